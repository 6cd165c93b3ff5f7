"""Unit tests of the node's lease holder (``LeaseHolder``, DESIGN.md "Safety: no split
brain"): one table test (or parametrized case) per rule, plain objects, no mocks. Times
are binary-exact so boundaries compare exactly. The simulator that drives it with the
other shipped classes through random histories, and the mutants it must catch, are in
``test_sim.py`` (``tests/unit/sim``)."""

from __future__ import annotations

import pytest

from vtlha.messages import GroupRecord, GroupState, decode, encode
from vtlha.protocol.hold import HoldGate
from vtlha.protocol.lease import (
    REASK_AFTER,
    AskPromise,
    Effect,
    KvResult,
    LeaseHolder,
    Note,
    Notice,
    Phase,
    Probe,
    PromiseAnswer,
    Renew,
)

A, B, C = "node-a", "node-b", "node-c"
G, H = "node-a-data", "node-a-mgmt"
TTL = 0.25
MARGIN = 0.03125
INTERVAL = 0.0625
T0 = 100.0
RTT = 0.015625  # how long a KV answer takes in these tables


def rec(owner: str = A, epoch: int = 1, state: GroupState = "held") -> GroupRecord:
    return GroupRecord(owner=owner, term=1, epoch=epoch, state=state, since=0.0)


def holder(node: str = A, started_at: float = 0.0) -> LeaseHolder:
    return LeaseHolder(node=node, companion=B if node == A else A, lease_ttl=TTL,
                       margin=MARGIN, interval=INTERVAL, started_at=started_at)


def renews(effects: list[Effect]) -> list[Renew]:
    return [e for e in effects if isinstance(e, Renew)]


def notices(effects: list[Effect]) -> list[Notice]:
    return [e for e in effects if isinstance(e, Notice)]


def asks(effects: list[Effect]) -> list[AskPromise]:
    return [e for e in effects if isinstance(e, AskPromise)]


def holding(now: float = T0, revision: int = 5, groups: tuple[str, ...] = (G,)) -> LeaseHolder:
    """A holds ``groups`` at epoch 1: renewals sent at ``now`` succeeded (valid until
    now + TTL), the keys are now at revision + 1."""
    lh = holder(A)
    for grp in groups:
        assert lh.on_record(grp, rec(), revision, now) == []
    for r in renews(lh.tick(now)):
        lh.on_renew_result(r.group, r.sent_at, KvResult.OK, revision=revision + 1,
                           now=now + RTT)
    assert all(lh.is_valid(grp, now) for grp in groups)
    return lh


def renewing(lh: LeaseHolder, now: float, group: str = G) -> Renew:
    [r] = renews(lh.tick(now))
    assert r.group == group
    return r


def cut_off(lh: LeaseHolder, now: float = T0 + INTERVAL) -> AskPromise:
    """The next renewal finds the KV unavailable: returns the promise asked for."""
    r = renewing(lh, now)
    [ask] = asks(lh.on_renew_result(G, r.sent_at, KvResult.UNAVAILABLE, now=now + RTT))
    return ask


def acquiring(seen_at: float, started_at: float = 0.0, epoch: int = 2) -> LeaseHolder:
    """B's lease holder has just seen the arbiter's claim of G for B."""
    lh = holder(B, started_at)
    out = lh.on_record(G, rec(B, epoch, "acquiring"), 20, seen_at)
    assert [type(e) for e in out] == [Note]
    assert lh.groups[G].phase is Phase.ACQUIRING
    return lh


def first_served_at(lh: LeaseHolder, start: float, end: float, step: float = 0.0078125,
                    write_s: float = 0.0) -> float | None:
    """Tick from ``start`` to ``end``, each renewal committing ``write_s`` after it was
    sent: when the group is first served — its first notice (None: never)."""
    now, rev = start, 100
    pending: list[tuple[float, Renew]] = []
    while now <= end:
        out = lh.tick(now)
        pending += [(now + write_s, r) for r in renews(out)]
        for due, r in sorted(p for p in pending if p[0] <= now):
            pending.remove((due, r))
            rev += 1
            out += lh.on_renew_result(r.group, r.sent_at, KvResult.OK, revision=rev, now=now)
        if notices(out):
            return now
        now += step
    return None


def first_renewal_at(lh: LeaseHolder, start: float, end: float,
                     step: float = 0.0078125) -> float | None:
    """Tick from ``start`` to ``end``: when the first renewal goes out (None: never)."""
    now = start
    while now <= end:
        if renews(lh.tick(now)):
            return now
        now += step
    return None


def unreachable_companion(started_at: float = 0.0) -> LeaseHolder:
    """B's lease holder, whose last write found the KV unavailable."""
    lh = holder(B, started_at)
    lh.on_probe_result(KvResult.UNAVAILABLE)
    return lh


# ---- renewals ---------------------------------------------------------------------------


def test_renewal_is_a_compare_and_set_against_the_revision_last_seen() -> None:
    lh = holder(A)
    lh.on_record(G, rec(), 5, T0)
    r = renewing(lh, T0)
    assert r == Renew(G, rec().model_copy(update={"renewed_by": A}), 5, T0)
    lh.on_renew_result(G, T0, KvResult.OK, revision=8, now=T0 + RTT)
    assert renewing(lh, T0 + INTERVAL).last == 8


@pytest.mark.parametrize("answered_after", [0.0, RTT, 0.125, TTL - 0.0078125])
def test_renewal_validity_is_counted_from_when_it_was_sent(answered_after: float) -> None:
    """A slow answer does not extend the lease."""
    lh = holder(A)
    lh.on_record(G, rec(), 5, T0)
    r = renewing(lh, T0)
    out = lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=6, now=T0 + answered_after)
    assert notices(out) == [Notice(G, 1, T0 + TTL)]
    assert lh.is_valid(G, T0 + TTL - 0.0078125)
    assert not lh.is_valid(G, T0 + TTL)


def test_renewal_never_shortens_validity() -> None:
    lh = holding(T0)
    lh.groups[G].valid_until = T0 + 1.0  # e.g. from a promise
    r = renewing(lh, T0 + INTERVAL)
    out = lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=7, now=T0 + INTERVAL + RTT)
    assert notices(out) == [Notice(G, 1, T0 + 1.0)]


@pytest.mark.parametrize(("since_last", "renews_now"), [
    (0.0, False), (INTERVAL - 0.0078125, False), (INTERVAL, True), (3 * INTERVAL, True),
])
def test_renewal_cadence_is_the_interval(since_last: float, renews_now: bool) -> None:
    lh = holding(T0)
    assert bool(renews(lh.tick(T0 + since_last))) is renews_now


def test_renewal_in_flight_is_not_duplicated() -> None:
    lh = holding(T0)
    r = renewing(lh, T0 + INTERVAL)
    for k in range(2, 10):  # the answer is late: many intervals pass
        assert renews(lh.tick(T0 + k * INTERVAL)) == []
    lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=7, now=T0 + 10 * INTERVAL)
    assert renewing(lh, T0 + 10 * INTERVAL).last == 7


# ---- compare-and-set conflicts ---------------------------------------------------------


@pytest.mark.parametrize("current", [rec(B, 2), rec(A, 2), rec(B, 1), None],
                         ids=["other-owner-new-epoch", "same-owner-new-epoch",
                              "other-owner-same-epoch", "key-gone"])
def test_conflict_with_changed_epoch_or_owner_drops_at_once_and_asks_nothing(
        current: GroupRecord | None) -> None:
    lh = holding(T0)
    r = renewing(lh, T0 + INTERVAL)
    out = lh.on_renew_result(G, r.sent_at, KvResult.CONFLICT, current=current,
                             current_revision=None if current is None else 9,
                             now=T0 + INTERVAL + RTT)
    assert isinstance(out[0], Notice) and out[0].revoked and out[0].epoch == 1
    assert [n.kind for n in out if isinstance(n, Note)] == ["lease.dropped"]
    assert asks(out) == [] and not lh.promise_in_flight
    assert G not in lh.groups and not lh.is_valid(G, T0 + INTERVAL + RTT)
    assert renews(lh.tick(T0 + 2 * INTERVAL)) == []
    assert lh.kv_reachable is True  # a conflict is an answer from the KV


def test_conflict_with_our_own_committed_write_adopts_the_revision_extends_nothing() -> None:
    """A renewal can commit and still time out; the next one then conflicts with it."""
    lh = holding(T0)
    r1 = renewing(lh, T0 + INTERVAL)  # commits as revision 7, but the answer is lost
    lh.on_renew_result(G, r1.sent_at, KvResult.UNAVAILABLE, now=T0 + INTERVAL + RTT)
    lh.on_promise_reply(T0 + INTERVAL + RTT, None, (G,))
    r2 = renewing(lh, T0 + 2 * INTERVAL)
    assert r2.last == 6
    out = lh.on_renew_result(G, r2.sent_at, KvResult.CONFLICT,
                             current=rec().model_copy(update={"renewed_by": A}),
                             current_revision=7, now=T0 + 2 * INTERVAL + RTT)
    assert out == []
    assert lh.groups[G].valid_until == T0 + TTL  # still from the renewal at T0
    assert G in lh.groups and lh.groups[G].phase is Phase.HOLDING
    # ... and renews again at the next tick, not an interval later: the lease runs on
    # meanwhile (chaos iteration 77 lost 0.3 s of it this way)
    r3 = renewing(lh, T0 + 2 * INTERVAL + RTT)
    assert r3.last == 7
    [n] = notices(lh.on_renew_result(G, r3.sent_at, KvResult.OK, revision=8,
                                     now=T0 + 2 * INTERVAL + 2 * RTT))
    assert n.valid_until == T0 + 2 * INTERVAL + RTT + TTL


def test_conflict_with_our_own_write_while_acquiring_does_not_open_the_gate() -> None:
    lh = acquiring(T0)
    lh.on_acquire_command(G, 2, 0.0, T0)
    r = renewing(lh, T0)
    out = lh.on_renew_result(G, r.sent_at, KvResult.CONFLICT, current=rec(B, 2, "held"),
                             current_revision=21, now=T0 + RTT)
    assert out == [] and lh.groups[G].phase is Phase.ACQUIRING
    assert not lh.is_valid(G, T0 + RTT)
    assert renewing(lh, T0 + RTT).last == 21


# ---- the KV unavailable: asking for a promise --------------------------------------------


def test_kv_unavailable_asks_the_companion_for_a_promise_of_lease_ttl() -> None:
    lh = holding(T0, groups=(G, H))
    out = lh.tick(T0 + INTERVAL)
    [r1, r2] = renews(out)
    sent = T0 + INTERVAL + 0.046875  # when the renewal timed out and the request goes
    ask = lh.on_renew_result(r1.group, r1.sent_at, KvResult.UNAVAILABLE, now=sent)
    assert ask == [AskPromise(B, (G, H), TTL, sent)]
    assert lh.kv_reachable is False
    assert lh.is_valid(G, sent)  # the lease itself is not touched
    assert lh.on_renew_result(r2.group, r2.sent_at, KvResult.UNAVAILABLE, now=sent) == []


def test_only_one_promise_request_in_flight() -> None:
    lh = holding(T0)
    cut_off(lh, T0 + INTERVAL)
    r = renewing(lh, T0 + 2 * INTERVAL)
    assert lh.on_renew_result(G, r.sent_at, KvResult.UNAVAILABLE,
                              now=T0 + 2 * INTERVAL + RTT) == []
    lh.on_promise_reply(T0 + INTERVAL + RTT, None, (G,))  # the first one went unanswered
    out = lh.tick(T0 + 3 * INTERVAL)  # asked again at once (REASK_AFTER), with a renewal
    assert len(asks(out)) == 1 and len(renews(out)) == 1
    assert lh.on_renew_result(G, renews(out)[0].sent_at, KvResult.UNAVAILABLE,
                              now=T0 + 3 * INTERVAL + RTT) == []  # one in flight


def test_a_refused_promise_is_asked_again_within_a_quarter_interval() -> None:
    """The companion's own last write may just have succeeded: it refuses, and learns
    the KV is gone within its next renewal. Waiting for our next failed renewal to ask
    again let a lease lapse ~50 ms (the simulator: the witness's loss)."""
    lh = holding(T0)
    ask = cut_off(lh, T0 + INTERVAL)
    lh.on_promise_reply(ask.sent_at, PromiseAnswer(False, 0.0, "node-b reaches the KV"),
                        ask.groups)
    due = ask.sent_at + REASK_AFTER * INTERVAL
    assert asks(lh.tick(due - 0.001)) == []
    [again] = asks(lh.tick(due))
    assert again.groups == (G,)


def test_no_promise_asked_when_nothing_is_held() -> None:
    lh = acquiring(T0)
    lh.on_acquire_command(G, 2, 0.0, T0)
    r = renewing(lh, T0)
    assert lh.on_renew_result(G, r.sent_at, KvResult.UNAVAILABLE, now=T0 + RTT) == []
    assert lh.groups[G].phase is Phase.ACQUIRING and not lh.promise_in_flight


# ---- the promise's answer ----------------------------------------------------------------


@pytest.mark.parametrize(("duration", "extends"), [
    (TTL, True),  # to sent_at + TTL
    (10 * TTL, True),  # never longer than lease_ttl
    (0.1875, True),
    (0.0625, False),  # ends before the renewal's validity: extends nothing
])
def test_granted_promise_extends_to_request_sent_plus_duration_at_most_ttl(
        duration: float, extends: bool) -> None:
    lh = holding(T0)
    ask = cut_off(lh, T0 + INTERVAL)
    sent = ask.sent_at
    out = lh.on_promise_reply(sent, PromiseAnswer(True, duration, "ok"), ask.groups)
    expected = sent + min(duration, TTL)
    if not extends:
        assert out == [] and lh.groups[G].valid_until == T0 + TTL
    else:
        assert out == [Notice(G, 1, expected, reason="failsafe promise")]
        assert lh.groups[G].valid_until == expected
        assert lh.groups[G].valid_until <= sent + TTL
    assert not lh.promise_in_flight


@pytest.mark.parametrize("answer", [PromiseAnswer(False, 0.0, "no"), None],
                         ids=["refused", "unanswered"])
def test_refused_or_unanswered_promise_extends_nothing(answer: PromiseAnswer | None) -> None:
    lh = holding(T0)
    ask = cut_off(lh, T0 + INTERVAL)
    assert lh.on_promise_reply(ask.sent_at, answer, ask.groups) == []
    assert lh.groups[G].valid_until == T0 + TTL
    assert not lh.is_valid(G, T0 + TTL)  # self-fences at lease_ttl
    assert not lh.promise_in_flight


def test_promise_for_a_group_dropped_meanwhile_extends_nothing() -> None:
    lh = holding(T0)
    ask = cut_off(lh, T0 + INTERVAL)
    lh.on_record(G, rec(B, 2, "acquiring"), 9, T0 + INTERVAL + RTT)
    assert lh.on_promise_reply(ask.sent_at, PromiseAnswer(True, TTL, "ok"), ask.groups) == []
    assert G not in lh.groups


# ---- granting a promise ------------------------------------------------------------------


def test_promise_granted_only_to_the_companion() -> None:
    lh = unreachable_companion()
    ans = lh.on_promise_request(C, [G], TTL, T0)
    assert not ans.granted and C in ans.reason
    assert lh.promises_given == {}
    assert lh.on_promise_request(A, [G], TTL, T0).granted


@pytest.mark.parametrize(("last_write", "granted"), [
    (None, False),  # does not know yet: refuse
    (KvResult.OK, False),  # reaches the KV: the requester is the one cut off
    (KvResult.CONFLICT, False),  # a conflict is an answer from the KV too
    (KvResult.UNAVAILABLE, True),
])
def test_promise_granted_only_when_this_nodes_last_write_found_the_kv_unavailable(
        last_write: KvResult | None, granted: bool) -> None:
    lh = holder(B)
    if last_write is not None:
        lh.on_probe_result(last_write)
    ans = lh.on_promise_request(A, [G, H], TTL, T0)
    assert ans.granted is granted
    assert lh.promises_given == ({G: T0 + TTL, H: T0 + TTL} if granted else {})


def test_kv_reachability_follows_the_last_write_renewal_or_probe() -> None:
    lh = holding(T0)
    assert lh.kv_reachable is True
    cut_off(lh, T0 + INTERVAL)
    assert lh.kv_reachable is False
    lh.on_probe_result(KvResult.OK)
    assert lh.kv_reachable is True


@pytest.mark.parametrize("phase", [Phase.HOLDING, Phase.ACQUIRING])
def test_promise_never_given_for_a_group_held_or_being_acquired(phase: Phase) -> None:
    lh = holder(B)
    state: GroupState = "held" if phase is Phase.HOLDING else "acquiring"
    lh.on_record(G, rec(B, 2, state), 9, T0)
    if phase is Phase.HOLDING:  # a lease it holds: renewed, valid
        [r] = renews(lh.tick(T0))
        lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=10, now=T0 + RTT)
    assert lh.groups[G].phase is phase
    lh.on_probe_result(KvResult.UNAVAILABLE)
    ans = lh.on_promise_request(A, [H, G], TTL, T0 + RTT)
    assert not ans.granted and G in ans.reason
    assert lh.promises_given == {}  # not even for the other group of the request


def test_partial_promise_leaves_out_the_groups_held_and_grants_the_rest() -> None:
    """node-b took node-a's group G while node-a was cut off from the KV; node-a never
    heard of the claim and still lists G. During a KV outage node-b asks node-a for a
    promise for G and its own K: node-a must not refuse K because of G (node-b would
    self-fence its own group), and must never promise G."""
    K = "node-b-data"
    lh = holder(B)  # plays node-a's part: B's companion is A
    lh.on_record(G, rec(B, 1, "held"), 9, T0)
    [r] = renews(lh.tick(T0))  # its lease on G still runs
    lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=10, now=T0 + RTT)
    lh.on_probe_result(KvResult.UNAVAILABLE)
    t = T0 + RTT
    assert not lh.on_promise_request(A, [G, K], TTL, t).granted  # all or nothing
    ans = lh.on_promise_request(A, [G, K], TTL, t, partial=True)
    assert ans.granted and ans.groups == (K,) and G in ans.reason
    assert lh.promises_given == {K: t + TTL}
    only_held = lh.on_promise_request(A, [G], TTL, t, partial=True)
    assert not only_held.granted and only_held.groups is None


def test_a_listed_group_whose_lease_ran_out_may_be_promised() -> None:
    """node-b was cut off long enough for its lease on K to run out, and node-a took K
    (node-b never saw the claim). Back, node-b still lists K: it serves none of it, so
    it may promise it — else node-a, serving K on node-b's promise during the KV's
    election after node-b rejoins, drops K (the chaos suite: 1.3-4.8 s unserved)."""
    K = "node-b-data"
    lh = holder(B)
    lh.on_record(K, rec(B, 1, "held"), 9, T0)
    [r] = renews(lh.tick(T0))
    lh.on_renew_result(K, r.sent_at, KvResult.OK, revision=10, now=T0 + RTT)
    lh.on_probe_result(KvResult.UNAVAILABLE)
    assert not lh.is_valid(K, T0 + TTL)
    ans = lh.on_promise_request(A, [K], TTL, T0 + TTL)
    assert ans.granted and lh.promises_given == {K: T0 + 2 * TTL}


def test_a_promise_granted_to_us_does_not_extend_a_lease_we_promised_away() -> None:
    """node-a, paused long enough for node-b to take its group, resumes: it promises the
    lapsed group to node-b and, in the same instant, asks node-b for a promise; node-b
    (its own lease on the group lapsed too) grants it. Applied, that grant made two
    holders (the simulator, seed 312987)."""
    lh = holding(T0)
    t = T0 + TTL + INTERVAL  # the lease ran out: lapsed
    lh.on_probe_result(KvResult.UNAVAILABLE)
    lh.kv_reachable = False
    assert lh.on_promise_request(B, [G], TTL, t).granted  # promised away
    sent = t + 0.001
    out = lh.on_promise_reply(sent, PromiseAnswer(True, TTL, "ok"), (G,))
    assert notices(out) == [] and not lh.is_valid(G, sent)


def test_a_renewal_succeeding_while_a_promise_runs_extends_nothing() -> None:
    K = "node-b-data"
    lh = holder(B)
    lh.on_record(K, rec(B, 1, "held"), 9, T0)
    [r] = renews(lh.tick(T0))
    lh.on_renew_result(K, r.sent_at, KvResult.OK, revision=10, now=T0 + RTT)
    lh.on_probe_result(KvResult.UNAVAILABLE)
    t = T0 + TTL
    [r2] = renews(lh.tick(t))  # a renewal in flight when the promise is given
    assert lh.on_promise_request(A, [K], TTL, t + RTT).granted
    out = lh.on_renew_result(K, r2.sent_at, KvResult.OK, revision=11, now=t + 2 * RTT)
    assert notices(out) == [] and not lh.is_valid(K, t + 2 * RTT)
    assert lh.groups[K].phase is Phase.ACQUIRING  # waits for the promise to run out
    assert renews(lh.tick(t + RTT + TTL - 0.001)) == []
    [r3] = renews(lh.tick(t + RTT + TTL))
    out = lh.on_renew_result(K, r3.sent_at, KvResult.OK, revision=12,
                             now=t + RTT + TTL + RTT)
    assert [n.group for n in notices(out)] == [K]


def test_partial_grant_extends_only_the_groups_it_covers() -> None:
    lh = holding(T0, groups=(G, H))
    r = renews(lh.tick(T0 + INTERVAL))[0]
    [ask] = asks(lh.on_renew_result(r.group, r.sent_at, KvResult.UNAVAILABLE,
                                    now=T0 + INTERVAL + RTT))
    assert set(ask.groups) == {G, H}
    out = lh.on_promise_reply(ask.sent_at, PromiseAnswer(True, TTL, "ok", (H,)), ask.groups)
    assert out == [Notice(H, 1, ask.sent_at + TTL, reason="failsafe promise")]
    assert lh.groups[H].valid_until == ask.sent_at + TTL
    assert lh.groups[G].valid_until == T0 + TTL  # G self-fences at its lease


@pytest.mark.parametrize("asked", [TTL, 4 * TTL, 0.125])
def test_promise_never_longer_than_lease_ttl(asked: float) -> None:
    lh = unreachable_companion()
    ans = lh.on_promise_request(A, [G], asked, T0)
    assert ans.granted and ans.duration == min(asked, TTL)
    assert lh.promises_given[G] == T0 + min(asked, TTL)


def test_promises_given_only_ever_extend() -> None:
    lh = unreachable_companion()
    lh.on_promise_request(A, [G], TTL, T0)
    lh.on_promise_request(A, [G], 0.0625, T0 + 0.0625)
    assert lh.promises_given[G] == T0 + TTL


def test_claim_seen_then_promise_request_is_refused() -> None:
    """Promise racing an acquire: once a claim for G is seen here, no promise for G."""
    lh = acquiring(T0)
    lh.on_probe_result(KvResult.UNAVAILABLE)
    assert not lh.on_promise_request(A, [G], TTL, T0 + RTT).granted


@pytest.mark.parametrize("wait", [0.0, 0.0625, None], ids=["released", "wait", "no-command"])
def test_promise_given_then_claim_seen_waits_until_the_promise_ran_out(
        wait: float | None) -> None:
    """Promise racing an acquire: a promise given for G holds the acquisition of G back
    until it ran out, whatever the arbiter's wait says."""
    lh = unreachable_companion()
    assert lh.on_promise_request(A, [G], TTL, T0).granted
    lh.on_record(G, rec(B, 2, "acquiring"), 20, T0 + RTT)
    if wait is not None:
        lh.on_acquire_command(G, 2, wait, T0 + RTT)
    expected = T0 + TTL if wait is not None else T0 + RTT + TTL + MARGIN
    assert first_served_at(lh, T0, T0 + 1.0) == expected


def test_expired_promises_are_forgotten() -> None:
    lh = unreachable_companion()
    lh.on_promise_request(A, [G], TTL, T0)
    lh.tick(T0 + TTL - 0.0078125)
    assert G in lh.promises_given
    lh.tick(T0 + TTL)
    assert lh.promises_given == {}


# ---- the acquire gate -----------------------------------------------------------------------


def test_served_no_sooner_than_ttl_plus_margin_after_the_claim_was_seen() -> None:
    lh = acquiring(T0)
    assert first_served_at(lh, T0, T0 + 1.0) == T0 + TTL + MARGIN


def test_first_renewal_goes_out_ahead_of_the_gate_and_serves_nothing_before_it() -> None:
    """The first renewal is sent ``lead`` (the margin) before the gate, so that its write
    is not on the way to serving; its success before the gate serves nothing: the notice
    comes at the gate, valid from the renewal's send time (shorter, never longer)."""
    lh = acquiring(T0)
    gate = T0 + TTL + MARGIN
    sent = first_renewal_at(lh, T0, T0 + 1.0)
    assert sent == gate - MARGIN
    out = lh.on_renew_result(G, sent, KvResult.OK, revision=21, now=sent + RTT)
    assert notices(out) == [] and not lh.is_valid(G, sent + RTT)
    assert lh.groups[G].phase is Phase.ACQUIRING and lh.groups[G].revision == 21
    assert notices(lh.tick(gate - 0.0078125)) == []
    out = lh.tick(gate)
    assert notices(out) == [Notice(G, 2, sent + TTL, since=sent)]
    assert [n.kind for n in out if isinstance(n, Note)] == ["lease.acquired"]
    assert lh.is_valid(G, gate) and not lh.is_valid(G, sent + TTL)


@pytest.mark.parametrize(("write_s", "served"), [
    (RTT, T0 + TTL + MARGIN),  # the write is done before the gate: served at the gate
    (2 * MARGIN, T0 + TTL + 2 * MARGIN),  # longer than the lead: when it is done
])
def test_a_slow_first_renewal_serves_when_it_is_done(write_s: float, served: float) -> None:
    lh = acquiring(T0)
    assert first_served_at(lh, T0, T0 + 1.0, write_s=write_s) == served


def test_a_first_renewal_too_old_at_the_gate_is_sent_again() -> None:
    """With a lead longer than a renewal interval, a renewal that committed early is
    older than the cadence at the gate: another is sent, and serves when it succeeds."""
    lh = acquiring(T0)
    lh.first_renewal_lead = 2 * INTERVAL
    gate = T0 + TTL + MARGIN
    sent = first_renewal_at(lh, T0, T0 + 1.0)
    assert sent == gate - 2 * INTERVAL
    assert lh.on_renew_result(G, sent, KvResult.OK, revision=21, now=sent + RTT) == []
    again = renews(lh.tick(gate))
    assert [r.sent_at for r in again] == [gate] and not lh.is_valid(G, gate)
    out = lh.on_renew_result(G, gate, KvResult.OK, revision=22, now=gate + RTT)
    assert notices(out) == [Notice(G, 2, gate + TTL, since=gate)]


def test_next_due_is_the_first_renewal_then_the_gate() -> None:
    lh = acquiring(T0)
    gate = T0 + TTL + MARGIN
    assert lh.next_due(T0) == gate - MARGIN
    r = renews(lh.tick(gate - MARGIN))[0]
    assert lh.next_due(gate - MARGIN) is None  # in flight: its answer comes first
    lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=21, now=gate - MARGIN + RTT)
    assert lh.next_due(gate - MARGIN + RTT) == gate
    lh.tick(gate)
    assert lh.next_due(gate) is None  # held: the regular ticks renew it


@pytest.mark.parametrize(("wait", "expected"), [
    (0.0, T0 + RTT),  # every executor of the old owner acknowledged the release
    (0.125, T0 + RTT + 0.125),
    (TTL + MARGIN - RTT, T0 + TTL + MARGIN),
    (10.0, T0 + TTL + MARGIN),  # the arbiter's wait never makes it later
])
def test_arbiters_wait_can_make_the_first_renewal_earlier(wait: float,
                                                          expected: float) -> None:
    lh = acquiring(T0)
    assert lh.on_acquire_command(G, 2, wait, T0 + RTT) == []
    assert first_served_at(lh, T0, T0 + 1.0) == expected


def test_later_acquire_command_with_a_shorter_wait_opens_the_gate_sooner() -> None:
    lh = acquiring(T0)
    lh.on_acquire_command(G, 2, 0.125, T0)
    lh.on_acquire_command(G, 2, 0.0, T0 + 0.0625)  # the release acks came in
    assert first_served_at(lh, T0, T0 + 1.0) == T0 + 0.0625


def claim_with_wait(wait: float | None, epoch: int = 2) -> GroupRecord:
    return rec(B, epoch, "acquiring").model_copy(update={"wait": wait})


@pytest.mark.parametrize(("wait", "expected"), [
    (None, T0 + TTL + MARGIN),  # a claim written without one: the whole lease
    (0.0, T0),  # an assignment: nobody held it
    (0.125, T0 + 0.125),
    (10.0, T0 + TTL + MARGIN),  # never later than the lease holder's own gate
])
def test_the_claims_wait_counts_from_when_the_claim_is_seen(wait: float | None,
                                                           expected: float) -> None:
    """The arbiter's bound on what may remain of the old owner's lease, written in its
    claim: counted from when this node sees the claim (later than when the arbiter
    computed it), it opens the gate without waiting for the acquire command."""
    lh = holder(B)
    lh.on_record(G, claim_with_wait(wait), 20, T0)
    assert first_served_at(lh, T0, T0 + 1.0) == expected


@pytest.mark.parametrize(("claim_wait", "command_wait", "expected"), [
    (0.125, 0.0, T0 + RTT),  # the release acks came in: the command opens it sooner
    (0.0625, 0.125, T0 + 0.0625),  # the command came late: the claim's opens it
    (None, 0.0625, T0 + RTT + 0.0625),
])
def test_the_claims_wait_and_the_commands_whichever_opens_the_gate_first(
        claim_wait: float | None, command_wait: float, expected: float) -> None:
    lh = holder(B)
    lh.on_record(G, claim_with_wait(claim_wait), 20, T0)
    lh.on_acquire_command(G, 2, command_wait, T0 + RTT)
    assert first_served_at(lh, T0, T0 + 1.0) == expected


def test_an_early_command_and_the_claims_wait_whichever_opens_the_gate_first() -> None:
    """The command came before the claim was seen (kept); the claim's own wait, counted
    from when it is seen, opens the gate if that is sooner."""
    lh = holder(B)
    lh.on_acquire_command(G, 2, 0.25, T0)
    lh.on_record(G, claim_with_wait(0.0625), 20, T0 + RTT)
    assert first_served_at(lh, T0, T0 + 1.0) == T0 + RTT + 0.0625


def test_a_claims_wait_never_opens_the_gate_within_lease_ttl_of_the_start() -> None:
    """A lease holder that starts and sees a claim still waits ``lease_ttl`` from its own
    start (it may have forgotten a promise), whatever the claim's wait says."""
    lh = holder(B, started_at=T0)
    lh.on_record(G, claim_with_wait(0.0), 20, T0 + RTT)
    assert first_served_at(lh, T0, T0 + 1.0) == T0 + TTL


def test_a_renewal_drops_the_claims_wait() -> None:
    lh = holder(B)
    lh.on_record(G, claim_with_wait(0.0), 20, T0)
    r = renewing(lh, T0)
    assert r.record.state == "held" and r.record.wait is None
    lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=21, now=T0 + RTT)
    assert lh.groups[G].record.wait is None
    assert renewing(lh, T0 + INTERVAL).record.wait is None


@pytest.mark.parametrize(("group", "epoch"), [(G, 1), (G, 3), (H, 2)],
                         ids=["older-epoch", "newer-epoch", "other-group"])
def test_acquire_command_for_another_epoch_or_group_is_ignored(group: str, epoch: int) -> None:
    lh = acquiring(T0)
    lh.on_acquire_command(group, epoch, 0.0, T0)
    assert first_served_at(lh, T0, T0 + 1.0) == T0 + TTL + MARGIN


def test_acquire_command_for_a_group_held_changes_nothing() -> None:
    lh = holding(T0)
    lh.on_acquire_command(G, 1, 0.0, T0)
    assert lh.groups[G].phase is Phase.HOLDING and lh.groups[G].gate_at == 0.0


@pytest.mark.parametrize("wait", [0.0, 1.0])
def test_nothing_acquired_within_lease_ttl_of_the_lease_holders_start(wait: float) -> None:
    """A restarted lease holder may have forgotten a promise it gave."""
    started = T0
    lh = acquiring(started + RTT, started_at=started)
    lh.on_acquire_command(G, 2, wait, started + RTT)
    expected = started + TTL if wait == 0.0 else started + RTT + TTL + MARGIN
    assert first_served_at(lh, started, started + 2.0) == expected


def test_first_successful_renewal_serves_the_group() -> None:
    lh = acquiring(T0)
    lh.on_acquire_command(G, 2, 0.0, T0)
    r = renewing(lh, T0)
    assert r.record.state == "held" and r.record.renewed_by == B and r.record.epoch == 2
    out = lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=21, now=T0 + RTT)
    assert notices(out) == [Notice(G, 2, T0 + TTL)]
    assert [n.kind for n in out if isinstance(n, Note)] == ["lease.acquired"]
    assert lh.groups[G].phase is Phase.HOLDING and lh.is_valid(G, T0 + RTT)


def test_renewals_keep_the_claims_since() -> None:
    """``since`` is the wall clock of the claim: "when the group last moved" for the
    arbiter. Renewals (the first one included, and after adopting our own committed
    write or a newer revision from the watch) must carry it unchanged, never now."""
    claimed_at = 1_700_000_000.5
    claim = rec(B, 2, "acquiring").model_copy(update={"since": claimed_at})
    lh = holder(B)
    lh.on_record(G, claim, 20, T0)
    lh.on_acquire_command(G, 2, 0.0, T0)
    r1 = renewing(lh, T0 + TTL)
    assert r1.record.since == claimed_at and r1.record.state == "held"
    lh.on_renew_result(G, r1.sent_at, KvResult.OK, revision=21, now=T0 + TTL + RTT)
    r2 = renewing(lh, T0 + TTL + INTERVAL)
    assert r2.record.since == claimed_at
    # its answer is lost, it committed; the next renewal conflicts with it: adopt the key
    lh.on_renew_result(G, r2.sent_at, KvResult.UNAVAILABLE, now=T0 + TTL + INTERVAL + RTT)
    lh.on_promise_reply(T0 + TTL + INTERVAL + RTT, None, (G,))
    r3 = renewing(lh, T0 + TTL + 2 * INTERVAL)
    lh.on_renew_result(G, r3.sent_at, KvResult.CONFLICT, current=r2.record,
                       current_revision=22, now=T0 + TTL + 2 * INTERVAL + RTT)
    # the watch delivers the same epoch at a newer revision
    lh.on_record(G, r2.record, 23, T0 + TTL + 2 * INTERVAL + RTT)
    r4 = renewing(lh, T0 + TTL + 3 * INTERVAL)
    assert r4.last == 23 and r4.record.since == claimed_at
    # and the wire keeps it (decode never defaults it when it is there)
    assert decode(GroupRecord, encode(r4.record)).since == claimed_at


def test_acquiring_group_is_not_valid_before_its_first_renewal() -> None:
    lh = acquiring(T0)
    for now in (T0, T0 + TTL + MARGIN, T0 + 10.0):
        assert not lh.is_valid(G, now)


# ---- records ----------------------------------------------------------------------------


@pytest.mark.parametrize("record", [rec(B, 2, "acquiring"), rec(B, 2, "held"), None],
                         ids=["claimed", "held-by-other", "deleted"])
def test_record_owned_by_another_node_drops_a_held_group(record: GroupRecord | None) -> None:
    lh = holding(T0)
    out = lh.on_record(G, record, 9, T0 + RTT)
    [n] = notices(out)
    assert n.revoked and n.epoch == 1 and n.valid_until == 0.0
    assert G not in lh.groups and asks(out) == []


def test_record_owned_by_another_node_drops_an_acquisition() -> None:
    lh = acquiring(T0)
    out = lh.on_record(G, rec(A, 3, "acquiring"), 21, T0 + RTT)
    assert notices(out)[0].revoked and G not in lh.groups


def test_record_of_a_group_not_ours_is_ignored() -> None:
    lh = holder(B)
    assert lh.on_record(G, rec(A, 1), 5, T0) == []
    assert lh.groups == {}


@pytest.mark.parametrize("started_at", [T0, T0 - 100.0], ids=["just-restarted", "long-ago"])
def test_record_held_by_this_node_after_a_restart_resumes_renewing(started_at: float) -> None:
    """The first successful compare-and-set proves nobody took it meanwhile."""
    lh = holder(A, started_at)
    assert lh.on_record(G, rec(A, 3, "held"), 40, T0 + RTT) == []
    assert not lh.is_valid(G, T0 + RTT)  # served again only once a renewal succeeds
    r = renewing(lh, T0 + TTL)
    assert r.last == 40 and r.record.epoch == 3
    out = lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=41, now=T0 + TTL + RTT)
    assert notices(out) == [Notice(G, 3, T0 + 2 * TTL)]
    assert lh.groups[G].phase is Phase.HOLDING and lh.is_valid(G, T0 + TTL + RTT)


def test_stale_record_of_an_older_epoch_is_ignored() -> None:
    lh = holding(T0)
    lh.on_record(G, rec(A, 2, "held"), 30, T0 + RTT)  # epoch 2 now
    assert lh.on_record(G, rec(A, 1, "held"), 6, T0 + 2 * RTT) == []
    assert lh.groups[G].epoch == 2


def test_record_of_the_same_epoch_adopts_a_newer_revision_only() -> None:
    lh = holding(T0)  # key at revision 6
    lh.on_record(G, rec(), 4, T0 + RTT)
    assert lh.groups[G].revision == 6
    lh.on_record(G, rec(), 12, T0 + RTT)
    assert renewing(lh, T0 + INTERVAL).last == 12
    assert lh.groups[G].valid_until == T0 + TTL  # a record extends nothing


# ---- monotonic reads (issue 14, trace 2) ------------------------------------------------


def b_took_over(epoch: int = 26, claim_rev: int = 100) -> tuple[LeaseHolder, HoldGate]:
    """node-b took G at ``epoch`` (the claim at ``claim_rev``, its first renewal at
    ``claim_rev`` + 1); its executor's gate is fed the lease holder's notices."""
    lh, gate = holder(B), HoldGate(MARGIN)
    lh.on_record(G, rec(B, epoch, "acquiring"), claim_rev, T0)
    lh.on_acquire_command(G, epoch, 0.0, T0)  # every old executor acked the release
    r = renewing(lh, T0)
    feed(gate, lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=claim_rev + 1,
                                  now=T0 + RTT))
    assert gate.should_hold(G, T0 + RTT)
    return lh, gate


def feed(gate: HoldGate, effects: list[Effect]) -> list[Effect]:
    for n in notices(effects):
        gate.on_notice(n.group, n.epoch, n.valid_until, n.revoked)
    return effects


def test_trace2_an_older_record_applied_after_the_newer_one_changes_nothing() -> None:
    """Trace 2: node-b had taken node-a-data at epoch 26; a second later its lease holder
    was handed an older record (epoch 25, owner node-a). It must neither drop the group
    (its executors released it, and nothing brought it back) nor notice anything."""
    lh, gate = b_took_over()
    assert feed(gate, lh.on_record(G, rec(A, 25, "held"), 90, T0 + 2 * RTT)) == []
    assert lh.is_valid(G, T0 + 2 * RTT) and gate.should_hold(G, T0 + 2 * RTT)
    r = renewing(lh, T0 + INTERVAL)  # and it goes on renewing at epoch 26
    assert (r.record.epoch, r.record.owner, r.last) == (26, B, 101)
    feed(gate, lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=102,
                                  now=T0 + INTERVAL + RTT))
    assert gate.should_hold(G, T0 + INTERVAL + TTL / 2)


def test_an_older_record_is_ignored_even_for_a_group_not_held() -> None:
    """The same for a deletion or a foreign record: only newer revisions count."""
    lh = holder(B)
    lh.on_record(G, rec(A, 7, "held"), 50, T0)
    assert lh.on_record(G, rec(B, 6, "acquiring"), 40, T0 + RTT) == []
    assert G not in lh.groups


def test_a_stale_read_after_a_conflict_adopts_nothing_and_drops_nothing() -> None:
    lh, gate = b_took_over()
    r = renewing(lh, T0 + INTERVAL)
    # The read after the conflict was answered by a follower behind (revision 95 < 101).
    out = lh.on_renew_result(G, r.sent_at, KvResult.CONFLICT, current=rec(A, 26, "held"),
                             current_revision=95, now=T0 + INTERVAL + RTT)
    assert out == [] and G in lh.groups
    assert gate.should_hold(G, T0 + INTERVAL + RTT)


def test_a_new_bucket_forgets_what_was_applied_and_held() -> None:
    lh, _ = b_took_over()
    out = lh.on_new_bucket()
    assert [type(e) for e in out] == [Note] and lh.groups == {} and lh.applied == {}
    assert notices(out) == []  # no revoke: the old leases run out on their own
    lh.on_record(G, rec(B, 1, "acquiring"), 3, T0 + RTT)  # the new bucket starts again
    assert lh.groups[G].epoch == 1


def test_an_answer_of_the_old_bucket_after_the_new_one_is_ignored() -> None:
    """A read sent (or a watch made) before the bucket was found recreated answers with
    the old bucket's high revision; applied, it would hide every record of the new
    bucket (the simulator's recreated-bucket histories stranded a group so)."""
    lh, _ = b_took_over()
    gen = lh.generation
    lh.on_new_bucket()
    assert lh.generation == gen + 1
    assert lh.on_record(G, rec(B, 26, "held"), 101, T0 + RTT, generation=gen) == []
    assert lh.applied == {} and lh.groups == {}
    lh.on_record(G, rec(B, 1, "acquiring"), 3, T0 + RTT, generation=gen + 1)
    assert lh.groups[G].epoch == 1 and lh.applied[G] == 3


# ---- probes -----------------------------------------------------------------------------


def test_probes_only_when_nothing_is_held_one_in_flight_at_the_renewal_cadence() -> None:
    lh = holder(B)
    assert lh.tick(T0) == [Probe(T0)]
    assert lh.tick(T0 + INTERVAL) == []  # one in flight
    assert lh.tick(T0 + 3 * INTERVAL) == []
    lh.on_probe_result(KvResult.UNAVAILABLE)
    assert lh.tick(T0 + 3 * INTERVAL) == [Probe(T0 + 3 * INTERVAL)]
    lh.on_probe_result(KvResult.OK)
    assert lh.tick(T0 + 4 * INTERVAL - 0.0078125) == []
    assert lh.tick(T0 + 4 * INTERVAL) == [Probe(T0 + 4 * INTERVAL)]


@pytest.mark.parametrize("state", ["held", "acquiring"])
def test_no_probe_while_a_group_is_held_or_acquired(state: GroupState) -> None:
    lh = holder(B)
    lh.on_record(G, rec(B, 2, state), 9, T0)
    for k in range(10):
        assert not any(isinstance(e, Probe) for e in lh.tick(T0 + k * INTERVAL))


# ---- bugs found -----------------------------------------------------------------------------


def test_late_answer_for_an_older_epoch_does_not_open_a_newer_epochs_gate() -> None:
    lh = holding(T0)
    r = renewing(lh, T0 + INTERVAL)  # epoch 1, commits as revision 7; the answer is slow
    lh.on_record(G, rec(B, 2, "acquiring"), 8, T0 + INTERVAL + RTT)  # taken: dropped
    lh.on_record(G, rec(A, 3, "acquiring"), 9, T0 + INTERVAL + 2 * RTT)  # and given back
    out = lh.on_renew_result(G, r.sent_at, KvResult.OK, revision=7,
                             now=T0 + INTERVAL + 3 * RTT)
    assert notices(out) == []
    assert lh.groups[G].phase is Phase.ACQUIRING
    assert first_served_at(lh, T0 + INTERVAL + 3 * RTT, T0 + 1.0) == (
        T0 + INTERVAL + 2 * RTT + TTL + MARGIN)


def test_group_resumed_from_its_record_waits_for_a_promise_given_for_it() -> None:
    started = T0
    lh = unreachable_companion(started_at=started)  # restarted during a KV outage
    assert lh.on_promise_request(A, [G], TTL, started + 0.5).granted
    lh.on_record(G, rec(B, 2, "held"), 9, started + 0.5 + RTT)  # the KV is back
    assert first_served_at(lh, started + 0.5 + RTT, started + 2.0) == started + 0.5 + TTL


# ---- a quiet moment to move the NATS connection (chaos iteration 131) -----------------


def test_quiet_only_right_after_a_renewal_with_nothing_in_flight() -> None:
    lh = holding(T0, groups=(G, H))
    assert lh.quiet(T0 + RTT)  # both renewals answered just now
    assert not lh.quiet(T0 + INTERVAL / 2 + RTT)  # the next renewal is close: not now
    rs = renews(lh.tick(T0 + INTERVAL))
    assert {r.group for r in rs} == {G, H}
    assert not lh.quiet(T0 + INTERVAL)  # renewals in flight: a move would lose a reply
    lh.on_renew_result(G, rs[0].sent_at, KvResult.OK, revision=9, now=T0 + INTERVAL + RTT)
    assert not lh.quiet(T0 + INTERVAL + RTT)  # H's still in flight
    lh.on_renew_result(H, rs[1].sent_at, KvResult.OK, revision=9, now=T0 + INTERVAL + RTT)
    assert lh.quiet(T0 + INTERVAL + RTT)


def test_quiet_waits_for_a_promise_or_probe_in_flight() -> None:
    lh = holding(T0)
    cut_off(lh)  # the renewal found the KV unavailable: a promise is asked
    assert lh.promise_in_flight and not lh.quiet(T0 + INTERVAL + RTT)
    idle = holder(A)
    assert idle.quiet(T0)  # nothing held, nothing in flight
    [probe] = [e for e in idle.tick(T0) if isinstance(e, Probe)]
    assert probe and not idle.quiet(T0)


def test_quiet_does_not_wait_for_an_acquiring_group() -> None:
    lh = holder(A)
    assert lh.on_record(G, rec(state="acquiring"), 3, T0)
    assert lh.groups[G].phase is Phase.ACQUIRING and lh.quiet(T0)


def test_renewals_abandoned_after_a_reconnect_are_sent_again_at_once() -> None:
    """A node's own nats-server died mid-renewal (chaos iteration 42): the renewal is
    sent again at the next tick, not after its timeout and an interval; a late answer to
    the abandoned one extends nothing."""
    lh = holding(T0)
    r1 = renewing(lh, T0 + INTERVAL)
    assert lh.abandon_in_flight() == [G] and lh.abandon_in_flight() == []
    r2 = renewing(lh, T0 + INTERVAL + RTT)  # the very next tick
    assert r2.last == r1.last
    assert lh.on_renew_result(G, r1.sent_at, KvResult.OK, revision=7,
                              now=T0 + INTERVAL + 2 * RTT) == []  # the abandoned one: ignored
    assert lh.groups[G].valid_until == T0 + TTL
    # it committed, so the new one conflicts with it: adopt, and renew at once again
    assert lh.on_renew_result(G, r2.sent_at, KvResult.CONFLICT,
                              current=rec().model_copy(update={"renewed_by": A}),
                              current_revision=7, now=T0 + INTERVAL + 2 * RTT) == []
    r3 = renewing(lh, T0 + INTERVAL + 3 * RTT)
    assert r3.last == 7
    [n] = notices(lh.on_renew_result(G, r3.sent_at, KvResult.OK, revision=8,
                                     now=T0 + INTERVAL + 4 * RTT))
    assert n.valid_until == r3.sent_at + TTL


@pytest.mark.parametrize(("wait", "seen_after", "expected"), [
    (0.0, RTT, T0 + RTT),  # every executor of the old owner acknowledged the release
    (0.125, RTT, T0 + 0.125),  # the wait runs from the command, not from the claim seen
    (0.125, 0.25, T0 + 0.25),  # the wait was over when the claim arrived: at once
    (10.0, RTT, T0 + RTT + TTL + MARGIN),  # the arbiter's wait never makes it later
])
def test_an_acquire_command_before_the_claim_is_applied_when_the_claim_arrives(
        wait: float, seen_after: float, expected: float) -> None:
    """The arbiter sends Acquire once its claim committed, but B's KV watch (or a direct
    read a lagging server answered) may show the claim later: the command counts from
    when it came, as it would have had the claim come first."""
    lh = holder(B)
    assert lh.on_acquire_command(G, 2, wait, T0) == []
    assert G not in lh.groups and first_served_at(lh, T0, T0 + seen_after - 0.01) is None
    lh.on_record(G, rec(B, 2, "acquiring"), 20, T0 + seen_after)
    assert first_served_at(lh, T0 + seen_after, T0 + 2.0) == pytest.approx(expected,
                                                                              abs=0.008)
    assert lh.early_acquires == {}


@pytest.mark.parametrize(("claim", "why"), [
    (rec(B, 3, "acquiring"), "a newer claim than the command's"),
    (rec(A, 2, "acquiring"), "the command's epoch claimed for another node"),
])
def test_an_early_acquire_command_serves_only_its_own_claim(claim: GroupRecord,
                                                            why: str) -> None:
    lh = holder(B)
    lh.on_acquire_command(G, 2, 0.0, T0)
    lh.on_record(G, claim, 20, T0 + RTT)
    assert lh.early_acquires == {}, why
    if claim.owner == B:  # its own wait, the whole lease_ttl + margin
        assert first_served_at(lh, T0, T0 + 2.0) == pytest.approx(
            T0 + RTT + TTL + MARGIN, abs=0.008), why
    else:
        assert G not in lh.groups and first_served_at(lh, T0, T0 + 2.0) is None, why


def test_an_early_acquire_command_is_forgotten_with_the_bucket_and_in_time() -> None:
    from vtlha.protocol.lease import EARLY_ACQUIRE_KEPT
    lh = holder(B)
    lh.on_acquire_command(G, 2, 0.0, T0)
    lh.on_new_bucket()
    lh.on_record(G, rec(B, 2, "acquiring"), 3, T0 + RTT)  # the new bucket's epoch 2
    assert first_served_at(lh, T0, T0 + 2.0) == pytest.approx(T0 + RTT + TTL + MARGIN,
                                                               abs=0.008)
    lh = holder(B)
    lh.on_acquire_command(G, 2, 0.0, T0)
    later = T0 + EARLY_ACQUIRE_KEPT * (TTL + MARGIN) + 0.01
    lh.tick(later)
    assert lh.early_acquires == {}
    lh.on_record(G, rec(B, 2, "acquiring"), 20, later)
    assert lh.groups[G].gate_at == pytest.approx(later + TTL + MARGIN)
