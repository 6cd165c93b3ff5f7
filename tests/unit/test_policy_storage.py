"""Unit tests of the policy's storage rules (the manual's "storage device connectivity
failure"): plain snapshots with storage views, no mocks, and hypothesis properties over
random storage views.

Pair node-a/node-b; node-a-data has devices vtl-a0, vtl-a1 and node-b-data vtl-b0,
vtl-b1, each with two paths on each node."""

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
    ClearStorageAlarm,
    Decision,
    DevicePaths,
    GroupFailure,
    GroupView,
    MarkDown,
    NodeView,
    PairView,
    RaiseStorageAlarm,
    Resume,
    Rule,
    Snapshot,
    StorageView,
    Takeover,
    decide,
    failed_group,
    fresh_storage,
    is_alive,
    is_dead,
    lost_devices,
    reaches_all,
)

# Binary-exact numbers, so boundary comparisons are exact.
DEAD_AFTER = 0.25
INTERVAL = 0.0625
STALE = 0.75
NOW = 100.0
A, B = "node-a", "node-b"
DEVICES = {"node-a-data": ("vtl-a0", "vtl-a1"), "node-b-data": ("vtl-b0", "vtl-b1")}
ALL_DEVICES = ("vtl-a0", "vtl-a1", "vtl-b0", "vtl-b1")
NO_ACTION = "no action: every node is as expected"

T = TypeVar("T")
Paths = dict[str, tuple[int, int]]


def sv(node: str, age: float = INTERVAL, **paths: tuple[int, int]) -> StorageView:
    """A view received ``age`` s before NOW: every device 2/2 paths up unless given
    (keyword names use '_' for '-'); (-1, -1) leaves a device out of the view."""
    devices = {d: DevicePaths(2, 2) for d in ALL_DEVICES}
    for k, (up, total) in paths.items():
        name = k.replace("_", "-")
        if up < 0:
            del devices[name]
        else:
            devices[name] = DevicePaths(up, total)
    return StorageView(node, NOW - age, devices)


def gv(name: str, owner: str | None, epoch: int, revision: int,
       state: str = "held") -> GroupView:
    home, kind = name.rsplit("-", 1)
    return GroupView(name, home, kind, owner, epoch, state if owner else None, revision,
                     DEVICES.get(name, ()))


def snap(
    a: StorageView | None = None,
    b: StorageView | None = None,
    *,
    a_age: float = INTERVAL,
    b_age: float = INTERVAL,
    owners: dict[str, str] | None = None,
    alarms: frozenset[str] = frozenset(),
    maintenance: bool = False,
    in_flight: frozenset[str] = frozenset(),
    states: dict[str, str] | None = None,
) -> Snapshot:
    own = {"node-a-data": A, "node-a-mgmt": A, "node-b-data": B, "node-b-mgmt": B}
    own.update(owners or {})
    storage = {v.node: v for v in (a, b) if v is not None}
    return Snapshot(
        dead_after=DEAD_AFTER,
        started_at=0.0,
        pairs=(PairView("pair-1", (A, B), "manual", maintenance),),
        nodes={A: NodeView(A, NOW - a_age, "inc-a"), B: NodeView(B, NOW - b_age, "inc-b")},
        groups={g: gv(g, o, 4 + i, 17 + i, (states or {}).get(g, "held"))
                for i, (g, o) in enumerate(sorted(own.items()))},
        in_flight=in_flight,
        storage=storage,
        storage_stale_after=STALE,
        storage_alarms=alarms,
    )


def of_type(decision: Decision, kind: type[T]) -> list[T]:
    return [a for a in decision.actions if isinstance(a, kind)]


# ---- path failover: one path is enough ------------------------------------------


def test_healthy_views_no_action() -> None:
    d = decide(snap(sv(A), sv(B)), NOW)
    assert d == Decision()
    assert d.status == NO_ACTION


@pytest.mark.parametrize("paths", [
    {"vtl_a0": (1, 2)},
    {"vtl_a0": (1, 2), "vtl_a1": (1, 2)},
    {"vtl_a0": (1, 4)},
])
def test_one_path_left_per_device_no_failover(paths: dict[str, tuple[int, int]]) -> None:
    assert decide(snap(sv(A, **paths), sv(B)), NOW).actions == ()


def test_devices_of_another_group_do_not_move_this_one() -> None:
    """node-a lost vtl-b0, a device of node-b-data, which node-b serves: nothing moves."""
    assert decide(snap(sv(A, vtl_b0=(0, 2)), sv(B)), NOW).actions == ()


def test_device_absent_from_the_owners_view_is_not_known_lost() -> None:
    assert decide(snap(sv(A, vtl_a0=(-1, -1)), sv(B)), NOW).actions == ()


@pytest.mark.parametrize("a_view", [None, sv(A, STALE + 2**-10, vtl_a0=(0, 2))],
                         ids=["missing", "stale"])
def test_owners_own_view_missing_or_stale_no_action(a_view: StorageView | None) -> None:
    assert decide(snap(a_view, sv(B)), NOW).actions == ()


# ---- local failure: the data group moves, the management group stays ------------


def test_local_failure_moves_the_data_group_only() -> None:
    s = snap(sv(A, vtl_a0=(0, 2)), sv(B))
    d = decide(s, NOW)
    data = s.groups["node-a-data"]
    status = ("node-b takes over node-a-data: node-a has no path left to vtl-a0 and node-b "
              "reaches all 2 devices of the group (a local failure; the management group "
              "stays)")
    assert d.actions == (
        Takeover("node-a-data", A, B, "pair-1", data.epoch, data.revision, status,
                 Rule.STORAGE_LOCAL_FAILURE),
    )
    assert d.status == status
    assert "node-a-mgmt" not in {a.group for a in of_type(d, Takeover)}


def test_local_failure_of_both_devices_names_both() -> None:
    d = decide(snap(sv(A, vtl_a0=(0, 2), vtl_a1=(0, 2)), sv(B)), NOW)
    (t,) = of_type(d, Takeover)
    assert (t.group, t.new, t.rule) == ("node-a-data", B, Rule.STORAGE_LOCAL_FAILURE)
    assert "no path left to vtl-a0, vtl-a1" in t.status


def test_companion_with_one_path_per_device_is_enough() -> None:
    d = decide(snap(sv(A, vtl_a0=(0, 2)), sv(B, vtl_a0=(1, 2), vtl_a1=(1, 2))), NOW)
    assert [(t.group, t.new) for t in of_type(d, Takeover)] == [("node-a-data", B)]


def test_the_other_direction() -> None:
    d = decide(snap(sv(A), sv(B, vtl_b1=(0, 2))), NOW)
    assert [(t.group, t.old, t.new, t.rule) for t in of_type(d, Takeover)] == [
        ("node-b-data", B, A, Rule.STORAGE_LOCAL_FAILURE)]


def test_group_held_by_the_companion_goes_back_home_on_a_local_failure() -> None:
    """After a failover node-b holds node-a-data; node-b loses vtl-a1, node-a reaches
    both: node-a takes it (a storage takeover, not a failback)."""
    s = snap(sv(A), sv(B, vtl_a1=(0, 2)), owners={"node-a-data": B, "node-a-mgmt": B})
    (t,) = of_type(decide(s, NOW), Takeover)
    assert (t.group, t.old, t.new, t.rule) == ("node-a-data", B, A, Rule.STORAGE_LOCAL_FAILURE)


def test_companion_view_exactly_stale_after_old_still_confirms() -> None:
    d = decide(snap(sv(A, vtl_a0=(0, 2)), sv(B, STALE)), NOW)
    assert [t.new for t in of_type(d, Takeover)] == [B]


def test_in_flight_group_is_not_decided_again() -> None:
    s = snap(sv(A, vtl_a0=(0, 2)), sv(B), in_flight=frozenset({"node-a-data"}))
    assert decide(s, NOW).actions == ()


def test_acquiring_owner_resumes_first() -> None:
    s = snap(sv(A, vtl_a0=(0, 2)), sv(B), states={"node-a-data": "acquiring"})
    assert [type(a) for a in decide(s, NOW).actions] == [Resume]


# ---- global failure: no failover, one alarm ---------------------------------------


@pytest.mark.parametrize(("b_view", "why"), [
    (sv(B, vtl_a0=(0, 2)), "node-b reaches no path to vtl-a0"),
    (sv(B, vtl_a1=(0, 2)), "node-b reaches no path to vtl-a1"),
    (sv(B, vtl_a1=(-1, -1)), "node-b reaches no path to vtl-a1"),
    (sv(B, STALE + 2**-10), "node-b cannot confirm its devices (its storage report is "
                            "0.75 s old, stale after 0.75 s)"),
    (None, "node-b cannot confirm its devices (no storage report)"),
], ids=["same-device", "other-device", "device-absent", "stale", "missing"])
def test_companion_cannot_confirm_raises_a_global_alarm(b_view: StorageView | None,
                                                         why: str) -> None:
    s = snap(sv(A, vtl_a0=(0, 2)), b_view)
    d = decide(s, NOW)
    status = ("storage failure of node-a-data is not local, no failover: node-a has no "
              f"path left to vtl-a0 and {why}")
    assert d.actions == (
        RaiseStorageAlarm("node-a-data", A, "pair-1", ("vtl-a0",),
                          s.groups["node-a-data"].epoch, status, Rule.STORAGE_GLOBAL_FAILURE),
    )
    assert d.status == status
    assert of_type(d, Takeover) == []


def test_dead_companion_is_no_target() -> None:
    """node-b's heartbeats stopped: its groups fail over to node-a (heartbeat rule), and
    node-a's lost device raises the alarm instead of a storage takeover."""
    d = decide(snap(sv(A, vtl_a0=(0, 2)), sv(B), b_age=1.0), NOW)
    assert [(t.group, t.new, t.rule) for t in of_type(d, Takeover)] == [
        ("node-b-data", A, Rule.HEARTBEATS_STOPPED), ("node-b-mgmt", A, Rule.HEARTBEATS_STOPPED)]
    (alarm,) = of_type(d, RaiseStorageAlarm)
    assert alarm.status.endswith(
        "node-b cannot take over (heartbeats from node-b stopped 1.00 s ago)")


def test_companion_past_dead_after_but_not_declared_is_no_target_either() -> None:
    d = decide(snap(sv(A, vtl_a0=(0, 2)), sv(B), b_age=DEAD_AFTER + 2**-10), NOW)
    assert all(t.new == A for t in of_type(d, Takeover))
    assert len(of_type(d, RaiseStorageAlarm)) == 1


def test_alarm_is_not_repeated() -> None:
    s = snap(sv(A, vtl_a0=(0, 2)), sv(B, vtl_a0=(0, 2)))
    (alarm,) = of_type(decide(s, NOW), RaiseStorageAlarm)
    after = replace(s, storage_alarms=frozenset({alarm.group}))  # what the arbiter keeps
    assert decide(after, NOW).actions == ()
    assert decide(after, NOW + 0.125).actions == ()  # a later tick, all still fresh


def test_alarm_clears_when_the_owner_reaches_every_device_again() -> None:
    s = snap(sv(A, vtl_a0=(1, 2)), sv(B, vtl_a0=(0, 2)),
             alarms=frozenset({"node-a-data"}))
    status = "node-a reaches every device of node-a-data again: storage alarm cleared"
    assert decide(s, NOW).actions == (
        ClearStorageAlarm("node-a-data", A, "pair-1", s.groups["node-a-data"].epoch, status,
                          Rule.STORAGE_RECOVERED),
    )
    cleared = replace(s, storage_alarms=frozenset())
    assert decide(cleared, NOW).actions == ()


@pytest.mark.parametrize("a_view", [
    sv(A, vtl_a0=(0, 2)),
    sv(A, STALE + 2**-10),
    sv(A, vtl_a0=(-1, -1)),
    None,
], ids=["still-lost", "owner-stale", "device-absent", "owner-missing"])
def test_alarm_stays_until_the_owner_is_seen_reaching_every_device(
        a_view: StorageView | None) -> None:
    s = snap(a_view, sv(B, vtl_a0=(0, 2)), alarms=frozenset({"node-a-data"}))
    assert decide(s, NOW).actions == ()


def test_raised_alarm_then_companion_confirms_takes_over() -> None:
    """The companion's view was stale when the alarm went up; now it is fresh and has
    reached every device for storage_settle: the failure was local after all."""
    s = snap(sv(A, vtl_a0=(0, 2)), _since(sv(B), 2.0), alarms=frozenset({"node-a-data"}))
    (t,) = decide(s, NOW).actions
    assert isinstance(t, Takeover)
    assert (t.group, t.new, t.rule) == ("node-a-data", B, Rule.STORAGE_LOCAL_FAILURE)


def test_alarm_clears_on_the_new_owner_after_a_heartbeat_failover() -> None:
    s = snap(sv(A), sv(B), owners={"node-a-data": B, "node-a-mgmt": B},
             alarms=frozenset({"node-a-data"}))
    (c,) = decide(s, NOW).actions
    assert isinstance(c, ClearStorageAlarm)
    assert (c.group, c.node) == ("node-a-data", B)


# ---- precedence: maintenance, heartbeat death -------------------------------------


@pytest.mark.parametrize("b_view", [sv(B), sv(B, vtl_a0=(0, 2)), None],
                         ids=["companion-reaches-all", "companion-lacks", "companion-unknown"])
def test_maintenance_nothing(b_view: StorageView | None) -> None:
    s = snap(sv(A, vtl_a0=(0, 2), vtl_a1=(0, 2)), b_view, maintenance=True)
    assert decide(s, NOW).actions == ()


def test_maintenance_still_clears_a_raised_alarm() -> None:
    """Clearing is bookkeeping (like MarkUp): it moves nothing."""
    s = snap(sv(A), sv(B), alarms=frozenset({"node-a-data"}), maintenance=True)
    assert [type(a) for a in decide(s, NOW).actions] == [ClearStorageAlarm]


@pytest.mark.parametrize("b_view", [sv(B, vtl_a0=(0, 2)), None, sv(B, 10.0)],
                         ids=["companion-lacks", "companion-unknown", "companion-stale"])
def test_dead_owner_fails_over_regardless_of_storage_views(b_view: StorageView | None) -> None:
    d = decide(snap(sv(A, vtl_a0=(0, 2)), b_view, a_age=1.0), NOW)
    assert [type(a) for a in d.actions] == [MarkDown, Takeover, Takeover]
    assert {(t.group, t.new, t.rule) for t in of_type(d, Takeover)} == {
        ("node-a-data", B, Rule.HEARTBEATS_STOPPED), ("node-a-mgmt", B, Rule.HEARTBEATS_STOPPED)}
    assert of_type(d, RaiseStorageAlarm) == []


def test_heartbeat_death_and_storage_in_one_pair() -> None:
    """node-a dead (heartbeat rule moves its groups) while node-b also lost a device of
    its own group: node-a is no target, so node-b's failure raises the alarm."""
    d = decide(snap(None, sv(B, vtl_b0=(0, 2)), a_age=2.0), NOW)
    assert {t.group for t in of_type(d, Takeover)} == {"node-a-data", "node-a-mgmt"}
    assert [a.group for a in of_type(d, RaiseStorageAlarm)] == ["node-b-data"]


# ---- replay --------------------------------------------------------------------

SCENARIOS = {
    "healthy": snap(sv(A), sv(B)),
    "local": snap(sv(A, vtl_a0=(0, 2)), sv(B)),
    "global": snap(sv(A, vtl_a0=(0, 2)), sv(B, vtl_a0=(0, 2))),
    "stale": snap(sv(A, vtl_a0=(0, 2)), sv(B, 3.0)),
    "absent": snap(sv(A, vtl_a1=(-1, -1)), None),
    "raised": snap(sv(A, vtl_a0=(0, 2)), None, alarms=frozenset({"node-a-data"})),
    "cleared": snap(sv(A), None, alarms=frozenset({"node-a-data", "node-b-data"})),
}


@pytest.mark.parametrize("s", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_inputs_round_trip_reproduces_the_decision(s: Snapshot) -> None:
    again = Snapshot.from_inputs(orjson.loads(orjson.dumps(s.to_inputs())))
    assert again == s
    assert decide(again, NOW) == decide(s, NOW)
    assert decide(again, NOW).status == decide(s, NOW).status


def test_inputs_without_storage_fields_still_load() -> None:
    """An event recorded before the storage rules: no storage view, no alarms."""
    s = snap()
    old = s.to_inputs()
    for k in ("storage", "storage_stale_after", "storage_alarms"):
        del old[k]
    for g in old["groups"].values():
        del g["devices"]
    again = Snapshot.from_inputs(old)
    assert again.storage == {} and again.storage_alarms == frozenset()
    assert decide(again, NOW) == decide(s, NOW)


def test_storage_inputs_are_plain_json() -> None:
    inputs = snap(sv(A, vtl_a0=(1, 2)), alarms=frozenset({"node-b-data", "node-a-data"})
                  ).to_inputs()
    assert inputs["storage_alarms"] == ["node-a-data", "node-b-data"]
    assert inputs["storage_stale_after"] == STALE
    wire = orjson.loads(orjson.dumps(inputs))
    assert wire["storage"][A]["devices"]["vtl-a0"] == {"reachable": 1, "total": 2,
                                                       "confirmed": None}
    assert wire["storage"][A]["received_at"] == NOW - INTERVAL
    assert wire["groups"]["node-a-data"]["devices"] == ["vtl-a0", "vtl-a1"]


# ---- properties ----------------------------------------------------------------

NODE_AGES = st.sampled_from([None, 0.0, INTERVAL, INTERVAL, DEAD_AFTER, DEAD_AFTER + 2**-20, 5.0])
VIEW_AGES = st.sampled_from([0.0, INTERVAL, STALE, STALE + 2**-20, 10.0, -0.5])
FOCUS_NODE_AGES = st.sampled_from([INTERVAL, 0.0, DEAD_AFTER, DEAD_AFTER + 2**-20])
FOCUS_VIEW_AGES = st.sampled_from([INTERVAL, 0.0, STALE, STALE + 2**-20])


#: a device as one node sees it, mostly reachable (None: absent from the view), so that
#: companions reaching every device of a group (storage takeovers) are common
DEVICE_PATHS = st.sampled_from([None, DevicePaths(0, 2), DevicePaths(0, 0), DevicePaths(1, 2),
                                DevicePaths(2, 2), DevicePaths(2, 2), DevicePaths(1, 1),
                                DevicePaths(3, 3)])


@st.composite
def storage_views(draw: st.DrawFn, node: str, devices: list[str],
                  ages: st.SearchStrategy[float] = VIEW_AGES) -> StorageView:
    paths = {d: draw(DEVICE_PATHS) for d in devices}
    return StorageView(node, NOW - draw(ages),
                       {d: p for d, p in paths.items() if p is not None})


@st.composite
def snapshots(draw: st.DrawFn, owner_reaches: bool = False, focus: bool = False) -> Snapshot:
    """Random pairs with random storage views. With ``owner_reaches`` every data group's
    owner (if it has a view) shows at least one path up to every device of the group.
    ``focus`` makes the storage rules' cases common: nodes mostly alive, views present
    and mostly fresh, groups owned and held."""
    node_ages = FOCUS_NODE_AGES if focus else NODE_AGES
    view_ages = FOCUS_VIEW_AGES if focus else VIEW_AGES
    n_pairs = draw(st.integers(1, 2))
    maintenance = st.sampled_from([False, False, False, True])
    pairs = tuple(PairView(f"pair-{i}", (f"p{i}-a", f"p{i}-b"), "manual", draw(maintenance))
                  for i in range(n_pairs))
    names = [n for p in pairs for n in p.nodes]
    devs = {n: [f"{n}-d{k}" for k in range(draw(st.integers(0, 3)))] for n in names}
    every = [d for n in names for d in devs[n]]
    nodes = {}
    for n in names:
        age = draw(node_ages)
        nodes[n] = NodeView(n, None if age is None else NOW - age, "inc", draw(st.booleans()))
    storage = {n: draw(storage_views(n, every, view_ages)) for n in names
               if focus or draw(st.integers(0, 4))}
    groups: dict[str, GroupView] = {}
    for p in pairs:
        for home in p.nodes:
            for kind in ("data", "mgmt"):
                g = f"{home}-{kind}"
                owner = draw(st.sampled_from([*p.nodes, *p.nodes, *(() if focus else (None,))]))
                state = draw(st.sampled_from(["held"] * 4 + ([] if focus else ["acquiring"])))
                groups[g] = GroupView(g, home, kind, owner, draw(st.integers(0, 9)),
                                      None if owner is None else state, draw(st.integers(0, 99)),
                                      tuple(devs[home]) if kind == "data" else ())
    if owner_reaches:
        storage = _owners_reach(storage, groups)
    else:  # a holder may report a data group failed, at its epoch or an older one
        storage = {n: replace(v, failed={
            g.name: GroupFailure(g.epoch - draw(st.integers(0, 1)), "resource tape failed")
            for g in groups.values() if g.owner == n and g.devices
            and draw(st.sampled_from([False, False, True]))}) for n, v in storage.items()}
    alarms = frozenset(draw(st.lists(st.sampled_from(sorted(groups)), max_size=3)))
    in_flight = frozenset(draw(st.lists(st.sampled_from(sorted(groups)), max_size=2)))
    return Snapshot(DEAD_AFTER, NOW - draw(st.sampled_from([0.0, 10.0])), pairs, nodes,
                    groups, in_flight, 0.0, storage, STALE, alarms)


def _owners_reach(storage: dict[str, StorageView],
                  groups: dict[str, GroupView]) -> dict[str, StorageView]:
    out = dict(storage)
    for g in groups.values():
        if g.owner is None or g.owner not in out:
            continue
        view = out[g.owner]
        devices = dict(view.devices)
        for d in g.devices:
            total = max(1, devices[d].total if d in devices else 2)
            devices[d] = DevicePaths(max(1, devices[d].reachable if d in devices else 1), total)
        out[g.owner] = replace(view, devices=devices)
    return out


def _pair_of(s: Snapshot, node: str) -> PairView:
    return next(p for p in s.pairs if node in p.nodes)


def _check_storage_takeover(s: Snapshot, t: Takeover) -> None:
    g = s.groups[t.group]
    pair = _pair_of(s, g.home)
    assert g.kind == "data" and g.devices
    assert t.old == g.owner and t.old in pair.nodes and t.new in pair.nodes and t.new != t.old
    assert not pair.maintenance
    assert not is_dead(s.nodes[t.old], s, NOW), "a dead owner fails over by heartbeats"
    assert is_alive(s.nodes[t.new], NOW, s.dead_after), "took over to a node not alive"
    assert reaches_all(fresh_storage(s, t.new, NOW), g.devices), \
        "took over to a node that does not reach every device of the group"
    owner_view = fresh_storage(s, t.old, NOW)
    assert owner_view is not None
    assert lost_devices(owner_view, g.devices) or failed_group(owner_view, g)
    assert (t.epoch, t.revision) == (g.epoch, g.revision)


def _check_alarms(s: Snapshot, actions: tuple[Action, ...]) -> None:
    for a in actions:
        if isinstance(a, RaiseStorageAlarm):
            g = s.groups[a.group]
            assert a.group not in s.storage_alarms, "alarm repeated"
            assert a.node == g.owner and not _pair_of(s, g.home).maintenance
            view = fresh_storage(s, a.node, NOW)
            assert view is not None and a.devices == lost_devices(view, g.devices)
            assert a.devices or failed_group(view, g)
            assert a.rule is Rule.STORAGE_GLOBAL_FAILURE
        elif isinstance(a, ClearStorageAlarm):
            g = s.groups[a.group]
            assert a.group in s.storage_alarms and a.node == g.owner
            view = fresh_storage(s, a.node, NOW)
            assert reaches_all(view, g.devices)
            assert view is not None and failed_group(view, g) is None
            assert a.rule is Rule.STORAGE_RECOVERED


def _grouped(actions: tuple[Action, ...]) -> list[str]:
    return [a.group for a in actions if not isinstance(a, MarkDown) and hasattr(a, "group")]


@settings(max_examples=300, deadline=None)
@given(s=st.one_of(snapshots(), snapshots(focus=True)))
def test_storage_properties(s: Snapshot) -> None:
    d = decide(s, NOW)
    per_group = _grouped(d.actions)
    assert len(per_group) == len(set(per_group)), "two actions (two owners) for one group"
    assert not set(per_group) & s.in_flight
    for a in d.actions:
        if isinstance(a, Takeover) and a.rule is Rule.STORAGE_LOCAL_FAILURE:
            _check_storage_takeover(s, a)
        elif isinstance(a, Takeover):
            assert a.rule is Rule.HEARTBEATS_STOPPED
            assert is_dead(s.nodes[a.old], s, NOW) and not is_dead(s.nodes[a.new], s, NOW)
        elif isinstance(a, Assign | Resume):
            assert not is_dead(s.nodes[a.node], s, NOW)
    _check_alarms(s, d.actions)
    for a in d.actions:
        if isinstance(a, RaiseStorageAlarm | ClearStorageAlarm | Takeover):
            assert a.group in s.groups
            if a.rule.value.startswith("storage"):
                assert s.groups[a.group].kind == "data", "the management group stays"
    assert d.status == (NO_ACTION if not d.actions else "; ".join(a.status for a in d.actions))


@settings(max_examples=200, deadline=None)
@given(s=st.one_of(snapshots(owner_reaches=True), snapshots(owner_reaches=True, focus=True)))
def test_one_path_on_the_owner_for_every_device_never_a_storage_takeover(s: Snapshot) -> None:
    d = decide(s, NOW)
    assert [a for a in of_type(d, Takeover) if a.rule is Rule.STORAGE_LOCAL_FAILURE] == []
    assert of_type(d, RaiseStorageAlarm) == []


@settings(max_examples=200, deadline=None)
@given(s=st.one_of(snapshots(), snapshots(focus=True)))
def test_storage_decisions_are_replayable(s: Snapshot) -> None:
    again = Snapshot.from_inputs(orjson.loads(orjson.dumps(s.to_inputs())))
    assert again == s
    assert decide(again, NOW) == decide(s, NOW)
    assert decide(again, NOW).status == decide(s, NOW).status


# ---- recovery from a global failure: the companion's view must settle ---------


def _since(view: StorageView, age: float) -> StorageView:
    """The same view, every device it reaches reached for ``age`` s without a break."""
    return replace(view, reachable_since={d: NOW - age for d, p in view.devices.items()
                                          if p.reachable >= 1})


@pytest.mark.parametrize(("settled_for", "moves"), [(0.0, False), (1.0, False), (1.99, False),
                                                    (2.0, True), (5.0, True)])
def test_global_failure_recovering_needs_a_settled_companion(settled_for: float,
                                                             moves: bool) -> None:
    """In a global-failure episode node-b recovers first (node-a still shows vtl-a0
    lost for a probe or two): no takeover until node-b has reached every device of the
    group for storage_settle (2 s by default) without a break."""
    s = snap(sv(A, vtl_a0=(0, 2)), _since(sv(B), settled_for),
             alarms=frozenset({"node-a-data"}))
    assert s.storage_settle == 2.0
    acts = decide(s, NOW).actions
    takeovers = [a for a in acts if isinstance(a, Takeover)]
    if moves:
        assert [(t.group, t.new, t.rule) for t in takeovers] == [
            ("node-a-data", B, Rule.STORAGE_LOCAL_FAILURE)]
    else:
        assert takeovers == []
    # Outside an episode a local failure moves at once, settled or not.
    plain = snap(sv(A, vtl_a0=(0, 2)), _since(sv(B), 0.0))
    assert [a.group for a in decide(plain, NOW).actions if isinstance(a, Takeover)] == [
        "node-a-data"]


def test_reachable_since_round_trips_through_inputs() -> None:
    s = snap(sv(A), _since(sv(B), 1.5), alarms=frozenset({"node-a-data"}))
    back = Snapshot.from_inputs(orjson.loads(orjson.dumps(s.to_inputs())))
    assert back == s


def test_companion_paths_up_by_hysteresis_only_do_not_confirm() -> None:
    """The device died for both nodes: node-a already counts it lost (fall probes in a
    row), node-b's paths are still "up" by hysteresis but their latest probes failed.
    That is no confirmation: a global failure, no takeover."""
    b = sv(B)
    b = replace(b, devices={**b.devices, "vtl-a0": DevicePaths(2, 2, confirmed=0)})
    acts = decide(snap(sv(A, vtl_a0=(0, 2)), b), NOW).actions
    assert [type(a) for a in acts] == [RaiseStorageAlarm]
    # One path whose latest probe answered is enough.
    b = replace(b, devices={**b.devices, "vtl-a0": DevicePaths(2, 2, confirmed=1)})
    (t,) = decide(snap(sv(A, vtl_a0=(0, 2)), b), NOW).actions
    assert isinstance(t, Takeover) and t.new == B
    # The owner's own loss is by hysteresis: a failed latest probe is not a loss yet.
    a = sv(A)
    a = replace(a, devices={**a.devices, "vtl-a0": DevicePaths(2, 2, confirmed=0)})
    assert decide(snap(a, sv(B)), NOW).actions == ()


@pytest.mark.parametrize(("lost_for", "b_age", "moves"), [
    (0.1, INTERVAL, False),   # the companion's report cannot show a probe after the loss
    (1.4, INTERVAL, False),
    (1.6, 0.05, True),        # received 1.55 s after the loss: a whole round after it
    (1.6, 0.2, False),        # the companion's latest report predates that round
])
def test_local_takeover_waits_for_a_companion_probe_round_after_the_loss(
        lost_for: float, b_age: float, moves: bool) -> None:
    """With fast failures (EIO) the owner may count a device lost before the companion's
    first failed probe: the companion confirms only with a report received a whole probe
    round (storage_confirm_after, 1.5 s by default) after the owner's loss."""
    a = replace(sv(A, vtl_a0=(0, 2)), lost_since={"vtl-a0": NOW - lost_for})
    s = snap(a, sv(B, age=b_age))
    assert s.storage_confirm_after == 1.5
    acts = decide(s, NOW).actions
    if moves:
        assert [(type(x), x.group) for x in acts] == [(Takeover, "node-a-data")]
    else:
        assert acts == ()  # waiting: neither a takeover nor an alarm yet


# ---- a group its owner reports failed (a resource gave up: vtlha.recovery) -----------


def failed(view: StorageView, group: str = "node-a-data", epoch: int | None = None,
           reason: str = "resource tape: monitor failed: not running") -> StorageView:
    """The view with ``group`` reported failed at ``epoch`` (default: the group's epoch
    in ``snap``)."""
    if epoch is None:
        epoch = snap().groups[group].epoch
    return replace(view, failed={**view.failed, group: GroupFailure(epoch, reason)})


def test_a_group_reported_failed_moves_like_a_local_failure() -> None:
    """Every path up, but node-a gave node-a-data up (its tape service failed twice):
    node-b, which reaches every device, takes the data group; the management group
    stays. The same rule as a lost device, with its own sentence."""
    s = snap(failed(sv(A)), sv(B))
    d = decide(s, NOW)
    data = s.groups["node-a-data"]
    status = ("node-b takes over node-a-data: node-a reports the group failed (resource "
              "tape: monitor failed: not running) and node-b reaches all 2 devices of the "
              "group (a local failure; the management group stays)")
    assert d.actions == (Takeover("node-a-data", A, B, "pair-1", data.epoch, data.revision,
                                  status, Rule.STORAGE_LOCAL_FAILURE),)


def test_a_failed_group_with_a_lost_device_says_both() -> None:
    (t,) = of_type(decide(snap(failed(sv(A, vtl_a1=(0, 2))), sv(B)), NOW), Takeover)
    assert "node-a has no path left to vtl-a1 and it reports the group failed (" in t.status


def test_a_failure_reported_at_an_older_epoch_says_nothing_now() -> None:
    """A report about the group's previous epoch (before it moved) is not about it now."""
    epoch = snap().groups["node-a-data"].epoch
    assert decide(snap(failed(sv(A), epoch=epoch - 1), sv(B)), NOW).actions == ()


def test_a_failed_group_of_the_companion_moves_nothing_here() -> None:
    """node-b reports node-a-data failed, but node-a owns it: nothing (only the
    owner's word about its own group counts)."""
    assert decide(snap(sv(A), failed(sv(B))), NOW).actions == ()


@pytest.mark.parametrize(("b_view", "why"), [
    (sv(B, vtl_a0=(0, 2)), "node-b reaches no path to vtl-a0"),
    (None, "node-b cannot confirm its devices (no storage report)"),
], ids=["companion-lacks", "companion-unknown"])
def test_a_failed_group_the_companion_cannot_serve_raises_the_alarm(
        b_view: StorageView | None, why: str) -> None:
    s = snap(failed(sv(A)), b_view)
    status = ("storage failure of node-a-data cannot fail over: node-a reports the group "
              f"failed (resource tape: monitor failed: not running) and {why}")
    assert decide(s, NOW).actions == (
        RaiseStorageAlarm("node-a-data", A, "pair-1", (), s.groups["node-a-data"].epoch,
                          status, Rule.STORAGE_GLOBAL_FAILURE),)
    # raised once; it is not cleared while the owner still reports the group failed
    assert decide(replace(s, storage_alarms=frozenset({"node-a-data"})), NOW).actions == ()


def test_a_dead_companion_is_no_target_for_a_failed_group() -> None:
    d = decide(snap(failed(sv(A)), sv(B), b_age=1.0), NOW)
    (alarm,) = of_type(d, RaiseStorageAlarm)
    assert alarm.group == "node-a-data" and "node-b cannot take over" in alarm.status
    assert "node-a-data" not in {t.group for t in of_type(d, Takeover)}


def test_a_failed_group_waits_out_the_hold_after_a_move_and_maintenance() -> None:
    """The storage rule's own limits hold: no move within failback_hold_time of the
    group's last move (decided afresh after it), none in maintenance."""
    s = snap(failed(sv(A)), sv(B))
    recent = replace(s, groups={**s.groups, "node-a-data": replace(
        s.groups["node-a-data"], moved_at=NOW - 1.0)})
    assert decide(recent, NOW).actions == ()
    later = replace(recent, groups={**s.groups, "node-a-data": replace(
        s.groups["node-a-data"], moved_at=NOW - 31.0)})
    assert [type(a) for a in decide(later, NOW).actions] == [Takeover]
    assert decide(snap(failed(sv(A)), sv(B), maintenance=True), NOW).actions == ()


def test_the_alarm_clears_once_the_new_owner_serves_the_group() -> None:
    s = snap(sv(A), sv(B), owners={"node-a-data": B}, alarms=frozenset({"node-a-data"}))
    (c,) = decide(s, NOW).actions
    assert isinstance(c, ClearStorageAlarm) and c.node == B


def test_a_failed_group_round_trips_through_the_inputs() -> None:
    s = snap(failed(sv(A)), sv(B))
    wire = orjson.loads(orjson.dumps(s.to_inputs()))
    assert wire["storage"][A]["failed"] == {"node-a-data": {
        "epoch": s.groups["node-a-data"].epoch,
        "reason": "resource tape: monitor failed: not running"}}
    again = Snapshot.from_inputs(wire)
    assert again == s and decide(again, NOW).status == decide(s, NOW).status
    del wire["storage"][A]["failed"]  # an event recorded before: nothing failed
    assert Snapshot.from_inputs(wire).storage[A].failed == {}


def test_a_long_reason_is_cut_in_the_sentence() -> None:
    (t,) = of_type(decide(snap(failed(sv(A), reason="x" * 1000), sv(B)), NOW), Takeover)
    assert "x" * 297 + "..." in t.status and "x" * 298 not in t.status
