"""arbiter: runs the failover policy and carries out its decisions.

It subscribes to every node's heartbeats, keeps its view of ownership from the KV
(watch), and on each tick builds one immutable ``Snapshot``, calls the pure
``decide(snapshot, now)`` and carries out what it returns. A takeover runs as
DESIGN.md's three steps: **claim** (compare-and-set of the group key to the new owner
with epoch + 1, against the revision the arbiter last saw), **release** (the old
owner's executors are told to release; they ack only once it is gone), **acquire**
(once every executor of the old owner acked, or ``dead_after`` has passed since its
last heartbeat). Events go to the JetStream event stream.

At this stage exactly one arbiter runs per cluster (the witness's); standby arbiters,
leases and promises come with the safety issue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge, Histogram

from vtlha import bus, policy
from vtlha.errors import InvalidMessage
from vtlha.messages import Ack, Command, GroupRecord, Heartbeat, LeaderRecord, decode, encode
from vtlha.policy import (
    Assign,
    GroupView,
    MarkDown,
    MarkUp,
    NodeView,
    PairView,
    Resume,
    Snapshot,
    Takeover,
)
from vtlha.service import Service, service_command

EXECUTORS = ("ip-manager",)  # storage-monitor becomes an executor with storage takeover
ACQUIRE_DEADLINE = 10.0  # seconds an acquire is retried before the policy resumes it
LEADER_CHECK_INTERVAL = 1.0  # seconds between checks that stream leaders sit on the witness


@dataclass
class NodeState:
    last_heartbeat: float | None = None
    incarnation: str | None = None
    seq: int = -1
    declared_down: bool = False
    heartbeat: Heartbeat | None = None


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
        self.in_flight: set[str] = set()
        self.started_at = time.monotonic()
        self.last_status = "starting"
        self.ready = False
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

    # ---- start -------------------------------------------------------------
    async def start(self) -> None:
        n = self.config.nats
        replicas = n.stream_replicas
        self.kv = await bus.retry_js("kv bucket", lambda: bus.ensure_kv(self.js, self.subjects,
                                                                        replicas))
        await bus.retry_js("event stream", lambda: bus.ensure_events_stream(
            self.js, self.subjects, replicas, n.events_max_bytes, n.events_max_age))
        self.term = await bus.retry_js("leader key", self._take_leader_key)
        self.log.info("active arbiter", extra={"term": self.term})
        await bus.retry_js("group records", self._load_records)
        self.watcher = await self.kv.watch("group.>")
        self.spawn(self._watch(self.watcher), "kv-watch")
        await self.nc.subscribe(self.subjects.hb("*"),
                                cb=self.subscribe_handler("heartbeat", self._on_heartbeat))
        self.started_at = time.monotonic()
        self.ready = True
        await self._announce_term()
        self.every(self.t.heartbeat_interval / 2, self._tick, "decide")
        if self.config.witness.host in self.config.nats.servers:
            self.every(LEADER_CHECK_INTERVAL, self._keep_leaders_on_witness, "leaders")

    async def _keep_leaders_on_witness(self) -> None:
        """Keep the KV's and the event stream's raft leaders on the witness, so that a
        node's crash never waits for an election (DESIGN.md, "Raft elections are slow")."""
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

    async def _take_leader_key(self) -> int:
        """Write the leader key and return its revision: this arbiter's term."""
        assert self.kv is not None
        value = encode(LeaderRecord(node=self.node))
        try:
            entry = await self.kv.get(self.subjects.LEADER_KEY)
        except (KeyNotFoundError, NotFoundError):
            return int(await self.kv.create(self.subjects.LEADER_KEY, value))
        return int(await self.kv.update(self.subjects.LEADER_KEY, value, last=entry.revision))

    async def _announce_term(self) -> None:
        for n in self.config.nodes:
            for svc in EXECUTORS:
                cmd = self._command(n.name, "term", "", 0)
                try:
                    await bus.send_command(self.nc, self.subjects.cmd(n.name, svc), cmd,
                                           self.t.command_timeout)
                except (nats.errors.Error, TimeoutError, InvalidMessage) as exc:
                    self.log.info("term not announced (executor not up yet)",
                                  extra={"to": n.name, "executor": svc, "error": repr(exc)})

    async def _load_records(self) -> None:
        assert self.kv is not None
        for group in self.config.groups():
            try:
                entry = await self.kv.get(self.subjects.group_key(group))
            except (KeyNotFoundError, NotFoundError):
                continue
            if entry.value and entry.revision is not None:
                self._set_record(group, decode(GroupRecord, entry.value), entry.revision)

    def _set_record(self, group: str, rec: GroupRecord, revision: int) -> None:
        cur = self.records.get(group)
        if cur is None or revision > cur[1]:
            self.records[group] = (rec, revision)

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

    def snapshot(self) -> Snapshot:
        groups = {}
        for g, (home, kind) in self.config.groups().items():
            rec = self.records.get(g)
            groups[g] = GroupView(
                g, home, kind,
                owner=rec[0].owner if rec else None,
                epoch=rec[0].epoch if rec else 0,
                state=rec[0].state if rec else None,
                revision=rec[1] if rec else 0,
            )
        return Snapshot(
            dead_after=self.t.dead_after,
            started_at=self.started_at,
            pairs=tuple(PairView(p.name, (p.nodes[0].name, p.nodes[1].name), p.failback)
                        for p in self.config.pairs),
            nodes={n: NodeView(n, st.last_heartbeat, st.incarnation, st.declared_down)
                   for n, st in self.nodes.items()},
            groups=groups,
            in_flight=frozenset(self.in_flight),
            initial_assign_wait=self.t.initial_assign_wait,
        )

    # ---- the loop ----------------------------------------------------------
    async def _tick(self) -> None:
        now = time.monotonic()
        snap = self.snapshot()
        decision = policy.decide(snap, now)
        for n, _st in self.nodes.items():
            self.node_alive.labels(n).set(1 if policy.is_alive(snap.nodes[n], now,
                                                                 self.t.dead_after) else 0)
        if not decision.actions:
            return
        self.last_status = decision.status
        self.log.info(decision.status, extra={"term": self.term})
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
            self.spawn(self._assign(action), f"assign-{action.group}",
                       critical=False)
        elif isinstance(action, Resume):
            self.in_flight.add(action.group)
            self.spawn(self._resume(action), f"resume-{action.group}",
                       critical=False)

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
        t0 = time.monotonic()
        epoch = a.epoch + 1
        try:
            rev = await self._cas(a.group, self._record(a.new, epoch, "acquiring"), a.revision)
            if rev is None:
                self.takeovers.labels("claim_lost").inc()
                return
            common = {"pair": a.pair, "group": a.group, "old": a.old, "new": a.new,
                      "term": self.term, "epoch": epoch}
            await self.emit("failover.started", a.status, inputs=inputs,
                            data={"rule": a.rule.value}, **common)
            released = await self._release_or_silence(a.old, a.group, epoch)
            if not await self._acquire_all(a.new, a.group, epoch):
                self.takeovers.labels("acquire_failed").inc()
                await self.emit("failover.failed", f"{a.new} did not acknowledge acquiring "
                                f"{a.group} (epoch {epoch}); will retry", **common)
                return
            await self._cas(a.group, self._record(a.new, epoch, "held"), rev)
            took = time.monotonic() - t0
            self.takeover_seconds.observe(took)
            self.takeovers.labels("completed").inc()
            how = "acknowledged" if released else "not acknowledged: waited out dead_after"
            await self.emit(
                "failover.completed",
                f"{a.new} now serves {a.group} (epoch {epoch}), taken from {a.old} in "
                f"{took * 1000:.0f} ms; release {how}",
                data={"duration_s": round(took, 4), "released_by_ack": released}, **common)
        finally:
            self.in_flight.discard(a.group)

    def _silence_left(self, node: str) -> float:
        """Seconds until dead_after has passed since ``node``'s last heartbeat (<= 0: it
        has)."""
        last = self.nodes[node].last_heartbeat
        return 0.0 if last is None else last + self.t.dead_after - time.monotonic()

    async def _release_or_silence(self, old: str, group: str, epoch: int) -> bool:
        """Step 2 and the gate of step 3: tell the old owner's executors to release, and
        return once every one acknowledged (True) or the old owner has been silent for
        dead_after and a short grace for the ack has passed (False), whichever comes
        first. The release request stays in flight after the gate opens, so a live old
        owner still hears it."""
        release = asyncio.ensure_future(self._release_all(old, group, epoch))
        # A live executor acks within milliseconds: give it that long even when the gate
        # is already open, so a node whose heartbeat alone died releases before we acquire.
        grace = self.t.heartbeat_interval / 2
        left = max(self._silence_left(old), grace)
        done, _ = await asyncio.wait({release}, timeout=left)
        if release in done and release.result():
            return True
        if not release.done():
            self.spawn(self._finish(release), f"release-{group}", critical=False)
        delay = self._silence_left(old)
        if delay > 0:
            await asyncio.sleep(delay)
        return False

    async def _finish(self, fut: asyncio.Future[bool]) -> None:
        await fut

    async def _assign(self, a: Assign) -> None:
        try:
            rev = await self._cas(a.group, self._record(a.node, 1, "acquiring"), None)
            if rev is None:
                return
            if await self._acquire_all(a.node, a.group, 1):
                await self._cas(a.group, self._record(a.node, 1, "held"), rev)
                await self.emit("group.assigned", a.status, pair=a.pair, group=a.group,
                                new=a.node, term=self.term, epoch=1)
        finally:
            self.in_flight.discard(a.group)

    async def _resume(self, a: Resume) -> None:
        try:
            if await self._acquire_all(a.node, a.group, a.epoch):
                await self._cas(a.group, self._record(a.node, a.epoch, "held"), a.revision)
                await self.emit("group.resumed", a.status, pair=a.pair, group=a.group,
                                new=a.node, term=self.term, epoch=a.epoch)
        finally:
            self.in_flight.discard(a.group)

    # ---- commands ----------------------------------------------------------
    def _command(self, node: str, action: str, group: str, epoch: int) -> Command:
        return Command(cluster=self.config.cluster, node=self.node, term=self.term, epoch=epoch,
                       group=group, action=action)

    async def _send(self, node: str, svc: str, action: str, group: str, epoch: int,
                    deadline: float, give_up_if_absent: bool = False) -> Ack | None:
        """Send one command, retried until acked or ``deadline`` (monotonic). With
        ``give_up_if_absent`` a missing executor (no responders) ends it at once."""
        subject = self.subjects.cmd(node, svc)
        cmd = self._command(node, action, group, epoch)
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
            if time.monotonic() >= deadline or self.stopping:
                return None
            await asyncio.sleep(min(0.05, self.t.command_timeout))

    async def _release_all(self, node: str, group: str, epoch: int) -> bool:
        """True when every executor of ``node`` acknowledged the release."""
        deadline = time.monotonic() + self.t.command_timeout
        acks = await asyncio.gather(*(self._send(node, s, "release", group, epoch, deadline,
                                                 give_up_if_absent=True) for s in EXECUTORS))
        return all(a is not None and a.ok for a in acks)

    async def _acquire_all(self, node: str, group: str, epoch: int) -> bool:
        deadline = time.monotonic() + ACQUIRE_DEADLINE
        acks = await asyncio.gather(*(self._send(node, s, "acquire", group, epoch, deadline)
                                      for s in EXECUTORS))
        for a in acks:
            if a is not None and not a.ok:
                self.log.warning("acquire refused", extra={"group": group, "by": a.node,
                                                           "reason": a.reason})
        return all(a is not None and a.ok for a in acks)

    async def stop(self) -> None:
        if self.watcher is not None:
            with contextlib.suppress(Exception):
                await self.watcher.stop()  # type: ignore[no-untyped-call]

    # ---- http --------------------------------------------------------------
    def is_ready(self) -> bool:
        return self.ready

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "term": self.term,
            "last_decision": self.last_status,
            "nodes": {n: {"alive": st.last_heartbeat is not None
                          and now - st.last_heartbeat <= self.t.dead_after,
                          "heartbeat_age_s": None if st.last_heartbeat is None
                          else round(now - st.last_heartbeat, 3),
                          "incarnation": st.incarnation, "declared_down": st.declared_down}
                      for n, st in self.nodes.items()},
            "groups": {g: {"owner": r.owner, "epoch": r.epoch, "state": r.state, "revision": rev}
                       for g, (r, rev) in sorted(self.records.items())},
            "in_flight": sorted(self.in_flight),
        }


main = service_command(Arbiter)
