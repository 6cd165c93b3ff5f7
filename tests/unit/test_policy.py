"""Unit tests of the pure failover policy: table tests with plain snapshots, no mocks,
and hypothesis properties over random snapshots."""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtlha.policy import (
    Action,
    Assign,
    Decision,
    GroupView,
    MarkDown,
    MarkUp,
    NodeView,
    PairView,
    Rule,
    Snapshot,
    Takeover,
    decide,
    is_alive,
    is_dead,
)

# Binary-exact numbers, so boundary comparisons are exact.
DEAD_AFTER = 0.25
INTERVAL = 0.0625
STARTED = 0.0
NOW = 100.0
A, B = "node-a", "node-b"
NO_ACTION = "no action: every node is as expected"

T = TypeVar("T")


def nv(name: str, age: float | None, *, down: bool = False) -> NodeView:
    """A node whose last heartbeat was ``age`` seconds before NOW (None: never heard)."""
    return NodeView(name, None if age is None else NOW - age, "inc-" + name, down)


def gv(name: str, owner: str | None, *, epoch: int = 4, revision: int = 17) -> GroupView:
    home, kind = name.rsplit("-", 1)
    return GroupView(name, home, kind, owner, epoch, None if owner is None else "held", revision)


def snap(
    a_age: float | None = INTERVAL,
    b_age: float | None = INTERVAL,
    *,
    a_down: bool = False,
    b_down: bool = False,
    owners: dict[str, str | None] | None = None,
    maintenance: bool = False,
    failback: str = "manual",
    in_flight: frozenset[str] = frozenset(),
    started_at: float = STARTED,
    initial_assign_wait: float = 0.0,
) -> Snapshot:
    """One pair (node-a, node-b); each group is owned by its home unless ``owners`` says."""
    own: dict[str, str | None] = {
        "node-a-data": A, "node-a-mgmt": A, "node-b-data": B, "node-b-mgmt": B,
    }
    own.update(owners or {})
    return Snapshot(
        dead_after=DEAD_AFTER,
        started_at=started_at,
        pairs=(PairView("pair-1", (A, B), failback, maintenance),),
        nodes={A: nv(A, a_age, down=a_down), B: nv(B, b_age, down=b_down)},
        groups={g: gv(g, o, epoch=4 + i, revision=17 + i)
                for i, (g, o) in enumerate(sorted(own.items()))},
        in_flight=in_flight,
        initial_assign_wait=initial_assign_wait,
    )


def of_type(decision: Decision, kind: type[T]) -> list[T]:
    return [a for a in decision.actions if isinstance(a, kind)]


def moves(decision: Decision) -> dict[str, str]:
    """group -> new owner, for every Takeover and Assign."""
    out: dict[str, str] = {}
    for a in decision.actions:
        if isinstance(a, Takeover):
            out[a.group] = a.new
        elif isinstance(a, Assign):
            out[a.group] = a.node
    return out


# ---- steady state --------------------------------------------------------------


def test_all_healthy_no_action() -> None:
    d = decide(snap(), NOW)
    assert d == Decision()
    assert d.actions == ()
    assert d.status == NO_ACTION
    assert d.status.startswith("no action")


def test_groups_on_the_companion_with_both_alive_stay_put() -> None:
    s = snap(owners={"node-a-data": B, "node-a-mgmt": B})
    assert decide(s, NOW).actions == ()


@pytest.mark.parametrize("age", [INTERVAL, 2 * INTERVAL, 3 * INTERVAL, DEAD_AFTER - 0.001])
def test_missed_heartbeats_within_dead_after_no_action(age: float) -> None:
    assert age < DEAD_AFTER
    assert decide(snap(a_age=age), NOW).actions == ()


def test_age_exactly_dead_after_is_not_dead() -> None:
    s = snap(a_age=DEAD_AFTER)
    assert NOW - s.nodes[A].last_heartbeat == DEAD_AFTER  # type: ignore[operator]
    assert not is_dead(s.nodes[A], s, NOW)
    assert is_alive(s.nodes[A], NOW, DEAD_AFTER)
    assert decide(s, NOW).actions == ()


def test_age_just_past_dead_after_is_dead() -> None:
    s = snap(a_age=DEAD_AFTER + 2**-20)
    assert is_dead(s.nodes[A], s, NOW)
    assert not is_alive(s.nodes[A], NOW, DEAD_AFTER)
    assert [type(a) for a in decide(s, NOW).actions] == [MarkDown, Takeover, Takeover]


# ---- failover ------------------------------------------------------------------


def test_heartbeats_stopped_marks_down_and_takes_over_both_groups() -> None:
    s = snap(a_age=1.0)
    d = decide(s, NOW)
    data, mgmt = s.groups["node-a-data"], s.groups["node-a-mgmt"]
    silence = "heartbeats from node-a stopped 1.00 s ago"
    assert d.actions == (
        MarkDown(A, "pair-1", f"node-a is down: {silence}", Rule.HEARTBEATS_STOPPED),
        Takeover("node-a-data", A, B, "pair-1", data.epoch, data.revision,
                 f"node-b takes over node-a-data: {silence}", Rule.HEARTBEATS_STOPPED),
        Takeover("node-a-mgmt", A, B, "pair-1", mgmt.epoch, mgmt.revision,
                 f"node-b takes over node-a-mgmt: {silence}", Rule.HEARTBEATS_STOPPED),
    )
    assert (data.epoch, data.revision) != (mgmt.epoch, mgmt.revision)
    assert d.status == (
        f"node-a is down: {silence}; "
        f"node-b takes over node-a-data: {silence}; "
        f"node-b takes over node-a-mgmt: {silence}"
    )


def test_the_other_direction() -> None:
    d = decide(snap(b_age=0.5), NOW)
    assert of_type(d, MarkDown) == [
        MarkDown(B, "pair-1", "node-b is down: heartbeats from node-b stopped 0.50 s ago",
                 Rule.HEARTBEATS_STOPPED)
    ]
    assert moves(d) == {"node-b-data": A, "node-b-mgmt": A}


def test_dead_node_already_declared_down_is_not_marked_again() -> None:
    d = decide(snap(a_age=1.0, a_down=True), NOW)
    assert of_type(d, MarkDown) == []
    assert moves(d) == {"node-a-data": B, "node-a-mgmt": B}


def test_dead_node_owning_its_companions_group_loses_it_too() -> None:
    d = decide(snap(a_age=1.0, owners={"node-b-mgmt": A}), NOW)
    assert moves(d) == {"node-a-data": B, "node-a-mgmt": B, "node-b-mgmt": B}


def test_dead_node_that_owns_nothing_is_only_marked_down() -> None:
    d = decide(snap(a_age=1.0, owners={"node-a-data": B, "node-a-mgmt": B}), NOW)
    assert [type(a) for a in d.actions] == [MarkDown]


def test_node_never_heard_after_grace_is_dead() -> None:
    d = decide(snap(a_age=None), NOW)
    assert of_type(d, MarkDown)[0].status == (
        "node-a is down: no heartbeat from node-a since the arbiter started"
    )
    assert moves(d) == {"node-a-data": B, "node-a-mgmt": B}


def test_both_nodes_dead_no_takeover() -> None:
    d = decide(snap(a_age=1.0, b_age=2.0), NOW)
    assert [(type(a), a.node) for a in d.actions if isinstance(a, MarkDown)] == [
        (MarkDown, A), (MarkDown, B),
    ]
    assert of_type(d, Takeover) == []
    assert of_type(d, Assign) == []


def test_in_flight_group_is_not_decided_again() -> None:
    d = decide(snap(a_age=1.0, in_flight=frozenset({"node-a-data"})), NOW)
    assert moves(d) == {"node-a-mgmt": B}
    d = decide(snap(a_age=1.0, in_flight=frozenset({"node-a-data", "node-a-mgmt"})), NOW)
    assert of_type(d, Takeover) == []
    assert len(of_type(d, MarkDown)) == 1


def test_maintenance_no_takeover() -> None:
    d = decide(snap(a_age=1.0, maintenance=True), NOW)
    assert of_type(d, Takeover) == []
    assert of_type(d, Assign) == []


# ---- recovery ------------------------------------------------------------------


def test_node_back_is_marked_up_without_failback() -> None:
    failback = "manual"  # the default
    s = snap(a_down=True, owners={"node-a-data": B, "node-a-mgmt": B}, failback=failback)
    d = decide(s, NOW)
    assert d.actions == (
        MarkUp(A, "pair-1", f"node-a is back (heartbeats resumed); failback is {failback}",
               Rule.NODE_BACK),
    )
    assert d.status == f"node-a is back (heartbeats resumed); failback is {failback}"
    assert of_type(d, Takeover) == []


@pytest.mark.parametrize("since_start", [0.0, 0.125, DEAD_AFTER])
def test_a_node_declared_down_before_is_not_back_in_a_new_arbiters_grace(
        since_start: float) -> None:
    """A new active arbiter adopts "declared down" from the KV and has never heard the
    node: within its grace the node is not dead, but not back either (no heartbeat)."""
    s = snap(a_age=None, a_down=True, owners={"node-a-data": B, "node-a-mgmt": B},
             started_at=NOW - since_start)
    assert decide(s, NOW).actions == ()


def test_node_back_at_the_dead_after_boundary() -> None:
    d = decide(snap(a_age=DEAD_AFTER, a_down=True), NOW)
    assert [type(a) for a in d.actions] == [MarkUp]


# ---- initial assignment --------------------------------------------------------

ALL_NEW: dict[str, str | None] = {
    "node-a-data": None, "node-a-mgmt": None, "node-b-data": None, "node-b-mgmt": None,
}


def test_initial_assignment_to_home_when_alive() -> None:
    d = decide(snap(owners=ALL_NEW), NOW)
    assert d.actions == tuple(
        Assign(g, home, "pair-1", f"{home} serves its home group {g}", Rule.INITIAL_ASSIGN)
        for g, home in [("node-a-data", A), ("node-a-mgmt", A), ("node-b-data", B),
                        ("node-b-mgmt", B)]
    )


def test_initial_assignment_to_companion_when_home_dead_past_grace() -> None:
    d = decide(snap(a_age=None, owners=ALL_NEW), NOW)
    assert moves(d) == {"node-a-data": B, "node-a-mgmt": B, "node-b-data": B, "node-b-mgmt": B}
    assign = next(a for a in of_type(d, Assign) if a.group == "node-a-data")
    assert assign.status == (
        "node-b serves node-a-data: its home node-a is down "
        "(no heartbeat from node-a since the arbiter started)"
    )
    assert of_type(d, MarkDown)[0].node == A


def test_initial_assignment_to_companion_when_home_heartbeats_stopped() -> None:
    d = decide(snap(a_age=3.0, owners={"node-a-data": None}), NOW)
    assert moves(d) == {"node-a-data": B, "node-a-mgmt": B}
    assert [type(a) for a in d.actions] == [MarkDown, Assign, Takeover]


@pytest.mark.parametrize("since_start", [0.0, 0.125, DEAD_AFTER])
def test_never_heard_node_within_grace_gets_nothing(since_start: float) -> None:
    d = decide(snap(a_age=None, owners=ALL_NEW, started_at=NOW - since_start), NOW)
    assert of_type(d, MarkDown) == []
    assert moves(d) == {"node-b-data": B, "node-b-mgmt": B}


def test_never_heard_node_within_grace_keeps_its_groups() -> None:
    d = decide(snap(a_age=None, started_at=NOW - 0.125), NOW)
    assert d.actions == ()


def test_unowned_group_waits_initial_assign_wait_for_its_home_node() -> None:
    """Cold start: services boot slower than dead_after; a group nobody owns yet is not
    handed to the companion until initial_assign_wait has passed since the arbiter began."""
    since_start = NOW - STARTED
    early = decide(snap(a_age=None, owners=ALL_NEW, initial_assign_wait=since_start + 1), NOW)
    assert of_type(early, MarkDown)[0].node == A
    assert moves(early) == {"node-b-data": B, "node-b-mgmt": B}
    late = decide(snap(a_age=None, owners=ALL_NEW, initial_assign_wait=since_start - 0.01), NOW)
    assert moves(late) == {"node-a-data": B, "node-a-mgmt": B, "node-b-data": B,
                           "node-b-mgmt": B}
    # An owned group of a dead node is taken over at once: the wait is for unowned ones.
    owned = decide(snap(a_age=3.0, initial_assign_wait=1e9), NOW)
    assert moves(owned) == {"node-a-data": B, "node-a-mgmt": B}


def test_no_initial_assignment_when_both_dead() -> None:
    d = decide(snap(a_age=None, b_age=None, owners=ALL_NEW), NOW)
    assert of_type(d, Assign) == []
    assert len(of_type(d, MarkDown)) == 2


def test_no_initial_assignment_to_companion_in_maintenance() -> None:
    d = decide(snap(a_age=None, owners=ALL_NEW, maintenance=True), NOW)
    assert moves(d) == {"node-b-data": B, "node-b-mgmt": B}


# ---- several pairs -------------------------------------------------------------


def test_pairs_are_decided_independently() -> None:
    s = snap(a_age=1.0)
    s = replace(
        s,
        pairs=(*s.pairs, PairView("pair-2", ("node-c", "node-d"))),
        nodes={**s.nodes, "node-c": nv("node-c", INTERVAL), "node-d": nv("node-d", 9.0)},
        groups={**s.groups, **{g: gv(g, g.rsplit("-", 1)[0]) for g in
                               ("node-c-data", "node-c-mgmt", "node-d-data", "node-d-mgmt")}},
    )
    d = decide(s, NOW)
    assert moves(d) == {
        "node-a-data": B, "node-a-mgmt": B, "node-d-data": "node-c", "node-d-mgmt": "node-c",
    }
    assert {a.pair for a in of_type(d, Takeover) if a.new == "node-c"} == {"pair-2"}


# ---- replay ------------------------------------------------------------------

SCENARIOS = {
    "healthy": (snap(), NOW),
    "a-dead": (snap(a_age=1.0), NOW),
    "a-back": (snap(a_down=True, owners={"node-a-data": B, "node-a-mgmt": B}), NOW),
    "both-dead": (snap(a_age=1.0, b_age=None), NOW),
    "in-flight": (snap(b_age=0.5, in_flight=frozenset({"node-b-mgmt"})), NOW),
    "maintenance": (snap(a_age=1.0, maintenance=True), NOW),
    "initial": (snap(a_age=None, owners=ALL_NEW), NOW),
    "grace": (snap(a_age=None, owners=ALL_NEW, started_at=NOW - 0.1), NOW),
}


@pytest.mark.parametrize(("s", "now"), SCENARIOS.values(), ids=SCENARIOS.keys())
def test_inputs_round_trip_reproduces_the_decision(s: Snapshot, now: float) -> None:
    inputs = s.to_inputs()
    wire = orjson.loads(orjson.dumps(inputs))  # as carried in an event
    again = Snapshot.from_inputs(wire)
    assert again == s
    assert Snapshot.from_inputs(inputs) == s
    assert decide(again, now) == decide(s, now)
    assert decide(again, now).status == decide(s, now).status


def test_to_inputs_is_plain_json() -> None:
    inputs = snap(in_flight=frozenset({"node-b-mgmt", "node-a-data"})).to_inputs()
    assert inputs["in_flight"] == ["node-a-data", "node-b-mgmt"]
    assert inputs["dead_after"] == DEAD_AFTER
    assert set(inputs) == {"dead_after", "started_at", "pairs", "nodes", "groups", "in_flight",
                           "initial_assign_wait", "storage", "storage_stale_after",
                           "storage_alarms", "storage_settle",
                           "storage_confirm_after", "hold_off_until"}
    assert orjson.loads(orjson.dumps(inputs))["nodes"][A]["name"] == A


# ---- properties ----------------------------------------------------------------

AGES = st.one_of(
    st.none(),
    st.sampled_from([0.0, INTERVAL, DEAD_AFTER, DEAD_AFTER + 2**-20, 10.0, -0.5]),
    st.floats(min_value=0.0, max_value=4 * DEAD_AFTER, allow_nan=False),
)


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[Snapshot, float]:
    n_pairs = draw(st.integers(min_value=1, max_value=3))
    pairs = tuple(
        PairView(f"pair-{i}", (f"p{i}-a", f"p{i}-b"), draw(st.sampled_from(["manual", "auto"])),
                 draw(st.booleans()))
        for i in range(n_pairs)
    )
    names = [n for p in pairs for n in p.nodes]
    nodes = {n: nv(n, draw(AGES), down=draw(st.booleans())) for n in names}
    groups: dict[str, GroupView] = {}
    for p in pairs:
        for home, other in (p.nodes, p.nodes[::-1]):
            # mostly the home or the companion; sometimes no record, sometimes a stranger
            owners = st.sampled_from([home, home, other, other, None]) | st.sampled_from(names)
            for kind in ("data", "mgmt"):
                g = f"{home}-{kind}"
                groups[g] = GroupView(g, home, kind, draw(owners), draw(st.integers(0, 50)),
                                      "held", draw(st.integers(0, 500)))
    in_flight = frozenset(draw(st.lists(st.sampled_from(sorted(groups)), max_size=3)))
    since_start = draw(st.sampled_from([0.0, DEAD_AFTER / 2, DEAD_AFTER, 10.0]))
    s = Snapshot(DEAD_AFTER, NOW - since_start, pairs, nodes, groups, in_flight)
    return s, NOW


def _pair_of(s: Snapshot, node: str) -> PairView:
    return next(p for p in s.pairs if node in p.nodes)


def _check_takeover(s: Snapshot, now: float, t: Takeover) -> None:
    g = s.groups[t.group]
    pair = _pair_of(s, g.home)
    assert t.old == g.owner
    assert not is_alive(s.nodes[t.old], now, s.dead_after), "took over from a live owner"
    assert is_dead(s.nodes[t.old], s, now)
    assert not is_dead(s.nodes[t.new], s, now), "took over to a dead node"
    assert t.pair == pair.name
    assert t.old in pair.nodes
    assert t.new in pair.nodes
    assert t.new != t.old, "the new owner is the companion in the same pair"
    assert (t.epoch, t.revision) == (g.epoch, g.revision)
    assert not pair.maintenance
    assert t.rule is Rule.HEARTBEATS_STOPPED


def _check_assign(s: Snapshot, now: float, a: Assign) -> None:
    g = s.groups[a.group]
    pair = _pair_of(s, g.home)
    assert g.owner is None
    assert a.pair == pair.name
    assert a.node in pair.nodes
    assert not is_dead(s.nodes[a.node], s, now)
    if a.node != g.home:
        assert is_dead(s.nodes[g.home], s, now)
        assert not pair.maintenance


def _check_marks(s: Snapshot, now: float, actions: tuple[Action, ...]) -> None:
    for a in actions:
        if isinstance(a, MarkDown):
            assert is_dead(s.nodes[a.node], s, now)
            assert not s.nodes[a.node].declared_down
        elif isinstance(a, MarkUp):
            assert not is_dead(s.nodes[a.node], s, now)
            assert s.nodes[a.node].declared_down


@settings(max_examples=200, deadline=None)
@given(case=snapshots())
def test_decide_properties(case: tuple[Snapshot, float]) -> None:
    s, now = case
    d = decide(s, now)
    moved = [a.group for a in d.actions if isinstance(a, Takeover | Assign)]
    assert len(moved) == len(set(moved)), "two actions for the same group"
    assert not set(moved) & s.in_flight
    for a in d.actions:
        if isinstance(a, Takeover):
            _check_takeover(s, now, a)
        elif isinstance(a, Assign):
            _check_assign(s, now, a)
    _check_marks(s, now, d.actions)
    assert d.status == (NO_ACTION if not d.actions else "; ".join(a.status for a in d.actions))


@settings(max_examples=100, deadline=None)
@given(case=snapshots())
def test_decide_is_replayable(case: tuple[Snapshot, float]) -> None:
    s, now = case
    again = Snapshot.from_inputs(orjson.loads(orjson.dumps(s.to_inputs())))
    assert again == s
    assert decide(again, now) == decide(s, now)
    assert decide(again, now).status == decide(s, now).status
