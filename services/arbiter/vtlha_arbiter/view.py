"""The arbiter's view of the cluster: what it received (heartbeats, management-path and
storage reports, group and pair records) turned into the policy's one immutable
``Snapshot``. No NATS and no clock reads: every input and every question carries its
time, so it is unit-testable as it is.

What the snapshot holds, and from where: heartbeats (liveness, the failing process
checks as the heartbeat service reports them, already debounced), management-path
reports (``ha.<c>.mgmt.<node>``), storage reports, the group records and the pairs'
operator state (``pair.<pair>``, ``vtlha_arbiter.pairstate``) from the KV, the alarms
raised, and per node three "since" trackers (``vtlha.health.Since``) fed with
``policy.node_health`` on every snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vtlha import policy
from vtlha.config import ClusterConfig
from vtlha.errors import InvalidMessage
from vtlha.health import Since
from vtlha.messages import GroupRecord, Heartbeat, MgmtReport, StorageReport
from vtlha.policy import DevicePaths, GroupFailure, GroupView, NodeView, Snapshot, StorageView
from vtlha_arbiter.pairstate import PairState, to_monotonic


@dataclass
class NodeState:
    last_heartbeat: float | None = None
    incarnation: str | None = None
    seq: int = -1
    declared_down: bool = False
    heartbeat: Heartbeat | None = None
    mgmt: MgmtReport | None = None  # the latest management-path report
    mgmt_at: float | None = None  # when it arrived (monotonic)
    alarms: set[str] = field(default_factory=set)  # checks whose alarm is raised
    healthy: Since = field(default_factory=Since)  # -> NodeView.healthy_since
    mgmt_ok: Since = field(default_factory=Since)  # -> mgmt_ok_since
    storage_ok: Since = field(default_factory=Since)  # -> storage_ok_since
    #: ``failing()`` of the heartbeat it was computed from (every snapshot asks)
    _failing: tuple[Heartbeat | None, tuple[tuple[str, ...], tuple[str, ...]]] | None = \
        field(default=None, repr=False, compare=False)

    def failing(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(fatal, non-fatal) failing process checks of the latest heartbeat. The
        heartbeat service applies rise/fall per check run: taken as they are."""
        if self._failing is not None and self._failing[0] is self.heartbeat:
            return self._failing[1]
        checks = self.heartbeat.checks if self.heartbeat is not None else []
        bad = sorted({(c.name, c.fatal) for c in checks if not c.ok})
        out = (tuple(n for n, f in bad if f), tuple(n for n, f in bad if not f))
        self._failing = (self.heartbeat, out)
        return out


def _check_sender(kind: str, cluster: str, node: str, subject_node: str | None,
                  config: ClusterConfig, known: dict[str, NodeState]) -> None:
    if cluster != config.cluster:
        raise InvalidMessage(f"{kind}: cluster {cluster[:64]!r} is not ours")
    if node not in known:
        what = ("no pair's node" if node in config.lookups.host_index
                else "not a host of the cluster")
        raise InvalidMessage(f"{kind}: node {node[:64]!r} is {what}")
    if subject_node != node:
        raise InvalidMessage(f"{kind}: node {node!r} sent on {subject_node!r}'s subject")


class ClusterView:
    def __init__(self, config: ClusterConfig, started_at: float) -> None:
        self.config = config
        self.t = config.timings
        self.nodes = {n.name: NodeState() for n in config.nodes}
        self.records: dict[str, tuple[GroupRecord, int]] = {}
        self.last_renewal: dict[str, float] = {}  # group -> when the arbiter saw it
        #: node -> (its latest storage report, when it arrived on the monotonic clock)
        self.storage: dict[str, tuple[StorageReport, float]] = {}
        self.storage_alarms: set[str] = set()  # groups whose global storage alarm is raised
        #: node -> device -> since when it has reached the device without a break
        self.reachable_since: dict[str, dict[str, float]] = {}
        #: node -> device -> since when it has had no path up to the device
        self.lost_since: dict[str, dict[str, float]] = {}
        #: node -> the StorageView of its latest report (``storage_report`` makes it: it
        #: changes only when a report arrives, and a snapshot of 1,000 pairs rebuilt all
        #: 2,000 every tick)
        self.storage_views: dict[str, StorageView] = {}
        #: node -> its last storage report's paths and groups as parsed (``storage_report``)
        self.storage_raw: dict[str, Any] = {}
        self.started_at = started_at  # the policy's "never heard" grace counts from here
        self.pairs: PairState | None = None  # the pairs' operator state (KV pair.<pair>)
        #: what the config says of each group, and each node's home data devices, as
        #: every snapshot needs them (the config is frozen)
        self.group_keys = tuple((g, home, kind, tuple(config.group_devices(g)))
                                for g, (home, kind) in config.groups().items())
        self.home_devices = {n: tuple(d for _, home, kind, devs in self.group_keys
                                      if home == n and kind == "data" for d in devs)
                             for n in self.nodes}

    # ---- liveness: the one rule --------------------------------------------------
    def is_alive(self, node: str, now: float) -> bool:
        """The one "is this node alive" rule (``policy.is_alive``): a heartbeat within
        ``dead_after``."""
        return policy.heard_within(self.nodes[node].last_heartbeat, now, self.t.dead_after)

    def death_due(self, node: str) -> float | None:
        """When ``node`` is dead (``policy.is_dead`` and no renewal of a group it owns
        seen within ``dead_after``) if nothing more is heard of it: monotonic; None for
        a node never heard."""
        last = self.nodes[node].last_heartbeat
        if last is None:
            return None
        renewed = [self.last_renewal.get(g, last) for g, (rec, _) in self.records.items()
                   if rec.owner == node]
        return max([last, *renewed]) + self.t.dead_after

    def is_gone(self, node: str) -> bool:
        """Declared down by the policy (its heartbeats stopped): waiting for it to answer
        would only keep its groups "in flight", out of the policy's reach."""
        st = self.nodes.get(node)
        return st is not None and st.declared_down

    # ---- inputs --------------------------------------------------------------------
    def heartbeat(self, hb: Heartbeat, subject_node: str | None, now: float) -> bool:
        """A heartbeat received at ``now``; False when it is a duplicate or reordered."""
        _check_sender("Heartbeat", hb.cluster, hb.node, subject_node, self.config, self.nodes)
        st = self.nodes[hb.node]
        if hb.incarnation == st.incarnation and hb.seq <= st.seq:
            return False
        st.last_heartbeat = now
        st.incarnation, st.seq, st.heartbeat = hb.incarnation, hb.seq, hb
        return True

    def mgmt_report(self, report: MgmtReport, subject_node: str | None, now: float) -> None:
        _check_sender("MgmtReport", report.cluster, report.node, subject_node, self.config,
                      self.nodes)
        st = self.nodes[report.node]
        st.mgmt, st.mgmt_at = report, now

    def storage_report(self, report: StorageReport, subject_node: str | None,
                       now: float, raw: Any = None) -> None:
        """A storage report received at ``now``. ``raw``: its paths and groups as parsed
        from the message, before validation; equal to the node's last report's, the
        node's view is the last one's, received now (the same content validates to the
        same report: what is reached, since when, and what failed cannot have
        changed)."""
        _check_sender("StorageReport", report.cluster, report.node, subject_node,
                      self.config, self.nodes)
        self.storage[report.node] = (report, now)
        last = self.storage_views.get(report.node)
        if raw is not None and last is not None and self.storage_raw.get(report.node) == raw:
            self.storage_views[report.node] = StorageView(
                report.node, now, last.devices, last.reachable_since, last.lost_since,
                last.failed)
            return
        since = self.reachable_since.setdefault(report.node, {})
        lost = self.lost_since.setdefault(report.node, {})
        devices, failed = self._paths(report.node, report)
        for dev, paths in devices.items():
            if paths.confirmed_now >= 1:
                since.setdefault(dev, now)
            else:
                since.pop(dev, None)
            if paths.reachable < 1:
                lost.setdefault(dev, now)
            else:
                lost.pop(dev, None)
        self.storage_views[report.node] = StorageView(report.node, now, devices, dict(since),
                                                      dict(lost), failed)
        self.storage_raw[report.node] = raw

    def set_record(self, group: str, rec: GroupRecord, revision: int, now: float) -> bool:
        """A group record read, watched or written at ``revision``. A revision not newer
        than the one applied is ignored (monotonic reads); False then."""
        cur = self.records.get(group)
        if cur is not None and revision <= cur[1]:
            return False
        self.records[group] = (rec, revision)
        if rec.renewed_by == rec.owner and rec.state == "held":
            # The owner's lease holder renewed: its lease runs until at most
            # lease_ttl after it *sent* that renewal, which was before now.
            self.last_renewal[group] = now
        return True

    def max_revision(self) -> int:
        """The highest revision of a group record this view holds (0: none)."""
        return max((rev for _, rev in self.records.values()), default=0)

    def forget_records(self) -> None:
        """The KV bucket was recreated: its group records, their revisions (the
        monotonic reads' high-water marks) and the renewals seen are the old bucket's."""
        self.records.clear()
        self.last_renewal.clear()

    def storage_state(self, node: str, group: str, epoch: int) -> tuple[str, str | None] | None:
        """The storage-monitor of ``node``'s latest word on ``group`` at ``epoch``:
        (state, reason), or None when it said nothing about that epoch."""
        got = self.storage.get(node)
        for gs in got[0].groups if got else ():
            if gs.group == group and gs.epoch == epoch:
                return gs.state, gs.reason
        return None

    # ---- the snapshot --------------------------------------------------------------
    def mgmt_healthy(self, st: NodeState, now: float) -> bool | None:
        """The management path as the policy wants it: None (unknown) when not
        monitored, never reported, or the report is older than mgmt_stale_after."""
        if st.mgmt is None or st.mgmt_at is None or not st.mgmt.monitored \
                or now - st.mgmt_at > self.t.mgmt_stale_after:
            return None
        return st.mgmt.healthy

    def storage_view(self, node: str, report: StorageReport, received: float) -> StorageView:
        """Per device the report mentions: paths up (distinct configured paths reported
        reachable, after rise/fall) of the paths the config gives this node, and how many
        of those answered their latest probe. Unknown devices are left out: a device the
        view does not show is neither lost nor confirmed. The groups the node reports
        ``failed`` (with their epoch and reason): the storage rule reads one at the
        group's epoch like a lost device of that group."""
        devices, failed = self._paths(node, report)
        return StorageView(node, received, devices,
                           dict(self.reachable_since.get(node, {})),
                           dict(self.lost_since.get(node, {})), failed)

    def snapshot(self, now: float, wall: float, in_flight: frozenset[str],
                 hold_off_until: float | None = None) -> Snapshot:
        """Everything the policy sees at ``now`` (``wall``: the wall clock then; the moves
        in flight; the end of a new active arbiter's hold-off). Also advances the nodes'
        "since" trackers (so call it once per decision)."""
        groups = {}
        records, renewals = self.records, self.last_renewal
        for g, home, kind, devices in self.group_keys:
            rec = records.get(g)
            groups[g] = GroupView(
                g, home, kind,
                owner=rec[0].owner if rec else None,
                epoch=rec[0].epoch if rec else 0,
                state=rec[0].state if rec else None,
                revision=rec[1] if rec else 0,
                devices=devices,
                moved_at=moved_at(rec[0], now, wall) if rec else None,
                renewed_at=renewals.get(g),
            )
        assert self.pairs is not None
        storage = dict(self.storage_views)
        return Snapshot(
            dead_after=self.t.dead_after,
            started_at=self.started_at,
            pairs=tuple(self.pairs.view(p, now, wall) for p in self.config.pairs),
            nodes={n: self._node_view_since(n, storage.get(n), now) for n in self.nodes},
            groups=groups,
            in_flight=in_flight,
            initial_assign_wait=self.t.initial_assign_wait,
            storage=storage,
            storage_stale_after=self.t.storage_stale_after,
            storage_alarms=frozenset(self.storage_alarms),
            storage_settle=self.t.storage_settle,
            storage_confirm_after=self.t.probe_interval + self.t.probe_timeout,
            hold_off_until=hold_off_until,
        )

    def _node_view_since(self, n: str, storage: StorageView | None, now: float) -> NodeView:
        """The node's view with its "since" times: its health (``policy.node_health``,
        from the same inputs the snapshot shows) fed to its trackers first."""
        st = self.nodes[n]
        fatal, nonfatal = st.failing()
        mgmt = self.mgmt_healthy(st, now)
        h = policy.health_of(st.last_heartbeat, fatal, mgmt,
                             policy.fresh(storage, now, self.t.storage_stale_after),
                             self.home_devices[n], now, self.t.dead_after)
        return NodeView(n, st.last_heartbeat, st.incarnation, st.declared_down,
                        fatal_failing=fatal, nonfatal_failing=nonfatal,
                        check_alarms=tuple(sorted(st.alarms)), mgmt_healthy=mgmt,
                        healthy_since=st.healthy.update(h.up, now),
                        mgmt_ok_since=st.mgmt_ok.update(h.mgmt, now),
                        storage_ok_since=st.storage_ok.update(h.storage, now))

    def _paths(self, node: str, report: StorageReport
               ) -> tuple[dict[str, DevicePaths], dict[str, GroupFailure]]:
        """``storage_view``'s devices and failed groups of one report."""
        up: dict[str, set[int]] = {}
        ok: dict[str, set[int]] = {}
        for p in report.paths:
            if p.device in self.config.devices:
                ups = up.setdefault(p.device, set())
                oks = ok.setdefault(p.device, set())
                if p.reachable:
                    ups.add(p.path)
                    if p.error is None:
                        oks.add(p.path)
        devices = {}
        for dev, paths in up.items():
            total = self.config.devices[dev].paths.get(node, 0)
            devices[dev] = DevicePaths(len({i for i in paths if i < total}), total,
                                       len({i for i in ok[dev] if i < total}))
        failed = {gs.group: GroupFailure(gs.epoch, gs.reason) for gs in report.groups
                  if gs.state == "failed" and gs.group in self.config.groups()}
        return devices, failed

    # ---- status (HTTP) ---------------------------------------------------------------
    def node_status(self, n: str, now: float) -> dict[str, Any]:
        st = self.nodes[n]
        fatal, nonfatal = st.failing()

        def span(since: Since) -> float | None:
            return None if since.since is None else round(now - since.since, 3)

        return {"alive": self.is_alive(n, now),
                "heartbeat_age_s": None if st.last_heartbeat is None
                else round(now - st.last_heartbeat, 3),
                "incarnation": st.incarnation, "declared_down": st.declared_down,
                "fatal_failing": list(fatal), "nonfatal_failing": list(nonfatal),
                "check_alarms": sorted(st.alarms), "mgmt_healthy": self.mgmt_healthy(st, now),
                "healthy_for_s": span(st.healthy), "mgmt_ok_for_s": span(st.mgmt_ok),
                "storage_ok_for_s": span(st.storage_ok)}

    def pairs_status(self, now: float, wall: float) -> dict[str, Any]:
        if self.pairs is None:
            return {}
        out = {}
        for p in self.config.pairs:
            v = self.pairs.view(p, now, wall)
            out[p.name] = {"failback": v.failback, "maintenance": v.maintenance,
                           "held_down": sorted(v.held_down),
                           "recent_failures": {n: policy.recent_failures(v, n, now)
                                               for n in v.nodes}}
        return out

    def groups_status(self) -> dict[str, Any]:
        return {g: {"owner": r.owner, "epoch": r.epoch, "state": r.state, "revision": rev}
                for g, (r, rev) in sorted(self.records.items())}


def moved_at(rec: GroupRecord, now: float, wall: float) -> float | None:
    """When the group last changed owner, on the monotonic clock: the claim's wall
    clock (``since``, kept by every renewal) for a group that moved (epoch > 1)."""
    return to_monotonic(rec.since, now, wall) if rec.epoch > 1 else None
