"""arbiter: runs the failover policy and carries out its decisions.

``main.py`` only wires the parts, each with one job:

- ``view.ClusterView``: what was received (heartbeats, management-path and storage
  reports, group and pair records) -> the policy's ``Snapshot``; no NATS, no clock.
- ``records.GroupRecords``: the group records in the KV (load, watch, read, CAS).
- ``term.Activation``: the term, its announcement to every executor, ``is_acting``,
  the hold-off after becoming active.
- ``decider.Decider``: the tick: snapshot -> ``policy.decide`` -> carry out.
- ``mover.Mover``: the moves in flight (claim -> release -> acquire, assign, resume).
- ``admin.AdminServer``: operator requests (``ha.<c>.admin.<verb>``), answered by the
  policy's pure ``answer`` and carried out by the mover.
- ``leaders.LeaderPlacement``: the KV's and event stream's raft leaders on the witness.
- ``election.ElectionRunner``: which arbiter is active (``arbiter.leader``).
- ``handback.Handback``: the active role back to the witness's arbiter once it is back.
- ``bucket.BucketWatch``: the KV bucket's identity; a recreated bucket starts the
  arbiter afresh on it (and a missing bucket or event stream is created).

Every node and the witness run an arbiter; exactly one is **active** (the witness's
preferred). Every arbiter subscribes to heartbeats and watches the group records, so a
standby is warm; only the active one decides. On becoming active it takes the term,
announces it, and only then acts; it makes no takeover within ``lease_ttl`` of becoming
active, and the policy's "never heard" grace counts from that moment.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge

from vtlha import bus
from vtlha.eventstate import EventStateStore, EventStateSync
from vtlha.messages import Heartbeat, MgmtReport, StorageReport, decode, parse, validate
from vtlha.service import OWN_VALIDATION, Service, service_command
from vtlha_arbiter.admin import AdminServer
from vtlha_arbiter.bucket import BUCKET_CHECK, BucketWatch
from vtlha_arbiter.decider import Decider
from vtlha_arbiter.election import ElectionRunner
from vtlha_arbiter.eventbook import EventBook
from vtlha_arbiter.gauges import StatusGauges
from vtlha_arbiter.handback import Handback
from vtlha_arbiter.leaders import LEADER_CHECK_INTERVAL, LeaderPlacement
from vtlha_arbiter.mover import Mover
from vtlha_arbiter.pairstate import PairState
from vtlha_arbiter.reconcile import Reconciler
from vtlha_arbiter.records import STALL_INTERVALS, GroupRecords
from vtlha_arbiter.term import Activation
from vtlha_arbiter.view import ClusterView


class Arbiter(Service):
    name = "arbiter"
    http_port_key = "arbiter"
    #: its three many-a-second inputs are checked by the view on the validated message
    #: (the cluster, a node of a pair, sent on its own subject: ``view._check_sender``)
    own_validation = OWN_VALIDATION | {"heartbeat", "storage", "mgmt"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.t = self.config.timings
        self.view = ClusterView(self.config, started_at=time.monotonic())
        self.records = GroupRecords(self, self.view)
        self.act = Activation(self)
        self.mover = Mover(self, self.view, self.records, self.act)
        self.decider = Decider(self, self.view, self.mover, self.act)
        self.admin = AdminServer(self, self.act, self.decider, self.mover)
        self.reconciler = Reconciler(self, self.view, self.mover, self.act)
        self.decider.reconciler = self.reconciler
        self.leaders = LeaderPlacement(self, lambda: self.js, self.act.is_active)
        self.book = EventBook(self, self.view, self.mover)  # events.<pair> in the KV
        self.handback = Handback(self, self.act, self.mover, self.reconciler,
                                 lambda: self.election)
        self.bucket = BucketWatch(self, lambda: self.js, self._new_bucket,
                                  self.view.max_revision)
        self.kv: KeyValue | None = None
        self.pairs: PairState  # set at start (the KV)
        self.pair_watcher: KeyValue.KeyWatcher | None = None
        self.election: ElectionRunner | None = None
        self.ready = False
        self.heartbeats = Counter("vtlha_heartbeats_received_total", "Valid heartbeats received",
                                  ["node"], registry=self.registry)
        #: each node's series, looked up once (every heartbeat counts)
        self.heartbeats_of = {n.name: self.heartbeats.labels(n.name)
                              for n in self.config.nodes}
        Gauge("vtlha_arbiter_active", "1 while this arbiter is the active one",
              registry=self.registry).set_function(lambda: 1.0 if self.act.is_active() else 0.0)
        Gauge("vtlha_arbiter_term", "The term this arbiter holds or last held (0: never)",
              registry=self.registry).set_function(lambda: float(self.act.term))
        self.registry.register(StatusGauges(self.view, lambda: getattr(self, "pairs", None),
                                            self.version))

    # ---- start -------------------------------------------------------------
    async def start(self) -> None:
        n = self.config.nats
        replicas = n.stream_replicas
        self.kv = await bus.retry_js("kv bucket", lambda: bus.ensure_kv(self.js, self.subjects,
                                                                        replicas))
        await bus.retry_js("event stream", lambda: bus.ensure_events_stream(
            self.js, self.subjects, replicas, n.events_max_bytes, n.events_max_age,
            n.events_duplicate_window, n.stream_max_msgs))
        # The bucket's identity goes into every command (``Command.bucket``): executors
        # compare terms and epochs only within one bucket (issue 14).
        self.act.bucket = self.bucket.identity = await bus.retry_js(
            "kv identity", lambda: bus.kv_identity(self.nc, self.subjects),
            not_found_too=True)
        self.records.kv = self.kv
        self.book.store = EventStateStore(self.kv, self.subjects, self.book.pair_nodes,
                                          self.log)
        await bus.retry_js("group records", self.records.load)
        await bus.retry_js("group watch", self.records.start_watch)
        self.every(STALL_INTERVALS * self.t.heartbeat_interval, self.records.check,
                   "records")
        self.pairs = PairState(self.kv, self.subjects, self.config, self.log)
        pairs = self.view.pairs = self.mover.pairs = self.decider.pairs = self.pairs
        self.admin.pairs = pairs
        await bus.retry_js("pair records", pairs.load)
        await bus.retry_js("pair watch", self._watch_pairs)
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
        self.act.election = self.election
        self.spawn(self.election.run(), "election")
        await self.handback.start()
        self.every(self.t.leader_ttl / 3, self.handback.check, "handback")
        self.ready = True
        self.every(self.t.heartbeat_interval / 2, self.decider.tick, "decide")
        sync = EventStateSync(self.book.store, self.book.current, self.act.is_acting)
        self.every(self.t.heartbeat_interval / 2, sync.sync, "event-state")
        if self.leaders.wanted():
            self.every(LEADER_CHECK_INTERVAL, self.leaders.check, "leaders")
        self.every(BUCKET_CHECK, self.bucket.check, "bucket-check")

    async def _watch_pairs(self) -> None:
        assert self.kv is not None
        self.pair_watcher = await self.kv.watch("pair.>")
        self.spawn(self.pairs.watch(self.pair_watcher), "pair-watch", critical=False)

    # ---- a recreated bucket ---------------------------------------------------------
    async def _new_bucket(self, old: str, new: str) -> None:
        """The KV bucket was recreated (``bucket.BucketWatch``): start afresh on it. The
        election first (standby at once: no move of this activation goes on, every run
        gives up), then every record, revision and state of the old bucket is dropped
        and the new one read; the next activation announces its term with the new
        identity and reconciles every group."""
        why = f"the KV bucket was recreated ({new}, was {old})"
        self.log.warning("the KV bucket was recreated: the arbiter starts afresh on it",
                         extra={"old": old, "new": new, "term": self.act.term})
        self.emit_soon("fencing.new_bucket", f"{self.node}'s arbiter: {why}; its election, "
                       "group records and pairs' state start afresh on the new bucket",
                       term=self.act.term, data={"old": old, "new": new})
        # Everything of the old bucket is forgotten before the first await: nothing runs
        # in between (the election's loop could otherwise win the new key meanwhile).
        if self.election is not None:
            self.election.restart(why)
        self.mover.forget_bucket(why)
        if self.book.store is not None:
            self.book.store.revisions.clear()
        self.pairs.forget()
        self.records.forget()
        if self.pair_watcher is not None:
            with contextlib.suppress(Exception):
                await self.pair_watcher.stop()  # type: ignore[no-untyped-call]
        await bus.retry_js("group records", self.records.rewatch, deadline=10.0)
        await bus.retry_js("pair records", self.pairs.load, deadline=10.0)
        await bus.retry_js("pair watch", self._watch_pairs, deadline=10.0)

    # ---- the election ----------------------------------------------------------
    def is_acting(self) -> bool:
        return self.act.is_acting()

    async def _on_election_change(self, active: bool, term: int) -> None:
        """Becoming active: take the term, announce it to every executor, and only then
        act (``is_acting``). Losing it needs nothing here to stop: the tick asks the
        election every time. Called one change at a time, in order."""
        el, act = self.election, self.act
        assert el is not None
        if not active:
            act.announced_term = 0
            await self.admin.close()
            leader = el.leader if el.leader != self.node else None
            await self.emit("arbiter.standby", f"{self.node}'s arbiter is no longer active "
                            f"(it held term {term}): {el.reason}", term=term, old=self.node,
                            new=leader, data={"reason": el.reason})
            return
        since = el.active_since
        if since is None:  # lapsed again before we got here: the standby change follows
            return
        # The view must be of the bucket this activation won in: a bucket recreated and
        # not noticed yet starts the arbiter afresh instead (the election included).
        identity = await self.bucket.read()
        if identity is not None and identity != self.bucket.identity:
            await self.bucket.adopt(identity)
            return
        act.announced_term = 0
        act.bucket = self.bucket.identity
        act.term, act.active_since, self.view.started_at = term, since, since
        self.decider.holdoff_logged = False
        await self.book.adopt(deadline=self.t.leader_ttl)  # before deciding anything
        not_acked = await act.announce()
        if not act.is_current(term, since):
            return  # lost or lapsed meanwhile: the change that follows says so
        act.announced_term = term
        self.book.end_unfinished()
        await self.admin.open()
        prev = el.previous_leader
        after = f", taking over from {prev}" if prev and prev != self.node else ""
        await self.emit("arbiter.active", f"{self.node}'s arbiter is active with term {term}"
                        f"{after}; it makes no takeover for lease_ttl "
                        f"({self.t.lease_ttl} s)", term=term, old=prev, new=self.node,
                        data={"previous_leader": prev, "not_acked": not_acked,
                              "reason": el.reason})

    # ---- input -------------------------------------------------------------
    async def _on_heartbeat(self, msg: Msg) -> None:
        hb = decode(Heartbeat, msg.data)
        st = self.view.nodes.get(hb.node)
        was = st.failing()[0] if st is not None else ()
        if self.view.heartbeat(hb, self.subjects.node_of(msg.subject), time.monotonic()):
            self.heartbeats_of[hb.node].inc()
            if st is not None and st.failing()[0] != was and self.ready:
                # a fatal check began (or ceased) failing: decide now, not at the next
                # tick (the node sends such a heartbeat at once: heartbeat service)
                self.spawn(self.decider.decide_now(), "decide-on-check", critical=False)

    async def _on_storage(self, msg: Msg) -> None:
        obj = parse(StorageReport, msg.data)
        report = validate(StorageReport, obj)
        # Its paths and groups as sent: the same as the node's last report's (the usual
        # case, five times a second) spare the view working them out again.
        self.view.storage_report(report, self.subjects.node_of(msg.subject),
                                 time.monotonic(), raw=(obj.get("paths"), obj.get("groups")))

    async def _on_mgmt(self, msg: Msg) -> None:
        report = decode(MgmtReport, msg.data)
        st = self.view.nodes.get(report.node)
        was = _mgmt_word(st.mgmt if st is not None else None)
        self.view.mgmt_report(report, self.subjects.node_of(msg.subject), time.monotonic())
        if _mgmt_word(report) != was and self.ready:
            # the management path failed (or came back): decide now, not at the next
            # tick (the node sends such a report at once on a link event)
            self.spawn(self.decider.decide_now(), "decide-on-mgmt", critical=False)

    async def stop(self) -> None:
        await self.admin.close()
        if self.election is not None:
            self.election.stop()
        await self.records.stop_watch()
        if self.pair_watcher is not None:
            with contextlib.suppress(Exception):
                await self.pair_watcher.stop()  # type: ignore[no-untyped-call]

    # ---- http --------------------------------------------------------------
    def is_ready(self) -> bool:
        return self.ready

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        el = self.election
        return {
            "role": "active" if self.act.is_active() else "standby",
            "term": el.term if el is not None else self.act.term,  # held, or last held
            "active_since": el.active_since if el is not None else None,
            "leader": el.leader if el is not None else None,
            "acting": self.act.is_acting(),
            "election": el.status() if el is not None else None,
            "last_decision": self.decider.last_status,
            "nodes": {n: self.view.node_status(n, now) for n in self.view.nodes},
            "pairs": self.view.pairs_status(now, time.time()),
            "groups": self.view.groups_status(),
            "in_flight": sorted(self.mover.in_flight),
        }


main = service_command(Arbiter)


def _mgmt_word(report: MgmtReport | None) -> bool | None:
    """What a management report says of the path (None: not monitored, or none yet)."""
    return report.healthy if report is not None and report.monitored else None
