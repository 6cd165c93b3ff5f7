"""The cluster at a glance, as data: what ``vtlha status`` shows and prints as JSON, and
what a dashboard can show. ``build`` is pure: it turns what was read (the KV's group,
pair and leader records) and what was heard (each node's latest heartbeat, storage and
management-path reports, with how long ago each arrived) into one ``ClusterStatus``,
problems first. Reading is ``vtlha.statuscollect``'s; rendering is the CLI's.

Only durations cross hosts: a report's age is measured on the reader's own monotonic
clock from when it arrived, and a lease's age and validity are the node's own report
(``Heartbeat.leases``). Wall-clock times (``since``) are for humans only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, computed_field

from vtlha.config import ClusterConfig
from vtlha.messages import (
    GroupRecord,
    Heartbeat,
    LeaderRecord,
    MgmtReport,
    PairRecord,
    StorageReport,
)

Severity = Literal["error", "warning"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Problem(_Frozen):
    severity: Severity
    about: str  # the cluster, a pair, node or group name
    text: str  # one sentence, starting with what it is about


class CheckState(_Frozen):
    name: str
    ok: bool
    fatal: bool
    detail: str = ""


class PathState(_Frozen):
    path: int
    reachable: bool
    latency_s: float | None = None
    error: str | None = None


class DeviceState(_Frozen):
    device: str
    reachable: bool  # through at least one path
    paths: list[PathState]


class MgmtState(_Frozen):
    healthy: bool
    link_up: bool
    gateway_ok: bool | None
    latency_s: float | None
    monitored: bool
    detail: str
    age_s: float


class LeaseView(_Frozen):
    group: str
    epoch: int
    phase: str
    valid_for_s: float
    age_s: float | None


class NodeStatus(_Frozen):
    name: str
    pair: str
    up: bool  # a heartbeat heard within dead_after
    heartbeat_age_s: float | None  # None: none heard while listening
    incarnation: str | None
    checks: list[CheckState]
    #: every device reachable (None: no storage report, or none fresher than
    #: ``storage_stale_after`` — the policy confirms nothing with an older one)
    storage_ok: bool | None
    storage_age_s: float | None
    devices: list[DeviceState]
    mgmt: MgmtState | None
    leases: list[LeaseView]
    held_down: bool
    standby: bool = False  # an operator put it in standby (given nothing)


class GroupStatus(_Frozen):
    name: str
    pair: str
    kind: Literal["data", "mgmt"]
    home: str
    owner: str | None  # None: no record (never assigned)
    epoch: int | None
    state: str | None  # the record's: acquiring, held, releasing
    at_home: bool | None
    served: bool | None  # None: the owner's reports were not heard
    served_detail: str
    storage_state: str | None  # data groups: the owner's storage-monitor's word
    lease_age_s: float | None
    lease_valid_for_s: float | None
    addresses: list[str]
    devices: list[str]


class PairStatus(_Frozen):
    name: str
    failback: str
    maintenance: bool
    held_down: list[str]
    nodes: list[str]
    groups: list[str]
    standby: list[str] = []  # nodes an operator put in standby (``PairRecord.standby``)


class ArbiterStatus(_Frozen):
    node: str
    term: int
    since: float  # wall clock when it won, for humans


class ClusterStatus(_Frozen):
    cluster: str
    version: str
    gathered_at: float  # wall clock, for humans
    listened_s: float  # how long health reports were listened to
    arbiter: ArbiterStatus | None
    pairs: list[PairStatus]
    nodes: list[NodeStatus]
    groups: list[GroupStatus]
    problems: list[Problem]  # errors first

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """No error-level problem (warnings allowed)."""
        return not any(p.severity == "error" for p in self.problems)


@dataclass
class Heard:
    """A node's latest reports and how long ago (seconds, the reader's clock) each
    arrived."""

    heartbeat: Heartbeat | None = None
    heartbeat_age: float | None = None
    storage: StorageReport | None = None
    storage_age: float | None = None
    mgmt: MgmtReport | None = None
    mgmt_age: float | None = None


@dataclass
class Read:
    """What was read from the KV."""

    leader: tuple[LeaderRecord, int] | None = None  # the record and its revision
    groups: dict[str, tuple[GroupRecord, int]] = field(default_factory=dict)
    pairs: dict[str, PairRecord] = field(default_factory=dict)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _devices(cfg: ClusterConfig, node: str, report: StorageReport | None) -> list[DeviceState]:
    """Each device the node has paths to, with each path as its last report says."""
    if report is None:
        return []
    by_dev: dict[str, list[PathState]] = {}
    for p in sorted(report.paths, key=lambda p: p.path):
        by_dev.setdefault(p.device, []).append(PathState(
            path=p.path, reachable=p.reachable,
            latency_s=None if p.latency is None else round(p.latency, 6), error=p.error))
    return [DeviceState(device=d, reachable=any(p.reachable for p in by_dev.get(d, [])),
                        paths=by_dev.get(d, []))
            for d in cfg.lookups.devices_of.get(node, ())]


def _node(cfg: ClusterConfig, name: str, heard: Heard, held: bool,
          standby: frozenset[str] = frozenset()) -> NodeStatus:
    hb = heard.heartbeat
    age = heard.heartbeat_age
    mgmt = heard.mgmt
    devices = _devices(cfg, name, heard.storage)
    fresh = heard.storage_age is not None \
        and heard.storage_age <= cfg.timings.storage_stale_after
    return NodeStatus(
        name=name, pair=cfg.pair_of(name).name,
        up=age is not None and age <= cfg.timings.dead_after,
        heartbeat_age_s=_r(age), incarnation=hb.incarnation if hb else None,
        checks=[CheckState(name=c.name, ok=c.ok, fatal=c.fatal, detail=c.detail)
                for c in (hb.checks if hb else [])],
        storage_ok=all(d.reachable for d in devices) if heard.storage and fresh else None,
        storage_age_s=_r(heard.storage_age), devices=devices,
        mgmt=None if mgmt is None or heard.mgmt_age is None else MgmtState(
            healthy=mgmt.healthy, link_up=mgmt.link_up, gateway_ok=mgmt.gateway_ok,
            latency_s=_r(mgmt.latency), monitored=mgmt.monitored, detail=mgmt.detail,
            age_s=round(heard.mgmt_age, 3)),
        leases=[LeaseView(group=x.group, epoch=x.epoch, phase=x.phase,
                          valid_for_s=x.valid_for, age_s=x.age)
                for x in (hb.leases if hb else [])],
        held_down=held, standby=name in standby)


def _served(cfg: ClusterConfig, group: str, rec: GroupRecord,
            owner: NodeStatus | None, heard: Heard | None) -> tuple[bool | None, str, str | None]:
    """(served, why, the owner's storage state) from the owner's own reports: its lease
    holder holds the group at the record's epoch with validity left, and for a data
    group with devices its storage-monitor reports it served at that epoch."""
    storage_state = None
    if heard is not None and heard.storage is not None:
        mine = [g for g in heard.storage.groups if g.group == group]
        if mine:
            storage_state = mine[0].state if mine[0].epoch == rec.epoch \
                else f"{mine[0].state} at epoch {mine[0].epoch}"
    if owner is None or heard is None or heard.heartbeat is None:
        return None, f"no heartbeat heard from {rec.owner}", storage_state
    lease = next((x for x in owner.leases if x.group == group), None)
    if lease is None:
        return False, f"{rec.owner}'s lease holder reports no lease on it", storage_state
    if lease.epoch != rec.epoch:
        return False, (f"{rec.owner}'s lease is for epoch {lease.epoch}, the record's is "
                       f"{rec.epoch}"), storage_state
    if lease.phase != "holding" or lease.valid_for_s <= 0:
        return False, f"{rec.owner}'s lease is {lease.phase}, not valid yet", storage_state
    if not cfg.group_devices(group):
        return True, f"lease valid for {lease.valid_for_s:.2f} s", storage_state
    if heard.storage is None:
        return None, f"no storage report heard from {rec.owner}", storage_state
    mine = [g for g in heard.storage.groups if g.group == group and g.epoch == rec.epoch]
    if not mine or mine[0].state != "served":
        why = f": {mine[0].reason}" if mine and mine[0].reason else ""
        return False, (f"storage {mine[0].state if mine else 'not started'} on "
                       f"{rec.owner}{why}"), storage_state
    return True, f"lease valid for {lease.valid_for_s:.2f} s, storage served", storage_state


def _group(cfg: ClusterConfig, name: str, read: Read, nodes: dict[str, NodeStatus],
           heard: dict[str, Heard]) -> GroupStatus:
    home, kind = cfg.groups()[name]
    pair = cfg.pair_of(home).name
    base = {"name": name, "pair": pair, "kind": kind, "home": home,
            "addresses": cfg.group_addresses(name), "devices": cfg.group_devices(name)}
    if name not in read.groups:
        return GroupStatus(**base, owner=None, epoch=None, state=None, at_home=None,
                           served=False, served_detail="no owner recorded",
                           storage_state=None, lease_age_s=None, lease_valid_for_s=None)
    rec = read.groups[name][0]
    owner = nodes.get(rec.owner)
    served, why, storage_state = _served(cfg, name, rec, owner, heard.get(rec.owner))
    lease = next((x for x in owner.leases if x.group == name and x.epoch == rec.epoch),
                 None) if owner else None
    return GroupStatus(**base, owner=rec.owner, epoch=rec.epoch, state=rec.state,
                       at_home=rec.owner == home, served=served, served_detail=why,
                       storage_state=storage_state,
                       lease_age_s=lease.age_s if lease else None,
                       lease_valid_for_s=lease.valid_for_s if lease else None)


def _operator_states(n: NodeStatus) -> list[Problem]:
    """What keeps a node from being given groups: standby, a hold-down."""
    out = []
    if n.standby:
        out.append(Problem(severity="warning", about=n.name, text=(
            f"{n.name}: in standby: given no group, not even if its companion fails "
            f"(vtlha standby off {n.pair} {n.name})")))
    if n.held_down:
        out.append(Problem(severity="warning", about=n.name, text=(
            f"{n.name}: held down after repeated failures: given no group automatically "
            f"(vtlha clear-hold {n.pair} {n.name})")))
    return out


def _node_problems(n: NodeStatus, listened: float) -> list[Problem]:
    out: list[Problem] = []

    def add(sev: Severity, text: str) -> None:
        out.append(Problem(severity=sev, about=n.name, text=f"{n.name}: {text}"))

    out += _operator_states(n)
    if n.heartbeat_age_s is None:
        add("error", f"no heartbeat heard within {listened:.1f} s")
        return out
    if not n.up:
        add("error", f"last heartbeat {n.heartbeat_age_s:.1f} s ago")
    for c in n.checks:
        if not c.ok:
            add("error" if c.fatal else "warning", f"{'fatal' if c.fatal else 'non-fatal'} "
                f"check {c.name} failing" + (f": {c.detail}" if c.detail else ""))
    if n.mgmt is None:
        add("warning", "no management-path report heard")
    elif not n.mgmt.healthy:
        add("error", "management path unhealthy" + (f": {n.mgmt.detail}" if n.mgmt.detail
                                                     else ""))
    if n.storage_ok is None:
        add("warning", "no storage report heard" if n.storage_age_s is None else
            f"no fresh storage report (the last is {n.storage_age_s:g} s old)")
    for d in n.devices:
        down = [p for p in d.paths if not p.reachable]
        if not d.paths or not d.reachable:
            add("error", f"device {d.device} unreachable (no path up)")
        elif down:
            add("warning", f"device {d.device}: " + "; ".join(
                f"path {p.path} down" + (f" ({p.error})" if p.error else "") for p in down))
    return out


def _group_problems(g: GroupStatus, pair: PairStatus) -> list[Problem]:
    def one(sev: Severity, text: str) -> list[Problem]:
        return [Problem(severity=sev, about=g.name, text=f"{g.name}: {text}")]

    if g.owner is None:
        return one("error", "no owner recorded (never assigned: is an arbiter active?)")
    out: list[Problem] = []
    if g.served is False:
        out += one("error", f"not served by {g.owner}: {g.served_detail}")
    elif g.served is None:
        out += one("warning", f"not known to be served by {g.owner}: {g.served_detail}")
    if g.state != "held":
        out += one("warning", f"record is {g.state} (a move under way?)")
    if not g.at_home:
        how = "it goes back by itself once its home is healthy" if pair.failback == "auto" \
            else f"vtlha failback {pair.name}"
        out += one("warning", f"served by {g.owner}, away from its home {g.home} ({how})")
    return out


def _global_storage(cfg: ClusterConfig, pair: PairStatus,
                    nodes: dict[str, NodeStatus]) -> list[Problem]:
    """A device that no node of the pair reaches: not a local failure (the manual: no
    failover, an alarm)."""
    out = []
    of_pair = sorted({d for n in pair.nodes for d in cfg.lookups.devices_of.get(n, ())})
    for dev in of_pair:
        d = cfg.devices[dev]
        users = [nodes[n] for n in pair.nodes if n in d.paths and nodes[n].storage_ok
                 is not None]
        if len(users) >= 2 and not any(x.reachable for n in users for x in n.devices
                                       if x.device == dev):
            out.append(Problem(severity="error", about=pair.name,
                               text=f"{pair.name}: device {dev} unreachable from every node "
                                    "(a global storage failure: nothing fails over)"))
    return out


def build(cfg: ClusterConfig, read: Read, heard: dict[str, Heard], listened: float,
          gathered_at: float, version: str) -> ClusterStatus:
    pairs = []
    for pc in cfg.pairs:
        pr = read.pairs.get(pc.name) or PairRecord(failback=pc.failback)
        pairs.append(PairStatus(
            name=pc.name, failback=pr.failback, maintenance=pr.maintenance,
            held_down=sorted(pr.hold), standby=sorted(pr.standby),
            nodes=[n.name for n in pc.nodes],
            groups=[g for n in pc.nodes for g in (n.data_group, n.mgmt_group)]))
    held = {n for p in pairs for n in p.held_down}
    standby = frozenset(n for p in pairs for n in p.standby)
    nodes = {n.name: _node(cfg, n.name, heard.get(n.name, Heard()), n.name in held, standby)
             for n in cfg.nodes}
    groups = [_group(cfg, g, read, nodes, heard) for g in cfg.groups()]
    arbiter = None
    if read.leader is not None:
        rec, rev = read.leader
        arbiter = ArbiterStatus(node=rec.node, term=rec.term or rev, since=rec.since)
    problems: list[Problem] = []
    if arbiter is None:
        problems.append(Problem(severity="error", about=cfg.cluster,
                                text="no active arbiter: nothing fails over"))
    by_pair = {p.name: p for p in pairs}
    for p in pairs:
        if p.maintenance:
            problems.append(Problem(severity="warning", about=p.name, text=(
                f"{p.name}: in maintenance: automatic failover suspended "
                f"(vtlha maintenance off {p.name})")))
        problems += _global_storage(cfg, p, nodes)
    for n in nodes.values():
        problems += _node_problems(n, listened)
    for g in groups:
        problems += _group_problems(g, by_pair[g.pair])
    problems.sort(key=lambda x: x.severity != "error")  # stable: errors first
    return ClusterStatus(cluster=cfg.cluster, version=version, gathered_at=gathered_at,
                         listened_s=round(listened, 3), arbiter=arbiter, pairs=pairs,
                         nodes=list(nodes.values()), groups=groups, problems=problems)
