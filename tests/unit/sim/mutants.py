"""Mutants of the shipped classes, each dropping one rule (DESIGN.md "Safety", issue 14);
the simulator must catch every one (``tests/unit/test_sim.py``). Subclasses or
replacement functions only: the shipped code is never edited."""

from __future__ import annotations

from dataclasses import dataclass, field

from vtlha.messages import GroupRecord
from vtlha.protocol import takeover as tk
from vtlha.protocol.hold import HoldGate, Why
from vtlha.protocol.lease import Effect, GroupLease, KvResult, LeaseHolder, PromiseAnswer

# ---- the four of DESIGN.md's safety section (plus two more rules of the promises) ------


class AcquireAtOnceMover(tk.Mover):
    """The arbiter's wait dropped: the new owner may serve right after the claim."""

    def _moving(self, now: float, wait: float | None) -> list[tk.Output]:
        return super()._moving(now, None if wait is None else 0.0)


class ClaimWaitDropped(tk.Mover):
    """The wait the claim's record carries dropped: the new owner may serve as soon as it
    sees the claim (the acquire command still carries the right one)."""

    def claim_wait(self, now: float) -> float:
        return 0.0


class ClaimNotReread(tk.Mover):
    """Before issue 14: a lost (or unanswered) automatic claim is not re-read: the
    policy decides again on what its view shows."""

    def on_claim(self, result: tk.ClaimResult, now: float) -> list[tk.Output]:
        if self.phase is tk.Phase.CLAIMING and not isinstance(result, tk.Won):
            return self._give_up("claim_lost")
        return super().on_claim(result, now)


class AcquireAtOnce(LeaseHolder):
    """The lease holder's own gate dropped: serves right after the claim is seen."""

    def gate(self, g: GroupLease) -> float:
        return max(self.started_at + self.lease_ttl, self.promises_given.get(g.group, 0.0))


class PromiseWhileHolding(LeaseHolder):
    """Drops "never promise for a group held or being acquired": promises it, and keeps
    serving it (a holder that honoured its own promise would stop serving, which the
    lapsed-lease rule made a second guard)."""

    def on_promise_request(self, requester: str, groups: list[str], duration: float,
                           now: float, partial: bool = False) -> PromiseAnswer:
        mine, self.groups = self.groups, {}
        given = dict(self.promises_given)
        try:
            return super().on_promise_request(requester, groups, duration, now)
        finally:
            self.groups = mine
            for g in mine:  # not honoured for the groups it serves
                if g in given:
                    self.promises_given[g] = given[g]
                else:
                    self.promises_given.pop(g, None)


class LeaseFromReply(LeaseHolder):
    """Counts a renewal's lease from when its answer arrived, not when it was sent."""

    def on_renew_result(self, group: str, sent_at: float, result: KvResult,
                        revision: int | None = None, current: GroupRecord | None = None,
                        current_revision: int | None = None,
                        now: float = 0.0) -> list[Effect]:
        g = self.groups.get(group)
        if result is KvResult.OK and g is not None and g.in_flight and g.last_sent == sent_at:
            g.last_sent = sent_at = now
        return super().on_renew_result(group, sent_at, result, revision, current,
                                       current_revision, now)


class PromiseNotHonoured(LeaseHolder):
    """Drops "nothing is served while a promise given for it runs" (the acquire gate's
    wait, and a renewal's extension while the promise runs)."""

    def promised_until(self, group: str) -> float:
        return 0.0


class PromiseTooLong(LeaseHolder):
    """Drops "a promise never lasts longer than lease_ttl" on the asking side: takes
    three times what was granted."""

    def on_promise_reply(self, sent_at: float, answer: PromiseAnswer | None,
                         groups: tuple[str, ...]) -> list[Effect]:
        if answer is None or not answer.granted:
            return super().on_promise_reply(sent_at, answer, groups)
        ttl, self.lease_ttl = self.lease_ttl, 3 * self.lease_ttl
        try:
            return super().on_promise_reply(
                sent_at, PromiseAnswer(True, 3 * answer.duration, answer.reason), groups)
        finally:
            self.lease_ttl = ttl


# ---- issue 14's stranding bugs, put back -------------------------------------------------


class AppliesOlderRecords(LeaseHolder):
    """Before monotonic reads: a record older than one applied is applied all the same
    (issue 14, trace 2)."""

    def on_record(self, group: str, rec: GroupRecord | None, revision: int,
                  now: float, generation: int | None = None) -> list[Effect]:
        self.applied.pop(group, None)
        return super().on_record(group, rec, revision, now, generation)


class RevokeFinalForItsEpoch(HoldGate):
    """Before ``LeaseNotice.since``: a revoke is final for its epoch, whatever was decided
    after it (issue 14, trace 2, with ``AppliesOlderRecords``)."""

    def on_notice(self, group: str, epoch: int, valid_until: float, revoked: bool,
                  since: float = 0.0) -> None:
        super().on_notice(group, epoch, valid_until, revoked, 0.0)


@dataclass
class EdgeTriggeredGate(HoldGate):
    """Before level-triggered executors: hold only at the epoch of the latest acquire
    command (issue 14, traces 1 and 3)."""

    desired: dict[str, int] = field(default_factory=dict)

    def on_acquire(self, group: str, epoch: int) -> None:
        self.desired[group] = epoch

    def on_release(self, group: str, epoch: int | None = None) -> None:
        super().on_release(group, epoch)
        self.desired.pop(group, None)

    def verdict(self, group: str, now: float) -> Why:
        if self.desired.get(group) != self.epoch(group):
            return Why.NO_NOTICE
        return super().verdict(group, now)


def recall_acquire(gate: HoldGate, group: str, epoch: int) -> None:
    """What an edge-triggered executor did at start: the epoch of a group its node owns
    counts as the latest acquire."""
    gate.on_acquire(group, epoch)


# ---- candidate fixes of what the simulator found (not mutants: proposals) ------------------


class PromiseRightAfterStart(LeaseHolder):
    """The rule dropped: promises granted within ``lease_ttl`` of this lease holder's
    start, when its node's executors may still hold a group on its predecessor's notices
    (found by the simulator: ``docs/safety.md`` "The simulator")."""

    def on_promise_request(self, requester: str, groups: list[str], duration: float,
                           now: float, partial: bool = False) -> PromiseAnswer:
        started, self.started_at = self.started_at, now - self.lease_ttl
        try:
            return super().on_promise_request(requester, groups, duration, now, partial)
        finally:
            self.started_at = started
