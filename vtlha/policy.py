"""The failover policy: ``decide(snapshot, now) -> Decision``. Pure.

No I/O, no clock reads, no NATS: everything the policy knows is in the snapshot,
and ``now`` is the arbiter's monotonic clock passed in. The runner feeds it and
carries out the actions it returns; every action carries a status sentence (as
Patroni's loop returns one) and the name of the rule that made it, and the event
that records it carries ``snapshot.to_inputs()`` so the decision can be re-run.

Storage rules (the manual's "storage device connectivity failure"): a device stays
served while one of its paths on the owner is up (path failover, no node failover).
When the owner's fresh view shows no path left to some device of a data group, the
companion takes over that data group only if its own fresh view reaches every device
of the group (the failure is local; the management group stays). Otherwise the failure
is global: no failover, one alarm per episode, cleared when the owner reaches every
device again. Heartbeat death keeps precedence; maintenance suspends storage moves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
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


@dataclass(frozen=True)
class NodeView:
    """What the arbiter knows of one node. Times are the arbiter's monotonic clock."""

    name: str
    last_heartbeat: float | None = None
    incarnation: str | None = None
    declared_down: bool = False


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


@dataclass(frozen=True)
class PairView:
    name: str
    nodes: tuple[str, str]
    failback: str = "manual"
    maintenance: bool = False


@dataclass(frozen=True)
class DevicePaths:
    """One device as one node sees it: how many of its paths are up, of how many."""

    reachable: int
    total: int


@dataclass(frozen=True)
class StorageView:
    """A node's latest storage report, as the arbiter received it (its monotonic clock).
    A device the report does not mention is absent: neither lost nor confirmed."""

    node: str
    received_at: float
    devices: dict[str, DevicePaths] = field(default_factory=dict)


DEFAULT_STORAGE_STALE_AFTER = 1.5  # 3 x the default probe_interval


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

    def to_inputs(self) -> dict[str, Any]:
        d = asdict(self)
        d["in_flight"] = sorted(self.in_flight)
        d["storage_alarms"] = sorted(self.storage_alarms)
        return d

    @classmethod
    def from_inputs(cls, d: dict[str, Any]) -> Snapshot:
        return cls(
            dead_after=d["dead_after"],
            started_at=d["started_at"],
            pairs=tuple(
                PairView(p["name"], tuple(p["nodes"]), p["failback"], p["maintenance"])
                for p in d["pairs"]
            ),
            nodes={k: NodeView(**v) for k, v in d["nodes"].items()},
            groups={k: _group_from(v) for k, v in d["groups"].items()},
            in_flight=frozenset(d["in_flight"]),
            initial_assign_wait=d.get("initial_assign_wait", 0.0),
            storage={k: _storage_from(v) for k, v in d.get("storage", {}).items()},
            storage_stale_after=d.get("storage_stale_after", DEFAULT_STORAGE_STALE_AFTER),
            storage_alarms=frozenset(d.get("storage_alarms", ())),
        )


def _group_from(v: dict[str, Any]) -> GroupView:
    return GroupView(**{**v, "devices": tuple(v.get("devices", ()))})


def _storage_from(v: dict[str, Any]) -> StorageView:
    return StorageView(v["node"], v["received_at"],
                       {k: DevicePaths(**p) for k, p in v.get("devices", {}).items()})


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


Action = MarkDown | MarkUp | Assign | Takeover | Resume | RaiseStorageAlarm | ClearStorageAlarm


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...] = field(default_factory=tuple)

    @property
    def status(self) -> str:
        if not self.actions:
            return "no action: every node is as expected"
        return "; ".join(a.status for a in self.actions)


# ---- predicates --------------------------------------------------------------


def heartbeat_age(node: NodeView, now: float) -> float | None:
    return None if node.last_heartbeat is None else now - node.last_heartbeat


def is_alive(node: NodeView, now: float, dead_after: float) -> bool:
    age = heartbeat_age(node, now)
    return age is not None and age <= dead_after


def is_dead(node: NodeView, snap: Snapshot, now: float) -> bool:
    """Dead: no heartbeat for dead_after, counting from the arbiter's own start for a
    node it has never heard (so a restarting arbiter does not fail everything over)."""
    since = node.last_heartbeat if node.last_heartbeat is not None else snap.started_at
    return now - since > snap.dead_after


def storage_age(view: StorageView, now: float) -> float:
    return now - view.received_at


def fresh_storage(snap: Snapshot, node: str, now: float) -> StorageView | None:
    """The node's storage view if it is fresh; None (cannot confirm) if missing or stale."""
    view = snap.storage.get(node)
    if view is None or storage_age(view, now) > snap.storage_stale_after:
        return None
    return view


def lost_devices(view: StorageView, devices: tuple[str, ...]) -> tuple[str, ...]:
    """Devices the view reports with no path up (absent ones are not known lost)."""
    return tuple(d for d in devices if d in view.devices and view.devices[d].reachable < 1)


def unconfirmed_devices(view: StorageView, devices: tuple[str, ...]) -> tuple[str, ...]:
    """Devices the view does not show reachable through at least one path."""
    return tuple(d for d in devices if d not in view.devices or view.devices[d].reachable < 1)


def reaches_all(view: StorageView | None, devices: tuple[str, ...]) -> bool:
    return view is not None and not unconfirmed_devices(view, devices)


def _silence(node: NodeView, now: float) -> str:
    age = heartbeat_age(node, now)
    if age is None:
        return f"no heartbeat from {node.name} since the arbiter started"
    return f"heartbeats from {node.name} stopped {age:.2f} s ago"


# ---- the policy --------------------------------------------------------------


def decide(snap: Snapshot, now: float) -> Decision:
    actions: list[Action] = []
    for pair in snap.pairs:
        actions += _decide_pair(snap, pair, now)
    return Decision(tuple(actions))


def _decide_pair(snap: Snapshot, pair: PairView, now: float) -> list[Action]:
    out: list[Action] = []
    dead = {n for n in pair.nodes if is_dead(snap.nodes[n], snap, now)}
    for n in pair.nodes:
        view = snap.nodes[n]
        if n in dead and not view.declared_down:
            out.append(MarkDown(n, pair.name, f"{n} is down: {_silence(view, now)}",
                                Rule.HEARTBEATS_STOPPED))
        elif n not in dead and view.declared_down:
            out.append(MarkUp(n, pair.name,
                              f"{n} is back (heartbeats resumed); failback is {pair.failback}",
                              Rule.NODE_BACK))
    for g in sorted(snap.groups.values(), key=lambda g: g.name):
        if g.home not in pair.nodes or g.name in snap.in_flight:
            continue
        action = _decide_group(snap, pair, g, dead, now)
        if action is not None:
            out.append(action)
    return out


def _other(pair: PairView, node: str) -> str:
    return pair.nodes[1] if pair.nodes[0] == node else pair.nodes[0]


def _decide_group(
    snap: Snapshot, pair: PairView, g: GroupView, dead: set[str], now: float
) -> Action | None:
    if g.owner is None:
        return _initial_owner(snap, pair, g, dead, now)
    if g.owner not in dead:
        if g.state == "acquiring" and is_alive(snap.nodes[g.owner], now, snap.dead_after):
            return Resume(g.name, g.owner, pair.name, g.epoch, g.revision,
                          f"{g.owner} finishes acquiring {g.name} (epoch {g.epoch})",
                          Rule.RESUME_ACQUIRE)
        return _decide_storage(snap, pair, g, now)
    new = _other(pair, g.owner)
    if new in dead or pair.maintenance:
        return None
    return Takeover(
        g.name, g.owner, new, pair.name, g.epoch, g.revision,
        f"{new} takes over {g.name}: {_silence(snap.nodes[g.owner], now)}",
        Rule.HEARTBEATS_STOPPED,
    )


def _initial_owner(
    snap: Snapshot, pair: PairView, g: GroupView, dead: set[str], now: float
) -> Action | None:
    if is_alive(snap.nodes[g.home], now, snap.dead_after):
        return Assign(g.name, g.home, pair.name,
                      f"{g.home} serves its home group {g.name}", Rule.INITIAL_ASSIGN)
    other = _other(pair, g.home)
    waited = now - snap.started_at > snap.initial_assign_wait
    if g.home in dead and other not in dead and waited and not pair.maintenance:
        return Assign(g.name, other, pair.name,
                      f"{other} serves {g.name}: its home {g.home} is down "
                      f"({_silence(snap.nodes[g.home], now)})", Rule.INITIAL_ASSIGN)
    return None


# ---- storage rules -------------------------------------------------------------


def _decide_storage(snap: Snapshot, pair: PairView, g: GroupView, now: float) -> Action | None:
    """The storage rules for a group whose owner is not dead. A device with one path
    left on the owner is still served (path failover): nothing to do."""
    if not g.devices or g.owner is None or g.owner not in pair.nodes:
        return None
    view = fresh_storage(snap, g.owner, now)
    if view is None:
        return None  # the owner's own view is missing or stale: nothing to act on
    lost = lost_devices(view, g.devices)
    if not lost:
        return _storage_recovered(snap, pair, g, view)
    if pair.maintenance:
        return None
    new = _other(pair, g.owner)
    doubt = _cannot_confirm(snap, new, g.devices, now)
    if doubt is None:
        return Takeover(
            g.name, g.owner, new, pair.name, g.epoch, g.revision,
            f"{new} takes over {g.name}: {g.owner} has no path left to {_names(lost)} and "
            f"{new} reaches all {len(g.devices)} devices of the group (a local failure; "
            f"the management group stays)", Rule.STORAGE_LOCAL_FAILURE)
    if g.name in snap.storage_alarms:
        return None  # raised already in this episode
    return RaiseStorageAlarm(
        g.name, g.owner, pair.name, lost, g.epoch,
        f"storage failure of {g.name} is not local, no failover: {g.owner} has no path "
        f"left to {_names(lost)} and {doubt}", Rule.STORAGE_GLOBAL_FAILURE)


def _storage_recovered(
    snap: Snapshot, pair: PairView, g: GroupView, view: StorageView
) -> Action | None:
    if g.name not in snap.storage_alarms or g.owner is None or not reaches_all(view, g.devices):
        return None
    return ClearStorageAlarm(
        g.name, g.owner, pair.name, g.epoch,
        f"{g.owner} reaches every device of {g.name} again: storage alarm cleared",
        Rule.STORAGE_RECOVERED)


def _cannot_confirm(
    snap: Snapshot, node: str, devices: tuple[str, ...], now: float
) -> str | None:
    """Why ``node`` cannot take over a group with ``devices`` (a phrase), or None when
    it is alive and its fresh view reaches every one of them."""
    nv = snap.nodes[node]
    if not is_alive(nv, now, snap.dead_after):
        return f"{node} cannot take over ({_silence(nv, now)})"
    view = snap.storage.get(node)
    if view is None:
        return f"{node} cannot confirm its devices (no storage report)"
    age = storage_age(view, now)
    if age > snap.storage_stale_after:
        return (f"{node} cannot confirm its devices (its storage report is {age:.2f} s old, "
                f"stale after {snap.storage_stale_after} s)")
    missing = unconfirmed_devices(view, devices)
    if missing:
        return f"{node} reaches no path to {_names(missing)}"
    return None


def _names(devices: tuple[str, ...]) -> str:
    return ", ".join(devices)
