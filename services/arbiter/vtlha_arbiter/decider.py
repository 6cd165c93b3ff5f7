"""The decision loop: on each tick one immutable ``Snapshot`` from the cluster view,
the pure ``policy.decide(snapshot, now)``, and what it returns carried out (moves by the
mover; marks, alarms and hold-downs here). Every event of a decision carries its inputs,
``{"snapshot": ..., "now": ...}``, and its status sentence as ``reason``. Only an
acting arbiter (active, its term announced) decides; operator requests take turns with
the tick through ``lock``."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from vtlha import policy
from vtlha.policy import (
    ClearCheckAlarm,
    ClearStorageAlarm,
    HoldDown,
    MarkDown,
    MarkUp,
    RaiseCheckAlarm,
    RaiseStorageAlarm,
    Snapshot,
)
from vtlha_arbiter.host import Host
from vtlha_arbiter.mover import Mover
from vtlha_arbiter.pairstate import PairState
from vtlha_arbiter.term import Activation
from vtlha_arbiter.view import ClusterView


class Reconciling(Protocol):
    def tick(self, now: float) -> None: ...


MOVES = policy.MOVES  # actions that move a group: carried out by the mover
#: a node whose last heartbeat is this many heartbeat intervals old is late: a decision
#: is made right when it would be dead (``death_due``), not at the tick after it
LATE_INTERVALS = 1.5
DEATH_SLACK = 0.001  # s after the due time: dead is "no heartbeat for *more* than"


class Decider:
    def __init__(self, host: Host, view: ClusterView, mover: Mover,
                 activation: Activation) -> None:
        self.host = host
        self.view = view
        self.mover = mover
        self.act = activation
        self.pairs: PairState | None = None
        self.reconciler: Reconciling | None = None  # a new activation's reconciliation
        self.last_status = "starting"
        self.holdoff_logged = False
        #: one decision at a time: the tick and operator requests take turns
        self.lock = asyncio.Lock()
        self.decisions = Counter("vtlha_decisions_total", "Policy actions, by rule", ["rule"],
                                 registry=host.registry)
        self.node_alive = Gauge("vtlha_node_alive", "1 while a node's heartbeats arrive",
                                ["node"], registry=host.registry)
        #: each node's series, looked up once (every tick sets every node's)
        self.alive_gauges = {n: self.node_alive.labels(n) for n in view.nodes}
        #: late nodes: when a decision is due for each (a timer runs for it)
        self.death_watch: dict[str, float] = {}
        self.late_after = LATE_INTERVALS * view.t.heartbeat_interval

    def snapshot(self, now: float) -> Snapshot:
        """The policy's inputs at ``now`` (advances the "since" trackers: once per
        decision)."""
        return self.view.snapshot(now, time.time(), frozenset(self.mover.in_flight),
                                  self.act.hold_off_until())

    async def tick(self) -> None:
        async with self.lock:
            await self._decide()

    async def decide_now(self) -> None:
        """A decision at once, between ticks (after leaving maintenance)."""
        await self.tick()

    async def _decide(self) -> None:
        now = time.monotonic()
        acting = self.act.is_acting()
        self.watch_nodes(now, acting)
        if not acting:
            self.snapshot(now)  # a standby keeps its "since" trackers warm
            return  # a standby (or not yet announced): watch, never decide
        if self.reconciler is not None:
            self.reconciler.tick(now)  # before the policy: its moves are then in flight
        snap = self.snapshot(now)
        decision = policy.decide(snap, now)
        if decision.held_back and not self.holdoff_logged:
            self.holdoff_logged = True  # once per activation
            self.host.log.info(decision.status, extra={"term": self.act.term})
        actions = decision.actions
        if not actions:
            return
        self.last_status = decision.status
        self.host.log.info(decision.status, extra={"term": self.act.term,
                                                   "rules": [a.rule.value for a in actions]})
        per_pair: dict[str, dict[str, Any]] = {}  # each event carries its pair's part
        for action in decision.actions:
            self.decisions.labels(action.rule.value).inc()
            inputs = per_pair.get(action.pair)
            if inputs is None:
                inputs = per_pair[action.pair] = {
                    "snapshot": snap.for_pairs([action.pair]).to_inputs(), "now": now}
            await self._carry_out(action, inputs)

    def watch_nodes(self, now: float, acting: bool) -> None:
        """Each node's alive gauge; for an acting arbiter, a death watch on late ones."""
        for n, gauge in self.alive_gauges.items():
            alive = self.view.is_alive(n, now)
            gauge.set(1 if alive else 0)
            if alive and acting:
                last = self.view.nodes[n].last_heartbeat
                if last is not None and now - last > self.late_after:
                    self._watch_death(n)

    def _watch_death(self, node: str) -> None:
        """A late node: decide right when it would be dead (the tick comes up to half a
        heartbeat interval after that). Its heartbeat coming back makes that decision a
        no-op; only late nodes get a timer, so its cost does not grow with the estate."""
        due = self.view.death_due(node)
        if due is None or self.death_watch.get(node) == due:
            return
        self.death_watch[node] = due
        asyncio.get_running_loop().call_later(max(0.0, due + DEATH_SLACK - time.monotonic()),
                                              self._death_due, node, due)

    def _death_due(self, node: str, due: float) -> None:
        if self.death_watch.get(node) == due:
            del self.death_watch[node]
        if not self.host.stopping:
            self.host.spawn(self.decide_now(), "decide-on-death", critical=False)

    async def _carry_out(self, action: policy.Action, inputs: dict[str, Any]) -> None:
        term = self.act.term
        if isinstance(action, MOVES):
            self.mover.start(action, inputs)
        elif isinstance(action, MarkDown):
            self.view.nodes[action.node].declared_down = True
            await self.host.emit("node.down", action.status, pair=action.pair, old=action.node,
                                 term=term, inputs=inputs, data={"rule": action.rule.value})
        elif isinstance(action, MarkUp):
            self.view.nodes[action.node].declared_down = False
            await self.host.emit("node.up", action.status, pair=action.pair, new=action.node,
                                 term=term, inputs=inputs, data={"rule": action.rule.value})
        elif isinstance(action, RaiseCheckAlarm | ClearCheckAlarm | HoldDown):
            await self._carry_out_node(action, inputs)
        elif isinstance(action, RaiseStorageAlarm):
            self.view.storage_alarms.add(action.group)
            await self.host.emit("storage.global_failure", action.status, pair=action.pair,
                                 group=action.group, term=term, epoch=action.epoch,
                                 inputs=inputs, data={"rule": action.rule.value,
                                                      "node": action.node,
                                                      "devices": list(action.devices)})
        elif isinstance(action, ClearStorageAlarm):
            self.view.storage_alarms.discard(action.group)
            await self.host.emit("storage.recovered", action.status, pair=action.pair,
                                 group=action.group, term=term, epoch=action.epoch,
                                 inputs=inputs, data={"rule": action.rule.value,
                                                      "node": action.node})

    async def _carry_out_node(self, action: RaiseCheckAlarm | ClearCheckAlarm | HoldDown,
                              inputs: dict[str, Any]) -> None:
        """The per-node bookkeeping: check alarms (in memory) and hold-downs (the KV)."""
        common: dict[str, Any] = {"pair": action.pair, "term": self.act.term, "inputs": inputs}
        if isinstance(action, RaiseCheckAlarm):
            self.view.nodes[action.node].alarms.add(action.check)
            await self.host.emit("check.alarm", action.status, old=action.node, data={
                "rule": action.rule.value, "node": action.node, "check": action.check,
                "fatal": action.fatal}, **common)
        elif isinstance(action, ClearCheckAlarm):
            self.view.nodes[action.node].alarms.discard(action.check)
            await self.host.emit("check.recovered", action.status, new=action.node, data={
                "rule": action.rule.value, "node": action.node, "check": action.check},
                **common)
        else:
            assert self.pairs is not None
            if await self.pairs.hold(action.pair, action.node) is None:
                return  # not written: the next decision holds it down again
            await self.host.emit("node.held_down", action.status, old=action.node, data={
                "rule": action.rule.value, "node": action.node, "failures": action.failures},
                **common)
