"""Table tests of the policy's rules from issue 7: fatal process errors, check alarms,
the management path, failback (automatic, hold time, anti-flap hold-down), the hold after
a move, maintenance, and the operator requests (switchover, failback, clear-hold,
maintenance); replay through ``explain``. Plain snapshots, no mocks.

Pair node-a/node-b; node-a-data has device vtl-a0, node-b-data vtl-b0; by default both
nodes are alive, healthy for long, with healthy management paths and fresh storage
views reaching every device, and every group is on its home node."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

import orjson
import pytest

from vtlha.policy import (
    Assign,
    ClearCheckAlarm,
    ClearHold,
    Decision,
    DevicePaths,
    GroupView,
    HoldDown,
    MarkDown,
    NodeHealth,
    NodeView,
    PairView,
    RaiseCheckAlarm,
    RaiseStorageAlarm,
    Refusal,
    Rule,
    SetMaintenance,
    Snapshot,
    StorageView,
    Takeover,
    answer,
    answer_status,
    clear_hold,
    decide,
    event_kind,
    explain,
    failback,
    failed_nodes,
    healthy_for,
    node_health,
    record_failure,
    set_maintenance,
    switchover,
)

# Binary-exact numbers, so boundary comparisons are exact.
DEAD_AFTER = 0.25
INTERVAL = 0.0625
STALE = 0.75
HOLD = 8.0
NOW = 1000.0
LONG = 100.0  # healthy for this long: well past the hold time
A, B = "node-a", "node-b"
AD, AM, BD, BM = "node-a-data", "node-a-mgmt", "node-b-data", "node-b-mgmt"
DEVICES = {AD: ("vtl-a0",), BD: ("vtl-b0",)}
NO_ACTION = "no action: every node is as expected"

T = TypeVar("T")


def nv(name: str, *, age: float | None = INTERVAL, down: bool = False,
       fatal: tuple[str, ...] = (), nonfatal: tuple[str, ...] = (),
       alarms: tuple[str, ...] = (), mgmt: bool | None = True,
       healthy: float | None = LONG, mgmt_ok: float | None = LONG,
       storage_ok: float | None = LONG) -> NodeView:
    """A node heard ``age`` s before NOW; ``healthy``/``mgmt_ok``/``storage_ok`` say for
    how long (s) each input has been good (None: it is not)."""
    def since(span: float | None) -> float | None:
        return None if span is None else NOW - span
    return NodeView(name, None if age is None else NOW - age, "inc-" + name, down,
                    fatal, nonfatal, alarms, mgmt, since(healthy), since(mgmt_ok),
                    since(storage_ok))


def sv(node: str, age: float = INTERVAL, **up: int) -> StorageView:
    """Every device 2/2 paths up unless given (keyword: device with '_' for '-'; a
    negative count leaves it out of the view)."""
    devices = {d: DevicePaths(2, 2) for d in ("vtl-a0", "vtl-b0")}
    for k, n in up.items():
        name = k.replace("_", "-")
        if n < 0:
            del devices[name]
        else:
            devices[name] = DevicePaths(n, 2)
    return StorageView(node, NOW - age, devices)


DEFAULT_STORAGE = object()


def snap(
    a: NodeView | None = None,
    b: NodeView | None = None,
    *,
    owners: dict[str, str | None] | None = None,
    moved: dict[str, float] | None = None,
    states: dict[str, str] | None = None,
    storage: Any = DEFAULT_STORAGE,
    failback: str = "manual",
    maintenance: bool = False,
    held: frozenset[str] = frozenset(),
    failures: dict[str, tuple[float, ...]] | None = None,
    flap_max: int = 3,
    flap_window: float = 3600.0,
    in_flight: frozenset[str] = frozenset(),
    storage_alarms: frozenset[str] = frozenset(),
    started_at: float = 0.0,
    initial_assign_wait: float = 0.0,
    standby: frozenset[str] = frozenset(),
) -> Snapshot:
    """``moved``: group -> how long ago (s) it last moved."""
    own: dict[str, str | None] = {AD: A, AM: A, BD: B, BM: B}
    own.update(owners or {})
    views = {A: sv(A), B: sv(B)} if storage is DEFAULT_STORAGE else storage
    groups = {}
    for i, (g, o) in enumerate(sorted(own.items())):
        home, kind = g.rsplit("-", 1)
        groups[g] = GroupView(g, home, kind, o, 4 + i,
                              None if o is None else (states or {}).get(g, "held"), 17 + i,
                              DEVICES.get(g, ()),
                              None if g not in (moved or {}) else NOW - (moved or {})[g])
    return Snapshot(
        dead_after=DEAD_AFTER,
        started_at=started_at,
        pairs=(PairView("pair-1", (A, B), failback, maintenance, HOLD, flap_max, flap_window,
                        held, failures or {}, standby=standby),),
        nodes={A: a or nv(A), B: b or nv(B)},
        groups=groups,
        in_flight=in_flight,
        initial_assign_wait=initial_assign_wait,
        storage=views,
        storage_stale_after=STALE,
        storage_alarms=storage_alarms,
    )


def of_type(decision: Decision, kind: type[T]) -> list[T]:
    return [a for a in decision.actions if isinstance(a, kind)]


def moves(decision: Decision) -> dict[str, tuple[str, Rule]]:
    """group -> (new owner, rule), for every Takeover and Assign."""
    out: dict[str, tuple[str, Rule]] = {}
    for a in decision.actions:
        if isinstance(a, Takeover):
            out[a.group] = (a.new, a.rule)
        elif isinstance(a, Assign):
            out[a.group] = (a.node, a.rule)
    return out


def takeover(s: Snapshot, group: str, new: str, status: str, rule: Rule) -> Takeover:
    g = s.groups[group]
    assert g.owner is not None
    return Takeover(group, g.owner, new, "pair-1", g.epoch, g.revision, status, rule)


AWAY: dict[str, str | None] = {AD: B, AM: B}  # node-a's groups on node-b


# ---- the defaults are quiet ---------------------------------------------------------


def test_healthy_pair_no_action() -> None:
    d = decide(snap(), NOW)
    assert d == Decision()
    assert d.status == NO_ACTION


def test_groups_away_with_manual_failback_stay() -> None:
    assert decide(snap(owners=AWAY), NOW).actions == ()


# ---- rule 1: fatal process error ------------------------------------------------------


def test_fatal_check_on_the_owner_moves_both_groups_to_the_companion() -> None:
    s = snap(nv(A, fatal=("vtl-daemon",)))
    d = decide(s, NOW)
    why = "fatal check vtl-daemon failing on node-a (a fatal process error)"
    assert d.actions == (
        RaiseCheckAlarm(A, "pair-1", "vtl-daemon", True,
                        "check vtl-daemon fails on node-a (fatal: its companion takes over "
                        "what it serves)", Rule.CHECK_FAILED),
        takeover(s, AD, B, f"node-b takes over node-a-data: {why}", Rule.FATAL_PROCESS_ERROR),
        takeover(s, AM, B, f"node-b takes over node-a-mgmt: {why}", Rule.FATAL_PROCESS_ERROR),
    )
    assert of_type(d, MarkDown) == []  # the node is alive: not "down"


def test_fatal_owner_also_gives_up_its_companions_group() -> None:
    s = snap(nv(A, fatal=("x", "y"), alarms=("x", "y")), owners={BM: A})
    d = decide(s, NOW)
    assert moves(d) == {AD: (B, Rule.FATAL_PROCESS_ERROR), AM: (B, Rule.FATAL_PROCESS_ERROR),
                        BM: (B, Rule.FATAL_PROCESS_ERROR)}
    assert of_type(d, Takeover)[0].status.endswith("fatal checks x, y failing on node-a "
                                                   "(a fatal process error)")
    assert of_type(d, RaiseCheckAlarm) == []  # raised already in this episode


@pytest.mark.parametrize(("b", "held", "maintenance"), [
    (nv(B, age=1.0), frozenset(), False),
    (nv(B, age=None), frozenset(), False),  # never heard (within the arbiter's grace)
    (nv(B, fatal=("vtl-daemon",), alarms=("vtl-daemon",)), frozenset(), False),
    (nv(B), frozenset({B}), False),
    (nv(B), frozenset(), True),
], ids=["companion-dead", "companion-never-heard", "companion-fatal-too",
        "companion-held-down", "maintenance"])
def test_fatal_error_without_a_fit_companion_moves_nothing(b: NodeView, held: frozenset[str],
                                                           maintenance: bool) -> None:
    s = snap(nv(A, fatal=("vtl-daemon",), alarms=("vtl-daemon",)), b, held=held,
             maintenance=maintenance, started_at=NOW - 0.125)
    d = decide(s, NOW)
    assert [m for m in moves(d) if m.startswith("node-a")] == []


def test_fatal_error_moves_at_once_even_right_after_a_move() -> None:
    s = snap(nv(A, fatal=("vtl-daemon",), alarms=("vtl-daemon",)), moved={AD: 1.0, AM: 1.0})
    assert moves(decide(s, NOW)) == {AD: (B, Rule.FATAL_PROCESS_ERROR),
                                     AM: (B, Rule.FATAL_PROCESS_ERROR)}


def test_dead_owner_with_a_stale_fatal_result_fails_over_by_heartbeats() -> None:
    d = decide(snap(nv(A, age=1.0, fatal=("vtl-daemon",))), NOW)
    assert moves(d) == {AD: (B, Rule.HEARTBEATS_STOPPED), AM: (B, Rule.HEARTBEATS_STOPPED)}
    assert of_type(d, RaiseCheckAlarm) == []  # a dead node's results are stale


def test_in_flight_groups_are_left_alone() -> None:
    s = snap(nv(A, fatal=("f",), alarms=("f",)), in_flight=frozenset({AD}))
    assert moves(decide(s, NOW)) == {AM: (B, Rule.FATAL_PROCESS_ERROR)}


def test_fatal_home_gets_no_initial_group_the_companion_does() -> None:
    s = snap(nv(A, fatal=("f",), alarms=("f",)), owners={AD: None, AM: None})
    d = decide(s, NOW)
    assert moves(d) == {AD: (B, Rule.INITIAL_ASSIGN), AM: (B, Rule.INITIAL_ASSIGN)}
    assert of_type(d, Assign)[0].status == (
        "node-b serves node-a-data: its home node-a has a fatal check failing: f")


# ---- check alarms (rule 1: non-fatal failures only raise an event) -------------------


def test_nonfatal_check_raises_an_alarm_and_moves_nothing() -> None:
    d = decide(snap(nv(A, nonfatal=("disk-space",))), NOW)
    assert d.actions == (
        RaiseCheckAlarm(A, "pair-1", "disk-space", False,
                        "check disk-space fails on node-a (not fatal: an alarm only, no "
                        "failover)", Rule.CHECK_FAILED),
    )


def test_one_alarm_per_check_and_episode() -> None:
    s = snap(nv(A, nonfatal=("a", "b")))
    assert [a.check for a in of_type(decide(s, NOW), RaiseCheckAlarm)] == ["a", "b"]
    raised = snap(nv(A, nonfatal=("a", "b"), alarms=("a", "b")))
    assert decide(raised, NOW).actions == ()
    assert decide(raised, NOW + 0.125).actions == ()
    one_more = snap(nv(A, nonfatal=("a", "b", "c"), alarms=("a", "b")))
    assert [a.check for a in of_type(decide(one_more, NOW), RaiseCheckAlarm)] == ["c"]


def test_alarm_clears_when_the_check_passes_again() -> None:
    d = decide(snap(nv(A, nonfatal=("b",), alarms=("a", "b"))), NOW)
    assert d.actions == (
        ClearCheckAlarm(A, "pair-1", "a", "check a passes again on node-a: alarm cleared",
                        Rule.CHECK_RECOVERED),
    )


def test_a_dead_nodes_alarms_are_neither_raised_nor_cleared() -> None:
    d = decide(snap(nv(A, age=1.0, down=True, nonfatal=("x",), alarms=("y",)),
                    owners=AWAY), NOW)
    assert d.actions == ()


def test_alarms_are_reported_in_maintenance() -> None:
    d = decide(snap(nv(A, fatal=("f",), nonfatal=("n",)), maintenance=True), NOW)
    assert [(type(a), a.check) for a in d.actions] == [  # type: ignore[union-attr]
        (RaiseCheckAlarm, "f"), (RaiseCheckAlarm, "n")]


# ---- rule 2: heartbeats stopped (the parts issue 7 adds) -------------------------------


@pytest.mark.parametrize(("b", "held"), [
    (nv(B), frozenset({B})),
    (nv(B, fatal=("f",), alarms=("f",)), frozenset()),
], ids=["held-down", "fatal"])
def test_dead_owner_is_not_replaced_by_an_unfit_companion(b: NodeView,
                                                         held: frozenset[str]) -> None:
    d = decide(snap(nv(A, age=1.0), b, held=held), NOW)
    assert [type(a) for a in d.actions] == [MarkDown]


def test_dead_owner_fails_over_at_once_right_after_a_failback() -> None:
    s = snap(nv(A, age=1.0), moved={AD: 0.5, AM: 0.5}, failback="auto")
    assert moves(decide(s, NOW)) == {AD: (B, Rule.HEARTBEATS_STOPPED),
                                     AM: (B, Rule.HEARTBEATS_STOPPED)}


# ---- rule 3: management path -----------------------------------------------------------


def test_management_path_failure_moves_only_the_management_group() -> None:
    s = snap(nv(A, mgmt=False, mgmt_ok=None))
    d = decide(s, NOW)
    assert d.actions == (
        takeover(s, AM, B, "node-b takes over node-a-mgmt: the management path of node-a "
                 "failed (its heartbeats still arrive: the data path is fine) and node-b's "
                 "is healthy", Rule.MGMT_PATH_FAILURE),
    )


def test_management_failure_on_a_node_serving_both_management_groups() -> None:
    d = decide(snap(nv(A), nv(B, mgmt=False, mgmt_ok=None), owners={AM: B}), NOW)
    assert moves(d) == {AM: (A, Rule.MGMT_PATH_FAILURE), BM: (A, Rule.MGMT_PATH_FAILURE)}


@pytest.mark.parametrize(("a", "b", "kw"), [
    (nv(A, mgmt=None), nv(B), {}),  # unknown: never acts
    (nv(A, mgmt=False), nv(B, mgmt=None), {}),  # companion's path not known healthy
    (nv(A, mgmt=False), nv(B, mgmt=False), {}),  # both failed: not local
    (nv(A, mgmt=False), nv(B), {"maintenance": True}),
    (nv(A, mgmt=False), nv(B), {"held": frozenset({B})}),
    (nv(A, mgmt=False), nv(B, fatal=("f",), alarms=("f",)), {}),
    (nv(A, mgmt=False), nv(B), {"moved": {AM: HOLD - 0.5}}),  # moved within the hold time
], ids=["owner-unknown", "companion-unknown", "both-failed", "maintenance",
        "companion-held-down", "companion-fatal", "recently-moved"])
def test_management_failure_negative_cases(a: NodeView, b: NodeView, kw: dict[str, Any]) -> None:
    d = decide(snap(a, b, **kw), NOW)
    assert AM not in moves(d)
    assert AD not in moves(d)


def test_management_group_moved_exactly_hold_time_ago_may_move_again() -> None:
    d = decide(snap(nv(A, mgmt=False), moved={AM: HOLD}), NOW)
    assert moves(d) == {AM: (B, Rule.MGMT_PATH_FAILURE)}


@pytest.mark.parametrize(("failback", "mgmt_ok", "moved"), [
    ("manual", LONG, None),
    ("auto", HOLD - 0.5, None),
    ("auto", None, None),
    ("auto", LONG, HOLD - 0.5),
])
def test_healed_management_path_no_failback(failback: str, mgmt_ok: float | None,
                                            moved: float | None) -> None:
    s = snap(nv(A, mgmt=mgmt_ok is not None, mgmt_ok=mgmt_ok), owners={AM: B},
             failback=failback, moved=None if moved is None else {AM: moved})
    assert decide(s, NOW).actions == ()


def test_healed_management_path_fails_back_when_auto() -> None:
    s = snap(nv(A, mgmt_ok=HOLD), owners={AM: B}, failback="auto", moved={AM: 60.0})
    d = decide(s, NOW)
    assert d.actions == (
        takeover(s, AM, A, "node-a takes back node-a-mgmt (failback is auto): node-a has "
                 "been healthy for 8.0 s (failback_hold_time 8 s)", Rule.FAILBACK),
    )


# ---- rule 4: failback -------------------------------------------------------------------


def test_auto_failback_once_the_home_is_healthy_for_the_hold_time() -> None:
    s = snap(nv(A, healthy=HOLD + 2, mgmt_ok=LONG, storage_ok=LONG), owners=AWAY,
             failback="auto")
    d = decide(s, NOW)
    why = "node-a has been healthy for 10.0 s (failback_hold_time 8 s)"
    assert d.actions == (
        takeover(s, AD, A, f"node-a takes back node-a-data (failback is auto): {why}",
                 Rule.FAILBACK),
        takeover(s, AM, A, f"node-a takes back node-a-mgmt (failback is auto): {why}",
                 Rule.FAILBACK),
    )


def test_auto_failback_at_exactly_the_hold_time_not_before() -> None:
    at = snap(nv(A, healthy=HOLD), owners=AWAY, failback="auto")
    assert set(moves(decide(at, NOW))) == {AD, AM}
    before = snap(nv(A, healthy=HOLD - 2**-10), owners=AWAY, failback="auto")
    assert decide(before, NOW).actions == ()


@pytest.mark.parametrize(("a", "kw", "back"), [
    (nv(A), {"failback": "manual"}, set()),
    (nv(A, healthy=None), {}, set()),
    (nv(A, fatal=("f",), alarms=("f",), healthy=None), {}, set()),
    (nv(A), {"held": frozenset({A})}, set()),
    (nv(A), {"maintenance": True}, set()),
    (nv(A), {"moved": {AD: 1.0, AM: 1.0}}, set()),
    (nv(A, mgmt=False, mgmt_ok=None), {}, {AD}),  # the management group waits
    (nv(A, mgmt_ok=1.0), {}, {AD}),
    (nv(A, mgmt=None, mgmt_ok=LONG), {}, {AD, AM}),  # unknown is no veto (not monitored)
    (nv(A, storage_ok=1.0), {}, {AM}),  # the data group waits
    (nv(A), {"storage": {A: sv(A, vtl_a0=0), B: sv(B)}}, {AM}),
    (nv(A), {"storage": {A: sv(A, 10.0), B: sv(B)}}, {AM}),  # stale view: cannot confirm
    (nv(A), {"storage": {B: sv(B)}}, {AM}),
    (nv(A), {"storage": {A: sv(A, vtl_b0=0), B: sv(B)}}, {AD, AM}),  # not its device
], ids=["manual", "not-healthy", "fatal", "held-down", "maintenance", "recently-moved",
        "mgmt-failed", "mgmt-healthy-briefly", "mgmt-unknown", "storage-ok-briefly",
        "storage-lost", "storage-stale", "storage-missing", "other-device-lost"])
def test_auto_failback_conditions(a: NodeView, kw: dict[str, Any], back: set[str]) -> None:
    d = decide(snap(a, owners=AWAY, **{"failback": "auto", **kw}), NOW)
    assert {g for g, (new, rule) in moves(d).items() if rule is Rule.FAILBACK} == back
    assert all(new == A for new, _ in moves(d).values())


def test_leaving_maintenance_fails_back_at_once() -> None:
    s = snap(owners=AWAY, failback="auto", maintenance=True)
    assert decide(s, NOW).actions == ()
    out = replace(s, pairs=(replace(s.pairs[0], maintenance=False),))
    assert set(moves(decide(out, NOW))) == {AD, AM}


def test_owner_dead_goes_home_by_heartbeats_not_failback() -> None:
    s = snap(nv(A, healthy=1.0), nv(B, age=1.0), owners=AWAY, failback="auto")
    assert moves(decide(s, NOW)) == {AD: (A, Rule.HEARTBEATS_STOPPED),
                                     AM: (A, Rule.HEARTBEATS_STOPPED),
                                     BD: (A, Rule.HEARTBEATS_STOPPED),
                                     BM: (A, Rule.HEARTBEATS_STOPPED)}


def test_healthy_for() -> None:
    s = snap(nv(A, healthy=20.0, mgmt_ok=5.0, storage_ok=12.0))
    assert healthy_for(s, A, s.groups[AM], NOW) == 5.0
    assert healthy_for(s, A, s.groups[AD], NOW) == 12.0
    assert healthy_for(s, A, s.groups[AD], NOW, frozenset({A})) is None
    assert healthy_for(snap(nv(A, age=1.0)), A, s.groups[AD], NOW) is None


def test_node_health_inputs() -> None:
    s = snap(nv(A, fatal=("f",), mgmt=None), nv(B, mgmt=False),
             storage={A: sv(A), B: sv(B, vtl_b0=0)})
    assert node_health(s, A, NOW) == NodeHealth(up=False, mgmt=True, storage=True)
    assert node_health(s, B, NOW) == NodeHealth(up=True, mgmt=False, storage=False)
    dead = snap(nv(A, age=1.0), storage={})
    assert node_health(dead, A, NOW) == NodeHealth(up=False, mgmt=True, storage=False)


# ---- rule 4: anti-flap hold-down -------------------------------------------------------


def test_third_failure_within_the_window_holds_the_node_down() -> None:
    fails = {A: (NOW - 3000.0, NOW - 1000.0, NOW - 10.0)}
    d = decide(snap(owners=AWAY, failures=fails, failback="auto"), NOW)
    assert d.actions == (
        HoldDown(A, "pair-1", 3, "node-a is held down: it failed 3 times within 3600 s "
                 "(flap_max 3); it is given no group automatically until an operator clears "
                 "the hold", Rule.FLAPPING),
    )  # and no failback to it in the same decision


def test_hold_down_is_decided_once_and_counts_only_the_window() -> None:
    fails = {A: (NOW - 4000.0, NOW - 1000.0, NOW - 10.0)}
    assert decide(snap(failures=fails), NOW).actions == ()
    held = snap(failures={A: (1.0, 2.0, 3.0)}, held=frozenset({A}), flap_window=1e6)
    assert decide(held, NOW).actions == ()
    in_maintenance = snap(failures={B: (NOW - 3, NOW - 2, NOW - 1)}, maintenance=True)
    assert [type(a) for a in decide(in_maintenance, NOW).actions] == [HoldDown]


def test_held_down_node_gets_no_group_automatically() -> None:
    held = frozenset({A})
    assert decide(snap(owners=AWAY, failback="auto", held=held), NOW).actions == ()
    d = decide(snap(nv(A), nv(B, age=1.0), held=held), NOW)  # its companion dies
    assert [type(a) for a in d.actions] == [MarkDown]
    d = decide(snap(owners={AD: None, AM: None}, held=held), NOW)  # initial assignment
    assert moves(d) == {AD: (B, Rule.INITIAL_ASSIGN), AM: (B, Rule.INITIAL_ASSIGN)}
    assert of_type(d, Assign)[0].status == (
        "node-b serves node-a-data: its home node-a is held down after repeated failures "
        "(until an operator clears it)")


def test_held_down_node_keeps_what_it_serves() -> None:
    assert decide(snap(held=frozenset({A})), NOW).actions == ()


def test_record_failure() -> None:
    assert record_failure((), 100.0, window=3600.0, merge_within=30.0) == (100.0,)
    assert record_failure((100.0,), 120.0, window=3600.0, merge_within=30.0) == (100.0,)
    assert record_failure((100.0,), 130.0, window=3600.0, merge_within=30.0) == (100.0, 130.0)
    assert record_failure((100.0, 200.0), 3750.0, window=3600.0, merge_within=30.0) == (
        200.0, 3750.0)


def test_failed_nodes_are_the_old_owners_of_fault_moves() -> None:
    s = snap(nv(A, age=1.0), nv(B, mgmt=False), owners={BM: A})
    d = decide(s, NOW)
    assert failed_nodes(d.actions) == (A,)
    fb = decide(snap(owners=AWAY, failback="auto"), NOW)
    assert failed_nodes(fb.actions) == ()
    assert failed_nodes(decide(snap(nv(A, mgmt=False)), NOW).actions) == (A,)


# ---- the hold after a move: a health flap does not move a group again -------------------


def test_storage_local_failure_within_the_hold_time_waits() -> None:
    lost = {A: sv(A, vtl_a0=0), B: sv(B)}
    assert decide(snap(storage=lost, moved={AD: 2.0}), NOW).actions == ()
    assert moves(decide(snap(storage=lost, moved={AD: HOLD}), NOW)) == {
        AD: (B, Rule.STORAGE_LOCAL_FAILURE)}


def test_storage_failure_with_an_unfit_companion_raises_the_alarm() -> None:
    s = snap(storage={A: sv(A, vtl_a0=0), B: sv(B)}, held=frozenset({B}))
    (alarm,) = decide(s, NOW).actions
    assert isinstance(alarm, RaiseStorageAlarm)
    assert alarm.status == (
        "storage failure of node-a-data cannot fail over: node-a has no path left to vtl-a0 "
        "and node-b is held down after repeated failures (until an operator clears it)")


# ---- rule 6: maintenance suspends every automatic move ------------------------------------

AUTOMATIC_MOVES: dict[str, dict[str, Any]] = {
    "heartbeats": {"a": nv(A, age=1.0)},
    "fatal": {"a": nv(A, fatal=("f",), alarms=("f",))},
    "mgmt": {"a": nv(A, mgmt=False)},
    "storage": {"storage": {A: sv(A, vtl_a0=0), B: sv(B)}},
    "failback": {"owners": AWAY, "failback": "auto"},
    "initial-to-companion": {"a": nv(A, age=None), "owners": {AD: None}},
}


@pytest.mark.parametrize("kw", AUTOMATIC_MOVES.values(), ids=AUTOMATIC_MOVES.keys())
def test_maintenance_suspends_the_move_and_leaving_it_acts_at_once(kw: dict[str, Any]) -> None:
    args = dict(kw)
    a = args.pop("a", None)
    normal = decide(snap(a, **args), NOW)
    assert {g for g in moves(normal) if g.startswith("node-a")}, "the scenario moves a group"
    held = decide(snap(a, maintenance=True, **args), NOW)
    assert {g for g in moves(held) if g.startswith("node-a")} == set()
    # health is still reported: MarkDown stays
    assert of_type(held, MarkDown) == of_type(normal, MarkDown)


# ---- rule 5: switchover -----------------------------------------------------------------


def test_switchover_moves_a_group_to_its_owners_companion() -> None:
    s = snap()
    assert switchover(s, AD, NOW) == takeover(
        s, AD, B, "node-b takes over node-a-data from node-a: switchover requested by an "
        "operator", Rule.SWITCHOVER)
    back = snap(owners={AD: B})
    t = switchover(back, AD, NOW)
    assert isinstance(t, Takeover) and (t.old, t.new) == (B, A)


def test_switchover_is_allowed_in_maintenance_and_right_after_a_move() -> None:
    t = switchover(snap(maintenance=True, moved={AM: 0.5}), AM, NOW)
    assert isinstance(t, Takeover)
    assert t.status.endswith("switchover requested by an operator (the pair stays in "
                             "maintenance)")


@pytest.mark.parametrize(("group", "kw", "reason"), [
    ("node-x-data", {}, "there is no group node-x-data"),
    (AD, {"in_flight": frozenset({AD})}, "a takeover of node-a-data is under way"),
    (AD, {"states": {AD: "acquiring"}}, "a takeover of node-a-data is under way"),
    (AD, {"owners": {AD: None}}, "nobody in pair-1 serves node-a-data yet"),
    (AD, {"b": nv(B, age=1.0)}, "node-b is not alive (heartbeats from node-b stopped 1.00 s "
                                "ago)"),
    (AD, {"held": frozenset({B})}, "node-b is held down after repeated failures (clear the "
                                   "hold first: clear-hold pair-1 node-b)"),
    (AD, {"b": nv(B, fatal=("f",))}, "node-b has a fatal check failing: f"),
    (AM, {"b": nv(B, mgmt=False)}, "the management path of node-b has failed"),
    (AD, {"storage": {A: sv(A)}}, "node-b cannot confirm the devices of node-a-data (no "
                                  "fresh storage report)"),
    (AD, {"storage": {A: sv(A), B: sv(B, vtl_a0=0)}}, "node-b reaches no path to vtl-a0"),
], ids=["unknown", "in-flight", "acquiring", "no-owner", "target-dead", "target-held",
        "target-fatal", "target-mgmt-failed", "target-storage-unknown", "target-storage-lost"])
def test_switchover_refused_with_a_reason(group: str, kw: dict[str, Any], reason: str) -> None:
    args = dict(kw)
    b = args.pop("b", None)
    r = switchover(snap(None, b, **args), group, NOW)
    assert r == Refusal(f"switchover {group}", reason)
    assert r.status == f"switchover {group} refused: {reason}"


def test_switchover_of_a_data_group_ignores_the_targets_management_path() -> None:
    assert isinstance(switchover(snap(None, nv(B, mgmt=False)), AD, NOW), Takeover)


# ---- rule 4/5: operator failback --------------------------------------------------------


def test_operator_failback_moves_every_away_group_home() -> None:
    s = snap(nv(A, healthy=1.0), owners={**AWAY, BM: A})  # no hold time for the operator
    r = failback(s, "pair-1", NOW)
    assert r == (
        takeover(s, AD, A, "node-a takes back node-a-data from node-b: failback requested by "
                 "an operator", Rule.OPERATOR_FAILBACK),
        takeover(s, AM, A, "node-a takes back node-a-mgmt from node-b: failback requested by "
                 "an operator", Rule.OPERATOR_FAILBACK),
        takeover(s, BM, B, "node-b takes back node-b-mgmt from node-a: failback requested by "
                 "an operator", Rule.OPERATOR_FAILBACK),
    )
    assert isinstance(failback(replace(s, pairs=(replace(s.pairs[0], maintenance=True),)),
                               "pair-1", NOW), tuple)


@pytest.mark.parametrize(("pair", "kw", "reason"), [
    ("pair-9", {}, "there is no pair pair-9"),
    ("pair-1", {}, "every group of pair-1 is on its home node"),
    ("pair-1", {"owners": AWAY, "held": frozenset({A})},
     "node-a-data: node-a is held down after repeated failures (clear the hold first: "
     "clear-hold pair-1 node-a); node-a-mgmt: node-a is held down after repeated failures "
     "(clear the hold first: clear-hold pair-1 node-a)"),
    ("pair-1", {"owners": AWAY, "a": nv(A, mgmt=False)},
     "node-a-mgmt: the management path of node-a has failed"),  # all or none
    ("pair-1", {"owners": AWAY, "in_flight": frozenset({AM})},
     "node-a-mgmt: a takeover is under way"),
], ids=["unknown", "nothing-away", "held-down", "one-group-unfit", "in-flight"])
def test_operator_failback_refused(pair: str, kw: dict[str, Any], reason: str) -> None:
    args = dict(kw)
    a = args.pop("a", None)
    assert failback(snap(a, **args), pair, NOW) == Refusal(f"failback {pair}", reason)


# ---- operator: clear-hold, maintenance, the request dispatcher ----------------------------


def test_clear_hold() -> None:
    s = snap(held=frozenset({A}))
    assert clear_hold(s, "pair-1", A) == ClearHold(
        A, "pair-1", "node-a is no longer held down: it may be given groups automatically "
        "again (its failures are forgotten)", Rule.HOLD_CLEARED)
    assert clear_hold(s, "pair-1", B) == Refusal(
        "clear-hold pair-1 node-b", "node-b is not held down and has no failure recorded")
    assert clear_hold(s, "pair-1", "node-z") == Refusal("clear-hold pair-1 node-z",
                                                        "node-z is not a node of pair-1")
    assert clear_hold(s, "pair-2", A) == Refusal("clear-hold pair-2 node-a",
                                                 "there is no pair pair-2")


def test_clear_hold_forgets_the_failures_of_a_node_not_held_down() -> None:
    """Failures short of flap_max count towards a later hold; clear-hold forgets them
    (the chaos runner's baseline does, so one iteration's failures do not hold a node
    down in the next)."""
    s = snap(failures={B: (NOW - 30, NOW - 10)})
    assert clear_hold(s, "pair-1", B) == ClearHold(
        B, "pair-1", "node-b's 2 recorded failures forgotten (it was not held down; its "
        "flap count starts again)", Rule.HOLD_CLEARED)
    one = clear_hold(snap(failures={B: (NOW - 5,)}), "pair-1", B)
    assert isinstance(one, ClearHold) and one.status.startswith("node-b's 1 recorded failure ")


def test_set_maintenance() -> None:
    s = snap()
    assert set_maintenance(s, "pair-1", True) == SetMaintenance(
        "pair-1", True, True, "pair-1 enters maintenance: automatic failover suspended, "
        "health still reported", Rule.MAINTENANCE)
    on = snap(maintenance=True)
    assert set_maintenance(on, "pair-1", False) == SetMaintenance(
        "pair-1", False, True, "pair-1 leaves maintenance: automatic failover resumes at once",
        Rule.MAINTENANCE)
    again = set_maintenance(on, "pair-1", True)
    assert isinstance(again, SetMaintenance) and not again.changed
    assert again.status == "pair-1 is already in maintenance"
    assert set_maintenance(s, "pair-7", True) == Refusal("maintenance on pair-7",
                                                         "there is no pair pair-7")


def test_answer_dispatches_requests() -> None:
    s = snap(owners=AWAY, held=frozenset({B}))
    assert answer(s, {"verb": "switchover", "group": AD}, NOW) == (
        takeover(s, AD, A, "node-a takes over node-a-data from node-b: switchover requested "
                 "by an operator", Rule.SWITCHOVER),)
    assert answer(snap(held=frozenset({B})), {"verb": "switchover", "group": AD}, NOW) == \
        switchover(snap(held=frozenset({B})), AD, NOW)
    assert [t.group for t in answer(s, {"verb": "failback", "pair": "pair-1"}, NOW)] == [
        AD, AM]  # type: ignore[union-attr]
    assert answer(s, {"verb": "clear-hold", "pair": "pair-1", "node": B}, NOW) == (
        clear_hold(s, "pair-1", B),)
    assert answer(s, {"verb": "maintenance", "pair": "pair-1", "on": True}, NOW) == (
        set_maintenance(s, "pair-1", True),)
    assert answer(s, {"verb": "reboot"}, NOW) == Refusal("reboot", "unknown request 'reboot'")
    assert answer_status(Refusal("x", "y")) == "x refused: y"


def test_event_kinds() -> None:
    assert event_kind(Rule.HEARTBEATS_STOPPED) == "failover"
    assert event_kind(Rule.FATAL_PROCESS_ERROR) == "failover"
    assert event_kind(Rule.MGMT_PATH_FAILURE) == "failover"
    assert event_kind(Rule.FAILBACK) == "failback"
    assert event_kind(Rule.OPERATOR_FAILBACK) == "failback"
    assert event_kind(Rule.SWITCHOVER) == "switchover"


# ---- replay: explain ----------------------------------------------------------------------

SCENARIOS: dict[str, Snapshot] = {
    "healthy": snap(),
    "fatal": snap(nv(A, fatal=("vtl-daemon",), nonfatal=("disk",), alarms=("disk",))),
    "nonfatal": snap(nv(A, nonfatal=("a", "b"), alarms=("c",))),
    "mgmt": snap(nv(A, mgmt=False, mgmt_ok=None), nv(B, mgmt=None)),
    "mgmt-move": snap(nv(A, mgmt=False, mgmt_ok=None)),
    "failback": snap(nv(A, healthy=HOLD + 1), owners=AWAY, failback="auto",
                     moved={AD: 50.0, AM: 50.0}),
    "recently-moved": snap(owners=AWAY, failback="auto", moved={AD: 1.0}),
    "hold-down": snap(owners=AWAY, failures={A: (NOW - 30, NOW - 20, NOW - 10), B: ()}),
    "held": snap(nv(A, age=1.0), held=frozenset({B, A}), flap_max=2, flap_window=60.0),
    "maintenance": snap(nv(A, age=1.0), maintenance=True),
    "storage-held": snap(storage={A: sv(A, vtl_a0=0), B: sv(B)}, held=frozenset({B}),
                         storage_alarms=frozenset({BD})),
}


@pytest.mark.parametrize("s", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_explain_reproduces_the_decision_through_json(s: Snapshot) -> None:
    inputs = {"snapshot": s.to_inputs(), "now": NOW}
    wire = orjson.loads(orjson.dumps(inputs))  # as carried in an event
    assert Snapshot.from_inputs(wire["snapshot"]) == s
    assert explain(wire) == decide(s, NOW).status
    for a in decide(s, NOW).actions:  # every event's reason is part of what explain prints
        assert a.status in explain(wire)


REQUESTS: list[tuple[Snapshot, dict[str, Any]]] = [
    (snap(), {"verb": "switchover", "group": AD}),
    (snap(held=frozenset({B})), {"verb": "switchover", "group": AD}),
    (snap(owners=AWAY), {"verb": "failback", "pair": "pair-1"}),
    (snap(owners=AWAY, held=frozenset({A})), {"verb": "failback", "pair": "pair-1"}),
    (snap(held=frozenset({A})), {"verb": "clear-hold", "pair": "pair-1", "node": A}),
    (snap(), {"verb": "maintenance", "pair": "pair-1", "on": True}),
]


@pytest.mark.parametrize(("s", "request_"), REQUESTS)
def test_explain_reproduces_an_operator_answer(s: Snapshot, request_: dict[str, Any]) -> None:
    inputs = {"snapshot": s.to_inputs(), "now": NOW, "request": request_}
    wire = orjson.loads(orjson.dumps(inputs))
    assert explain(wire) == answer_status(answer(s, request_, NOW))


def test_new_inputs_are_plain_json() -> None:
    s = SCENARIOS["hold-down"]
    inputs = replace(s, pairs=(replace(s.pairs[0], held_down=frozenset({B, A})),)).to_inputs()
    pair = orjson.loads(orjson.dumps(inputs))["pairs"][0]
    assert pair["held_down"] == [A, B]
    assert pair["failures"] == {A: [NOW - 30, NOW - 20, NOW - 10], B: []}
    assert pair["failback_hold_time"] == HOLD
    node = orjson.loads(orjson.dumps(SCENARIOS["fatal"].to_inputs()))["nodes"][A]
    assert node["fatal_failing"] == ["vtl-daemon"] and node["mgmt_healthy"] is True


def test_inputs_recorded_before_issue_7_still_load() -> None:
    s = snap(storage={})
    old = s.to_inputs()
    for p in old["pairs"]:
        for k in ("failback_hold_time", "flap_max", "flap_window", "held_down", "failures"):
            del p[k]
    for n in old["nodes"].values():
        for k in ("fatal_failing", "nonfatal_failing", "check_alarms", "mgmt_healthy",
                  "healthy_since", "mgmt_ok_since", "storage_ok_since"):
            del n[k]
    for g in old["groups"].values():
        del g["moved_at"]
    again = Snapshot.from_inputs(orjson.loads(orjson.dumps(old)))
    assert again.pairs[0].held_down == frozenset() and again.pairs[0].failures == {}
    assert again.nodes[A].fatal_failing == () and again.nodes[A].mgmt_healthy is None
    assert decide(again, NOW) == decide(s, NOW)
