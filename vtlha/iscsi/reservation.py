"""Taking and giving up a LUN's reservation through one session (one path), the way a
node's holder of a data group does it (``docs/storage.md``).

:func:`take` makes *this session* the holder of a Write Exclusive reservation with the
node's key at the group's epoch:

1. REGISTER AND IGNORE EXISTING KEY with the key (permit checked);
2. READ RESERVATION, then by :func:`vtlha.iscsi.scsi.preempt_target`: nothing reserved →
   RESERVE; an older key (the companion's, or this node's at an older epoch, or this
   node's key held through another path) → PREEMPT naming exactly that key (PREEMPT AND
   ABORT when the target has it, so that none of the old holder's queued writes lands
   after it; tgt has not); a key at this epoch or newer that is not ours →
   :class:`NewerHolder`, nothing taken;
3. a RESERVATION CONFLICT on step 2's command means the reservation changed since the
   read (another path of ours landed first, or someone else): read again and plan
   again, at most :data:`TAKE_ROUNDS` times.

Every step is safe to repeat, so a takeover retried on a second path after a slow reply
on the first ends with the reservation held by this key through this session, whatever
the first path's command did. With our key held through another session, step 2
PREEMPTs our own key: the reservation moves to this session (SPC: the issuer becomes
the holder; the other sessions' registrations of that key go).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vtlha.iscsi.scsi import (
    RESERVATION_TYPE,
    CheckCondition,
    IscsiError,
    Plan,
    Reservation,
    ReservationConflict,
    SenseKey,
    format_key,
    preempt_target,
)
from vtlha.iscsi.session import Permit, Session

TAKE_ROUNDS = 3


class NewerHolder(IscsiError):
    """The reservation is held by a key at the same or a newer epoch that is not ours:
    a newer takeover happened; nothing was preempted."""

    def __init__(self, mine: int, held: int) -> None:
        super().__init__(f"reservation held by {format_key(held)}, not older than ours "
                         f"({format_key(mine)}): not preempted")
        self.mine = mine
        self.held = held


class Taken(enum.Enum):
    RESERVED = "reserved"          # it was free
    PREEMPTED = "preempted"        # an older key held it
    MOVED = "moved"                # our key held it through another session


@dataclass(frozen=True)
class TakeResult:
    how: Taken
    previous: int | None           # the key that held it before (None: free)
    rounds: int
    aborted: bool = False          # by PREEMPT AND ABORT: the victim's queued commands too


async def _preempt(session: Session, key: int, victim: int, permit: Permit) -> bool:
    """PREEMPT AND ABORT where the target has it (the victim's commands still queued at
    the target are aborted: no write of the old owner lands after this), else PREEMPT;
    True when aborted. A target that refuses it (ILLEGAL REQUEST, as tgt) is not asked
    again on this session (``session.abort_supported``)."""
    if session.abort_supported is not False:
        try:
            await session.preempt_and_abort(key, victim, RESERVATION_TYPE, permit)
        except CheckCondition as exc:
            if exc.sense is None or exc.sense.key != SenseKey.ILLEGAL_REQUEST:
                raise
            session.abort_supported = False
        else:
            session.abort_supported = True
            return True
    await session.preempt(key, victim, RESERVATION_TYPE, permit)
    return False


async def take(session: Session, key: int, permit: Permit) -> TakeResult:
    """Make this session the holder with ``key`` (module docstring)."""
    await session.register_ignore(key, permit)
    for rounds in range(1, TAKE_ROUNDS + 1):
        held = (await session.read_reservation()).key
        plan = preempt_target(key, held)
        try:
            if plan is Plan.RESERVE:
                await session.reserve(key, RESERVATION_TYPE, permit)
                return TakeResult(Taken.RESERVED, None, rounds)
            if plan is Plan.NEWER:
                assert held is not None
                raise NewerHolder(key, held)
            # PREEMPT of an older key, or of our own (held through this session or
            # another: the reservation ends up on this one either way).
            assert held is not None
            aborted = await _preempt(session, key, held, permit)
            how = Taken.MOVED if plan is Plan.HELD else Taken.PREEMPTED
            return TakeResult(how, held, rounds, aborted)
        except ReservationConflict:
            if rounds == TAKE_ROUNDS:
                raise
            # Changed since the read (or our registration went): register and re-plan.
            await session.register_ignore(key, permit)
    raise AssertionError("unreachable")


async def give_up(session: Session, key: int) -> Reservation:
    """RELEASE (when this key holds the reservation) and unregister this session; the
    reservation as it is afterwards. A registration already preempted is given up."""
    held = (await session.read_reservation()).key
    try:
        if held == key:
            await session.release(key, RESERVATION_TYPE)
        await session.unregister(key)
    except ReservationConflict:
        pass  # not registered (any more): nothing of ours is left to give up
    return await session.read_reservation()
