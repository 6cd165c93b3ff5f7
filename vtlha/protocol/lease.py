"""The node's lease holder, sans-I/O (DESIGN.md "Safety").

The heartbeat service runs one ``LeaseHolder`` per node. It takes what happens (a KV
record seen, a renewal's result, a promise asked for or answered, an arbiter's acquire
command, the clock) and returns effects for the service to carry out (a renewal to
send, a lease notice to publish, a promise to ask for, a probe write). It never reads a
clock and does no I/O, so every rule is table-tested and a simulator can drive it.

Rules, each load-bearing:

- **Renew** every group the node owns by compare-and-set on its key; a success makes the
  lease valid until ``sent_at + lease_ttl`` — counted from when the renewal was *sent*,
  never from when the answer arrived — and a lease notice says so to the executors.
- A renewal that fails on a **CAS conflict** means the group was taken only if the key's
  epoch (or owner) changed: then drop it at once and ask for nothing. If the key still
  shows this node and this epoch, our own timed-out write committed: adopt its revision
  and go on, extending nothing (validity comes only from a renewal that succeeded).
- A renewal that fails because the **KV is unavailable** (timeout, no responders) asks
  the companion's lease holder for a **promise**; a grant of D extends the lease to
  ``request_sent_at + D``. Neither a renewal nor a promise: the lease runs out on its own.
- **Granting a promise**: only to the companion, only while this node itself cannot
  reach the KV (its last write failed as unavailable; a companion that can reach it
  refuses: the owner is the one cut off), never for a group this node holds or is
  acquiring, never for longer than ``lease_ttl``, never within ``lease_ttl`` of this
  lease holder's start (its executors may still hold groups on its predecessor's
  notices; found by the simulator); the promised groups cannot be acquired here before
  the promise has run out.
- **Acquire gate**: a group the arbiter gave this node (its key shows this node, state
  ``acquiring``) is served (its first notice) only after a successful renewal, and no
  sooner than the gate: ``lease_ttl + margin`` after the claim was seen here, or earlier
  by the arbiter's ``wait`` — the one its claim record carries, counted from when the
  claim is seen here, and the one its acquire command carries, counted from its receipt (0
  once every executor of the old owner acknowledged the release): each is counted from a
  moment later than the arbiter computed it; and never while a promise given for it runs,
  nor within ``lease_ttl`` of this lease holder's start (a restarted lease holder may have
  forgotten a promise). The first renewal is sent up to ``first_renewal_lead`` before the
  gate, so that its write is not on the way to serving: a renewal is a write, not a notice
  — it serves nothing, and the notice it makes at the gate counts its validity from the
  renewal's send time (shorter, never longer). A renewal that is more than one renewal
  interval old at the gate is not used: another is sent.
- Promise and acquire go through this one state machine, one event at a time.
- **Monotonic reads**: a group's record at a revision older than one already applied
  (a watch replaying, a lagging follower answering a read, a direct read racing the
  watch) is ignored; so is a record read after a conflict that is older than what was
  applied. Otherwise an older record (another owner, a lower epoch) applied after the
  newer one drops a group this node was really given (issue 14, trace 2).
- Notices are issued only for a group this node owns in the KV at that epoch and whose
  acquire gate has opened: only a successful renewal (or a promise for a held group)
  makes one; executors hold exactly while one is valid (level-triggered).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from vtlha.messages import GroupRecord

#: a promise refused (or unanswered) while the KV is unavailable is asked again after
#: this many renewal intervals, not at the next failed renewal
REASK_AFTER = 0.25
#: an acquire command whose claim this node has not seen is kept this many times
#: ``lease_ttl + margin`` past its wait (a claim seen later still gets it: the watch may
#: lag by seconds while a server is cut off), then forgotten
EARLY_ACQUIRE_KEPT = 10


class KvResult(StrEnum):
    OK = "ok"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"


class Phase(StrEnum):
    ACQUIRING = "acquiring"
    HOLDING = "holding"


# ---- effects -------------------------------------------------------------------


@dataclass(frozen=True)
class Renew:
    """Compare-and-set ``record`` on the group's key against ``last``."""

    group: str
    record: GroupRecord
    last: int
    sent_at: float


@dataclass(frozen=True)
class Notice:
    group: str
    epoch: int
    valid_until: float  # this host's monotonic clock; 0 with revoked
    revoked: bool = False
    reason: str = ""
    #: when what it says was decided (the renewal or promise request sent; the drop):
    #: a revoke is final only for notices of its epoch decided before it
    since: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class AskPromise:
    companion: str
    groups: tuple[str, ...]
    duration: float
    sent_at: float


@dataclass(frozen=True)
class Probe:
    """A write that tells whether this node reaches the KV (it holds nothing to renew)."""

    sent_at: float


@dataclass(frozen=True)
class Note:
    """Something worth an event/log line: kind and a sentence."""

    kind: str
    group: str
    message: str


Effect = Renew | Notice | AskPromise | Probe | Note


@dataclass(frozen=True)
class PromiseAnswer:
    granted: bool
    duration: float
    reason: str
    #: the groups the grant covers; None: every group asked for
    groups: tuple[str, ...] | None = None


# ---- state -----------------------------------------------------------------------


@dataclass
class GroupLease:
    group: str
    epoch: int
    revision: int
    record: GroupRecord
    phase: Phase
    valid_until: float = 0.0
    gate_at: float = 0.0  # acquiring: earliest first notice (before the other bounds)
    in_flight: bool = False
    last_sent: float | None = None
    #: acquiring: the send time of a renewal that committed before the gate opened (the
    #: first notice is made from it at the gate)
    renewed_at: float | None = None


@dataclass
class LeaseHolder:
    node: str
    companion: str
    lease_ttl: float
    margin: float
    interval: float  # renewal cadence
    started_at: float
    groups: dict[str, GroupLease] = field(default_factory=dict)
    promises_given: dict[str, float] = field(default_factory=dict)  # group -> until
    kv_reachable: bool | None = None  # from the last write (renewal or probe)
    promise_in_flight: bool = False
    #: when to ask again after a refusal or no answer while the KV is still unavailable
    #: (the companion's own last write may just have succeeded: it learns otherwise
    #: within one renewal, and waiting for our next failed renewal let a lease lapse)
    reask_at: float | None = None
    probe_in_flight: bool = False
    last_probe: float | None = None
    #: group -> the newest revision of its key applied (monotonic reads)
    applied: dict[str, int] = field(default_factory=dict)
    #: how many times the bucket was found recreated (``on_new_bucket``)
    generation: int = 0
    #: group -> (epoch, earliest first renewal) of an arbiter's acquire command that
    #: came before this node saw the claim it is for (``on_acquire_command``)
    early_acquires: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: how long before an acquiring group's gate its first renewal is sent (None: the
    #: margin — a renewal's write takes milliseconds; the margin is tens of them)
    first_renewal_lead: float | None = None

    # ---- predicates ------------------------------------------------------------
    def is_valid(self, group: str, now: float) -> bool:
        g = self.groups.get(group)
        return g is not None and g.phase is Phase.HOLDING and now < g.valid_until

    def gate(self, g: GroupLease) -> float:
        """When an acquiring group may be served (its first notice) at the earliest."""
        return max(g.gate_at, self.started_at + self.lease_ttl, self.promised_until(g.group))

    def lead(self) -> float:
        """How long before the gate an acquiring group's first renewal is sent."""
        return self.margin if self.first_renewal_lead is None else self.first_renewal_lead

    def first_renewal_at(self, g: GroupLease, now: float) -> float:
        """When an acquiring group's first renewal is sent: ``lead()`` before its gate —
        but not while a promise given for it runs (a lapsed lease promised: as before,
        the gate first, so that no renewal sent during the promise serves it)."""
        gate = self.gate(g)
        return gate if self.promised_until(g.group) > now else gate - self.lead()

    def next_due(self, now: float) -> float | None:
        """The earliest time an acquiring group has something to do (its first renewal,
        or its first notice once that renewal committed): when to tick next so that a
        gate opens on time, not at the next regular tick."""
        due = [self.gate(g) if g.renewed_at is not None else self.first_renewal_at(g, now)
               for g in self.groups.values()
               if g.phase is Phase.ACQUIRING and not g.in_flight]
        return min(due, default=None)

    def promised_until(self, group: str) -> float:
        """Until when this node promised its companion not to serve ``group`` (0: no
        promise runs)."""
        return self.promises_given.get(group, 0.0)

    def quiet(self, now: float) -> bool:
        """Nothing in flight (renewal, promise, probe) and every held lease renewed less
        than half a renewal interval ago: the moment to move the NATS connection (a move
        loses the replies in flight; this one has a whole lease before the next renewal
        is due). Acquiring groups are not waited for (their first renewal waits on a gate)."""
        if self.promise_in_flight or self.probe_in_flight:
            return False
        for g in self.groups.values():
            if g.in_flight:
                return False
            if g.phase is Phase.HOLDING and (g.last_sent is None
                                             or now - g.last_sent > self.interval / 2):
                return False
        return True

    def abandon_in_flight(self) -> list[str]:
        """The connection the renewals went out on was lost: their replies will not come.
        Each group in flight renews at the next tick; a late answer to the abandoned one
        is ignored (it no longer matches ``last_sent``): safe, as validity only ever
        counts from the send time of a renewal whose success was seen. If the abandoned
        one committed, the next one conflicts with it, adopts it and renews again."""
        out = []
        for g in self.groups.values():
            if g.in_flight:
                g.in_flight, g.last_sent = False, None
                out.append(g.group)
        return sorted(out)

    # ---- inputs ------------------------------------------------------------------
    def on_record(self, group: str, rec: GroupRecord | None, revision: int,
                  now: float, generation: int | None = None) -> list[Effect]:
        """A group's KV record as the watch (or a read) delivered it. ``generation``:
        the bucket generation (``self.generation``) when the read was sent or the watch
        made; an answer from before ``on_new_bucket`` is the old bucket's and ignored (it
        would otherwise set ``applied`` above every revision of the new bucket)."""
        if generation is not None and generation != self.generation:
            return []
        if revision < self.applied.get(group, 0):
            return []  # older than one applied: a replay or a stale read
        self.applied[group] = revision
        early = self.early_acquires.get(group)
        if early is not None and rec is not None and rec.epoch >= early[0]:
            del self.early_acquires[group]  # its claim is seen now (used below) or passed
        g = self.groups.get(group)
        if rec is None or rec.owner != self.node:
            if g is None:
                return []
            return self._drop(group, now, f"{group} is now owned by "
                              f"{rec.owner if rec else 'nobody'} (epoch "
                              f"{rec.epoch if rec else '-'})")
        if g is not None and rec.epoch == g.epoch:
            if revision > g.revision:
                g.revision, g.record = revision, rec
            return []
        if g is not None and rec.epoch < g.epoch:
            return []  # a stale delivery
        if rec.state == "acquiring":
            gate_at = now + self.lease_ttl + self.margin
            if rec.wait is not None:  # the arbiter's bound, counted from now: later than
                gate_at = min(gate_at, now + rec.wait)  # it was computed, never shorter
            if early is not None and early[0] == rec.epoch and rec.owner == self.node:
                gate_at = min(gate_at, early[1])  # the command came first: as if after
            self.groups[group] = GroupLease(group, rec.epoch, revision, rec, Phase.ACQUIRING,
                                            gate_at=gate_at)
            return [Note("lease.acquiring", group, f"{self.node} was given {group} (epoch "
                         f"{rec.epoch}); it serves it once the old owner is released or its "
                         f"lease has run out")]
        # Held by this node already (e.g. this lease holder restarted): carry on renewing;
        # the first successful compare-and-set proves nobody took it meanwhile. But not
        # while a promise given for it runs, nor within lease_ttl of this lease holder's
        # start (it may have given one and forgotten it): until then it waits as if it
        # were acquiring (the simulator found the overlap this prevents).
        lease = GroupLease(group, rec.epoch, revision, rec, Phase.HOLDING)
        if now < max(self.started_at + self.lease_ttl, self.promises_given.get(group, 0.0)):
            lease.phase, lease.gate_at = Phase.ACQUIRING, now
        self.groups[group] = lease
        return []

    def on_acquire_command(self, group: str, epoch: int, wait: float,
                           now: float) -> list[Effect]:
        """The arbiter: serve ``group`` at ``epoch`` no sooner than ``wait`` from now.

        A command for a claim this node has not seen yet (its KV watch lags, and the
        read of the key the service then makes failed) is kept and applied when the
        claim arrives, as if it had come after it: the arbiter sends it only once its
        claim committed, and ``now + wait`` is when the old owner's lease is over
        whenever the claim is seen. Dropped, it left the new owner waiting the whole
        ``lease_ttl + margin`` from the claim's arrival instead."""
        g = self.groups.get(group)
        if g is None or g.epoch < epoch:
            early = self.early_acquires.get(group)
            if early is None or early[0] < epoch or (early[0] == epoch and now + wait < early[1]):
                self.early_acquires[group] = (epoch, now + wait)
            return []
        if g.epoch != epoch or g.phase is not Phase.ACQUIRING:
            return []
        g.gate_at = min(g.gate_at, now + wait)
        return []

    def tick(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        for g in self.groups.values():
            if g.in_flight:
                continue
            if g.phase is Phase.ACQUIRING:
                out += self._acquiring(g, now)
            elif g.last_sent is None or now - g.last_sent >= self.interval:
                out.append(self._renew(g, now))
        if self.reask_at is not None and now >= self.reask_at:
            self.reask_at = None
            if self.kv_reachable is False:
                out += self._ask_promise(now)
        for grp, until in list(self.promises_given.items()):
            if until <= now:
                del self.promises_given[grp]
        for grp, (_, at) in list(self.early_acquires.items()):
            if now - at > EARLY_ACQUIRE_KEPT * (self.lease_ttl + self.margin):
                del self.early_acquires[grp]  # its claim never came: it was not for us
        if not self.groups and not self.probe_in_flight and (
                self.last_probe is None or now - self.last_probe >= self.interval):
            self.probe_in_flight, self.last_probe = True, now
            out.append(Probe(now))
        return out

    def _acquiring(self, g: GroupLease, now: float) -> list[Effect]:
        """An acquiring group's tick: its first renewal once due; its first notice at the
        gate once that renewal committed."""
        if g.renewed_at is not None:
            return self._open(g, now) if now >= self.gate(g) else []
        return [self._renew(g, now)] if now >= self.first_renewal_at(g, now) else []

    def _open(self, g: GroupLease, now: float) -> list[Effect]:
        """The gate of an acquiring group whose first renewal committed ahead of it: serve
        from that renewal, or renew again when it is older than one renewal interval."""
        sent_at, g.renewed_at = g.renewed_at, None
        assert sent_at is not None
        if now - sent_at > self.interval:
            return [self._renew(g, now)]
        return self._hold(g, sent_at)

    def _hold(self, g: GroupLease, sent_at: float) -> list[Effect]:
        """A renewal sent at ``sent_at`` succeeded and the group may be served."""
        first = g.phase is Phase.ACQUIRING
        g.phase = Phase.HOLDING
        g.record = self._held_record(g)
        g.valid_until = max(g.valid_until, sent_at + self.lease_ttl)
        out: list[Effect] = [Notice(g.group, g.epoch, g.valid_until, since=sent_at)]
        if first:
            out.append(Note("lease.acquired", g.group, f"{self.node} serves {g.group} "
                            f"(epoch {g.epoch})"))
        return out

    def _renew(self, g: GroupLease, now: float) -> Renew:
        g.in_flight, g.last_sent = True, now
        return Renew(g.group, self._held_record(g), g.revision, now)

    def _held_record(self, g: GroupLease) -> GroupRecord:
        """The group's record as this node's renewal writes it: held, renewed by this
        node, the claim's wait dropped (the rest — term, epoch, since, move — kept)."""
        return g.record.model_copy(update={"state": "held", "renewed_by": self.node,
                                           "wait": None})

    def on_renew_result(self, group: str, sent_at: float, result: KvResult,
                        revision: int | None = None, current: GroupRecord | None = None,
                        current_revision: int | None = None, now: float = 0.0) -> list[Effect]:
        """The answer to a Renew. For CONFLICT, ``current`` is the key as read after it
        (None when it is gone)."""
        g = self.groups.get(group)
        if g is None or not g.in_flight or g.last_sent != sent_at:
            return []  # the answer to a renewal of a lease dropped or replaced since
        g.in_flight = False
        if result is KvResult.OK:
            assert revision is not None
            self.kv_reachable = True
            g.revision = max(g.revision, revision)
            self.applied[group] = max(self.applied.get(group, 0), revision)
            promised = self.promised_until(group)
            if now < promised:
                # A lapsed lease promised to the companion meanwhile: the write proves
                # the record, but this node serves nothing of the group before the
                # promise has run out; it starts again as if acquiring.
                g.phase, g.gate_at = Phase.ACQUIRING, promised
                return []
            if g.phase is Phase.ACQUIRING and now < self.gate(g):
                g.renewed_at = sent_at  # committed ahead of the gate: served at the gate
                return []
            return self._hold(g, sent_at)
        if result is KvResult.CONFLICT:
            self.kv_reachable = True
            if current_revision is not None and current_revision < self.applied.get(group, 0):
                return []  # a stale read (a follower behind): adopt nothing, drop nothing
            if current_revision is not None:
                self.applied[group] = current_revision
            if (current is not None and current.owner == self.node
                    and current.epoch == g.epoch and current_revision is not None):
                # Our own timed-out renewal committed: adopt it, extend nothing — and
                # renew again at the next tick instead of an interval later (the lease
                # runs on meanwhile: chaos iteration 77 lost 0.3 s of it this way).
                g.revision = max(g.revision, current_revision)
                g.record = current
                g.last_sent = None
                return []
            if current is not None and current.epoch < g.epoch:
                return []  # a stale read (a follower behind): adopt nothing, drop nothing
            return self._drop(group, now, f"{group} was taken: its key now shows "
                              f"{current.owner if current else 'nothing'} (epoch "
                              f"{current.epoch if current else '-'}), this node had epoch "
                              f"{g.epoch}")
        self.kv_reachable = False
        return self._ask_promise(now)

    def _ask_promise(self, now: float) -> list[Effect]:
        holding = tuple(sorted(g.group for g in self.groups.values()
                               if g.phase is Phase.HOLDING))
        if not holding or self.promise_in_flight:
            return []
        self.promise_in_flight = True
        return [AskPromise(self.companion, holding, self.lease_ttl, now)]

    def on_promise_reply(self, sent_at: float, answer: PromiseAnswer | None,
                         groups: tuple[str, ...]) -> list[Effect]:
        """The companion's answer (None: no answer in time)."""
        self.promise_in_flight = False
        if answer is None or not answer.granted:
            if self.kv_reachable is False:
                self.reask_at = sent_at + REASK_AFTER * self.interval
            return []
        until = sent_at + min(answer.duration, self.lease_ttl)
        out: list[Effect] = []
        for grp in groups if answer.groups is None else set(groups) & set(answer.groups):
            g = self.groups.get(grp)
            if g is None or g.phase is not Phase.HOLDING:
                continue
            if self.promised_until(grp) > sent_at:
                continue  # this node promised not to serve it (a lapsed lease promised)
            if until > g.valid_until:
                g.valid_until = until
                out.append(Notice(grp, g.epoch, until, reason="failsafe promise",
                                  since=sent_at))
        return out

    def on_promise_request(self, requester: str, groups: list[str], duration: float,
                           now: float, partial: bool = False) -> PromiseAnswer:
        """Grant or refuse a promise. With ``partial`` (the requester accepts a grant of
        some of its groups) the groups this node holds or is acquiring are left out and
        the rest granted: a node cut off from the KV that still lists a group its
        companion took from it (it never heard of the claim) must not make the companion
        self-fence the companion's own groups during a KV outage."""
        if requester != self.companion:
            return PromiseAnswer(False, 0.0, f"{requester} is not {self.node}'s companion")
        if now < self.started_at + self.lease_ttl:
            # Its executors may still hold groups on its predecessor's notices (valid for
            # up to lease_ttl), which this lease holder cannot know of: found by the
            # simulator (docs/safety.md, "The simulator"), a promise then made two holders.
            return PromiseAnswer(False, 0.0, f"{self.node}'s lease holder started less than "
                                 "lease_ttl ago: its executors may still hold groups")
        if self.kv_reachable is not False:
            return PromiseAnswer(False, 0.0, f"{self.node} reaches the KV: {requester} is the "
                                 "one cut off" if self.kv_reachable else
                                 f"{self.node} does not know yet whether it reaches the KV")
        # A group this node lists but whose lease has run out (a HOLDING lease that no
        # renewal extended: this node was cut off, it never saw its companion's claim)
        # is not served here: it may be promised like one not listed, and a renewal that
        # succeeds while the promise runs extends nothing (``on_renew_result``).
        mine = [g for g in groups if g in self.groups and not self._lapsed(g, now)]
        rest = [g for g in groups if g not in mine]
        if mine and not (partial and rest):
            return PromiseAnswer(False, 0.0, f"{self.node} holds or is acquiring "
                                 f"{', '.join(sorted(mine))}")
        d = min(duration, self.lease_ttl)
        for g in rest:
            self.promises_given[g] = max(self.promises_given.get(g, 0.0), now + d)
        but = f" (not {', '.join(sorted(mine))}: it holds or is acquiring them)" if mine else ""
        return PromiseAnswer(True, d, f"{self.node} will not serve {', '.join(rest)} "
                             f"for {d:.3f} s{but}", tuple(rest) if partial else None)

    def _lapsed(self, group: str, now: float) -> bool:
        """This node lists ``group`` as held but its lease ran out: its executors hold
        nothing of it (``valid_until`` is what they were told)."""
        g = self.groups.get(group)
        return g is not None and g.phase is Phase.HOLDING and g.valid_until <= now

    def on_new_bucket(self) -> list[Effect]:
        """The KV bucket was recreated: its revisions and epochs start again. Forget
        what was applied and every lease of the old bucket (no renewal of the old one
        can be proved any more; what was valid runs out on its own), and take the new
        bucket's records as they come."""
        self.applied.clear()
        self.early_acquires.clear()  # the old bucket's epochs
        self.generation += 1
        out: list[Effect] = []
        for group in sorted(self.groups):
            del self.groups[group]
            out.append(Note("lease.dropped", group, f"{self.node} forgets {group}: the KV "
                            "bucket was recreated"))
        return out

    def on_probe_result(self, result: KvResult) -> None:
        self.probe_in_flight = False
        self.kv_reachable = result is not KvResult.UNAVAILABLE

    def _drop(self, group: str, now: float, why: str) -> list[Effect]:
        g = self.groups.pop(group)
        return [Notice(group, g.epoch, 0.0, revoked=True, reason=why, since=now),
                Note("lease.dropped", group, f"{self.node} drops {group}: {why}")]
