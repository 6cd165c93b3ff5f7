"""One iSCSI session (one path: one TCP connection to one portal, one LUN) through
libiscsi, for asyncio callers.

- **One context per thread.** Each :class:`Session` owns a thread of its own (a
  one-worker executor); its libiscsi context is created, used and destroyed only there.
- **Every call bounded.** ``iscsi_set_timeout`` makes libiscsi give up on a PDU after
  ``timeout`` (whole seconds, rounded up; libiscsi checks about once a second), and the
  asyncio side waits at most that plus :data:`TIMEOUT_GRACE`. Either way the session is
  then lost: :class:`IscsiTimeout`, and every later call raises :class:`SessionLost`.
- **No silent reconnects.** ``iscsi_set_noautoreconnect``: a failed connection is
  :class:`SessionLost`. tgt ties registrations to the session, so a reconnect would make
  the node a stranger to its own reservation; whoever opens a new session decides
  whether it may register again (the hold rule), never this layer.
- **Unit attentions.** A command answered with a UNIT ATTENTION did not run: it is sent
  again, at most :data:`UA_RETRIES` more times; the attentions seen are kept
  (:attr:`Session.attentions`, e.g. "reservations preempted") and passed to
  ``on_attention``.
- **Status.** RESERVATION CONFLICT raises :class:`ReservationConflict`; any other
  CHECK CONDITION :class:`CheckCondition` naming sense key, ASC and ASCQ.
- **The hold rule.** The PR OUT actions that give access — REGISTER, REGISTER AND IGNORE
  EXISTING KEY, RESERVE, PREEMPT — take a :class:`Permit` and are refused
  (:class:`NotPermitted`, nothing sent) unless it is valid right before the command is
  sent. RELEASE, CLEAR and unregistering give access up and need none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from vtlha.iscsi import libiscsi
from vtlha.iscsi.scsi import (
    Capabilities,
    CheckCondition,
    IscsiConnectError,
    IscsiError,
    IscsiTimeout,
    Keys,
    NotPermitted,
    PrIn,
    PrOut,
    Reservation,
    ReservationConflict,
    ScsiError,
    Sense,
    SenseKey,
    SessionLost,
    UnitAttentionsExhausted,
    parse_read_capacity16,
    parse_read_keys,
    parse_read_reservation,
    parse_report_capabilities,
)
from vtlha.protocol.hold import HoldGate

T = TypeVar("T")

DEFAULT_TIMEOUT = 2.0
TIMEOUT_GRACE = 1.5     # libiscsi scans for timed-out PDUs about once a second
UA_RETRIES = 3
PR_IN_LENGTH = 8 + 8 * 64


@dataclass(frozen=True)
class Permit:
    """Leave to register and reserve for ``group`` at ``epoch``, until ``valid_until``
    (CLOCK_MONOTONIC, ``time.monotonic``): built by the caller from a valid lease
    notice of its own node (DESIGN.md, "Roles on a node")."""

    group: str
    epoch: int
    valid_until: float

    @classmethod
    def from_gate(cls, gate: HoldGate, group: str, now: float) -> Permit | None:
        """The permit the hold rule gives now: for the group's noticed epoch until the
        notice's ``valid_until`` less the margin, exactly while the executor holds the
        group (``HoldGate.should_hold``); None otherwise (no notice, expired, revoked,
        below the release floor). ``Multipath``'s ``permit`` is this, read at each use."""
        epoch, until = gate.epoch(group), gate.valid_until(group)
        if not gate.should_hold(group, now) or epoch is None or until is None:
            return None
        return cls(group, epoch, until)

    def check(self, what: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now >= self.valid_until:
            raise NotPermitted(f"{what} refused: the permit for {self.group} at epoch "
                               f"{self.epoch} ran out {now - self.valid_until:.3f} s ago")


@dataclass(frozen=True)
class Target:
    """Where a path goes: ``portal`` "host:port", the target's IQN and the LUN."""

    portal: str
    iqn: str
    lun: int

    def __str__(self) -> str:
        return f"iscsi://{self.portal}/{self.iqn}/{self.lun}"


def initiator_name(cluster: str, node: str, role: str) -> str:
    """An initiator IQN per node and role (storage-monitor path, data service...)."""
    return f"iqn.2026-12.org.vtlha:{cluster}.{node}.{role}"


class Session:
    """One logged-in session to one LUN. Use :meth:`open`; always :meth:`close`."""

    def __init__(self, target: Target, initiator: str, timeout: float = DEFAULT_TIMEOUT,
                 on_attention: Callable[[Sense], None] | None = None) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.target = target
        self.initiator = initiator
        self.timeout = timeout
        self.on_attention = on_attention
        self.attentions: list[Sense] = []
        self.block_size = 0
        self.blocks = 0
        #: does the target take PREEMPT AND ABORT? None: not asked yet (reservation.take)
        self.abort_supported: bool | None = None
        self._lib = libiscsi.load()
        self._ctx: int | None = None
        self._lost: str | None = "not connected"
        self._pool: concurrent.futures.ThreadPoolExecutor | None = \
            concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"iscsi-{target.portal}-{target.lun}")

    # -- life cycle ----------------------------------------------------------------

    @classmethod
    async def open(cls, target: Target, initiator: str, timeout: float = DEFAULT_TIMEOUT,
                   on_attention: Callable[[Sense], None] | None = None) -> Session:
        s = cls(target, initiator, timeout, on_attention)
        try:
            await s._run("connect", s._connect)
            s._lost = None
            s.blocks, s.block_size = parse_read_capacity16(await s._execute(
                "READ CAPACITY(16)", lambda c: s._lib.iscsi_readcapacity16_sync(c, s.target.lun)))
        except BaseException:
            await s.close()
            raise
        return s

    @property
    def is_lost(self) -> bool:
        return self._lost is not None

    async def close(self) -> None:
        """Log out (bounded by the timeout) and destroy the context; idempotent. A
        thread still stuck in libiscsi is left to finish on its own."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        logout = self._lost is None   # a lost session is not asked to log out
        self._lost = self._lost or "closed"
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(pool, self._destroy, logout)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout + TIMEOUT_GRACE)
        except TimeoutError:
            pass
        finally:
            pool.shutdown(wait=False)

    def _connect(self) -> None:
        lib = self._lib
        ctx = lib.iscsi_create_context(self.initiator.encode())
        if not ctx:
            raise IscsiConnectError(f"{self.target}: iscsi_create_context failed")
        self._ctx = ctx
        # A random ISID: two sessions of one initiator name never reinstate each other.
        lib.iscsi_set_isid_random(ctx, secrets.randbits(24), 0)
        lib.iscsi_set_targetname(ctx, self.target.iqn.encode())
        lib.iscsi_set_session_type(ctx, libiscsi.SESSION_NORMAL)
        lib.iscsi_set_timeout(ctx, max(1, math.ceil(self.timeout)))
        lib.iscsi_set_noautoreconnect(ctx, 1)
        lib.iscsi_set_reconnect_max_retries(ctx, 0)
        lib.iscsi_set_tcp_user_timeout(ctx, int(self.timeout * 1000))
        lib.iscsi_set_tcp_syncnt(ctx, 2)
        if lib.iscsi_full_connect_sync(ctx, self.target.portal.encode(), self.target.lun):
            raise IscsiConnectError(f"{self.target}: {self._error()}")

    def _destroy(self, logout: bool = True) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        if logout and self._lib.iscsi_is_logged_in(ctx):
            self._lib.iscsi_logout_sync(ctx)
        self._lib.iscsi_destroy_context(ctx)

    def _error(self) -> str:
        if self._ctx is None:
            return "no context"
        msg = self._lib.iscsi_get_error(self._ctx)
        return msg.decode(errors="replace") if msg else "unknown error"

    # -- running calls on the session's thread -------------------------------------

    async def _run(self, op: str, fn: Callable[[], T]) -> T:
        if self._pool is None:
            raise SessionLost(f"{op} on {self.target}: session closed")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, fn)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout + TIMEOUT_GRACE)
        except TimeoutError:
            self._lost = f"{op} timed out"
            raise IscsiTimeout(f"{op} on {self.target}: no answer within "
                               f"{self.timeout + TIMEOUT_GRACE:.1f} s") from None

    def _command(self, op: str, issue: Callable[[int], Any]) -> tuple[int, Sense | None, bytes]:
        """On the session's thread: issue one command, return (status, sense, data in)
        and free the task. No task at all means the connection failed."""
        if self._ctx is None or self._lost is not None:
            raise SessionLost(f"{op} on {self.target}: {self._lost or 'no context'}")
        task = issue(self._ctx)
        if not task:
            self._lost = self._error()
            raise SessionLost(f"{op} on {self.target}: {self._lost}")
        try:
            t = task.contents
            status = t.status
            sense = None
            if status == libiscsi.STATUS_CHECK_CONDITION:
                sense = Sense(t.sense.key, (t.sense.ascq >> 8) & 0xFF, t.sense.ascq & 0xFF)
                self._check_sense(task, t.sense)
            size = t.datain.size
            data = ctypes.string_at(t.datain.data, size) if size > 0 and t.datain.data else b""
        finally:
            self._lib.scsi_free_scsi_task(task)
        if status in (libiscsi.STATUS_TIMEOUT, libiscsi.STATUS_ERROR,
                      libiscsi.STATUS_CANCELLED):
            self._lost = f"{op}: {self._error()}"
            if status == libiscsi.STATUS_TIMEOUT:
                raise IscsiTimeout(f"{op} on {self.target}: timed out")
            raise SessionLost(f"{op} on {self.target}: {self._lost}")
        return status, sense, data

    def _check_sense(self, task: Any, ours: libiscsi.ScsiSense) -> None:
        """The sense as libiscsi copies it out (``scsi_task_get_status``) must equal what
        we read through our declaration of ``struct scsi_task``."""
        copy = libiscsi.ScsiSense()
        self._lib.scsi_task_get_status(task, ctypes.byref(copy))
        if (copy.key, copy.ascq) != (ours.key, ours.ascq):
            raise IscsiError(f"struct scsi_task layout mismatch: sense read as "
                             f"{(ours.key, ours.ascq)}, libiscsi has {(copy.key, copy.ascq)}")

    async def _execute(self, op: str, issue: Callable[[int], Any]) -> bytes:
        """Run a command; retry it after a UNIT ATTENTION (it did not run); raise on any
        other status than GOOD; return the data in. A lost session fails at once (a
        call still stuck on the session's thread is not waited for)."""
        for _ in range(UA_RETRIES + 1):
            if self._lost is not None:
                raise SessionLost(f"{op} on {self.target}: {self._lost}")
            status, sense, data = await self._run(op, lambda: self._command(op, issue))
            if status == libiscsi.STATUS_GOOD:
                return data
            if status == libiscsi.STATUS_RESERVATION_CONFLICT:
                raise ReservationConflict(op, status, None, "RESERVATION CONFLICT")
            if sense is not None and sense.key == SenseKey.UNIT_ATTENTION:
                self.attentions.append(sense)
                if self.on_attention is not None:
                    self.on_attention(sense)
                continue
            if sense is not None:
                raise CheckCondition(op, status, sense)
            raise ScsiError(op, status, None)
        assert sense is not None
        raise UnitAttentionsExhausted(op, status, sense,
                                      f"a unit attention on each of {UA_RETRIES + 1} tries")

    # -- I/O -----------------------------------------------------------------------

    async def read(self, lba: int, blocks: int) -> bytes:
        """READ (16) of ``blocks`` blocks at ``lba``."""
        length = blocks * self.block_size
        lun, bs = self.target.lun, self.block_size
        data = await self._execute(
            "READ(16)", lambda c: self._lib.iscsi_read16_sync(c, lun, lba, length, bs,
                                                              0, 0, 0, 0, 0))
        if len(data) != length:
            raise IscsiError(f"READ(16) of {length} bytes at lba {lba} returned {len(data)}")
        return data

    async def write(self, lba: int, data: bytes, fua: bool = True) -> None:
        """WRITE (16) of whole blocks at ``lba``, with FUA by default (on the medium
        before the answer)."""
        if not data or len(data) % self.block_size:
            raise ValueError(f"{len(data)} bytes is not whole {self.block_size}-byte blocks")
        buf = ctypes.create_string_buffer(data, len(data))
        lun, bs = self.target.lun, self.block_size
        await self._execute(
            "WRITE(16)", lambda c: self._lib.iscsi_write16_sync(
                c, lun, lba, buf, len(data), bs, 0, 0, int(fua), 0, 0))

    async def test_unit_ready(self) -> None:
        lun = self.target.lun
        await self._execute("TEST UNIT READY",
                            lambda c: self._lib.iscsi_testunitready_sync(c, lun))

    # -- persistent reservations ---------------------------------------------------

    async def _pr_out(self, action: PrOut, key: int, sa_key: int = 0, type_: int = 0,
                      permit: Permit | None = None) -> None:
        op = f"PR OUT {action.name.replace('_', ' ')}"
        params = libiscsi.PrOutBasic(key, sa_key, 0, 0, 0)
        lun = self.target.lun

        def issue(c: int) -> Any:
            if permit is not None:   # checked on the session's thread, right before sending
                permit.check(op)
            return self._lib.iscsi_persistent_reserve_out_sync(c, lun, action, 0, type_,
                                                               ctypes.byref(params))

        await self._execute(op, issue)

    async def register(self, key: int, permit: Permit, old_key: int = 0) -> None:
        """REGISTER ``key`` (``old_key``: the key this session has registered, 0 for
        none)."""
        await self._pr_out(PrOut.REGISTER, old_key, key, permit=permit)

    async def register_ignore(self, key: int, permit: Permit) -> None:
        """REGISTER AND IGNORE EXISTING KEY: register ``key`` whatever this session had."""
        await self._pr_out(PrOut.REGISTER_AND_IGNORE_EXISTING_KEY, 0, key, permit=permit)

    async def unregister(self, key: int) -> None:
        """REGISTER with a service action key of zero: this session's registration goes
        (and the reservation, if this session held it)."""
        await self._pr_out(PrOut.REGISTER, key, 0)

    async def reserve(self, key: int, type_: int, permit: Permit) -> None:
        await self._pr_out(PrOut.RESERVE, key, type_=type_, permit=permit)

    async def release(self, key: int, type_: int) -> None:
        await self._pr_out(PrOut.RELEASE, key, type_=type_)

    async def preempt(self, key: int, victim: int, type_: int, permit: Permit) -> None:
        """PREEMPT: remove every registration of ``victim``; if ``victim`` held the
        reservation, this session holds it now (with ``type_``)."""
        await self._pr_out(PrOut.PREEMPT, key, victim, type_=type_, permit=permit)

    async def preempt_and_abort(self, key: int, victim: int, type_: int,
                                permit: Permit) -> None:
        """PREEMPT AND ABORT: as :meth:`preempt`, and the victim's commands still queued
        at the target are aborted. tgt refuses it (ILLEGAL REQUEST 24/00); arrays that
        implement it close the window of writes in flight (``docs/storage.md``)."""
        await self._pr_out(PrOut.PREEMPT_AND_ABORT, key, victim, type_=type_, permit=permit)

    async def clear(self, key: int) -> None:
        """CLEAR: every registration and the reservation go."""
        await self._pr_out(PrOut.CLEAR, key)

    async def pr_in(self, action: PrIn) -> bytes:
        """PERSISTENT RESERVE IN with ``action``: its parameter data as sent."""
        lun = self.target.lun
        return await self._execute(
            f"PR IN {action.name.replace('_', ' ')}",
            lambda c: self._lib.iscsi_persistent_reserve_in_sync(c, lun, action,
                                                                 PR_IN_LENGTH))

    async def read_keys(self) -> Keys:
        return parse_read_keys(await self.pr_in(PrIn.READ_KEYS))

    async def read_reservation(self) -> Reservation:
        return parse_read_reservation(await self.pr_in(PrIn.READ_RESERVATION))

    async def report_capabilities(self) -> Capabilities:
        return parse_report_capabilities(await self.pr_in(PrIn.REPORT_CAPABILITIES))
