"""Hypothesis properties of the policy over random *sequences* of health inputs (issue 7).

A small model of the runner drives it: each step changes some health inputs (heartbeats
stop or resume, fatal and non-fatal checks, the management path, storage views,
maintenance, operator requests), lets time pass, builds the snapshot the way the arbiter
does (the ``*_since`` times through ``node_health`` and ``vtlha.health.Since``), calls
``decide`` and applies its actions to the ownership like the runner would (a takeover
completes at once: the owner changes, the epoch goes up, ``moved_at`` is now; failures
are recorded with ``record_failure``; holds and alarms are remembered). After every
decision:

- no decision gives one group two owners: at most one move per group, a takeover only
  from the group's current owner, never to a dead node;
- maintenance suspends every automatic move (only an unowned group's home may take it);
- a group moved less than ``failback_hold_time`` ago moves again only because its owner
  died or failed a fatal check, and a dead owner's groups always fail over at once when
  the companion may take them;
- a held-down node is never given a group automatically;
- the decision replays from its JSON inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from vtlha.health import Since
from vtlha.policy import (
    URGENT_RULES,
    Assign,
    ClearCheckAlarm,
    ClearHold,
    ClearStorageAlarm,
    Decision,
    DevicePaths,
    GroupView,
    HoldDown,
    MarkDown,
    MarkUp,
    NodeView,
    PairView,
    RaiseCheckAlarm,
    RaiseStorageAlarm,
    Refusal,
    Rule,
    Snapshot,
    StorageView,
    Takeover,
    answer,
    decide,
    explain,
    failed_nodes,
    is_alive,
    is_dead,
    node_health,
    record_failure,
)

DEAD_AFTER = 0.25
STALE = 0.75
HOLD = 2.0
FLAP_MAX = 2
FLAP_WINDOW = 30.0
T0 = 100.0
A, B = "node-a", "node-b"
NODES = (A, B)
GROUPS = ("node-a-data", "node-a-mgmt", "node-b-data", "node-b-mgmt")
DEVICES = {"node-a-data": ("a0", "a1"), "node-b-data": ("b0",)}
ALL_DEVICES = ("a0", "a1", "b0")


@dataclass
class NodeModel:
    beating: bool = True
    last_heartbeat: float | None = T0
    fatal: tuple[str, ...] = ()
    nonfatal: tuple[str, ...] = ()
    mgmt: bool | None = True
    storage: str = "ok"  # ok | lost-own | lost-other | missing | stale
    declared_down: bool = False
    check_alarms: tuple[str, ...] = ()
    since: tuple[Since, Since, Since] = field(default_factory=lambda: (Since(), Since(),
                                                                       Since()))


@dataclass
class GroupModel:
    owner: str | None
    epoch: int = 1
    revision: int = 1
    moved_at: float | None = None


@dataclass
class Model:
    failback: str
    now: float = T0
    maintenance: bool = False
    held: set[str] = field(default_factory=set)
    failures: dict[str, tuple[float, ...]] = field(default_factory=dict)
    nodes: dict[str, NodeModel] = field(default_factory=lambda: {n: NodeModel() for n in NODES})
    groups: dict[str, GroupModel] = field(default_factory=dict)
    storage_alarms: set[str] = field(default_factory=set)
    revision: int = 100

    # ---- the snapshot, as the arbiter builds it ----------------------------------
    def storage_view(self, node: str) -> StorageView | None:
        st_ = self.nodes[node].storage
        if st_ == "missing":
            return None
        own = {d for g, ds in DEVICES.items() if g.startswith(node) for d in ds}
        lost = own if st_ == "lost-own" else (set(ALL_DEVICES) - own if st_ == "lost-other"
                                              else set())
        received = self.now - (10.0 if st_ == "stale" else 0.0625)
        return StorageView(node, received, {d: DevicePaths(0 if d in lost else 2, 2)
                                            for d in ALL_DEVICES})

    def snapshot(self) -> Snapshot:
        pair = PairView("pair-1", NODES, self.failback, self.maintenance, HOLD, FLAP_MAX,
                        FLAP_WINDOW, frozenset(self.held), dict(self.failures))
        groups = {}
        for g, m in self.groups.items():
            home, kind = g.rsplit("-", 1)
            groups[g] = GroupView(g, home, kind, m.owner, m.epoch if m.owner else 0,
                                  "held" if m.owner else None, m.revision,
                                  DEVICES.get(g, ()), m.moved_at)
        nodes = {n: NodeView(n, m.last_heartbeat, "inc", m.declared_down, m.fatal, m.nonfatal,
                             m.check_alarms, m.mgmt) for n, m in self.nodes.items()}
        storage = {n: v for n in NODES if (v := self.storage_view(n)) is not None}
        snap = Snapshot(DEAD_AFTER, T0, (pair,), nodes, groups, frozenset(), 0.5, storage,
                        STALE, frozenset(self.storage_alarms))
        # the *_since times: what node_health says of this very snapshot, kept over time
        with_since = {}
        for n, view in nodes.items():
            h = node_health(snap, n, self.now)
            up, mgmt, sto = self.nodes[n].since
            with_since[n] = replace(view, healthy_since=up.update(h.up, self.now),
                                    mgmt_ok_since=mgmt.update(h.mgmt, self.now),
                                    storage_ok_since=sto.update(h.storage, self.now))
        return replace(snap, nodes=with_since)

    # ---- carrying out actions, as the runner does ---------------------------------
    def move(self, t: Takeover) -> None:
        g = self.groups[t.group]
        assert g.owner == t.old, f"{t.group}: taken from {t.old} but owned by {g.owner}"
        self.revision += 1
        g.owner, g.epoch, g.revision, g.moved_at = t.new, g.epoch + 1, self.revision, self.now

    def apply(self, actions: tuple[Any, ...]) -> None:
        for node in failed_nodes(actions):
            self.failures[node] = record_failure(self.failures.get(node, ()), self.now,
                                                 window=FLAP_WINDOW, merge_within=HOLD)
        for a in actions:
            self.apply_one(a)

    def apply_one(self, a: Any) -> None:
        if isinstance(a, MarkDown | MarkUp):
            self.nodes[a.node].declared_down = isinstance(a, MarkDown)
        elif isinstance(a, Takeover):
            self.move(a)
        elif isinstance(a, Assign):
            g = self.groups[a.group]
            assert g.owner is None
            self.revision += 1
            g.owner, g.epoch, g.revision, g.moved_at = a.node, 1, self.revision, None
        elif isinstance(a, RaiseStorageAlarm):
            self.storage_alarms.add(a.group)
        elif isinstance(a, ClearStorageAlarm):
            self.storage_alarms.discard(a.group)
        elif isinstance(a, RaiseCheckAlarm):
            n = self.nodes[a.node]
            n.check_alarms = tuple(sorted({*n.check_alarms, a.check}))
        elif isinstance(a, ClearCheckAlarm):
            n = self.nodes[a.node]
            n.check_alarms = tuple(c for c in n.check_alarms if c != a.check)
        elif isinstance(a, HoldDown):
            self.held.add(a.node)
        elif isinstance(a, ClearHold):
            self.held.discard(a.node)
            self.failures.pop(a.node, None)
        # SetMaintenance is applied by the step itself


# ---- random steps -----------------------------------------------------------------

NODE = st.sampled_from(NODES)
EVENTS = st.one_of(
    st.tuples(st.just("beat"), NODE, st.booleans()),
    st.tuples(st.just("fatal"), NODE, st.sampled_from([(), (), ("vtl",)])),
    st.tuples(st.just("nonfatal"), NODE, st.sampled_from([(), ("disk",), ("disk", "log")])),
    st.tuples(st.just("mgmt"), NODE, st.sampled_from([True, True, False, None])),
    st.tuples(st.just("storage"), NODE,
              st.sampled_from(["ok", "ok", "lost-own", "lost-other", "missing", "stale"])),
    st.tuples(st.just("maintenance"), st.just(""), st.booleans()),
    st.tuples(st.just("switchover"), st.sampled_from(GROUPS), st.just(True)),
    st.tuples(st.just("failback"), st.just("pair-1"), st.just(True)),
    st.tuples(st.just("clear-hold"), NODE, st.just(True)),
)
DT = st.sampled_from([0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0])
STEP = st.tuples(st.lists(EVENTS, max_size=3), DT)
#: flapping nodes: heartbeats and fatal checks come and go, often enough for hold-downs
MOSTLY_A = st.sampled_from([A, A, A, B])
FLAPPY_EVENTS = st.one_of(
    st.tuples(st.just("beat"), MOSTLY_A, st.booleans()),
    st.tuples(st.just("fatal"), MOSTLY_A, st.sampled_from([(), ("vtl",)])),
    st.tuples(st.just("clear-hold"), NODE, st.just(True)),
    st.tuples(st.just("failback"), st.just("pair-1"), st.just(True)),
    st.tuples(st.just("maintenance"), st.just(""), st.sampled_from([False, False, True])),
)
FLAPPY_STEP = st.tuples(st.lists(FLAPPY_EVENTS, min_size=1, max_size=2),
                        st.sampled_from([0.5, 1.0, 2.0, 3.0, 3.0]))

Steps = list[tuple[list[tuple[str, str, Any]], float]]


@st.composite
def runs(draw: st.DrawFn, flappy: bool = False) -> tuple[Model, Steps]:
    model = Model(failback=draw(st.sampled_from(["auto", "auto", "manual"])))
    unowned = draw(st.booleans())
    model.groups = {g: GroupModel(None if unowned else g.rsplit("-", 1)[0]) for g in GROUPS}
    if flappy:
        return model, draw(st.lists(FLAPPY_STEP, min_size=15, max_size=50))
    return model, draw(st.lists(STEP, min_size=1, max_size=50))


RUNS = st.one_of(runs(), runs(flappy=True))


# ---- the properties ------------------------------------------------------------------


def check_decision(s: Snapshot, now: float, d: Decision) -> None:
    pair = s.pairs[0]
    held = pair.held_down | {a.node for a in d.actions if isinstance(a, HoldDown)}
    moved = [a.group for a in d.actions if isinstance(a, Takeover | Assign)]
    assert len(moved) == len(set(moved)), "two moves of one group in one decision"
    for a in d.actions:
        if isinstance(a, Takeover):
            g = s.groups[a.group]
            assert a.old == g.owner and a.new != a.old and a.new in pair.nodes
            assert not is_dead(s.nodes[a.new], s, now), "took over to a dead node"
            assert a.new not in held, "gave a group to a held-down node"
            assert not s.nodes[a.new].fatal_failing, "gave a group to a node failing a check"
            assert not pair.maintenance, "an automatic move in maintenance"
            if a.rule is not Rule.HEARTBEATS_STOPPED:
                assert is_alive(s.nodes[a.new], now, s.dead_after)
            if g.moved_at is not None and now - g.moved_at < pair.failback_hold_time:
                assert a.rule in URGENT_RULES, f"{a.rule} moved {a.group} within the hold time"
            if a.rule is Rule.FAILBACK:
                assert a.new == g.home and pair.failback == "auto"
        elif isinstance(a, Assign):
            assert s.groups[a.group].owner is None
            assert a.node not in held, "assigned a group to a held-down node"
            assert not is_dead(s.nodes[a.node], s, now)
            if a.node != s.groups[a.group].home:
                assert not pair.maintenance, "assigned to the companion in maintenance"


def check_dead_owner_fails_over(s: Snapshot, now: float, d: Decision) -> None:
    """A dead owner's group goes to the companion at once whenever it may take it."""
    pair = s.pairs[0]
    taken = {a.group for a in d.actions if isinstance(a, Takeover)}
    held = pair.held_down | {a.node for a in d.actions if isinstance(a, HoldDown)}
    for g in s.groups.values():
        if g.owner is None or not is_dead(s.nodes[g.owner], s, now):
            continue
        new = B if g.owner == A else A
        fit = (not is_dead(s.nodes[new], s, now) and new not in held
               and not s.nodes[new].fatal_failing)
        if fit and not pair.maintenance:
            assert g.name in taken, f"{g.name}: dead owner {g.owner} not replaced by {new}"


def check_operator(s: Snapshot, now: float, result: Any) -> None:
    if isinstance(result, Refusal):
        assert result.reason
        return
    for a in result:
        if isinstance(a, Takeover):
            assert a.rule in (Rule.SWITCHOVER, Rule.OPERATOR_FAILBACK)
            assert s.groups[a.group].owner == a.old
            assert is_alive(s.nodes[a.new], now, s.dead_after), "operator move to a dead node"
            assert a.new not in s.pairs[0].held_down, "operator move to a held-down node"
            assert not s.nodes[a.new].fatal_failing


def run_step(model: Model, events: list[tuple[str, str, Any]], dt: float) -> None:
    requests = []
    for kind, who, value in events:
        if kind == "beat":
            model.nodes[who].beating = value
        elif kind in ("fatal", "nonfatal", "mgmt", "storage"):
            setattr(model.nodes[who], kind, value)
        elif kind == "maintenance":
            model.maintenance = value
        elif kind == "switchover":
            requests.append({"verb": "switchover", "group": who})
        elif kind == "failback":
            requests.append({"verb": "failback", "pair": who})
        else:
            requests.append({"verb": "clear-hold", "pair": "pair-1", "node": who})
    model.now += dt
    for n in model.nodes.values():
        if n.beating:
            n.last_heartbeat = model.now
    for req in requests:  # operator requests answer on the current state
        s = model.snapshot()
        result = answer(s, req, model.now)
        check_operator(s, model.now, result)
        if not isinstance(result, Refusal):
            model.apply(result)
    s = model.snapshot()
    d = decide(s, model.now)
    check_decision(s, model.now, d)
    check_dead_owner_fails_over(s, model.now, d)
    model.apply(d.actions)


@settings(max_examples=200, deadline=None)
@given(case=RUNS)
def test_policy_over_random_health_sequences(case: tuple[Model, Steps]) -> None:
    model, steps = case
    for events, dt in steps:
        run_step(model, events, dt)
        for g in model.groups.values():  # one owner per group, and a known node
            assert g.owner is None or g.owner in NODES


@settings(max_examples=100, deadline=None)
@given(case=RUNS)
def test_every_decision_of_a_sequence_replays(case: tuple[Model, Steps]) -> None:
    model, steps = case
    for events, dt in steps:
        run_step(model, events, dt)
        s = model.snapshot()
        inputs = orjson.loads(orjson.dumps({"snapshot": s.to_inputs(), "now": model.now}))
        assert Snapshot.from_inputs(inputs["snapshot"]) == s
        assert explain(inputs) == decide(s, model.now).status


# ---- directed sequences: the hold after a failback --------------------------------------

FLAPS = st.lists(st.tuples(st.sampled_from(["mgmt", "storage", "nonfatal"]), st.booleans(),
                           st.sampled_from([0.0625, 0.125, 0.25])), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(flaps=FLAPS, death=st.sampled_from(["none", "heartbeats", "fatal"]))
def test_failed_back_group_stays_through_health_flaps_but_not_through_a_death(
        flaps: list[tuple[str, bool, float]], death: str) -> None:
    """node-a's groups failed over to node-b; node-a is healthy again and gets them back
    automatically. Within the hold time its management path, storage and non-fatal checks
    flap: nothing moves. If node-a then dies or fails a fatal check, its groups go to
    node-b at once."""
    model = Model(failback="auto")
    model.groups = {g: GroupModel(B if g.startswith(A) else g.rsplit("-", 1)[0], 2, 2, T0)
                    for g in GROUPS}
    # node-a healthy long enough: the next decision fails back both groups
    for _ in range(int(HOLD / 0.5) + 2):
        model.now += 0.5
        for n in model.nodes.values():
            n.last_heartbeat = model.now
        s = model.snapshot()
        d = decide(s, model.now)
        model.apply(d.actions)
        if d.actions:
            break
    assert {a.rule for a in d.actions} == {Rule.FAILBACK}
    assert model.groups["node-a-data"].owner == A and model.groups["node-a-mgmt"].owner == A
    back_at = model.now
    a = model.nodes[A]
    for kind, bad, dt in flaps:
        if kind == "mgmt":
            a.mgmt = not bad
        elif kind == "storage":
            a.storage = "lost-own" if bad else "ok"
        else:
            a.nonfatal = ("disk",) if bad else ()
        model.now += dt
        for n in model.nodes.values():
            n.last_heartbeat = model.now
        if model.now - back_at >= HOLD:
            break
        d = decide(model.snapshot(), model.now)
        assert [t for t in d.actions if isinstance(t, Takeover)] == [], "moved by a flap"
        model.apply(d.actions)
    if death == "none" or model.now - back_at >= HOLD:
        return
    if death == "heartbeats":
        model.now += DEAD_AFTER + 0.0625
        model.nodes[B].last_heartbeat = model.now
    else:
        a.fatal = ("vtl",)
    d = decide(model.snapshot(), model.now)
    taken = {t.group: t.rule for t in d.actions if isinstance(t, Takeover)}
    rule = Rule.HEARTBEATS_STOPPED if death == "heartbeats" else Rule.FATAL_PROCESS_ERROR
    assert taken == {"node-a-data": rule, "node-a-mgmt": rule}
