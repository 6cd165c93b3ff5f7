"""How the arbiter turns what it received into the policy's inputs (the pure parts):
pair records into PairViews (wall-clock failures on the monotonic clock, the config's
failback until a record exists), heartbeats' checks into failing names, and the CLI's
replay of an event's inputs."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from vtlha_arbiter.pairstate import PairState, to_monotonic
from vtlha_arbiter.view import NodeState

from tests.conftest import EXAMPLE
from vtlha.cli import replay
from vtlha.config import load_config
from vtlha.messages import CheckResult, Heartbeat, PairRecord
from vtlha.policy import GroupView, NodeView, PairView, Snapshot, decide
from vtlha.subjects import Subjects

CFG = load_config(EXAMPLE)


def _state() -> PairState:
    return PairState(None, Subjects(CFG.cluster), CFG, logging.getLogger("test"))  # type: ignore[arg-type]


@pytest.mark.parametrize(("wall", "expected"), [
    (1000.0, 500.0),  # now
    (990.0, 490.0),  # 10 s ago
    (1005.0, 500.0),  # "in the future" (another host's clock ahead): now, never later
])
def test_to_monotonic(wall: float, expected: float) -> None:
    assert to_monotonic(wall, now=500.0, wall_now=1000.0) == expected


def test_pair_view_without_a_record_is_the_configs() -> None:
    p = CFG.pairs[0]
    v = _state().view(p, now=50.0, wall_now=1000.0)
    assert v == PairView("pair-1", ("node-a", "node-b"), "manual", False,
                         failback_hold_time=p.failback_hold_time, flap_max=p.flap_max,
                         flap_window=p.flap_window, held_down=frozenset(), failures={})


def test_pair_view_from_the_record() -> None:
    st = _state()
    st.seen("pair-1", PairRecord(maintenance=True, hold=["node-b"], failback="auto",
                                 failures={"node-b": [900.0, 990.0]}), revision=7)
    v = st.view(CFG.pairs[0], now=50.0, wall_now=1000.0)
    assert (v.failback, v.maintenance, v.held_down) == ("auto", True, frozenset({"node-b"}))
    assert v.failures == {"node-b": (-50.0, 40.0)}


def test_a_pair_view_follows_each_new_record_and_its_clock() -> None:
    """A pair's view is reused while its record holds no failure times (nothing in it
    depends on the clock); a new record, a forgotten bucket or failure times make it
    afresh, the failures on the clock of the call."""
    st, p = _state(), CFG.pairs[0]
    first = st.view(p, now=50.0, wall_now=1000.0)
    assert st.view(p, now=60.0, wall_now=1010.0) is first  # the config's defaults, reused
    st.seen("pair-1", PairRecord(maintenance=True), revision=3)
    assert st.view(p, now=60.0, wall_now=1010.0).maintenance is True
    st.seen("pair-1", PairRecord(failures={"node-a": [990.0]}), revision=4)
    assert st.view(p, now=60.0, wall_now=1000.0).failures == {"node-a": (50.0,)}
    assert st.view(p, now=70.0, wall_now=1000.0).failures == {"node-a": (60.0,)}
    assert st.view(p, now=70.0, wall_now=1000.0).maintenance is False
    st.forget()
    assert st.view(p, now=80.0, wall_now=1020.0) == first


def test_failing_checks_are_those_of_the_latest_heartbeat_even_when_asked_often() -> None:
    st = NodeState()
    ok = [CheckResult(name="vtl-daemon", ok=True, fatal=True)]
    bad = [CheckResult(name="vtl-daemon", ok=False, fatal=True)]
    st.heartbeat = Heartbeat(cluster="demo", node="node-a", incarnation="i", seq=1,
                             interval=0.1, checks=bad)
    assert st.failing() == st.failing() == (("vtl-daemon",), ())
    st.heartbeat = Heartbeat(cluster="demo", node="node-a", incarnation="i", seq=2,
                             interval=0.1, checks=ok)
    assert st.failing() == ((), ())


def test_an_older_revision_is_ignored_and_a_delete_forgets() -> None:
    st = _state()
    st.seen("pair-1", PairRecord(maintenance=True), revision=7)
    st.seen("pair-1", PairRecord(maintenance=False), revision=5)  # a stale read
    assert st.record("pair-1").maintenance is True
    st.seen("pair-1", None, revision=8)  # deleted: the config's defaults again
    assert st.record("pair-1") == PairRecord(failback="manual")


def test_failing_checks_from_the_latest_heartbeat() -> None:
    st = NodeState()
    assert st.failing() == ((), ())
    st.heartbeat = Heartbeat(cluster="demo", node="node-a", incarnation="i", seq=1,
                             interval=0.1, checks=[
                                 CheckResult(name="vtl-daemon", ok=False, fatal=True),
                                 CheckResult(name="ui", ok=False),
                                 CheckResult(name="executor ip-manager alive", ok=False,
                                             fatal=True),
                                 CheckResult(name="port", ok=True, fatal=True)])
    assert st.failing() == (("executor ip-manager alive", "vtl-daemon"), ("ui",))


def _snap(**node_a: Any) -> Snapshot:
    return Snapshot(
        dead_after=0.3, started_at=0.0,
        pairs=(PairView("pair-1", ("node-a", "node-b")),),
        nodes={"node-a": NodeView("node-a", last_heartbeat=9.9, **node_a),
               "node-b": NodeView("node-b", last_heartbeat=9.9)},
        groups={"node-a-mgmt": GroupView("node-a-mgmt", "node-a", "mgmt", owner="node-a",
                                         epoch=1, state="held", revision=3)})


def test_replay_gives_each_sentence_of_the_decision() -> None:
    inputs = {"snapshot": _snap(fatal_failing=("vtl-daemon",)).to_inputs(), "now": 10.0}
    assert replay(inputs) == [
        "check vtl-daemon fails on node-a (fatal: its companion takes over what it serves)",
        "node-b takes over node-a-mgmt: fatal check vtl-daemon failing on node-a (a fatal "
        "process error)"]
    assert replay({"snapshot": _snap().to_inputs(), "now": 10.0}) == [
        "no action: every node is as expected"]


def test_replay_of_an_operator_request() -> None:
    inputs = {"snapshot": _snap().to_inputs(), "now": 10.0,
              "request": {"verb": "switchover", "group": "node-a-mgmt"}}
    assert replay(inputs) == ["node-b takes over node-a-mgmt from node-a: switchover "
                              "requested by an operator"]
    inputs["request"] = {"verb": "clear-hold", "pair": "pair-1", "node": "node-b"}
    assert replay(inputs) == ["clear-hold pair-1 node-b refused: node-b is not held down and "
                             "has no failure recorded"]


def test_replay_of_a_takeover_held_back_by_the_hold_off_says_so() -> None:
    """``vtlha explain`` replays what the arbiter did: within a new active arbiter's
    hold-off the takeover was held back, and the replay says so (issue 15)."""
    snap = dataclasses.replace(_snap(fatal_failing=("vtl-daemon",)), hold_off_until=10.1)
    inputs = {"snapshot": snap.to_inputs(), "now": 10.0}
    assert replay(inputs) == [
        "check vtl-daemon fails on node-a (fatal: its companion takes over what it serves)",
        "held back (0.10 s left of a new active arbiter's hold-off: no takeover within "
        "lease_ttl of becoming active): node-b takes over node-a-mgmt: fatal check "
        "vtl-daemon failing on node-a (a fatal process error)"]
    inputs["now"] = 10.1  # the hold-off is over: carried out
    assert replay(inputs)[1].startswith("node-b takes over node-a-mgmt")


def test_a_decision_with_only_moves_held_back_says_so() -> None:
    snap = dataclasses.replace(_snap(fatal_failing=("vtl-daemon",),
                                     check_alarms=("vtl-daemon",)), hold_off_until=11.0)
    d = decide(snap, 10.0)
    assert d.actions == () and len(d.held_back) == 1
    assert d.status.startswith("held back (1.00 s left")
    assert Snapshot.from_inputs(snap.to_inputs()) == snap
