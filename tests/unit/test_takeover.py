"""The arbiter's takeover rules and its state machine (vtlha.protocol.takeover): table
tests, one per transition."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtlha.messages import GroupRecord
from vtlha.protocol import takeover as tk
from vtlha.protocol.takeover import acquire_wait, claim_epoch

TTL, MARGIN = 0.3, 0.03


@pytest.mark.parametrize(("released", "seen", "now", "expected"), [
    (True, 10.0, 10.01, 0.0),            # every old executor acked: no wait
    (True, None, 10.0, 0.0),
    (False, None, 10.0, TTL + MARGIN),   # never saw a renewal: the whole lease + margin
    (False, 10.0, 10.0, TTL + MARGIN),   # renewal seen just now
    (False, 10.0, 10.1, TTL + MARGIN - 0.1),
    (False, 10.0, 10.33, 0.0),           # its lease (and the margin) ran out
    (False, 10.0, 99.0, 0.0),
])
def test_acquire_wait(released: bool, seen: float | None, now: float, expected: float) -> None:
    got = acquire_wait(released_all=released, last_renewal_seen=seen, now=now,
                       lease_ttl=TTL, margin=MARGIN)
    assert got == pytest.approx(expected, abs=1e-9)


@given(seen=st.floats(0, 1e6), delay=st.floats(0, 10))
def test_wait_never_ends_before_the_old_lease_plus_margin(seen: float, delay: float) -> None:
    """The old owner's lease ends at most lease_ttl after it *sent* its last renewal, which
    was before the arbiter saw it: the gate opens no earlier than seen + ttl + margin."""
    now = seen + delay
    wait = acquire_wait(released_all=False, last_renewal_seen=seen, now=now, lease_ttl=TTL,
                        margin=MARGIN)
    assert now + wait >= seen + TTL + MARGIN - 1e-9
    assert wait >= 0


def test_claim_writes_the_next_epoch() -> None:
    assert claim_epoch(1) == 2 and claim_epoch(41) == 42


# ---- the state machine: one table per transition --------------------------------------


T = tk.Timings(lease_ttl=TTL, margin=MARGIN, acquire_deadline=1.0, read_every=0.1,
               storage_bound=2.0, claim_tries=3)
TAKE = tk.Move(tk.Kind.TAKEOVER, "a-data", new="b", old="a", epoch=4, revision=40)
TERM = 7


def _rec(owner: str, epoch: int, state: str = "held", term: int = 1,
         renewed_by: str | None = None) -> GroupRecord:
    return GroupRecord(owner=owner, term=term, epoch=epoch, state=state,  # type: ignore[arg-type]
                       renewed_by=renewed_by or owner)


def _machine(move: tk.Move = TAKE, seen: float | None = 9.9, alive: bool = True) -> tk.Mover:
    return tk.Mover(move, T, term=TERM, last_renewal_seen=seen, old_alive=alive)


def _left(seen: float | None, now: float) -> Any:
    """What may remain of the old owner's lease at ``now`` (the claim's wait)."""
    return pytest.approx(TTL + MARGIN if seen is None else max(0.0, seen + TTL + MARGIN - now))


def _claimed(m: tk.Mover, now: float = 10.0) -> list[tk.Output]:
    assert m.start(now) == [tk.Claim("a-data", "b", 5, 40, _left(m.last_renewal_seen, now))]
    return m.on_claim(tk.Won(41), now)


def test_takeover_claims_the_next_epoch_against_the_revision_seen() -> None:
    m = _machine()
    assert m.start(10.0) == [tk.Claim("a-data", "b", 5, 40, _left(9.9, 10.0))]
    assert m.phase is tk.Phase.CLAIMING and m.blocks_policy


def test_a_won_claim_sends_release_and_acquire_with_the_old_lease_left() -> None:
    out = _claimed(_machine(seen=9.9))
    assert out[0] == tk.Emit("started", "", {})
    assert tk.Release("a", "a-data", 5) in out
    assert tk.Emit("notify", "", {}) in out
    acq = [o for o in out if isinstance(o, tk.Acquire)]
    assert acq == [tk.Acquire("b", "a-data", 5, pytest.approx(9.9 + TTL + MARGIN - 10.0))]


def test_no_notify_to_an_old_owner_that_is_not_alive() -> None:
    out = _claimed(_machine(alive=False))
    assert not any(isinstance(o, tk.Emit) and o.what == "notify" for o in out)


@pytest.mark.parametrize(("result", "phase"), [(tk.Lost(), tk.Phase.REREADING),
                                               (tk.Unknown(), tk.Phase.REREADING)])
def test_a_lost_or_unanswered_claim_reads_the_key_again(result: tk.ClaimResult,
                                                         phase: tk.Phase) -> None:
    m = _machine()
    m.start(10.0)
    assert m.on_claim(result, 10.0) == [tk.Read("a-data")]
    assert m.phase is phase


@pytest.mark.parametrize(("rec", "rev", "expected"), [
    # renewals only (a stalled or lagging watch): claim again against the fresh revision
    # (renewed by its owner, alive: that renewal was seen now, the whole lease to wait)
    (_rec("a", 4), 45, [tk.Claim("a-data", "b", 5, 45, _left(10.5, 10.5))]),
    # our own claim committed although the answer said otherwise
    (_rec("b", 5, "acquiring", term=TERM, renewed_by="arb"), 41, "claimed"),
    # really changed: another epoch, another owner, released, or a stale read
    (_rec("a", 5), 45, "given up"),
    (_rec("b", 5, "acquiring", term=TERM - 1), 45, "given up"),
    (_rec("a", 4, "releasing"), 45, "given up"),
    (_rec("a", 4), 40, "given up"),
    (None, 0, "given up"),
])
def test_the_reread_after_a_lost_claim(rec: GroupRecord | None, rev: int,
                                       expected: Any) -> None:
    m = _machine()
    m.start(10.0)
    m.on_claim(tk.Lost(), 10.0)
    out = m.on_record(rec, rev, 10.5)
    if expected == "claimed":
        assert m.phase is tk.Phase.MOVING and tk.Release("a", "a-data", 5) in out
    elif expected == "given up":
        assert out == [tk.GivenUp(out[0].reason, "claim_lost")]  # type: ignore[union-attr]
        assert m.done and not m.blocks_policy
    else:
        assert out == expected


def test_an_owner_decided_dead_that_renewed_since_is_not_claimed_again() -> None:
    """The witness lab's trace: node-a's arbiter, active, behind a 0.5 s cut of node-a,
    decided node-b dead (its heartbeats stopped reaching node-a's server); its claim
    was lost after the heal because node-b had renewed meanwhile, and the re-read claim
    won: node-b's own groups moved to node-a for nothing. An owner that renewed after it
    was decided dead is alive: the claim is given up (the policy decides again, and
    ``policy.renews`` holds it while the renewals go on); for an owner known alive
    (a fatal check, a switchover) a renewal only means claiming against it again."""
    m = _machine(alive=False)
    m.start(10.0)
    m.on_claim(tk.Lost(), 10.45)
    out = m.on_record(_rec("a", 4), 45, 10.5)  # renewed by its owner after revision 40
    assert out == [tk.GivenUp(out[0].reason, "owner_renewed")]  # type: ignore[union-attr]
    assert "renewed its lease" in out[0].reason and m.done  # type: ignore[union-attr]
    # a renewal written by someone else (the arbiter's own record) is no sign of life
    m = _machine(alive=False)
    m.start(10.0)
    m.on_claim(tk.Lost(), 10.45)
    assert m.on_record(_rec("a", 4, renewed_by="arb"), 45, 10.5) == [
        tk.Claim("a-data", "b", 5, 45, _left(9.9, 10.5))]
    # the owner alive: claim against the renewal
    m = _machine(alive=True)
    m.start(10.0)
    m.on_claim(tk.Lost(), 10.45)
    assert m.on_record(_rec("a", 4), 45, 10.5) == [
        tk.Claim("a-data", "b", 5, 45, _left(10.5, 10.5))]


@pytest.mark.parametrize(("seen", "claimed_at", "won_at"), [
    (9.9, 10.0, 10.006), (9.0, 10.0, 10.02), (None, 10.0, 10.01), (9.99, 10.0, 10.5)])
def test_the_claims_wait_is_what_may_remain_of_the_old_lease_when_it_is_written(
        seen: float | None, claimed_at: float, won_at: float) -> None:
    """The claim's wait is computed when it is written, the command's when the claim
    won: as a duration the claim's is never the shorter, and counted from when it was
    computed it never ends before the old owner's lease (and the margin) could have."""
    m = _machine(seen=seen)
    [claim] = m.start(claimed_at)
    assert isinstance(claim, tk.Claim) and claim.wait == _left(seen, claimed_at)
    [acq] = [o for o in m.on_claim(tk.Won(41), won_at) if isinstance(o, tk.Acquire)]
    assert acq.wait is not None and claim.wait is not None
    assert claim.wait >= acq.wait
    if seen is not None:
        assert claimed_at + claim.wait >= seen + TTL + MARGIN - 1e-9


def test_a_renewal_seen_on_the_reread_restarts_the_wait() -> None:
    m = _machine(seen=9.0)
    m.start(10.0)
    m.on_claim(tk.Lost(), 10.0)
    m.on_record(_rec("a", 4), 45, 10.5)  # the owner renewed: seen at 10.5
    out = m.on_claim(tk.Won(46), 10.6)
    acq = [o for o in out if isinstance(o, tk.Acquire)]
    assert acq[0].wait == pytest.approx(10.5 + TTL + MARGIN - 10.6)


def test_claims_are_retried_a_bounded_number_of_times() -> None:
    m = _machine()
    m.start(10.0)
    for rev in (45, 46):
        m.on_claim(tk.Lost(), 10.0)
        assert m.on_record(_rec("a", 4), rev, 10.0) == [
            tk.Claim("a-data", "b", 5, rev, _left(10.0, 10.0))]
    m.on_claim(tk.Lost(), 10.0)
    assert isinstance(m.on_record(_rec("a", 4), 47, 10.0)[0], tk.GivenUp)


def test_an_unanswered_claim_that_did_not_commit_is_sent_again() -> None:
    m = _machine()
    m.start(10.0)
    m.on_claim(tk.Unknown(), 10.0)
    assert m.on_record(_rec("a", 4), 40, 10.0) == [
        tk.Claim("a-data", "b", 5, 40, _left(9.9, 10.0))]


def test_release_acked_after_the_acquire_opens_the_gate_at_once() -> None:
    m = _machine(seen=9.9)
    _claimed(m)
    assert m.on_acquired(True, 10.01) == []
    assert m.phase is tk.Phase.HOLDING
    assert m.on_released(True, 10.02) == [tk.Acquire("b", "a-data", 5, 0.0, only="heartbeat")]
    assert m.on_released(True, 10.03) == []  # once


def test_release_acked_first_opens_the_gate_when_the_acquire_is_acked() -> None:
    m = _machine(seen=9.9)
    _claimed(m)
    assert m.on_released(True, 10.01) == []
    assert m.on_acquired(True, 10.02) == [tk.Acquire("b", "a-data", 5, 0.0, only="heartbeat")]


@pytest.mark.parametrize(("released", "now"), [(False, 10.02), (True, 10.5)])
def test_no_gate_opening_without_every_release_or_once_the_lease_ran_out(
        released: bool, now: float) -> None:
    m = _machine(seen=9.9)
    _claimed(m)
    m.on_acquired(True, now)
    assert m.on_released(released, now) == []


def test_an_acquire_not_acknowledged_fails_the_move() -> None:
    m = _machine()
    _claimed(m)
    out = m.on_acquired(False, 10.1)
    assert [type(o) for o in out] == [tk.Emit, tk.Failed]
    assert out[1].result == "acquire_failed" and m.done  # type: ignore[union-attr]


def test_held_without_storage_completes() -> None:
    m = _machine()
    _claimed(m)
    m.on_acquired(True, 10.1)
    assert m.on_record(_rec("b", 5, "acquiring", term=TERM), 41, 10.2) == []
    out = m.on_record(_rec("b", 5), 42, 10.4)
    assert [type(o) for o in out] == [tk.Emit, tk.Done] and out[0].what == "completed"  # type: ignore[union-attr]
    assert m.phase is tk.Phase.DONE


def test_held_with_storage_waits_for_served_outside_the_policys_reach() -> None:
    m = _machine(dataclasses.replace(TAKE, storage=True))
    _claimed(m)
    m.on_acquired(True, 10.1)
    assert m.on_record(_rec("b", 5), 42, 10.4) == []
    assert m.phase is tk.Phase.SERVING and not m.blocks_policy
    assert m.on_storage("starting", None, 10.5) == []
    out = m.on_storage("served", None, 10.6)
    assert isinstance(out[-1], tk.Done)


@pytest.mark.parametrize(("event", "result"), [
    (lambda m: m.on_storage("failed", "EIO", 10.6), "not_served"),
    (lambda m: m.tick(10.4 + 2.0), "not_served"),
    (lambda m: m.on_node_down("b", 10.6), "not_served"),
    (lambda m: m.on_record(_rec("a", 6), 50, 10.6), "moved"),
])
def test_storage_not_served(event: Any, result: str) -> None:
    m = _machine(dataclasses.replace(TAKE, storage=True))
    _claimed(m)
    m.on_acquired(True, 10.1)
    m.on_record(_rec("b", 5), 42, 10.4)
    out = event(m)
    assert isinstance(out[-1], tk.Failed) and out[-1].result == result


def test_holding_reads_the_key_directly_and_times_out() -> None:
    m = _machine(seen=None)
    _claimed(m)
    m.on_acquired(True, 10.0)
    assert m.tick(10.05) == []
    assert m.tick(10.11) == [tk.Read("a-data")]
    deadline = 10.0 + TTL + MARGIN + T.acquire_deadline
    assert not any(isinstance(o, tk.Failed) for o in m.tick(deadline - 0.01))
    assert isinstance(m.tick(deadline)[-1], tk.Failed)


@pytest.mark.parametrize("phase_at", ["new", "claiming", "rereading", "moving", "holding",
                                      "serving"])
def test_not_acting_gives_up_in_every_phase(phase_at: str) -> None:
    m = _machine(dataclasses.replace(TAKE, storage=True))
    steps = ["new", "claiming", "rereading", "moving", "holding", "serving"]
    if steps.index(phase_at) >= 1:
        m.start(10.0)
    if phase_at == "rereading":
        m.on_claim(tk.Lost(), 10.0)
    if steps.index(phase_at) >= 3:
        m.on_claim(tk.Won(41), 10.0)
    if steps.index(phase_at) >= 4:
        m.on_acquired(True, 10.1)
    if phase_at == "serving":
        m.on_record(_rec("b", 5), 42, 10.4)
    out = m.on_not_acting(10.5)
    assert len(out) == 1 and isinstance(out[0], tk.GivenUp) and out[0].result == "not_active"
    assert m.on_not_acting(10.6) == [] and m.on_claim(tk.Won(41), 10.6) == []


def test_the_new_owner_down_before_it_holds_fails_the_move() -> None:
    m = _machine()
    _claimed(m)
    assert m.on_node_down("a", 10.1) == []  # the old owner: expected
    out = m.on_node_down("b", 10.1)
    assert isinstance(out[-1], tk.Failed) and out[-1].result == "owner_down"


def test_assign_creates_the_key_at_epoch_1_and_opens_the_gate_at_once() -> None:
    m = _machine(tk.Move(tk.Kind.ASSIGN, "a-data", new="a"))
    assert m.start(1.0) == [tk.Claim("a-data", "a", 1, None, 0.0)]  # nobody held it
    out = m.on_claim(tk.Won(3), 1.0)
    assert out == [tk.Emit("started", "", {}), tk.Acquire("a", "a-data", 1, 0.0)]


def test_resume_acquires_with_the_lease_holders_own_gate() -> None:
    m = _machine(tk.Move(tk.Kind.RESUME, "a-data", new="b", epoch=5))
    assert m.start(1.0) == [tk.Acquire("b", "a-data", 5, None)]
    m.on_acquired(True, 1.1)
    out = m.on_record(_rec("b", 5), 42, 1.5)
    assert isinstance(out[-1], tk.Done)
