"""arbiter: runs the failover policy and carries out its decisions.

It subscribes to every node's heartbeats, keeps its view of ownership from the KV
(watch), and on each tick builds one immutable ``Snapshot``, calls the pure
``decide(snapshot, now)`` and carries out what it returns. A takeover runs as
DESIGN.md's three steps: **claim** (compare-and-set of the group key to the new owner
with epoch + 1, against the revision the arbiter last saw), **release** (the old
owner's executors are told to release; they ack only once it is gone), **acquire**
(once every executor of the old owner acked, or ``dead_after`` has passed since its
last heartbeat). Events go to the JetStream event stream.

What the snapshot holds, and from where: heartbeats (liveness, the failing process
checks as the heartbeat service reports them, already debounced), management-path
reports (``ha.<c>.mgmt.<node>``), storage reports, the group records and the pairs'
operator state (``pair.<pair>``, ``vtlha_arbiter.pairstate``) from the KV, the check
alarms it raised, and per node three "since" trackers (``vtlha.health.Since``) fed with
``policy.node_health`` on every tick. Every event of a decision carries the decision's
inputs, ``{"snapshot": ..., "now": ...}``, and its status sentence as ``reason``.

Operator requests (``ha.<c>.admin.<verb>``, ``vtlha_arbiter.admin``) are answered by the
active arbiter alone, by the policy's pure ``answer``; a granted move runs through the
same claim -> release -> acquire.

Every node and the witness run an arbiter; exactly one is **active** (the election,
``vtlha_arbiter.election``: the KV key ``arbiter.leader``, the witness's preferred).
Every arbiter subscribes to heartbeats and watches the group records, so a standby is
warm; only the active one decides. On becoming active it takes the term (the revision
at which it won the key), announces it to every executor of every node, and only then
acts; it makes no takeover within ``lease_ttl`` of becoming active, and the policy's
"never heard" grace counts from that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge, Histogram

from vtlha import bus, policy
from vtlha.errors import InvalidMessage
from vtlha.health import Since
from vtlha.messages import (
    Ack,
    Command,
    GroupRecord,
    Heartbeat,
    MgmtReport,
    StorageReport,
    decode,
    encode,
)
from vtlha.policy import (
    Assign,
    ClearCheckAlarm,
    ClearStorageAlarm,
    DevicePaths,
    GroupView,
    HoldDown,
    MarkDown,
    MarkUp,
    NodeView,
    RaiseCheckAlarm,
    RaiseStorageAlarm,
    Resume,
    Snapshot,
    StorageView,
    Takeover,
)
from vtlha.protocol import takeover
from vtlha.service import Service, service_command
from vtlha_arbiter.admin import AdminServer
from vtlha_arbiter.election import ElectionRunner
from vtlha_arbiter.pairstate import PairState, to_monotonic

EXECUTORS = ("ip-manager", "storage-monitor")
STORAGE = "storage-monitor"  # the executor of data groups with devices (storage takeover)
ACQUIRE_DEADLINE = 10.0  # seconds an acquire is retried before the policy resumes it
LEADER_CHECK_INTERVAL = 1.0  # seconds between checks that stream leaders sit on the witness
#: who hears a new term: the executors, and the lease holder where it answers commands
ANNOUNCE_TO = (*EXECUTORS, "heartbeat")
ANNOUNCE_RETRY = 0.02  # seconds between attempts of a term announcement that timed out
CLAIM_RETRIES = 3  # an operator's claim retried when the key changed by renewals only
#: actions that move a group: held back within lease_ttl of becoming active
MOVES = (Takeover, Assign, Resume)


@dataclass(frozen=True)
class Claimed:
    """A takeover whose claim succeeded: the epoch written, when it was decided, the
    event family and the number of its ``<kind>.started`` event."""

    epoch: int
    t0: float
    kind: str
    started: int | None


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

    def failing(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(fatal, non-fatal) failing process checks of the latest heartbeat. The
        heartbeat service applies rise/fall per check run: taken as they are."""
        checks = self.heartbeat.checks if self.heartbeat is not None else []
        bad = sorted({(c.name, c.fatal) for c in checks if not c.ok})
        return (tuple(n for n, f in bad if f), tuple(n for n, f in bad if not f))


class Arbiter(Service):
    name = "arbiter"
    http_port_key = "arbiter"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.t = self.config.timings
        self.term = 0
        self.kv: KeyValue | None = None
        self.watcher: KeyValue.KeyWatcher | None = None
        self.nodes = {n.name: NodeState() for n in self.config.nodes}
        self.records: dict[str, tuple[GroupRecord, int]] = {}
        self.last_renewal: dict[str, float] = {}  # group -> when the arbiter saw it
        self.in_flight: set[str] = set()
        #: node -> (its latest storage report, when it arrived on the monotonic clock)
        self.storage: dict[str, tuple[StorageReport, float]] = {}
        self.storage_alarms: set[str] = set()  # groups whose global storage alarm is raised
        #: node -> device -> since when it has reached the device without a break
        self.reachable_since: dict[str, dict[str, float]] = {}
        #: node -> device -> since when it has had no path up to the device
        self.lost_since: dict[str, dict[str, float]] = {}
        self.started_at = time.monotonic()
        self.last_status = "starting"
        self.ready = False
        self.pairs: PairState | None = None  # the pairs' operator state (KV pair.<pair>)
        self.pair_watcher: KeyValue.KeyWatcher | None = None
        #: one decision at a time: the tick and operator requests take turns
        self.decide_lock = asyncio.Lock()
        self.admin = AdminServer(self)
        self.decisions = Counter("vtlha_decisions_total", "Policy actions, by rule", ["rule"],
                                 registry=self.registry)
        self.takeovers = Counter("vtlha_takeovers_total", "Takeovers, by result", ["result"],
                                 registry=self.registry)
        self.takeover_seconds = Histogram(
            "vtlha_takeover_duration_seconds", "From the decision to the acquire ack",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry)
        self.heartbeats = Counter("vtlha_heartbeats_received_total", "Valid heartbeats received",
                                  ["node"], registry=self.registry)
        self.leader_moves = Counter("vtlha_stream_leader_stepdowns_total",
                                    "Step-downs asked for to move a stream leader to the witness",
                                    registry=self.registry)
        self.node_alive = Gauge("vtlha_node_alive", "1 while a node's heartbeats arrive",
                                ["node"], registry=self.registry)
        self.election: ElectionRunner | None = None
        self.active_since: float | None = None  # when this arbiter last became active
        self.announced_term = 0  # the term announced to the executors (0: none yet)
        self.holdoff_logged = False
        Gauge("vtlha_arbiter_active", "1 while this arbiter is the active one",
              registry=self.registry).set_function(
            lambda: 1.0 if self.election is not None and self.election.is_active() else 0.0)
        Gauge("vtlha_arbiter_term", "The term this arbiter holds or last held (0: never)",
              registry=self.registry).set_function(lambda: float(self.term))

    # ---- start -------------------------------------------------------------
    async def start(self) -> None:
        n = self.config.nats
        replicas = n.stream_replicas
        self.kv = await bus.retry_js("kv bucket", lambda: bus.ensure_kv(self.js, self.subjects,
                                                                        replicas))
        # The bucket's identity goes into every command (``Command.bucket``): executors
        # compare terms and epochs only within one bucket (issue 14).
        self.kv_bucket_id = await bus.retry_js("kv identity", lambda: bus.kv_identity(
            self.nc, self.subjects), not_found_too=True)
        await bus.retry_js("event stream", lambda: bus.ensure_events_stream(
            self.js, self.subjects, replicas, n.events_max_bytes, n.events_max_age))
        await bus.retry_js("group records", self._load_records)
        self.watcher = await self.kv.watch("group.>")
        self.spawn(self._watch(self.watcher), "kv-watch")
        self.pairs = PairState(self.kv, self.subjects, self.config, self.log)
        await bus.retry_js("pair records", self.pairs.load)
        self.pair_watcher = await self.kv.watch("pair.>")
        self.spawn(self.pairs.watch(self.pair_watcher), "pair-watch")
        await self.nc.subscribe(self.subjects.hb("*"),
                                cb=self.subscribe_handler("heartbeat", self._on_heartbeat))
        await self.nc.subscribe(self.subjects.storage("*"),
                                cb=self.subscribe_handler("storage", self._on_storage))
        await self.nc.subscribe(self.subjects.mgmt("*"),
                                cb=self.subscribe_handler("mgmt", self._on_mgmt))
        # Warm from here on (heartbeats, group records); the election says who decides.
        self.election = ElectionRunner(
            self.kv, self.subjects.LEADER_KEY, self.node,
            preferred=self.node == self.config.witness.host,
            leader_ttl=self.t.leader_ttl, standby_delay=self.t.leader_standby_delay,
            on_change=self._on_election_change, log=self.log)
        self.spawn(self.election.run(), "election")
        self.ready = True
        self.every(self.t.heartbeat_interval / 2, self._tick, "decide")
        if (self.config.witness.host in self.config.nats.servers
                and self.config.nats.keep_leaders_on_witness):
            self.every(LEADER_CHECK_INTERVAL, self._keep_leaders_on_witness, "leaders")

    async def _keep_leaders_on_witness(self) -> None:
        """Keep the KV's and the event stream's raft leaders on the witness, so that a
        node's crash never waits for an election (DESIGN.md, "Raft elections are slow").
        Only the active arbiter does it."""
        if self.election is None or not self.election.is_active():
            return
        witness = self.config.witness.host
        for stream in (bus.kv_stream(self.subjects), self.subjects.events_stream):
            try:
                was = await bus.prefer_leader(self.nc, self.js, stream, witness)
            except (nats.errors.Error, TimeoutError) as exc:
                self.log.info("leader check failed", extra={"stream": stream,
                                                            "error": repr(exc)})
                continue
            if was is not None and was != witness:
                self.leader_moves.inc()
                self.log.info("asked the stream leader to step down towards the witness",
                              extra={"stream": stream, "leader": was, "preferred": witness})

    # ---- the election ----------------------------------------------------------
    def is_acting(self) -> bool:
        """May decide: active per the election, and this activation's term announced."""
        el = self.election
        return (el is not None and el.is_active() and self.announced_term == el.term
                and el.active_since == self.active_since)

    async def _on_election_change(self, active: bool, term: int) -> None:
        """Becoming active: take the term, announce it to every executor, and only then
        act (``is_acting``). Losing it needs nothing here to stop: ``_tick`` asks the
        election on every tick. Called one change at a time, in order."""
        el = self.election
        assert el is not None
        if not active:
            self.announced_term = 0
            await self.admin.close()
            leader = el.leader if el.leader != self.node else None
            await self.emit("arbiter.standby", f"{self.node}'s arbiter is no longer active "
                            f"(it held term {term}): {el.reason}", term=term, old=self.node,
                            new=leader, data={"reason": el.reason})
            return
        since = el.active_since
        if since is None:  # lapsed again before we got here: the standby change follows
            return
        self.announced_term = 0
        self.term, self.active_since, self.started_at = term, since, since
        self.holdoff_logged = False
        not_acked = await self._announce_term()
        if not el.is_active() or el.term != term or el.active_since != since:
            return  # lost or lapsed meanwhile: the change that follows says so
        self.announced_term = term
        await self.admin.open()
        prev = el.previous_leader
        after = f", taking over from {prev}" if prev and prev != self.node else ""
        await self.emit("arbiter.active", f"{self.node}'s arbiter is active with term {term}"
                        f"{after}; it makes no takeover for lease_ttl "
                        f"({self.t.lease_ttl} s)", term=term, old=prev, new=self.node,
                        data={"previous_leader": prev, "not_acked": not_acked,
                              "reason": el.reason})

    async def _announce_term(self) -> list[str]:
        """Announce ``self.term`` to every executor of every node (DESIGN.md: a new
        active arbiter announces its term, acked and retried, and only then acts). A
        service with no responder is not there; a timeout is retried until lease_ttl has
        passed in total. Returns who did not acknowledge, as node/service."""
        deadline = time.monotonic() + self.t.lease_ttl
        targets = [(n.name, svc) for n in self.config.nodes for svc in ANNOUNCE_TO]
        outcomes = await asyncio.gather(*(self._announce_to(node, svc, deadline)
                                          for node, svc in targets))
        by = {f"{node}/{svc}": out for (node, svc), out in zip(targets, outcomes, strict=True)}
        not_acked = sorted(k for k, out in by.items() if out not in ("acked", "absent"))
        (self.log.warning if not_acked else self.log.info)(
            "term announced", extra={"term": self.term, "outcomes": by, "not_acked": not_acked})
        return not_acked

    async def _announce_to(self, node: str, svc: str, deadline: float) -> str:
        """One executor: 'acked', 'absent' (no responder), 'refused: ...' or 'no ack'."""
        subject = self.subjects.cmd(node, svc)
        cmd = self._command(node, "term", "", 0)
        while True:
            timeout = min(self.t.command_timeout, max(0.01, deadline - time.monotonic()))
            try:
                ack = await bus.send_command(self.nc, subject, cmd, timeout)
                return "acked" if ack.ok else f"refused: {ack.reason}"
            except nats.errors.NoRespondersError:
                return "absent"
            except (nats.errors.Error, TimeoutError) as exc:
                error = repr(exc)
            except InvalidMessage as exc:
                self.invalid_messages.labels("ack").inc()
                error = str(exc)
            if time.monotonic() >= deadline or self.stopping:
                self.log.info("term not acknowledged", extra={
                    "to": node, "executor": svc, "term": cmd.term, "error": error})
                return "no ack"
            await asyncio.sleep(ANNOUNCE_RETRY)

    def hold_off_left(self, now: float) -> float:
        """Seconds left of the hold-off after becoming active (0: none)."""
        if self.active_since is None:
            return 0.0
        return max(0.0, self.active_since + self.t.lease_ttl - now)

    def _hold_off(self, actions: tuple[policy.Action, ...],
                  now: float) -> tuple[policy.Action, ...]:
        """No takeover within lease_ttl of becoming active (DESIGN.md): Takeover, Assign
        and Resume wait; the bookkeeping (MarkDown, MarkUp, alarms, HoldDown) goes ahead."""
        left = self.hold_off_left(now)
        if left <= 0:
            return actions
        kept = tuple(a for a in actions if not isinstance(a, MOVES))
        if len(kept) < len(actions) and not self.holdoff_logged:
            self.holdoff_logged = True
            self.log.info("holding off: no takeover within lease_ttl of becoming active",
                          extra={"term": self.term, "held_back": [
                              f"{type(a).__name__} {getattr(a, 'group', '')}"
                              for a in actions if a not in kept],
                              "left_s": round(left, 3)})
        return kept

    async def _load_records(self) -> None:
        assert self.kv is not None
        for group in self.config.groups():
            try:
                entry = await self.kv.get(self.subjects.group_key(group))
            except (KeyNotFoundError, NotFoundError):
                continue
            if entry.value and entry.revision is not None:
                self._set_record(group, decode(GroupRecord, entry.value), entry.revision)

    async def _read_record(self, group: str) -> None:
        assert self.kv is not None
        try:
            entry = await asyncio.wait_for(self.kv.get(self.subjects.group_key(group)),
                                           self.t.command_timeout)
        except Exception:
            return
        if entry.value and entry.revision is not None:
            try:
                self._set_record(group, decode(GroupRecord, entry.value), entry.revision)
            except InvalidMessage:
                self.invalid_messages.labels("group-record").inc()

    def _set_record(self, group: str, rec: GroupRecord, revision: int) -> None:
        cur = self.records.get(group)
        if cur is None or revision > cur[1]:
            self.records[group] = (rec, revision)
            if rec.renewed_by == rec.owner and rec.state == "held":
                # The owner's lease holder renewed: its lease runs until at most
                # lease_ttl after it *sent* that renewal, which was before now.
                self.last_renewal[group] = time.monotonic()

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None or not entry.value or entry.revision is None:
                continue
            group = entry.key.removeprefix("group.")
            if group not in self.config.groups():
                continue
            try:
                self._set_record(group, decode(GroupRecord, entry.value), entry.revision)
            except InvalidMessage as exc:
                self.invalid_messages.labels("group-record").inc()
                self.log.warning("invalid group record", extra={"key": entry.key,
                                                                "error": str(exc)})

    # ---- input -------------------------------------------------------------
    async def _on_heartbeat(self, msg: Msg) -> None:
        hb = decode(Heartbeat, msg.data)
        if hb.cluster != self.config.cluster:
            raise InvalidMessage(f"Heartbeat: cluster {hb.cluster!r} is not ours")
        if hb.node not in self.nodes:
            raise InvalidMessage(f"Heartbeat: unknown node {hb.node!r}")
        if self.subjects.node_of(msg.subject) != hb.node:
            raise InvalidMessage(f"Heartbeat: node {hb.node!r} sent on {msg.subject}")
        st = self.nodes[hb.node]
        if hb.incarnation == st.incarnation and hb.seq <= st.seq:
            return  # duplicate or reordered
        st.last_heartbeat = time.monotonic()
        st.incarnation, st.seq, st.heartbeat = hb.incarnation, hb.seq, hb
        self.heartbeats.labels(hb.node).inc()

    async def _on_storage(self, msg: Msg) -> None:
        report = decode(StorageReport, msg.data)
        if report.cluster != self.config.cluster:
            raise InvalidMessage(f"StorageReport: cluster {report.cluster!r} is not ours")
        if report.node not in self.nodes:
            raise InvalidMessage(f"StorageReport: unknown node {report.node!r}")
        if self.subjects.node_of(msg.subject) != report.node:
            raise InvalidMessage(f"StorageReport: node {report.node!r} sent on {msg.subject}")
        now = time.monotonic()
        self.storage[report.node] = (report, now)
        since = self.reachable_since.setdefault(report.node, {})
        lost = self.lost_since.setdefault(report.node, {})
        for dev, paths in self._storage_view(report.node, report, now).devices.items():
            if paths.confirmed_now >= 1:
                since.setdefault(dev, now)
            else:
                since.pop(dev, None)
            if paths.reachable < 1:
                lost.setdefault(dev, now)
            else:
                lost.pop(dev, None)

    async def _on_mgmt(self, msg: Msg) -> None:
        report = decode(MgmtReport, msg.data)
        if report.cluster != self.config.cluster:
            raise InvalidMessage(f"MgmtReport: cluster {report.cluster!r} is not ours")
        if report.node not in self.nodes:
            raise InvalidMessage(f"MgmtReport: unknown node {report.node!r}")
        if self.subjects.node_of(msg.subject) != report.node:
            raise InvalidMessage(f"MgmtReport: node {report.node!r} sent on {msg.subject}")
        st = self.nodes[report.node]
        st.mgmt, st.mgmt_at = report, time.monotonic()

    def _mgmt_healthy(self, st: NodeState, now: float) -> bool | None:
        """The management path as the policy wants it: None (unknown) when not
        monitored, never reported, or the report is older than mgmt_stale_after."""
        if st.mgmt is None or st.mgmt_at is None or not st.mgmt.monitored \
                or now - st.mgmt_at > self.t.mgmt_stale_after:
            return None
        return st.mgmt.healthy

    def _storage_view(self, node: str, report: StorageReport, received: float) -> StorageView:
        """Per device the report mentions: paths up (distinct configured paths reported
        reachable, after rise/fall) of the paths the config gives this node, and how many
        of those answered their latest probe. Unknown devices are left out: a device the
        view does not show is neither lost nor confirmed."""
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
        return StorageView(node, received, devices,
                           dict(self.reachable_since.get(node, {})),
                           dict(self.lost_since.get(node, {})))

    def snapshot(self, now: float) -> Snapshot:
        """Everything the policy sees at ``now``. Also advances the nodes' "since"
        trackers (so call it once per decision)."""
        wall = time.time()
        groups = {}
        for g, (home, kind) in self.config.groups().items():
            rec = self.records.get(g)
            groups[g] = GroupView(
                g, home, kind,
                owner=rec[0].owner if rec else None,
                epoch=rec[0].epoch if rec else 0,
                state=rec[0].state if rec else None,
                revision=rec[1] if rec else 0,
                devices=tuple(self.config.group_devices(g)),
                moved_at=self._moved_at(rec[0], now, wall) if rec else None,
            )
        assert self.pairs is not None
        snap = Snapshot(
            dead_after=self.t.dead_after,
            started_at=self.started_at,
            pairs=tuple(self.pairs.view(p, now, wall) for p in self.config.pairs),
            nodes={n: self._node_view(n, st, now) for n, st in self.nodes.items()},
            groups=groups,
            in_flight=frozenset(self.in_flight),
            initial_assign_wait=self.t.initial_assign_wait,
            storage={n: self._storage_view(n, r, t) for n, (r, t) in self.storage.items()},
            storage_stale_after=self.t.storage_stale_after,
            storage_alarms=frozenset(self.storage_alarms),
            storage_settle=self.t.storage_settle,
            storage_confirm_after=self.t.probe_interval + self.t.probe_timeout,
        )
        return self._with_since(snap, now)

    @staticmethod
    def _moved_at(rec: GroupRecord, now: float, wall: float) -> float | None:
        """When the group last changed owner, on the monotonic clock: the claim's wall
        clock (``since``, kept by every renewal) for a group that moved (epoch > 1)."""
        return to_monotonic(rec.since, now, wall) if rec.epoch > 1 else None

    def _node_view(self, n: str, st: NodeState, now: float) -> NodeView:
        fatal, nonfatal = st.failing()
        return NodeView(n, st.last_heartbeat, st.incarnation, st.declared_down,
                        fatal_failing=fatal, nonfatal_failing=nonfatal,
                        check_alarms=tuple(sorted(st.alarms)),
                        mgmt_healthy=self._mgmt_healthy(st, now))

    def _with_since(self, snap: Snapshot, now: float) -> Snapshot:
        """Feed each node's health (``policy.node_health``) to its trackers and put
        their "since" times in its view."""
        nodes = {}
        for n, nv in snap.nodes.items():
            h = policy.node_health(snap, n, now)
            st = self.nodes[n]
            nodes[n] = dataclasses.replace(
                nv, healthy_since=st.healthy.update(h.up, now),
                mgmt_ok_since=st.mgmt_ok.update(h.mgmt, now),
                storage_ok_since=st.storage_ok.update(h.storage, now))
        return dataclasses.replace(snap, nodes=nodes)

    # ---- the loop ----------------------------------------------------------
    async def _tick(self) -> None:
        async with self.decide_lock:
            await self._decide()

    async def decide_now(self) -> None:
        """A decision at once, between ticks (after leaving maintenance)."""
        await self._tick()

    async def _decide(self) -> None:
        now = time.monotonic()
        snap = self.snapshot(now)
        for n in self.nodes:
            self.node_alive.labels(n).set(1 if policy.is_alive(snap.nodes[n], now,
                                                                 self.t.dead_after) else 0)
        if not self.is_acting():
            return  # a standby (or not yet announced): watch, never decide
        actions = self._hold_off(policy.decide(snap, now).actions, now)
        if not actions:
            return
        decision = policy.Decision(actions)
        self.last_status = decision.status
        self.log.info(decision.status, extra={"term": self.term,
                                              "rules": [a.rule.value for a in actions]})
        inputs = {"snapshot": snap.to_inputs(), "now": now}
        for action in decision.actions:
            self.decisions.labels(action.rule.value).inc()
            await self._carry_out(action, inputs)

    async def _carry_out(self, action: policy.Action, inputs: dict[str, Any]) -> None:
        if isinstance(action, MarkDown):
            self.nodes[action.node].declared_down = True
            await self.emit("node.down", action.status, pair=action.pair, old=action.node,
                            term=self.term, inputs=inputs, data={"rule": action.rule.value})
        elif isinstance(action, MarkUp):
            self.nodes[action.node].declared_down = False
            await self.emit("node.up", action.status, pair=action.pair, new=action.node,
                            term=self.term, inputs=inputs, data={"rule": action.rule.value})
        elif isinstance(action, Takeover):
            self.in_flight.add(action.group)
            self.spawn(self._takeover(action, inputs), f"takeover-{action.group}",
                       critical=False)
        elif isinstance(action, Assign):
            self.in_flight.add(action.group)
            self.spawn(self._assign(action, inputs), f"assign-{action.group}",
                       critical=False)
        elif isinstance(action, Resume):
            self.in_flight.add(action.group)
            self.spawn(self._resume(action, inputs), f"resume-{action.group}",
                       critical=False)
        elif isinstance(action, RaiseCheckAlarm | ClearCheckAlarm | HoldDown):
            await self._carry_out_node(action, inputs)
        elif isinstance(action, RaiseStorageAlarm):
            self.storage_alarms.add(action.group)
            await self.emit("storage.global_failure", action.status, pair=action.pair,
                            group=action.group, term=self.term, epoch=action.epoch,
                            inputs=inputs, data={"rule": action.rule.value, "node": action.node,
                                                 "devices": list(action.devices)})
        elif isinstance(action, ClearStorageAlarm):
            self.storage_alarms.discard(action.group)
            await self.emit("storage.recovered", action.status, pair=action.pair,
                            group=action.group, term=self.term, epoch=action.epoch,
                            inputs=inputs, data={"rule": action.rule.value, "node": action.node})

    async def _carry_out_node(self, action: RaiseCheckAlarm | ClearCheckAlarm | HoldDown,
                              inputs: dict[str, Any]) -> None:
        """The per-node bookkeeping: check alarms (in memory) and hold-downs (the KV)."""
        common: dict[str, Any] = {"pair": action.pair, "term": self.term, "inputs": inputs}
        if isinstance(action, RaiseCheckAlarm):
            self.nodes[action.node].alarms.add(action.check)
            await self.emit("check.alarm", action.status, old=action.node, data={
                "rule": action.rule.value, "node": action.node, "check": action.check,
                "fatal": action.fatal}, **common)
        elif isinstance(action, ClearCheckAlarm):
            self.nodes[action.node].alarms.discard(action.check)
            await self.emit("check.recovered", action.status, new=action.node, data={
                "rule": action.rule.value, "node": action.node, "check": action.check},
                **common)
        else:
            assert self.pairs is not None
            if await self.pairs.hold(action.pair, action.node) is None:
                return  # not written: the next decision holds it down again
            await self.emit("node.held_down", action.status, old=action.node, data={
                "rule": action.rule.value, "node": action.node, "failures": action.failures},
                **common)

    # ---- takeover: claim -> release -> acquire ------------------------------
    def _record(self, owner: str, epoch: int, state: str) -> GroupRecord:
        return GroupRecord(owner=owner, term=self.term, epoch=epoch, state=state,
                           renewed_by=self.node)

    async def _cas(self, group: str, rec: GroupRecord, last: int | None) -> int | None:
        """Create (last None) or compare-and-set the group key; None when it lost."""
        assert self.kv is not None
        key = self.subjects.group_key(group)
        try:
            if last is None:
                rev = int(await self.kv.create(key, encode(rec)))
            else:
                rev = int(await self.kv.update(key, encode(rec), last=last))
        except KeyWrongLastSequenceError:
            self.log.info("compare-and-set lost: the group changed since the arbiter saw it",
                          extra={"group": group, "last": last})
            return None
        self._set_record(group, rec, rev)
        return rev

    async def _takeover(self, a: Takeover, inputs: dict[str, Any]) -> None:
        """Claim -> release -> acquire (DESIGN.md "Safety"), as the policy decided. The
        group is in flight (added by the caller) until it is held or given up."""
        try:
            claimed = await self.claim(a, inputs)
        except BaseException:
            self.in_flight.discard(a.group)
            raise
        if claimed is None:
            self.in_flight.discard(a.group)
            return
        await self.finish_takeover(a, claimed)

    def _common(self, a: Takeover, epoch: int) -> dict[str, Any]:
        return {"pair": a.pair, "group": a.group, "old": a.old, "new": a.new,
                "term": self.term, "epoch": epoch}

    async def claim(self, a: Takeover, inputs: dict[str, Any],
                    data: dict[str, Any] | None = None,
                    renewals_ok: bool = False) -> Claimed | None:
        """Step 1: compare-and-set the group to the new owner at epoch + 1 against the
        revision the decision saw; publish ``<kind>.started`` (failover, failback or
        switchover: ``policy.event_kind``). A move for the old owner's own fault counts
        as one of its failures (``PairRecord.failures``). None: the claim lost.

        With ``renewals_ok`` (an operator's request: its owner is alive and renews every
        heartbeat interval) a conflict is retried against the fresh revision when the
        key changed only by renewals: same owner, same epoch, held."""
        t0 = time.monotonic()
        epoch = takeover.claim_epoch(a.epoch)
        rec = self._record(a.new, epoch, "acquiring")
        last = a.revision
        rev = await self._cas(a.group, rec, last)
        for _ in range(CLAIM_RETRIES if renewals_ok else 0):
            if rev is not None:
                break
            await self._read_record(a.group)
            cur = self.records.get(a.group)
            if cur is None or cur[1] == last or (cur[0].owner, cur[0].epoch, cur[0].state) \
                    != (a.old, a.epoch, "held"):
                break  # not known newer, or really changed: decide again
            last = cur[1]
            rev = await self._cas(a.group, rec, last)
        if rev is None:
            self.takeovers.labels("claim_lost").inc()
            return None
        if a.rule in policy.FAULT_RULES and self.pairs is not None:
            self.spawn(self._record_failure(a.pair, a.old), f"failure-{a.group}",
                       critical=False)
        kind = policy.event_kind(a.rule)
        seq = await self.emit(f"{kind}.started", a.status, inputs=inputs,
                              data={"rule": a.rule.value, **(data or {})},
                              **self._common(a, epoch))
        return Claimed(epoch, t0, kind, seq)

    async def _record_failure(self, pair: str, node: str) -> None:
        assert self.pairs is not None
        await self.pairs.record_failure(pair, node, time.time())

    def _is_alive(self, node: str) -> bool:
        hb = self.nodes[node].last_heartbeat
        return hb is not None and time.monotonic() - hb <= self.t.dead_after

    async def _notify(self, a: Takeover, epoch: int) -> None:
        """The manual's "tells the companion that it is assuming primary responsibility":
        the release commands to the old owner's executors are that notice."""
        await self.emit("failover.notify", f"{a.new} tells {a.old} that it is assuming "
                        f"primary responsibility for {a.group} (epoch {epoch}): {a.old}'s "
                        f"executors are asked to release it",
                        data={"rule": a.rule.value,
                              "executors": list(self.executors_of(a.group))},
                        **self._common(a, epoch))

    async def finish_takeover(self, a: Takeover, c: Claimed) -> None:
        """Steps 2 and 3 after a successful claim; the group leaves in_flight when done."""
        epoch, kind = c.epoch, c.kind
        common = self._common(a, epoch)
        ref = {"rule": a.rule.value, "started": c.started}
        try:
            # Release and acquire go out together: the acquire carries the safe wait (what
            # may remain of the old owner's lease); if every executor of the old owner
            # acknowledges the release first, a second acquire opens the gate at once.
            if not self.is_acting():
                self.takeovers.labels("not_active").inc()
                return  # lost the leader key since deciding: the new active arbiter decides
            wait = self._lease_left(a.group)
            release = asyncio.ensure_future(self._release_all(a.old, a.group, epoch))
            notify = (asyncio.ensure_future(self._notify(a, epoch))
                      if self._is_alive(a.old) else None)
            acquired = await self._acquire_all(a.new, a.group, epoch, wait)
            released = await release
            if notify is not None:
                await notify
            if released and acquired and self._lease_left(a.group) > 0:
                acquired = await self._acquire_all(a.new, a.group, epoch, 0.0, only="heartbeat")
            if not acquired:
                self.takeovers.labels("acquire_failed").inc()
                await self.emit(f"{kind}.failed", f"{a.new} did not acknowledge acquiring "
                                f"{a.group} (epoch {epoch}); will retry", data=ref, **common)
                return
            if not await self._wait_held(a.group, a.new, epoch, wait + ACQUIRE_DEADLINE):
                self.takeovers.labels("not_held").inc()
                await self.emit(f"{kind}.failed", f"{a.new}'s lease holder did not take "
                                f"{a.group} (epoch {epoch}) in time; will retry",
                                data=ref, **common)
                return
            # Held: the policy may decide about the group again (its new owner could die
            # while its storage starts); the storage is awaited on the side.
            self.in_flight.discard(a.group)
            problem = await self._wait_served(a.group, a.new, epoch)
            if problem is not None:
                self.takeovers.labels("not_served").inc()
                await self.emit(f"{kind}.failed", f"{a.new} holds {a.group} (epoch {epoch}) "
                                f"but does not serve its storage: {problem}",
                                data={**ref, "storage": problem}, **common)
                return
            took = time.monotonic() - c.t0
            self.takeover_seconds.observe(took)
            self.takeovers.labels("completed").inc()
            how = ("release acknowledged by every executor of the old owner" if released
                   else f"the old owner's lease ran out ({wait * 1000:.0f} ms to wait)")
            await self.emit(
                f"{kind}.completed",
                f"{a.new} now serves {a.group} (epoch {epoch}), taken from {a.old} in "
                f"{took * 1000:.0f} ms; {how}",
                data={**ref, "duration_s": round(took, 4), "released_by_ack": released,
                      "wait_s": round(wait, 4)}, **common)
        finally:
            self.in_flight.discard(a.group)

    def _lease_left(self, group: str) -> float:
        """How long the old owner's lease may still run, as the arbiter can bound it:
        lease_ttl + margin after the last renewal it saw (the renewal was sent before it
        was seen); lease_ttl + margin from now when it saw none."""
        return takeover.acquire_wait(released_all=False,
                                     last_renewal_seen=self.last_renewal.get(group),
                                     now=time.monotonic(), lease_ttl=self.t.lease_ttl,
                                     margin=self.t.margin)

    async def _wait_held(self, group: str, owner: str, epoch: int, timeout: float) -> bool:
        """Until the new owner's lease holder has renewed the group at ``epoch``. The KV
        watch may lag (its consumer can sit on a server just cut off): read the key
        directly every heartbeat interval too."""
        deadline = time.monotonic() + timeout
        next_read = time.monotonic() + self.t.heartbeat_interval
        while time.monotonic() < deadline and not self.stopping:
            if time.monotonic() >= next_read:
                next_read = time.monotonic() + self.t.heartbeat_interval
                await self._read_record(group)
            rec = self.records.get(group)
            if rec is not None and rec[0].owner == owner and rec[0].epoch == epoch \
                    and rec[0].state == "held":
                return True
            if rec is not None and rec[0].epoch > epoch:
                return False  # someone moved it again
            if self._gone(owner):
                return False  # the new owner died meanwhile: the policy decides again
            await asyncio.sleep(0.005)
        return False

    def _gone(self, node: str) -> bool:
        """Declared down by the policy (its heartbeats stopped): waiting for it to answer
        would only keep its groups "in flight", out of the policy's reach."""
        st = self.nodes.get(node)
        return st is not None and st.declared_down

    def _storage_bound(self, group: str) -> float:
        """How long a data group's storage may take to be served: every resource's
        start timeout, plus reservations and a report."""
        starts = sum(r.start_timeout for r in self.config.group_resources(group))
        return starts + 2 * self.t.probe_timeout + 2 * self.t.probe_interval + 1.0

    async def _wait_served(self, group: str, owner: str, epoch: int) -> str | None:
        """For a data group with devices: until the owner's storage-monitor reports it
        ``served`` at ``epoch`` (None), or ``failed`` (its reason), or the bound passes."""
        if not self.config.group_devices(group):
            return None
        deadline = time.monotonic() + self._storage_bound(group)
        while time.monotonic() < deadline and not self.stopping:
            got = self.storage.get(owner)
            for gs in got[0].groups if got else ():
                if gs.group == group and gs.epoch == epoch:
                    if gs.state == "served":
                        return None
                    if gs.state == "failed":
                        return gs.reason or "failed"
            rec = self.records.get(group)
            if rec is not None and rec[0].epoch > epoch:
                return f"moved again (epoch {rec[0].epoch})"
            if self._gone(owner):
                return f"{owner} went down before its storage was served"
            await asyncio.sleep(0.005)
        return (f"not reported served within {self._storage_bound(group):.1f} s "
                f"(storage-monitor of {owner} down?)")

    async def _served_event(self, kind: str, status: str, pair: str, group: str, node: str,
                            epoch: int, inputs: dict[str, Any]) -> None:
        self.in_flight.discard(group)  # held: the policy may decide about it again
        problem = await self._wait_served(group, node, epoch)
        if problem is None:
            await self.emit(kind, status, pair=pair, group=group, new=node, term=self.term,
                            epoch=epoch, inputs=inputs)
            return
        await self.emit("group.not_served", f"{node} holds {group} (epoch {epoch}) but does "
                        f"not serve its storage: {problem}", pair=pair, group=group, new=node,
                        term=self.term, epoch=epoch, data={"storage": problem})

    async def _assign(self, a: Assign, inputs: dict[str, Any]) -> None:
        try:
            rev = await self._cas(a.group, self._record(a.node, 1, "acquiring"), None)
            if rev is None:
                return
            if await self._acquire_all(a.node, a.group, 1, 0.0) and \
                    await self._wait_held(a.group, a.node, 1, ACQUIRE_DEADLINE):
                await self._served_event("group.assigned", a.status, a.pair, a.group, a.node, 1,
                                         inputs)
        finally:
            self.in_flight.discard(a.group)

    async def _resume(self, a: Resume, inputs: dict[str, Any]) -> None:
        """Finish an acquisition left half done. The arbiter does not know whether the
        old owner released: the lease holder waits the full lease (its own default)."""
        try:
            if await self._acquire_all(a.node, a.group, a.epoch, None) and \
                    await self._wait_held(a.group, a.node, a.epoch, ACQUIRE_DEADLINE):
                await self._served_event("group.resumed", a.status, a.pair, a.group, a.node,
                                         a.epoch, inputs)
        finally:
            self.in_flight.discard(a.group)

    # ---- commands ----------------------------------------------------------
    def _command(self, node: str, action: str, group: str, epoch: int,
                 wait: float | None = None) -> Command:
        return Command(cluster=self.config.cluster, node=self.node, term=self.term, epoch=epoch,
                       group=group, action=action, wait=wait,
                       bucket=getattr(self, "kv_bucket_id", ""))

    async def _send(self, node: str, svc: str, action: str, group: str, epoch: int,
                    deadline: float, give_up_if_absent: bool = False,
                    wait: float | None = None) -> Ack | None:
        """Send one command, retried until acked or ``deadline`` (monotonic). With
        ``give_up_if_absent`` a missing executor (no responders) ends it at once."""
        subject = self.subjects.cmd(node, svc)
        cmd = self._command(node, action, group, epoch, wait)
        while True:
            try:
                return await bus.send_command(self.nc, subject, cmd, self.t.command_timeout)
            except nats.errors.NoRespondersError:
                if give_up_if_absent:
                    return None
            except (nats.errors.TimeoutError, TimeoutError):
                pass
            except InvalidMessage as exc:
                self.invalid_messages.labels("ack").inc()
                self.log.warning("invalid ack", extra={"error": str(exc)})
            if time.monotonic() >= deadline or self.stopping or self._gone(node):
                return None  # (a node declared down will not answer: stop, decide anew)
            await asyncio.sleep(min(0.05, self.t.command_timeout))

    def executors_of(self, group: str) -> tuple[str, ...]:
        """Who carries a group out: the ip-manager, and the storage-monitor for a data
        group with devices."""
        return EXECUTORS if self.config.group_devices(group) else ("ip-manager",)

    async def _release_all(self, node: str, group: str, epoch: int) -> bool:
        """True when every executor of ``node`` acknowledged the release."""
        deadline = time.monotonic() + self.t.command_timeout
        acks = await asyncio.gather(*(self._send(node, s, "release", group, epoch, deadline,
                                                 give_up_if_absent=True)
                                      for s in self.executors_of(group)))
        for a in acks:
            if a is not None and not a.ok:
                self.log.warning("release not finished", extra={
                    "group": group, "by": a.node, "service": a.service, "reason": a.reason})
        return all(a is not None and a.ok for a in acks)

    async def _acquire_all(self, node: str, group: str, epoch: int, wait: float | None,
                           only: str | None = None) -> bool:
        """Tell the new owner's executors to hold the group (they do once its lease
        holder's notice for this epoch arrives) and its lease holder when it may start
        (``wait``; None leaves its own gate, the full lease, in place)."""
        deadline = time.monotonic() + ACQUIRE_DEADLINE
        services = (only,) if only else (*self.executors_of(group), "heartbeat")
        acks = await asyncio.gather(*(self._send(node, s, "acquire", group, epoch, deadline,
                                                 wait=wait) for s in services))
        for a in acks:
            if a is not None and not a.ok:
                self.log.warning("acquire refused", extra={"group": group, "by": a.node,
                                                           "reason": a.reason})
        return all(a is not None and a.ok for a in acks)

    async def stop(self) -> None:
        await self.admin.close()
        if self.election is not None:
            self.election.stop()
        for w in (self.watcher, self.pair_watcher):
            if w is not None:
                with contextlib.suppress(Exception):
                    await w.stop()  # type: ignore[no-untyped-call]

    # ---- http --------------------------------------------------------------
    def is_ready(self) -> bool:
        return self.ready

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        el = self.election
        return {
            "role": "active" if el is not None and el.is_active() else "standby",
            "term": el.term if el is not None else self.term,  # held, or last held
            "active_since": el.active_since if el is not None else None,
            "leader": el.leader if el is not None else None,
            "acting": self.is_acting(),
            "election": el.status() if el is not None else None,
            "last_decision": self.last_status,
            "nodes": {n: self._node_status(n, st, now) for n, st in self.nodes.items()},
            "pairs": self._pairs_status(now),
            "groups": {g: {"owner": r.owner, "epoch": r.epoch, "state": r.state, "revision": rev}
                       for g, (r, rev) in sorted(self.records.items())},
            "in_flight": sorted(self.in_flight),
        }

    def _node_status(self, n: str, st: NodeState, now: float) -> dict[str, Any]:
        fatal, nonfatal = st.failing()

        def span(since: Since) -> float | None:
            return None if since.since is None else round(now - since.since, 3)

        return {"alive": st.last_heartbeat is not None
                and now - st.last_heartbeat <= self.t.dead_after,
                "heartbeat_age_s": None if st.last_heartbeat is None
                else round(now - st.last_heartbeat, 3),
                "incarnation": st.incarnation, "declared_down": st.declared_down,
                "fatal_failing": list(fatal), "nonfatal_failing": list(nonfatal),
                "check_alarms": sorted(st.alarms), "mgmt_healthy": self._mgmt_healthy(st, now),
                "healthy_for_s": span(st.healthy), "mgmt_ok_for_s": span(st.mgmt_ok),
                "storage_ok_for_s": span(st.storage_ok)}

    def _pairs_status(self, now: float) -> dict[str, Any]:
        if self.pairs is None:
            return {}
        out = {}
        for p in self.config.pairs:
            v = self.pairs.view(p, now, time.time())
            out[p.name] = {"failback": v.failback, "maintenance": v.maintenance,
                           "held_down": sorted(v.held_down),
                           "recent_failures": {n: policy.recent_failures(v, n, now)
                                               for n in v.nodes}}
        return out


main = service_command(Arbiter)
