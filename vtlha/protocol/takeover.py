"""The arbiter's moves, sans-I/O (DESIGN.md "Safety": claim -> release -> acquire).

``Mover`` is one move of one group: a **takeover** (claim, release, acquire), an
**assignment** (create the key, acquire) or a **resume** (acquire what the KV already
gives: an acquisition left half done, or a group a new active arbiter reconciles). It
takes what happens and the current monotonic time and returns what to do; it reads no
clock and does no I/O. ``vtlha_arbiter.mover`` carries it out for the policy's moves and
for operator requests alike; a simulator can drive it with a fake clock and network.

Inputs (methods): ``start``, ``on_claim`` (``Won`` / ``Lost`` / ``Unknown``),
``on_record`` (the group's record, from the watch or a read; in ``rereading`` only the
answer to its ``Read``: the watch's view may be the stale one the claim lost on),
``on_released`` and ``on_acquired`` (whether every executor acknowledged),
``on_storage`` (the new owner's storage-monitor: served / failed at our epoch),
``on_node_down``, ``on_not_acting`` (the arbiter lost the leader key or the activation
changed), ``tick`` (time).

Outputs: ``Claim`` (compare-and-set, or create when ``last`` is None; with the wait the
claim's record carries), ``Read`` (the key, afresh), ``Release``, ``Acquire`` (with its
wait: None leaves the lease holder's own gate, the full lease), ``Emit`` (an event, by
suffix: started, notify, completed, failed), and one terminal output: ``Done``,
``Failed`` or ``GivenUp``.

Rules, each load-bearing:

- A claim writes epoch + 1 against the revision last seen. A lost claim (or one whose
  answer never came: it may have committed) is followed by a read of the key. If the
  read shows our own claim, it is ours. If it shows the same owner at the same epoch,
  held, at a newer revision (renewals only: a lagging or stalled watch), the claim is
  retried against that revision, up to ``claim_tries`` in all; that renewal was seen
  now, so the acquire's wait counts from now. Anything else: given up (the policy
  decides again on what it sees).
- The acquire's wait is what may remain of the old owner's lease: ``lease_ttl +
  margin`` after the last renewal seen (``acquire_wait``). The claim's record carries
  it too, computed when the claim is written: the new owner's lease holder counts it
  from when it sees the claim (later than it was computed, so never shorter), which
  spares it the command's way to it; the acquire command's wait, counted from its
  receipt, bounds the gate as well (whichever opens it first). Once every executor of
  the old owner acknowledged the release, a second acquire to the lease holder opens
  the gate at once.
- The move keeps the group out of the policy's reach (``blocks_policy``) until the new
  owner's lease holder holds it at our epoch; the storage is awaited on the side.
- An arbiter that is no longer acting gives the move up at once, whatever its phase:
  before the claim nothing was written; after it, the next active arbiter reconciles
  the group (it finishes or re-drives whatever the KV shows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vtlha.messages import GroupRecord


def claim_epoch(seen_epoch: int) -> int:
    """A claim writes the next epoch; it is a compare-and-set against the revision the
    arbiter last saw, so a renewal it did not see makes it fail."""
    return seen_epoch + 1


def acquire_wait(*, released_all: bool, last_renewal_seen: float | None, now: float,
                 lease_ttl: float, margin: float) -> float:
    """How long (a duration, from ``now``) the new owner must still wait before it may
    serve: 0 when every executor of the old owner acknowledged the release; otherwise
    what may remain of the old owner's lease, bounded by ``lease_ttl + margin`` after the
    last renewal the arbiter saw (that renewal was sent before it was seen), or the whole
    ``lease_ttl + margin`` when it saw none (a new arbiter, or after a restart)."""
    if released_all:
        return 0.0
    bound = lease_ttl + margin
    if last_renewal_seen is None:
        return bound
    return max(0.0, last_renewal_seen + bound - now)


class Kind(StrEnum):
    TAKEOVER = "takeover"
    ASSIGN = "assign"
    RESUME = "resume"


class Phase(StrEnum):
    NEW = "new"
    CLAIMING = "claiming"  # a claim is out
    REREADING = "rereading"  # the claim lost (or its answer never came): reading the key
    MOVING = "moving"  # release and acquire commands out
    HOLDING = "holding"  # acquire acknowledged: waiting for the lease holder to hold it
    SERVING = "serving"  # held: waiting for the storage to be served
    DONE = "done"
    FAILED = "failed"
    GIVEN_UP = "given_up"


TERMINAL = frozenset({Phase.DONE, Phase.FAILED, Phase.GIVEN_UP})


@dataclass(frozen=True)
class Timings:
    lease_ttl: float
    margin: float
    acquire_deadline: float = 10.0  # an acquire not held by then has failed
    read_every: float = 0.1  # the key is read directly this often while waiting
    storage_bound: float = 0.0  # how long the storage may take to be served
    claim_tries: int = 4  # claims in all, against fresher revisions (renewals only)


@dataclass(frozen=True)
class Move:
    """What to move. ``epoch``/``revision``: what the decision saw (a takeover writes
    epoch + 1 against revision; an assignment creates epoch 1; a resume finishes
    ``epoch``). ``storage``: the group has devices (its storage must be served)."""

    kind: Kind
    group: str
    new: str
    old: str | None = None
    epoch: int = 0
    revision: int | None = None
    storage: bool = False


# ---- inputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Won:
    revision: int


@dataclass(frozen=True)
class Lost:
    """Compare-and-set conflict: the key is not at the revision written against."""


@dataclass(frozen=True)
class Unknown:
    """No answer in time: the claim may or may not have committed."""


ClaimResult = Won | Lost | Unknown


# ---- outputs -----------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    group: str
    owner: str
    epoch: int
    last: int | None  # None: create the key
    #: written into the record (``GroupRecord.wait``): what may remain of the old
    #: owner's lease when the claim is written (None: the whole lease)
    wait: float | None = None


@dataclass(frozen=True)
class Read:
    group: str


@dataclass(frozen=True)
class Release:
    node: str
    group: str
    epoch: int


@dataclass(frozen=True)
class Acquire:
    node: str
    group: str
    epoch: int
    wait: float | None  # None: the lease holder's own gate (the full lease)
    only: str | None = None  # one service only (the lease holder: open the gate)


@dataclass(frozen=True)
class Emit:
    what: str  # started, notify, completed, failed, not_served
    reason: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Done:
    reason: str
    released_by_ack: bool
    wait: float
    took: float


@dataclass(frozen=True)
class Failed:
    reason: str
    result: str  # acquire_failed, not_held, not_served, moved, owner_down


@dataclass(frozen=True)
class GivenUp:
    reason: str
    result: str  # claim_lost, owner_renewed, not_active


Output = Claim | Read | Release | Acquire | Emit | Done | Failed | GivenUp


class Mover:
    def __init__(self, move: Move, t: Timings, *, term: int,
                 last_renewal_seen: float | None = None, old_alive: bool = False) -> None:
        self.m = move
        self.t = t
        self.term = term
        self.last_renewal_seen = last_renewal_seen
        self.old_alive = old_alive
        self.phase = Phase.NEW
        self.epoch = move.epoch if move.kind is Kind.RESUME else (
            1 if move.kind is Kind.ASSIGN else claim_epoch(move.epoch))
        self.last = move.revision  # the revision the claim is written against
        self.tries = 0
        self.unknown = False  # the last claim's answer never came
        self.t0 = 0.0
        self.wait = 0.0  # the acquire's wait, from when the claim was won
        self.gate_at = 0.0  # when the gate opens at the latest (t of claim + wait)
        self.released: bool | None = None  # None: no answer yet
        self.acquired = False
        self.gate_opened = False
        self.seen_held = False  # the latest record shows the new owner holding our epoch
        self.deadline = 0.0
        self.next_read = 0.0

    # ---- state ---------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    @property
    def blocks_policy(self) -> bool:
        """The group is in flight: the policy leaves it alone until it is held."""
        return self.phase not in TERMINAL and self.phase is not Phase.SERVING

    def _end(self, out: Done | Failed | GivenUp) -> list[Output]:
        self.phase = (Phase.DONE if isinstance(out, Done) else
                      Phase.FAILED if isinstance(out, Failed) else Phase.GIVEN_UP)
        return [out]

    # ---- inputs ----------------------------------------------------------------------
    def start(self, now: float) -> list[Output]:
        self.t0 = now
        if self.m.kind is Kind.RESUME:
            # Whether the old owner released is unknown: the lease holder's own gate.
            return self._moving(now, wait=None)
        return self._claim(self.last if self.m.kind is Kind.TAKEOVER else None, now)

    def _claim(self, last: int | None, now: float) -> list[Output]:
        self.phase = Phase.CLAIMING
        self.tries += 1
        self.last = last
        return [Claim(self.m.group, self.m.new, self.epoch, last, self.claim_wait(now))]

    def claim_wait(self, now: float) -> float:
        """The wait a claim written at ``now`` carries: what may remain of the old
        owner's lease then (an assignment's: none, nobody held it)."""
        if self.m.kind is Kind.ASSIGN:
            return 0.0
        return acquire_wait(released_all=False, last_renewal_seen=self.last_renewal_seen,
                            now=now, lease_ttl=self.t.lease_ttl, margin=self.t.margin)

    def on_claim(self, result: ClaimResult, now: float) -> list[Output]:
        if self.phase is not Phase.CLAIMING:
            return []
        if isinstance(result, Won):
            return self._claimed(now)
        self.phase = Phase.REREADING
        self.unknown = isinstance(result, Unknown)
        return [Read(self.m.group)]

    def _claimed(self, now: float) -> list[Output]:
        m = self.m
        out: list[Output] = [Emit("started", "", {})]
        if m.kind is Kind.ASSIGN:
            return out + self._moving(now, wait=0.0)
        wait = acquire_wait(released_all=False, last_renewal_seen=self.last_renewal_seen,
                            now=now, lease_ttl=self.t.lease_ttl, margin=self.t.margin)
        assert m.old is not None
        out.append(Release(m.old, m.group, self.epoch))
        if self.old_alive:
            out.append(Emit("notify", "", {}))
        return out + self._moving(now, wait=wait)

    def _moving(self, now: float, wait: float | None) -> list[Output]:
        self.phase = Phase.MOVING
        self.wait = self.t.lease_ttl + self.t.margin if wait is None else wait
        self.gate_at = now + self.wait
        return [Acquire(self.m.new, self.m.group, self.epoch, wait)]

    def on_record(self, rec: GroupRecord | None, revision: int, now: float) -> list[Output]:
        """The group's record at ``revision`` (None: no key), however it was seen."""
        if self.phase is Phase.REREADING:
            return self._reread(rec, revision, now)
        if self.phase in (Phase.HOLDING, Phase.MOVING, Phase.SERVING) and rec is not None:
            if rec.epoch > self.epoch:
                return self._fail(f"{self.m.group} moved again (epoch {rec.epoch})", "moved")
            self.seen_held = self._is_held(rec)
            if self.phase is Phase.HOLDING and self.seen_held:
                return self._held(now)
        return []

    def _is_held(self, rec: GroupRecord) -> bool:
        return rec.owner == self.m.new and rec.epoch == self.epoch and rec.state == "held"

    def _reread(self, rec: GroupRecord | None, revision: int, now: float) -> list[Output]:
        m = self.m
        if rec is not None and rec.owner == m.new and rec.epoch == self.epoch \
                and rec.term == self.term:
            return self._claimed(now)  # our own claim: it committed
        if self.tries >= self.t.claim_tries:
            return self._give_up("claim_lost")
        if m.kind is Kind.ASSIGN:
            if rec is None:
                return self._claim(None, now)
            return self._give_up("claim_lost")
        unchanged = rec is not None and (rec.owner, rec.epoch) == (m.old, m.epoch) \
            and rec.state == "held"
        if unchanged and self.last is not None and revision > self.last:
            if rec is not None and rec.renewed_by == rec.owner:
                if not self.old_alive:
                    # decided dead, yet it renewed since: the decision was made on a
                    # view that missed it (policy.renews); the policy decides again on
                    # what the view shows now, this renewal included
                    return self._give_up("owner_renewed")
                self.last_renewal_seen = now  # that renewal was seen now
            return self._claim(revision, now)
        if unchanged and self.unknown and revision == self.last:
            return self._claim(revision, now)  # our write did not commit: once more
        return self._give_up("claim_lost")

    def _give_up(self, result: str) -> list[Output]:
        why = {"claim_lost": f"{self.m.group} changed since it was decided (claim lost)",
               "owner_renewed": f"{self.m.old} renewed its lease on {self.m.group} after "
                                "it was decided dead: it is alive (claim given up)",
               "not_active": "this arbiter is no longer active: the next active arbiter "
                             "reconciles the group"}[result]
        return self._end(GivenUp(why, result))

    def _fail(self, reason: str, result: str) -> list[Output]:
        return [Emit("failed", reason, {"result": result}), *self._end(Failed(reason, result))]

    def on_released(self, all_acked: bool, now: float) -> list[Output]:
        if self.released is not None or self.done:
            return []
        self.released = all_acked
        return self._open_gate(now)

    def _open_gate(self, now: float) -> list[Output]:
        """Every executor of the old owner released and the new owner's acquire is
        acknowledged: the lease holder may start at once."""
        if self.released and self.acquired and not self.gate_opened \
                and self.gate_at > now and self.phase in (Phase.HOLDING, Phase.MOVING):
            self.gate_opened = True
            return [Acquire(self.m.new, self.m.group, self.epoch, 0.0, only="heartbeat")]
        return []

    def on_acquired(self, all_acked: bool, now: float) -> list[Output]:
        if self.phase is not Phase.MOVING:
            return []
        if not all_acked:
            return self._fail(f"{self.m.new} did not acknowledge acquiring {self.m.group} "
                              f"(epoch {self.epoch}); will retry", "acquire_failed")
        self.acquired = True
        self.phase = Phase.HOLDING
        self.deadline = max(now, self.gate_at) + self.t.acquire_deadline
        self.next_read = now + self.t.read_every
        if self.seen_held:  # held already (a resume of a group its owner renews)
            return self._held(now)
        return self._open_gate(now)

    def _held(self, now: float) -> list[Output]:
        if not self.m.storage:
            return self._complete(now)
        self.phase = Phase.SERVING
        self.deadline = now + self.t.storage_bound
        return []

    def _complete(self, now: float) -> list[Output]:
        took = now - self.t0
        if self.m.kind is not Kind.TAKEOVER:
            how = "its lease holder holds it"
        elif self.released:
            how = "release acknowledged by every executor of the old owner"
        else:
            how = f"the old owner's lease ran out ({self.wait * 1000:.0f} ms to wait)"
        reason = (f"{self.m.new} now serves {self.m.group} (epoch {self.epoch})"
                  + (f", taken from {self.m.old}" if self.m.kind is Kind.TAKEOVER else "")
                  + f" in {took * 1000:.0f} ms; {how}")
        done = Done(reason, bool(self.released), self.wait, took)
        return [Emit("completed", reason, {"duration_s": round(took, 4),
                                           "released_by_ack": bool(self.released),
                                           "wait_s": round(self.wait, 4)}), *self._end(done)]

    def on_storage(self, state: str, reason: str | None, now: float) -> list[Output]:
        """The new owner's storage-monitor on the group at our epoch."""
        if self.phase is not Phase.SERVING:
            return []
        if state == "served":
            return self._complete(now)
        if state == "failed":
            return self._fail(f"{self.m.new} holds {self.m.group} (epoch {self.epoch}) but "
                              f"does not serve its storage: {reason or 'failed'}",
                              "not_served")
        return []

    def on_node_down(self, node: str, now: float) -> list[Output]:
        """``node`` declared down: waiting for it would keep the group out of the
        policy's reach; the policy decides again."""
        if node != self.m.new or self.phase not in (Phase.MOVING, Phase.HOLDING,
                                                    Phase.SERVING):
            return []
        if self.phase is Phase.SERVING:
            return self._fail(f"{node} holds {self.m.group} (epoch {self.epoch}) but went "
                              f"down before its storage was served", "not_served")
        return self._fail(f"{node} went down before it held {self.m.group} (epoch "
                          f"{self.epoch})", "owner_down")

    def on_not_acting(self, now: float) -> list[Output]:
        if self.done:
            return []
        return self._give_up("not_active")

    def tick(self, now: float) -> list[Output]:
        if self.phase is Phase.HOLDING:
            if now >= self.deadline:
                return self._fail(f"{self.m.new}'s lease holder did not take {self.m.group} "
                                  f"(epoch {self.epoch}) in time; will retry", "not_held")
            if now >= self.next_read:
                self.next_read = now + self.t.read_every
                return [Read(self.m.group)]  # the watch may lag: read the key too
        elif self.phase is Phase.SERVING and now >= self.deadline:
            return self._fail(f"{self.m.new} holds {self.m.group} (epoch {self.epoch}) but "
                              f"does not serve its storage: not reported served within "
                              f"{self.t.storage_bound:.1f} s (storage-monitor of "
                              f"{self.m.new} down?)", "not_served")
        return []
