"""The failover policy: ``decide(snapshot, now) -> Decision``. Pure.

No I/O, no clock reads, no NATS: everything the policy knows is in the snapshot,
and ``now`` is the arbiter's monotonic clock passed in. The runner feeds it and
carries out the actions it returns; every action carries a status sentence (as
Patroni's loop returns one) and the name of the rule that made it, and the event
that records it carries ``snapshot.to_inputs()`` so the decision can be re-run
(``explain``).

The rules (``docs/policy.md`` draws them as a tree), per group, first match wins:

1. **Heartbeats stopped** (``heartbeats_stopped``): the owner is dead; the companion
   takes over at once, whatever else holds (a recent move, a health flap).
2. **Fatal process error** (``fatal_process_error``): a fatal check fails on a live
   owner (after hysteresis); the companion takes over every group the owner serves,
   at once like a death.
3. **Storage** (``storage_local_failure``, ``storage_global_failure``): a device stays
   served while one of its paths on the owner is up (path failover, no node failover).
   When the owner's fresh view shows no path left to some device of a data group, or
   reports the group ``failed`` at its epoch (a resource agent failed and the
   storage-monitor gave the group up: ``vtlha.recovery``), the companion takes over
   that data group only if its own fresh view reaches every device of the group (the
   failure is local; the management group stays). Otherwise the failure is global: no
   failover, one alarm per episode, cleared when the owner reaches every device again
   and serves the group.
4. **Management path** (``mgmt_path_failure``): the owner's management path failed
   (it is alive: its heartbeats travel the data network) and the companion's is known
   healthy: the management group alone moves.
5. **Automatic failback** (``failback``, pairs with ``failback: auto``): a group away
   from its home goes back once the home node has been healthy for the pair's
   ``failback_hold_time``.

Everywhere: a node that is dead, held down (it failed ``flap_max`` times within
``flap_window``) or failing a fatal check is never given a group automatically;
maintenance suspends every automatic move (health is still reported); a group moved
less than ``failback_hold_time`` ago moves again only for rules 1 and 2. Per node, on
the side: ``MarkDown``/``MarkUp``, one check alarm per failing check and episode, and
``HoldDown`` when a node has failed too often.

Operator requests (``switchover``, ``failback``, ``clear_hold``, ``set_maintenance``)
are decided by the same pure code: they return actions or a ``Refusal`` with a reason.
They are allowed in maintenance: maintenance suspends *automatic* moves only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from functools import cached_property
from typing import Any


class Rule(StrEnum):
    ALL_HEALTHY = "all_healthy"
    INITIAL_ASSIGN = "initial_assign"
    HEARTBEATS_STOPPED = "heartbeats_stopped"
    NODE_BACK = "node_back"
    RESUME_ACQUIRE = "resume_acquire"
    STORAGE_LOCAL_FAILURE = "storage_local_failure"
    STORAGE_GLOBAL_FAILURE = "storage_global_failure"
    STORAGE_RECOVERED = "storage_recovered"
    FATAL_PROCESS_ERROR = "fatal_process_error"
    CHECK_FAILED = "check_failed"
    CHECK_RECOVERED = "check_recovered"
    MGMT_PATH_FAILURE = "mgmt_path_failure"
    FAILBACK = "failback"
    FLAPPING = "flapping"
    # operator requests
    SWITCHOVER = "switchover"
    OPERATOR_FAILBACK = "operator_failback"
    HOLD_CLEARED = "hold_cleared"
    MAINTENANCE = "maintenance"
    STANDBY = "standby"  # a node put in standby; its groups move away (and stay away)
    FAILBACK_MODE = "failback_mode"
    CLEANUP = "cleanup"  # a data group's resource failures forgotten; a failed one restarted


#: automatic moves away from a node for a fault of that node: each counts towards the
#: node's failures (``record_failure``, ``failed_nodes``)
FAULT_RULES = frozenset({Rule.HEARTBEATS_STOPPED, Rule.FATAL_PROCESS_ERROR,
                         Rule.STORAGE_LOCAL_FAILURE, Rule.MGMT_PATH_FAILURE})
#: moves made even within failback_hold_time of the group's last move
URGENT_RULES = frozenset({Rule.HEARTBEATS_STOPPED, Rule.FATAL_PROCESS_ERROR})
#: moves an operator asked for
OPERATOR_RULES = frozenset({Rule.SWITCHOVER, Rule.OPERATOR_FAILBACK})

DEFAULT_FAILBACK_HOLD_TIME = 30.0
DEFAULT_FLAP_MAX = 3
DEFAULT_FLAP_WINDOW = 3600.0


@dataclass(frozen=True)
class NodeView:
    """What the arbiter knows of one node. Times are the arbiter's monotonic clock.

    The check and management fields are the state *after* hysteresis (``vtlha.health``);
    the ``*_since`` fields are kept by the runner (``node_health`` says what each one
    tracks; ``vtlha.health.Since`` keeps it) and are None while the input is bad."""

    name: str
    last_heartbeat: float | None = None
    incarnation: str | None = None
    declared_down: bool = False
    fatal_failing: tuple[str, ...] = ()  # fatal process checks failing, by name
    nonfatal_failing: tuple[str, ...] = ()  # the other failing process checks
    check_alarms: tuple[str, ...] = ()  # checks whose alarm is raised (this episode)
    #: management path: True healthy, False failed, None unknown (not monitored, no
    #: report, or the report is stale). None never moves anything.
    mgmt_healthy: bool | None = None
    healthy_since: float | None = None  # alive with no fatal check failing, since
    mgmt_ok_since: float | None = None  # management path not failed (healthy or unknown)
    storage_ok_since: float | None = None  # fresh view reaching its home data devices


@dataclass(frozen=True)
class GroupView:
    name: str
    home: str
    kind: str  # "data" | "mgmt"
    owner: str | None = None  # None: no KV record yet
    epoch: int = 0
    state: str | None = None
    revision: int = 0
    devices: tuple[str, ...] = ()  # storage devices of a data group (config)
    moved_at: float | None = None  # when it last changed owner (None: never, or unknown)
    #: when the arbiter last saw the owner renew the group's lease in the KV (its
    #: monotonic clock; None: not seen). A renewal is a sign of life as good as a
    #: heartbeat: see ``_dead_owner``.
    renewed_at: float | None = None


@dataclass(frozen=True)
class PairView:
    name: str
    nodes: tuple[str, str]
    failback: str = "manual"  # "manual" | "auto"
    maintenance: bool = False
    failback_hold_time: float = DEFAULT_FAILBACK_HOLD_TIME
    flap_max: int = DEFAULT_FLAP_MAX
    flap_window: float = DEFAULT_FLAP_WINDOW
    held_down: frozenset[str] = frozenset()  # nodes given no group automatically
    #: node -> when it failed (the arbiter's monotonic clock; see ``record_failure``)
    failures: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: nodes an operator put in standby: given no group, their groups moved away
    standby: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DevicePaths:
    """One device as one node sees it: how many of its paths are up (after rise/fall),
    of how many; and how many of those up paths also answered their latest probe
    (``confirmed``; None: not reported, taken as ``reachable``). An owner loses a
    device only by hysteresis (``reachable``); a companion confirms it reaches a device
    only with a path whose latest probe succeeded — hysteresis keeps a path "up" for a
    few probes after the device died, which must not pass for confirmation."""

    reachable: int
    total: int
    confirmed: int | None = None

    @property
    def confirmed_now(self) -> int:
        return self.reachable if self.confirmed is None else min(self.confirmed, self.reachable)


@dataclass(frozen=True)
class GroupFailure:
    """A data group its holder reports ``failed`` at ``epoch``: not served there (a
    reservation refused, or a resource agent failed and was not recovered on that node:
    ``migration_threshold`` reached or its restart failed)."""

    epoch: int
    reason: str = ""


@dataclass(frozen=True)
class StorageView:
    """A node's latest storage report, as the arbiter received it (its monotonic clock).
    A device the report does not mention is absent: neither lost nor confirmed."""

    node: str
    received_at: float
    devices: dict[str, DevicePaths] = field(default_factory=dict)
    #: device -> since when (arbiter's clock) the node has reached it without a break;
    #: a device not reached now is absent
    reachable_since: dict[str, float] = field(default_factory=dict)
    #: device -> since when the node has had no path up to it (absent: it has one)
    lost_since: dict[str, float] = field(default_factory=dict)
    #: group -> the node holds it but reports it failed (the storage rule reads this
    #: like a lost device of the group, at the group's epoch only)
    failed: dict[str, GroupFailure] = field(default_factory=dict)


DEFAULT_STORAGE_STALE_AFTER = 1.5  # 3 x the default probe_interval
DEFAULT_STORAGE_SETTLE = 2.0
DEFAULT_STORAGE_CONFIRM_AFTER = 1.5  # default probe_interval + probe_timeout


@dataclass(frozen=True)
class Snapshot:
    dead_after: float
    started_at: float  # when the arbiter began watching (monotonic)
    pairs: tuple[PairView, ...]
    nodes: dict[str, NodeView]
    groups: dict[str, GroupView]
    in_flight: frozenset[str] = frozenset()  # groups with a takeover under way
    initial_assign_wait: float = 0.0  # an unowned group waits this long for its home node
    storage: dict[str, StorageView] = field(default_factory=dict)  # node -> latest view
    storage_stale_after: float = DEFAULT_STORAGE_STALE_AFTER  # older views cannot confirm
    storage_alarms: frozenset[str] = frozenset()  # groups whose global alarm is raised
    #: in a global-failure episode, the companion must reach every device of the group
    #: this long without a break before the failure counts as local (recovery flaps)
    storage_settle: float = DEFAULT_STORAGE_SETTLE
    #: a companion confirms an owner's lost device only with a report received this long
    #: after the loss: one whole probe round (interval + timeout) that began after it
    storage_confirm_after: float = DEFAULT_STORAGE_CONFIRM_AFTER
    #: a new active arbiter makes no move (takeover, assignment, resume) before this
    #: (monotonic; lease_ttl after it became active): ``decide`` holds them back and
    #: says so. None: no hold-off.
    hold_off_until: float | None = None

    # The snapshot is immutable: its indexes are built once (decided group by group and
    # pair by pair, a scan of every group per pair made a decision pairs x groups).
    @cached_property
    def groups_by_home(self) -> Mapping[str, tuple[GroupView, ...]]:
        """home node -> its groups, by name."""
        out: dict[str, list[GroupView]] = {}
        for g in sorted(self.groups.values(), key=lambda g: g.name):
            out.setdefault(g.home, []).append(g)
        return {n: tuple(gs) for n, gs in out.items()}

    @cached_property
    def pair_by_node(self) -> Mapping[str, PairView]:
        out: dict[str, PairView] = {}
        for p in self.pairs:
            for n in p.nodes:
                out.setdefault(n, p)
        return out

    def for_pairs(self, names: Iterable[str]) -> Snapshot:
        """This snapshot cut down to the pairs ``names``: their nodes, the groups those
        are home to, those nodes' storage views. A pair is decided from its own part
        alone (``decide``), so a decision event carries only its pair's part as its
        inputs: the whole cluster's would grow with the estate (~2.2 KB a pair: past
        nats-server's 1 MB payload limit at ~450 pairs) and cost O(cluster) per event.
        Unknown names are ignored."""
        want = set(names)
        pairs = tuple(p for p in self.pairs if p.name in want)
        nodes = {n for p in pairs for n in p.nodes}
        groups = {g.name: g for n in sorted(nodes) for g in self.groups_by_home.get(n, ())}
        return replace(
            self, pairs=pairs, nodes={n: v for n, v in self.nodes.items() if n in nodes},
            groups=dict(sorted(groups.items())),
            in_flight=frozenset(g for g in self.in_flight if g in groups),
            storage={n: v for n, v in self.storage.items() if n in nodes},
            storage_alarms=frozenset(g for g in self.storage_alarms if g in groups))

    def to_inputs(self) -> dict[str, Any]:
        """Plain JSON-able data (tuples as lists, sets as sorted lists)."""
        d = asdict(self)
        d["in_flight"] = sorted(self.in_flight)
        d["storage_alarms"] = sorted(self.storage_alarms)
        for p, pd in zip(self.pairs, d["pairs"], strict=True):
            pd["held_down"] = sorted(p.held_down)
            pd["standby"] = sorted(p.standby)
            pd["failures"] = {n: list(ts) for n, ts in sorted(p.failures.items())}
        return d

    @classmethod
    def from_inputs(cls, d: Mapping[str, Any]) -> Snapshot:
        """The inverse of ``to_inputs``; fields an older event lacks take their defaults."""
        return cls(
            dead_after=d["dead_after"],
            started_at=d["started_at"],
            pairs=tuple(_pair_from(p) for p in d["pairs"]),
            nodes={k: _node_from(v) for k, v in d["nodes"].items()},
            groups={k: _group_from(v) for k, v in d["groups"].items()},
            in_flight=frozenset(d["in_flight"]),
            initial_assign_wait=d.get("initial_assign_wait", 0.0),
            storage={k: _storage_from(v) for k, v in d.get("storage", {}).items()},
            storage_stale_after=d.get("storage_stale_after", DEFAULT_STORAGE_STALE_AFTER),
            storage_alarms=frozenset(d.get("storage_alarms", ())),
            storage_settle=d.get("storage_settle", DEFAULT_STORAGE_SETTLE),
            storage_confirm_after=d.get("storage_confirm_after", DEFAULT_STORAGE_CONFIRM_AFTER),
            hold_off_until=d.get("hold_off_until"),
        )


def _pair_from(p: Mapping[str, Any]) -> PairView:
    return PairView(
        p["name"], (p["nodes"][0], p["nodes"][1]), p.get("failback", "manual"),
        p.get("maintenance", False),
        failback_hold_time=p.get("failback_hold_time", DEFAULT_FAILBACK_HOLD_TIME),
        flap_max=p.get("flap_max", DEFAULT_FLAP_MAX),
        flap_window=p.get("flap_window", DEFAULT_FLAP_WINDOW),
        held_down=frozenset(p.get("held_down", ())),
        standby=frozenset(p.get("standby", ())),
        failures={n: tuple(ts) for n, ts in p.get("failures", {}).items()},
    )


def _node_from(v: Mapping[str, Any]) -> NodeView:
    tuples = ("fatal_failing", "nonfatal_failing", "check_alarms")
    return NodeView(**{**v, **{k: tuple(v.get(k, ())) for k in tuples}})


def _group_from(v: Mapping[str, Any]) -> GroupView:
    return GroupView(**{**v, "devices": tuple(v.get("devices", ()))})


def _storage_from(v: Mapping[str, Any]) -> StorageView:
    return StorageView(v["node"], v["received_at"],
                       {k: DevicePaths(**p) for k, p in v.get("devices", {}).items()},
                       dict(v.get("reachable_since", {})), dict(v.get("lost_since", {})),
                       {k: GroupFailure(**f) for k, f in v.get("failed", {}).items()})


# ---- actions -----------------------------------------------------------------


@dataclass(frozen=True)
class MarkDown:
    node: str
    pair: str
    status: str
    rule: Rule


@dataclass(frozen=True)
class MarkUp:
    node: str
    pair: str
    status: str
    rule: Rule


@dataclass(frozen=True)
class Assign:
    group: str
    node: str
    pair: str
    status: str
    rule: Rule


@dataclass(frozen=True)
class Takeover:
    group: str
    old: str
    new: str
    pair: str
    epoch: int  # epoch the arbiter saw; the claim writes epoch + 1
    revision: int  # revision the arbiter saw; the claim is a CAS against it
    status: str
    rule: Rule


@dataclass(frozen=True)
class Resume:
    """Finish an acquisition left half done (an arbiter restarted mid-takeover, or the
    new owner's executors did not answer in time)."""

    group: str
    node: str
    pair: str
    epoch: int
    revision: int
    status: str
    rule: Rule


@dataclass(frozen=True)
class RaiseStorageAlarm:
    """The owner lost every path to some device of a data group and its companion cannot
    confirm that it reaches them all: a global failure, no failover. Raised once per
    episode (``Snapshot.storage_alarms`` remembers it)."""

    group: str
    node: str  # the owner that lost the devices
    pair: str
    devices: tuple[str, ...]  # the devices it has no path left to
    epoch: int
    status: str
    rule: Rule


@dataclass(frozen=True)
class ClearStorageAlarm:
    """The group's owner reaches every device of it again: the alarm's episode ends."""

    group: str
    node: str
    pair: str
    epoch: int
    status: str
    rule: Rule


@dataclass(frozen=True)
class RaiseCheckAlarm:
    """A process check fails on a live node (after hysteresis): an event, once per
    episode (``NodeView.check_alarms`` remembers it). A fatal check also moves the
    node's groups (rule ``fatal_process_error``, by its own ``Takeover``)."""

    node: str
    pair: str
    check: str
    fatal: bool
    status: str
    rule: Rule


@dataclass(frozen=True)
class ClearCheckAlarm:
    """The check passes again on the live node: the alarm's episode ends."""

    node: str
    pair: str
    check: str
    status: str
    rule: Rule


@dataclass(frozen=True)
class HoldDown:
    """The node failed ``failures`` times within the pair's ``flap_window`` (at least
    ``flap_max``): from now on it is given no group automatically, until an operator
    clears the hold (``clear_hold``)."""

    node: str
    pair: str
    failures: int
    status: str
    rule: Rule


@dataclass(frozen=True)
class ClearHold:
    """Operator: the node may be given groups automatically again. The runner removes it
    from the pair's hold list and forgets its failures."""

    node: str
    pair: str
    status: str
    rule: Rule


@dataclass(frozen=True)
class SetMaintenance:
    """Operator: the pair enters (``on``) or leaves maintenance. ``changed`` is False
    when it already was in that state (nothing to write)."""

    pair: str
    on: bool
    changed: bool
    status: str
    rule: Rule


@dataclass(frozen=True)
class Refusal:
    """An operator request the policy refuses, with the reason (a sentence)."""

    request: str  # e.g. "switchover node-a-data"
    reason: str

    @property
    def status(self) -> str:
        return f"{self.request} refused: {self.reason}"


Action = (MarkDown | MarkUp | Assign | Takeover | Resume | RaiseStorageAlarm | ClearStorageAlarm
          | RaiseCheckAlarm | ClearCheckAlarm | HoldDown)
@dataclass(frozen=True)
class SetStandby:
    """Operator: ``node`` of the pair enters (``on``) or leaves standby. ``changed`` is
    False when it already was in that state (nothing to write)."""

    pair: str
    node: str
    on: bool
    changed: bool
    status: str
    rule: Rule


@dataclass(frozen=True)
class SetFailbackMode:
    """Operator: the pair's failback mode (``auto`` | ``manual``) at run time."""

    pair: str
    mode: str
    changed: bool
    status: str
    rule: Rule


@dataclass(frozen=True)
class Cleanup:
    """Operator (Pacemaker's ``resource cleanup``): forget the failures of a data group's
    resources on ``nodes``, and where one of them holds the group at ``epoch`` and
    reports it ``failed``, start it there again. The runner sends each node's
    storage-monitor a ``cleanup`` command with its term and ``epoch``."""

    group: str
    nodes: tuple[str, ...]
    epoch: int
    status: str
    rule: Rule


OperatorAction = (Takeover | ClearHold | SetMaintenance | SetStandby | SetFailbackMode
                  | Cleanup)


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...] = field(default_factory=tuple)
    #: the sentences of the moves held back by a new active arbiter's hold-off
    held_back: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        if not self.actions and not self.held_back:
            return "no action: every node is as expected"
        return "; ".join((*(a.status for a in self.actions), *self.held_back))

    @property
    def sentences(self) -> list[str]:
        """Each action's sentence, then each held-back move's (the status when none)."""
        return [a.status for a in self.actions] + list(self.held_back) or [self.status]


# ---- predicates --------------------------------------------------------------


def heartbeat_age(node: NodeView, now: float) -> float | None:
    return None if node.last_heartbeat is None else now - node.last_heartbeat


def is_alive(node: NodeView, now: float, dead_after: float) -> bool:
    return heard_within(node.last_heartbeat, now, dead_after)


def heard_within(last_heartbeat: float | None, now: float, dead_after: float) -> bool:
    """``is_alive`` on the time of the last heartbeat alone."""
    return last_heartbeat is not None and now - last_heartbeat <= dead_after


def is_dead(node: NodeView, snap: Snapshot, now: float) -> bool:
    """Dead: no heartbeat for dead_after, counting from the arbiter's own start for a
    node it has never heard (so a restarting arbiter does not fail everything over)."""
    since = node.last_heartbeat if node.last_heartbeat is not None else snap.started_at
    return now - since > snap.dead_after


def renews(g: GroupView, now: float, dead_after: float) -> bool:
    """The owner renewed the group's lease within ``dead_after`` (as the arbiter saw the
    KV): it is alive whatever its heartbeats say. Its heartbeats reach the arbiter by
    another path than its renewals (a subscription through the arbiter's own server, not
    the KV's leader), and an arbiter whose own server was cut off for a moment misses the
    one and then gets the other (the renewals made meanwhile, at once). Waiting costs a
    real death nothing: the new owner serves ``lease_ttl + margin`` after the last renewal
    seen in any case, and ``dead_after <= lease_ttl``."""
    return g.renewed_at is not None and now - g.renewed_at < dead_after


def storage_age(view: StorageView, now: float) -> float:
    return now - view.received_at


def fresh_storage(snap: Snapshot, node: str, now: float) -> StorageView | None:
    """The node's storage view if it is fresh; None (cannot confirm) if missing or stale."""
    return fresh(snap.storage.get(node), now, snap.storage_stale_after)


def fresh(view: StorageView | None, now: float, stale_after: float) -> StorageView | None:
    """``view`` if it is no older than ``stale_after``, else None."""
    if view is None or storage_age(view, now) > stale_after:
        return None
    return view


def lost_devices(view: StorageView, devices: tuple[str, ...]) -> tuple[str, ...]:
    """Devices the view reports with no path up (absent ones are not known lost)."""
    return tuple(d for d in devices if d in view.devices and view.devices[d].reachable < 1)


def unconfirmed_devices(view: StorageView, devices: tuple[str, ...]) -> tuple[str, ...]:
    """Devices the view does not show reachable, now, through at least one path."""
    return tuple(d for d in devices
                 if d not in view.devices or view.devices[d].confirmed_now < 1)


def reaches_all(view: StorageView | None, devices: tuple[str, ...]) -> bool:
    return view is not None and not unconfirmed_devices(view, devices)


def failed_group(view: StorageView, g: GroupView) -> GroupFailure | None:
    """The view's node reports ``g`` failed at the group's current epoch (a report about
    an older epoch says nothing about the group now)."""
    f = view.failed.get(g.name)
    return f if f is not None and f.epoch == g.epoch else None


def recent_failures(pair: PairView, node: str, now: float) -> int:
    """How many of the node's recorded failures lie within the pair's flap_window."""
    return sum(1 for t in pair.failures.get(node, ()) if now - t <= pair.flap_window)


def is_recently_moved(pair: PairView, g: GroupView, now: float) -> bool:
    """Moved less than failback_hold_time ago: only a death or a fatal error moves it."""
    return g.moved_at is not None and now - g.moved_at < pair.failback_hold_time


def pair_of(snap: Snapshot, node: str) -> PairView | None:
    return snap.pair_by_node.get(node)


@dataclass(frozen=True)
class NodeHealth:
    """The three inputs whose "since" times the runner keeps for a node (feed each to a
    ``vtlha.health.Since`` every tick and put the results in the NodeView)."""

    up: bool  # -> healthy_since: alive and no fatal check failing
    mgmt: bool  # -> mgmt_ok_since: management path not known failed
    storage: bool  # -> storage_ok_since: a fresh view reaches every device of its home
    # data group(s) (True when they have none)


def node_health(snap: Snapshot, node: str, now: float) -> NodeHealth:
    nv = snap.nodes[node]
    return health_of(nv.last_heartbeat, nv.fatal_failing, nv.mgmt_healthy,
                     fresh_storage(snap, node, now), home_data_devices(snap, node), now,
                     snap.dead_after)


def home_data_devices(snap: Snapshot, node: str) -> tuple[str, ...]:
    """The devices of the data group(s) whose home is ``node``."""
    return tuple(d for g in snap.groups_by_home.get(node, ()) if g.kind == "data"
                 for d in g.devices)


def health_of(last_heartbeat: float | None, fatal_failing: tuple[str, ...],
              mgmt_healthy: bool | None, fresh_view: StorageView | None,
              devices: tuple[str, ...], now: float, dead_after: float) -> NodeHealth:
    """``node_health`` from its inputs (the runner computes it before it has a snapshot:
    ``ClusterView.snapshot`` builds each NodeView once, its "since" times included)."""
    return NodeHealth(
        up=heard_within(last_heartbeat, now, dead_after) and not fatal_failing,
        mgmt=mgmt_healthy is not False,
        storage=not devices or reaches_all(fresh_view, devices),
    )


def record_failure(failures: Sequence[float], at: float, *, window: float,
                   merge_within: float) -> tuple[float, ...]:
    """A node's failure times after one more failure ``at`` (any one clock: the runner
    keeps wall-clock times in the KV pair record). Times older than ``window`` are
    dropped; a failure within ``merge_within`` of the latest one is the same episode
    (both groups of one node, a claim retried) and is not counted again."""
    kept = tuple(t for t in failures if at - t <= window)
    if kept and at - max(kept) < merge_within:
        return kept
    return (*kept, at)


def failed_nodes(actions: Sequence[Action | OperatorAction]) -> tuple[str, ...]:
    """Nodes that lose a group in these actions by an automatic move for their own fault
    (rules in FAULT_RULES): what the runner records as failures."""
    return tuple(sorted({a.old for a in actions
                         if isinstance(a, Takeover) and a.rule in FAULT_RULES}))


def event_kind(rule: Rule) -> str:
    """The event family of a takeover made by ``rule``: failover, failback, switchover."""
    if rule in (Rule.FAILBACK, Rule.OPERATOR_FAILBACK):
        return "failback"
    return "switchover" if rule in (Rule.SWITCHOVER, Rule.STANDBY) else "failover"


def _silence(node: NodeView, now: float) -> str:
    age = heartbeat_age(node, now)
    if age is None:
        return f"no heartbeat from {node.name} since the arbiter started"
    return f"heartbeats from {node.name} stopped {age:.2f} s ago"


def _plural(names: Sequence[str], one: str, many: str) -> str:
    return f"{one if len(names) == 1 else many} {', '.join(names)}"


def _fatal_phrase(failing: Sequence[str]) -> str:
    return _plural(failing, "a fatal check failing:", "fatal checks failing:")


# ---- the policy --------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    """One pair being decided: the snapshot, the clock, and what holds for every group."""

    snap: Snapshot
    pair: PairView
    now: float
    dead: frozenset[str]
    held: frozenset[str]  # held down, including nodes held down in this very decision

    def node(self, name: str) -> NodeView:
        return self.snap.nodes[name]

    def other(self, node: str) -> str:
        return self.pair.nodes[1] if self.pair.nodes[0] == node else self.pair.nodes[0]


def decide(snap: Snapshot, now: float) -> Decision:
    actions: list[Action] = []
    for pair in snap.pairs:
        actions += _decide_pair(snap, pair, now)
    return _hold_off(snap, tuple(actions), now)


MOVES = (Takeover, Assign, Resume)


def _hold_off(snap: Snapshot, actions: tuple[Action, ...], now: float) -> Decision:
    """A new active arbiter makes no move within lease_ttl of becoming active (DESIGN.md:
    an executor may still act on its predecessor's commands): moves wait, and the
    decision says so; the bookkeeping (marks, alarms, hold-downs) goes ahead."""
    if snap.hold_off_until is None or now >= snap.hold_off_until:
        return Decision(actions)
    left = snap.hold_off_until - now
    held = tuple(f"held back ({left:.2f} s left of a new active arbiter's hold-off: no "
                 f"takeover within lease_ttl of becoming active): {a.status}"
                 for a in actions if isinstance(a, MOVES))
    return Decision(tuple(a for a in actions if not isinstance(a, MOVES)), held)


def _decide_pair(snap: Snapshot, pair: PairView, now: float) -> list[Action]:
    dead = frozenset(n for n in pair.nodes if is_dead(snap.nodes[n], snap, now))
    out: list[Action] = [*_marks(snap, pair, dead, now), *_check_alarms(snap, pair, now)]
    holds = _hold_downs(pair, now)
    out += holds
    c = _Ctx(snap, pair, now, dead, pair.held_down | {h.node for h in holds})
    mine = (g for n in pair.nodes for g in snap.groups_by_home.get(n, ()))
    for g in sorted(mine, key=lambda g: g.name):
        if g.name in snap.in_flight:
            continue
        action = _decide_group(c, g)
        if action is not None:
            out.append(action)
    return out


def _marks(snap: Snapshot, pair: PairView, dead: frozenset[str], now: float) -> list[Action]:
    out: list[Action] = []
    for n in pair.nodes:
        view = snap.nodes[n]
        if n in dead and not view.declared_down:
            out.append(MarkDown(n, pair.name, f"{n} is down: {_silence(view, now)}",
                                Rule.HEARTBEATS_STOPPED))
        elif view.declared_down and is_alive(view, now, snap.dead_after):
            # (heard again: a node declared down by an earlier active arbiter stays down
            # through a new one's "never heard" grace, in which it is not yet dead)
            out.append(MarkUp(n, pair.name,
                              f"{n} is back (heartbeats resumed); failback is {pair.failback}",
                              Rule.NODE_BACK))
    return out


def _check_alarms(snap: Snapshot, pair: PairView, now: float) -> list[Action]:
    """One alarm per failing check and episode, cleared when it passes again; only for a
    live node (a dead node's last results are stale: neither raised nor cleared)."""
    out: list[Action] = []
    for n in pair.nodes:
        nv = snap.nodes[n]
        if not is_alive(nv, now, snap.dead_after):
            continue
        failing = {c: False for c in nv.nonfatal_failing} | {c: True for c in nv.fatal_failing}
        for check, fatal in sorted(failing.items()):
            if check in nv.check_alarms:
                continue
            how = ("fatal: its companion takes over what it serves" if fatal
                   else "not fatal: an alarm only, no failover")
            out.append(RaiseCheckAlarm(n, pair.name, check, fatal,
                                       f"check {check} fails on {n} ({how})", Rule.CHECK_FAILED))
        for check in sorted(set(nv.check_alarms) - set(failing)):
            out.append(ClearCheckAlarm(n, pair.name, check,
                                       f"check {check} passes again on {n}: alarm cleared",
                                       Rule.CHECK_RECOVERED))
    return out


def _hold_downs(pair: PairView, now: float) -> list[HoldDown]:
    out = []
    for n in pair.nodes:
        k = recent_failures(pair, n, now)
        if n not in pair.held_down and k >= pair.flap_max:
            out.append(HoldDown(
                n, pair.name, k,
                f"{n} is held down: it failed {k} times within {pair.flap_window:g} s "
                f"(flap_max {pair.flap_max}); it is given no group automatically until an "
                f"operator clears the hold", Rule.FLAPPING))
    return out


def _barrier(c: _Ctx, node: str, *, strict: bool = True) -> str | None:
    """Why ``node`` may not be given a group automatically (a phrase), or None. Strict:
    it must be alive (heard within dead_after); otherwise only not dead."""
    nv = c.node(node)
    if node in c.dead or (strict and not is_alive(nv, c.now, c.snap.dead_after)):
        return f"{node} is not alive ({_silence(nv, c.now)})"
    if node in c.held:
        return f"{node} is held down after repeated failures (until an operator clears it)"
    if node in c.pair.standby:
        return f"{node} is in standby (until an operator takes it out)"
    if nv.fatal_failing:
        return f"{node} has {_fatal_phrase(nv.fatal_failing)}"
    return None


def _decide_group(c: _Ctx, g: GroupView) -> Action | None:
    if g.owner is None:
        return _initial_owner(c, g)
    if g.owner in c.dead:
        return _dead_owner(c, g)
    if g.state == "acquiring" and is_alive(c.node(g.owner), c.now, c.snap.dead_after):
        return Resume(g.name, g.owner, c.pair.name, g.epoch, g.revision,
                      f"{g.owner} finishes acquiring {g.name} (epoch {g.epoch})",
                      Rule.RESUME_ACQUIRE)
    if g.owner not in c.pair.nodes:
        return None
    for rule in (_fatal_error, _decide_storage, _mgmt_path, _standby_owner, _auto_failback):
        action = rule(c, g)
        if action is not None:
            return action
    return None


def _dead_owner(c: _Ctx, g: GroupView) -> Action | None:
    assert g.owner is not None
    new = c.other(g.owner)
    if c.pair.maintenance or _barrier(c, new, strict=False) is not None:
        return None
    if renews(g, c.now, c.snap.dead_after):
        return None
    return Takeover(
        g.name, g.owner, new, c.pair.name, g.epoch, g.revision,
        f"{new} takes over {g.name}: {_silence(c.node(g.owner), c.now)}",
        Rule.HEARTBEATS_STOPPED,
    )


def _initial_owner(c: _Ctx, g: GroupView) -> Action | None:
    home_bar = _barrier(c, g.home)
    if home_bar is None:
        return Assign(g.name, g.home, c.pair.name,
                      f"{g.home} serves its home group {g.name}", Rule.INITIAL_ASSIGN)
    other = c.other(g.home)
    waited = c.now - c.snap.started_at > c.snap.initial_assign_wait
    home_out = g.home in c.dead or g.home in c.held or g.home in c.pair.standby \
        or bool(c.node(g.home).fatal_failing)
    if not home_out or not waited or c.pair.maintenance \
            or _barrier(c, other, strict=False) is not None:
        return None
    why = (f"its home {g.home} is down ({_silence(c.node(g.home), c.now)})"
           if g.home in c.dead else f"its home {home_bar}")
    return Assign(g.name, other, c.pair.name, f"{other} serves {g.name}: {why}",
                  Rule.INITIAL_ASSIGN)


# ---- fatal process error -------------------------------------------------------


def _fatal_error(c: _Ctx, g: GroupView) -> Action | None:
    """A fatal check fails on the (live) owner: the companion takes over every group the
    owner serves, at once (like a death; the recent-move hold does not apply)."""
    assert g.owner is not None
    failing = c.node(g.owner).fatal_failing
    new = c.other(g.owner)
    if not failing or c.pair.maintenance or _barrier(c, new) is not None:
        return None
    what = _plural(failing, "fatal check", "fatal checks")
    return Takeover(
        g.name, g.owner, new, c.pair.name, g.epoch, g.revision,
        f"{new} takes over {g.name}: {what} failing on {g.owner} (a fatal process error)",
        Rule.FATAL_PROCESS_ERROR)


# ---- storage rules -------------------------------------------------------------


def _decide_storage(c: _Ctx, g: GroupView) -> Action | None:
    """The storage rules for a group whose owner is not dead. A device with one path
    left on the owner is still served (path failover): nothing to do."""
    if not g.devices or g.owner is None:
        return None
    view = fresh_storage(c.snap, g.owner, c.now)
    if view is None:
        return None  # the owner's own view is missing or stale: nothing to act on
    lost = lost_devices(view, g.devices)
    failed = failed_group(view, g)
    if not lost and failed is None:
        return _storage_recovered(c, g, view)
    if c.pair.maintenance:
        return None
    new = c.other(g.owner)
    doubt, storage_doubt = _cannot_confirm(c, new, g.devices)
    loss = _owner_loss(g.owner, lost, failed)
    if doubt is None:
        if is_recently_moved(c.pair, g, c.now):
            return None  # moved less than failback_hold_time ago: decided again after it
        if g.name in c.snap.storage_alarms and not _settled(c, new, g.devices):
            return None  # a global failure recovering: the companion's view must settle
        if not _seen_after_loss(c, view, new, lost):
            return None  # wait for a companion report from a probe round after the loss
        return Takeover(
            g.name, g.owner, new, c.pair.name, g.epoch, g.revision,
            f"{new} takes over {g.name}: {loss} and {new} reaches all {len(g.devices)} "
            f"devices of the group (a local failure; the management group stays)",
            Rule.STORAGE_LOCAL_FAILURE)
    if g.name in c.snap.storage_alarms:
        return None  # raised already in this episode
    what = "is not local, no failover" if storage_doubt and lost else "cannot fail over"
    return RaiseStorageAlarm(
        g.name, g.owner, c.pair.name, lost, g.epoch,
        f"storage failure of {g.name} {what}: {loss} and {doubt}",
        Rule.STORAGE_GLOBAL_FAILURE)


REASON_CHARS = 300  # of a failed group's reason, in a status sentence


def _owner_loss(owner: str, lost: tuple[str, ...], failed: GroupFailure | None) -> str:
    """What the owner lacks, as a phrase: devices with no path left, the group failed."""
    parts = [f"{owner} has no path left to {_names(lost)}"] if lost else []
    if failed is not None:
        why = failed.reason or "no reason given"
        if len(why) > REASON_CHARS:
            why = why[:REASON_CHARS - 3] + "..."
        parts.append(f"{'it' if lost else owner} reports the group failed ({why})")
    return " and ".join(parts)


def _settled(c: _Ctx, node: str, devices: tuple[str, ...]) -> bool:
    """``node`` has reached every one of ``devices`` for ``storage_settle`` without a
    break: in a global-failure episode the owner and its companion recover at slightly
    different times, and the first to recover must not look like a local failure of the
    other."""
    view = c.snap.storage.get(node)
    if view is None:
        return False
    return all(d in view.reachable_since
               and c.now - view.reachable_since[d] >= c.snap.storage_settle for d in devices)


def _seen_after_loss(c: _Ctx, owner_view: StorageView, node: str,
                     lost: tuple[str, ...]) -> bool:
    """The companion's view was received ``storage_confirm_after`` (a whole probe round)
    after the owner lost the devices: a device that died for both nodes has had time to
    fail the companion's probe too, instead of the owner's loss racing the companion's
    first failed probe."""
    view = c.snap.storage.get(node)
    since = [owner_view.lost_since[d] for d in lost if d in owner_view.lost_since]
    if view is None or not since:
        return view is not None
    return view.received_at >= max(since) + c.snap.storage_confirm_after


def _storage_recovered(c: _Ctx, g: GroupView, view: StorageView) -> Action | None:
    if g.name not in c.snap.storage_alarms or g.owner is None or not reaches_all(view, g.devices):
        return None
    return ClearStorageAlarm(
        g.name, g.owner, c.pair.name, g.epoch,
        f"{g.owner} reaches every device of {g.name} again: storage alarm cleared",
        Rule.STORAGE_RECOVERED)


def _cannot_confirm(c: _Ctx, node: str, devices: tuple[str, ...]) -> tuple[str | None, bool]:
    """Why ``node`` cannot take over a group with ``devices`` (a phrase), or None when
    it may be given a group and its fresh view reaches every one of them; and whether
    the reason is about storage (the failure is then not local)."""
    nv = c.node(node)
    if not is_alive(nv, c.now, c.snap.dead_after):
        return f"{node} cannot take over ({_silence(nv, c.now)})", False
    bar = _barrier(c, node)
    if bar is not None:
        return bar, False
    view = c.snap.storage.get(node)
    if view is None:
        return f"{node} cannot confirm its devices (no storage report)", True
    age = storage_age(view, c.now)
    if age > c.snap.storage_stale_after:
        return (f"{node} cannot confirm its devices (its storage report is {age:.2f} s old, "
                f"stale after {c.snap.storage_stale_after} s)"), True
    missing = unconfirmed_devices(view, devices)
    if missing:
        return f"{node} reaches no path to {_names(missing)}", True
    return None, True


def _names(devices: tuple[str, ...]) -> str:
    return ", ".join(devices)


# ---- management path -------------------------------------------------------------


def _mgmt_path(c: _Ctx, g: GroupView) -> Action | None:
    """The owner's management path failed while it is alive (its heartbeats travel the
    data network: the data path is fine): the management group alone moves, to a
    companion whose management path is known healthy. Unknown (None) moves nothing."""
    assert g.owner is not None
    if g.kind != "mgmt" or c.pair.maintenance or c.node(g.owner).mgmt_healthy is not False:
        return None
    new = c.other(g.owner)
    if c.node(new).mgmt_healthy is not True or _barrier(c, new) is not None \
            or is_recently_moved(c.pair, g, c.now):
        return None
    return Takeover(
        g.name, g.owner, new, c.pair.name, g.epoch, g.revision,
        f"{new} takes over {g.name}: the management path of {g.owner} failed (its "
        f"heartbeats still arrive: the data path is fine) and {new}'s is healthy",
        Rule.MGMT_PATH_FAILURE)


# ---- failback ----------------------------------------------------------------------


def healthy_for(snap: Snapshot, node: str, g: GroupView, now: float,
                held: frozenset[str] = frozenset()) -> float | None:
    """How long ``node`` has been fit to serve ``g`` without a break (seconds), or None
    when it is not fit now: alive, not held down, no fatal check failing; for a
    management group its management path not failed; for a data group with devices a
    fresh storage view reaching every one of them."""
    nv = snap.nodes[node]
    pair = pair_of(snap, node)
    if not is_alive(nv, now, snap.dead_after) or nv.fatal_failing or node in held \
            or (pair is not None and (node in pair.held_down or node in pair.standby)):
        return None
    spans = [nv.healthy_since]
    if g.kind == "mgmt":
        if nv.mgmt_healthy is False:
            return None
        spans.append(nv.mgmt_ok_since)
    if g.devices:
        if not reaches_all(fresh_storage(snap, node, now), g.devices):
            return None
        spans.append(nv.storage_ok_since)
    if any(s is None for s in spans):
        return None
    return now - max(s for s in spans if s is not None)


def _standby_owner(c: _Ctx, g: GroupView) -> Action | None:
    """A group still owned by a node in standby (its move at the request did not happen
    or did not last) goes to the companion when the companion may serve it now; not in
    maintenance, not within the hold after the group's last move."""
    assert g.owner is not None
    if g.owner not in c.pair.standby or c.pair.maintenance \
            or is_recently_moved(c.pair, g, c.now):
        return None
    new = c.other(g.owner)
    if _barrier(c, new) is not None \
            or _target_refusal(c.snap, c.pair, new, g, c.now) is not None:
        return None
    return Takeover(g.name, g.owner, new, c.pair.name, g.epoch, g.revision,
                    f"{new} takes over {g.name}: {g.owner} is in standby", Rule.STANDBY)


def _auto_failback(c: _Ctx, g: GroupView) -> Action | None:
    """A group away from home goes back once its home has been fit to serve it for the
    pair's failback_hold_time (pairs with failback auto; never within the hold time of
    the group's last move)."""
    if c.pair.failback != "auto" or c.pair.maintenance or g.owner == g.home \
            or is_recently_moved(c.pair, g, c.now):
        return None
    assert g.owner is not None
    hold = c.pair.failback_hold_time
    span = healthy_for(c.snap, g.home, g, c.now, c.held)
    if span is None or span < hold:
        return None
    return Takeover(
        g.name, g.owner, g.home, c.pair.name, g.epoch, g.revision,
        f"{g.home} takes back {g.name} (failback is auto): {g.home} has been healthy for "
        f"{span:.1f} s (failback_hold_time {hold:g} s)", Rule.FAILBACK)


# ---- operator requests ---------------------------------------------------------------


def _target_refusal(snap: Snapshot, pair: PairView, node: str, g: GroupView,
                    now: float) -> str | None:
    """Why an operator may not move ``g`` to ``node`` now (a phrase), or None."""
    nv = snap.nodes[node]
    if not is_alive(nv, now, snap.dead_after):
        return f"{node} is not alive ({_silence(nv, now)})"
    if node in pair.held_down:
        return (f"{node} is held down after repeated failures (clear the hold first: "
                f"clear-hold {pair.name} {node})")
    if node in pair.standby:
        return f"{node} is in standby (take it out first: standby off {pair.name} {node})"
    if nv.fatal_failing:
        return f"{node} has {_fatal_phrase(nv.fatal_failing)}"
    if g.kind == "mgmt" and nv.mgmt_healthy is False:
        return f"the management path of {node} has failed"
    if g.devices:
        view = fresh_storage(snap, node, now)
        if view is None:
            return f"{node} cannot confirm the devices of {g.name} (no fresh storage report)"
        missing = unconfirmed_devices(view, g.devices)
        if missing:
            return f"{node} reaches no path to {_names(missing)}"
    return None


def _busy(snap: Snapshot, g: GroupView) -> bool:
    return g.name in snap.in_flight or g.state == "acquiring"


def switchover(snap: Snapshot, group: str, now: float) -> Takeover | Refusal:
    """Operator: move ``group`` to the companion of its current owner (a planned move).
    Allowed in maintenance and within the hold time; refused when the target could not
    serve it (not alive, held down, a fatal check failing, its management path failed
    for a management group, not reaching every device for a data group)."""
    req = f"switchover {group}"
    g = snap.groups.get(group)
    pair = None if g is None else pair_of(snap, g.home)
    if g is None or pair is None:
        return Refusal(req, f"there is no group {group}")
    if _busy(snap, g):
        return Refusal(req, f"a takeover of {group} is under way")
    if g.owner is None or g.owner not in pair.nodes:
        return Refusal(req, f"nobody in {pair.name} serves {group} yet")
    new = pair.nodes[1] if pair.nodes[0] == g.owner else pair.nodes[0]
    why = _target_refusal(snap, pair, new, g, now)
    if why is not None:
        return Refusal(req, why)
    note = " (the pair stays in maintenance)" if pair.maintenance else ""
    return Takeover(g.name, g.owner, new, pair.name, g.epoch, g.revision,
                    f"{new} takes over {group} from {g.owner}: switchover requested by an "
                    f"operator{note}", Rule.SWITCHOVER)


def failback(snap: Snapshot, pair_name: str, now: float) -> tuple[Takeover, ...] | Refusal:
    """Operator: every group of the pair away from its home goes home, all or none: if
    one of them may not go home now, the request is refused with each reason (a
    switchover moves one group). The hold time does not apply: the operator judged."""
    req = f"failback {pair_name}"
    pair = next((p for p in snap.pairs if p.name == pair_name), None)
    if pair is None:
        return Refusal(req, f"there is no pair {pair_name}")
    away = [g for g in sorted(snap.groups.values(), key=lambda g: g.name)
            if g.home in pair.nodes and g.owner in pair.nodes and g.owner != g.home]
    if not away:
        return Refusal(req, f"every group of {pair_name} is on its home node")
    reasons = []
    for g in away:
        why = ("a takeover is under way" if _busy(snap, g)
               else _target_refusal(snap, pair, g.home, g, now))
        if why is not None:
            reasons.append(f"{g.name}: {why}")
    if reasons:
        return Refusal(req, "; ".join(reasons))
    return tuple(Takeover(g.name, g.owner or "", g.home, pair.name, g.epoch, g.revision,
                          f"{g.home} takes back {g.name} from {g.owner}: failback requested "
                          f"by an operator", Rule.OPERATOR_FAILBACK) for g in away)


def _pair_node(snap: Snapshot, req: str, pair_name: str,
               node: str | None = None) -> PairView | Refusal:
    """The pair a request names (and that ``node`` is one of its nodes), or the refusal."""
    pair = next((p for p in snap.pairs if p.name == pair_name), None)
    if pair is None:
        return Refusal(req, f"there is no pair {pair_name}")
    if node is not None and node not in pair.nodes:
        return Refusal(req, f"{node} is not a node of {pair_name}")
    return pair


def clear_hold(snap: Snapshot, pair_name: str, node: str) -> ClearHold | Refusal:
    """Operator: a held-down node may be given groups automatically again; a node not
    held down has its recorded failures forgotten (its flap count starts again, as
    Pacemaker's failcount cleanup)."""
    pair = _pair_node(snap, f"clear-hold {pair_name} {node}", pair_name, node)
    if isinstance(pair, Refusal):
        return pair
    req = f"clear-hold {pair_name} {node}"
    if node in pair.held_down:
        return ClearHold(node, pair.name, f"{node} is no longer held down: it may be given "
                         f"groups automatically again (its failures are forgotten)",
                         Rule.HOLD_CLEARED)
    recorded = len(pair.failures.get(node, ()))
    if not recorded:
        return Refusal(req, f"{node} is not held down and has no failure recorded")
    return ClearHold(node, pair.name, f"{node}'s {recorded} recorded "
                     f"failure{'s' if recorded != 1 else ''} forgotten (it was not held "
                     f"down; its flap count starts again)", Rule.HOLD_CLEARED)


def set_maintenance(snap: Snapshot, pair_name: str, on: bool) -> SetMaintenance | Refusal:
    """Operator: maintenance on or off for a pair. Leaving it, the next decision acts on
    the current state at once."""
    req = f"maintenance {'on' if on else 'off'} {pair_name}"
    pair = next((p for p in snap.pairs if p.name == pair_name), None)
    if pair is None:
        return Refusal(req, f"there is no pair {pair_name}")
    changed = pair.maintenance != on
    if not changed:
        status = f"{pair_name} is already {'in' if on else 'out of'} maintenance"
    elif on:
        status = (f"{pair_name} enters maintenance: automatic failover suspended, health "
                  f"still reported")
    else:
        status = f"{pair_name} leaves maintenance: automatic failover resumes at once"
    return SetMaintenance(pair_name, on, changed, status, Rule.MAINTENANCE)


def standby(snap: Snapshot, pair_name: str, node: str, on: bool,
            now: float) -> tuple[OperatorAction, ...] | Refusal:
    """Operator: put ``node`` in standby (``on``; Pacemaker's ``node standby``): it is
    given no group, and every group it serves moves to its companion now — all or
    none: refused with each group's reason if one cannot go (the companion not alive,
    held down, failing a fatal check, or unable to serve it). Off: it may be given
    groups again; its groups come home by the pair's failback mode."""
    req = f"standby {'on' if on else 'off'} {pair_name} {node}"
    pair = _pair_node(snap, req, pair_name, node)
    if isinstance(pair, Refusal):
        return pair
    if not on:
        if node not in pair.standby:
            return (SetStandby(pair_name, node, False, False, f"{node} is not in standby",
                               Rule.STANDBY),)
        home = ("its groups come home by themselves (failback is auto)"
                if pair.failback == "auto"
                else f"its groups come home with `failback {pair_name}` (failback is manual)")
        return (SetStandby(pair_name, node, False, True, f"{node} leaves standby: it may be "
                           f"given groups again; {home}", Rule.STANDBY),)
    other = pair.nodes[1] if pair.nodes[0] == node else pair.nodes[0]
    owned = [g for g in sorted(snap.groups.values(), key=lambda g: g.name)
             if g.home in pair.nodes and g.owner == node]
    reasons = []
    for g in owned:
        why = ("a takeover is under way" if _busy(snap, g)
               else _target_refusal(snap, pair, other, g, now))
        if why is not None:
            reasons.append(f"{g.name}: {why}")
    if reasons:
        return Refusal(req, "; ".join(reasons))
    moves = tuple(Takeover(g.name, node, other, pair.name, g.epoch, g.revision,
                           f"{other} takes over {g.name} from {node}: {node} is put in "
                           f"standby by an operator", Rule.STANDBY) for g in owned)
    if node in pair.standby:
        return (SetStandby(pair_name, node, True, False, f"{node} is already in standby",
                           Rule.STANDBY), *moves)
    what = (f"its {len(owned)} group{'s' if len(owned) != 1 else ''} move to {other}"
            if owned else "it serves no group")
    return (SetStandby(pair_name, node, True, True, f"{node} enters standby: it is given no "
                       f"group until taken out; {what}", Rule.STANDBY), *moves)


def set_failback_mode(snap: Snapshot, pair_name: str, mode: str) -> SetFailbackMode | Refusal:
    """Operator: the pair's failback mode at run time (kept in ``pair.<pair>``, over the
    cluster file's until changed again)."""
    req = f"failback-mode {mode} {pair_name}"
    pair = next((p for p in snap.pairs if p.name == pair_name), None)
    if pair is None:
        return Refusal(req, f"there is no pair {pair_name}")
    if mode not in ("auto", "manual"):
        return Refusal(req, f"unknown failback mode {mode!r} (auto or manual)")
    if pair.failback == mode:
        return SetFailbackMode(pair_name, mode, False, f"failback of {pair_name} is already "
                               f"{mode}", Rule.FAILBACK_MODE)
    what = ("a group away from home goes back once its home has been healthy for "
            f"failback_hold_time ({pair.failback_hold_time:g} s)" if mode == "auto"
            else f"groups away from home stay until `failback {pair_name}`")
    return SetFailbackMode(pair_name, mode, True, f"failback of {pair_name} is now {mode}: "
                           f"{what}", Rule.FAILBACK_MODE)


def cleanup(snap: Snapshot, group: str, node: str | None, now: float) -> Cleanup | Refusal:
    """Operator: forget a data group's resource failures on ``node`` (default: both
    nodes of its pair that are alive) and restart it where it is held and failed.
    Refused for an unknown or management group, a node not of its pair or down, or while
    a takeover of the group is under way (its epoch is about to change)."""
    req = f"cleanup {group}" + (f" on {node}" if node else "")
    g = snap.groups.get(group)
    if g is None:
        return Refusal(req, f"there is no group {group}")
    if not g.devices:
        return Refusal(req, f"{group} is a management group: it has no storage resources")
    pair = pair_of(snap, g.home)
    if pair is None:
        return Refusal(req, f"{group}'s home {g.home} is of no pair")
    if node is not None and node not in pair.nodes:
        return Refusal(req, f"{node} is not a node of {pair.name}")
    if _busy(snap, g):
        return Refusal(req, f"a takeover of {group} is under way (try again when it ends)")

    def alive(n: str) -> bool:
        view = snap.nodes.get(n)
        return view is not None and is_alive(view, now, snap.dead_after)

    asked = (node,) if node else pair.nodes
    nodes = tuple(n for n in asked if alive(n))
    if not nodes:
        return Refusal(req, f"{' and '.join(asked)} {'is' if len(asked) == 1 else 'are'} "
                       f"down: no storage-monitor to clean up")
    parts = [f"the failures of {group}'s resources on {' and '.join(nodes)} are forgotten"]
    view = snap.storage.get(g.owner) if g.owner in nodes else None
    failure = failed_group(view, g) if view is not None else None
    if failure is not None:
        parts.append(f"{g.owner}, which holds it and reports it failed ({failure.reason}), "
                     f"starts it again")
    skipped = [n for n in asked if n not in nodes]
    if skipped:
        parts.append(f"{' and '.join(skipped)} is down (its storage-monitor forgets its "
                     f"counts when it starts again)")
    return Cleanup(group, nodes, g.epoch, "; ".join(parts), Rule.CLEANUP)


Answer = tuple[OperatorAction, ...] | Refusal


def answer(snap: Snapshot, request: Mapping[str, Any], now: float) -> Answer:
    """One operator request, as carried in an admin message and in the event's inputs:
    ``{"verb": "switchover", "group": G}``, ``{"verb": "failback", "pair": P}``,
    ``{"verb": "clear-hold", "pair": P, "node": N}``,
    ``{"verb": "maintenance", "pair": P, "on": bool}``,
    ``{"verb": "standby", "pair": P, "node": N, "on": bool}``,
    ``{"verb": "failback-mode", "pair": P, "mode": "auto" | "manual"}``,
    ``{"verb": "cleanup", "group": G, "node": N | None}``."""
    verb = request.get("verb")
    result: OperatorAction | tuple[OperatorAction, ...] | Refusal
    if verb == "switchover":
        result = switchover(snap, str(request.get("group", "")), now)
    elif verb == "failback":
        result = failback(snap, str(request.get("pair", "")), now)
    elif verb == "clear-hold":
        result = clear_hold(snap, str(request.get("pair", "")), str(request.get("node", "")))
    elif verb == "maintenance":
        result = set_maintenance(snap, str(request.get("pair", "")), bool(request.get("on")))
    elif verb == "standby":
        result = standby(snap, str(request.get("pair", "")), str(request.get("node", "")),
                         bool(request.get("on")), now)
    elif verb == "failback-mode":
        result = set_failback_mode(snap, str(request.get("pair", "")),
                                   str(request.get("mode", "")))
    elif verb == "cleanup":
        node = request.get("node")
        result = cleanup(snap, str(request.get("group", "")),
                         None if node is None else str(node), now)
    else:
        return Refusal(str(verb), f"unknown request {verb!r}")
    if isinstance(result, Refusal | tuple):
        return result
    return (result,)


def answer_status(result: Answer) -> str:
    if isinstance(result, Refusal):
        return result.status
    return "; ".join(a.status for a in result)


def explain(inputs: Mapping[str, Any]) -> str:
    """Re-run the decision an event recorded and return its status sentence. ``inputs``
    is the event's: ``{"snapshot": Snapshot.to_inputs(), "now": float}``, plus
    ``"request"`` for an operator request (see ``answer``)."""
    snap = Snapshot.from_inputs(inputs["snapshot"])
    now = float(inputs["now"])
    request = inputs.get("request")
    if request is not None:
        return answer_status(answer(snap, request, now))
    return decide(snap, now).status
