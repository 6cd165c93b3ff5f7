"""Reading what ``vtlha.clusterstatus.build`` needs, over NATS: the KV's records, and
every node's heartbeat, storage and management-path reports as they go by (the same
subjects the arbiter listens to; nothing is asked of any service, so it works with no
active arbiter). Each report is validated as the arbiter validates it; an invalid one
is counted and dropped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NotFoundError

from vtlha.bounded import bounded
from vtlha.clusterstatus import ClusterStatus, Heard, Read, build
from vtlha.config import ClusterConfig
from vtlha.errors import InvalidMessage, VtlhaError
from vtlha.messages import (
    Envelope,
    GroupRecord,
    Heartbeat,
    LeaderRecord,
    MgmtReport,
    PairRecord,
    StorageReport,
    decode,
)
from vtlha.subjects import Subjects

#: seconds for each KV read
READ_TIMEOUT = 3.0


class UnknownCluster(VtlhaError):
    """The servers have no KV bucket for the cluster: it never ran there, or the
    cluster file names another cluster."""


def listen_window(cfg: ClusterConfig) -> float:
    """How long to listen for reports at most: a node that sends none within it is not
    heard (its heartbeats are due every ``heartbeat_interval``, its reports every
    ``probe_interval``; stale after ``dead_after`` / ``*_stale_after``)."""
    t = cfg.timings
    return min(5.0, max(t.dead_after, t.storage_stale_after, t.mgmt_stale_after)
               + t.heartbeat_interval)


class Collector:
    """The latest heartbeat, storage and management-path report of every node, each
    with when it arrived on this process's monotonic clock."""

    KINDS = ("heartbeat", "storage", "mgmt")

    def __init__(self, nc: NATS, cfg: ClusterConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nc, self.cfg, self.clock = nc, cfg, clock
        self.subjects = Subjects(cfg.cluster)
        self.latest: dict[tuple[str, str], tuple[Envelope, float]] = {}
        self.invalid = 0
        self.started = clock()
        self._subs: list[Subscription] = []
        self._changed = asyncio.Event()

    async def start(self) -> None:
        s = self.subjects
        for kind, subject, model in (("heartbeat", s.hb(), Heartbeat),
                                     ("storage", s.storage(), StorageReport),
                                     ("mgmt", s.mgmt(), MgmtReport)):
            self._subs.append(await self.nc.subscribe(subject, cb=self._handler(kind, model)))
        self.started = self.clock()

    def _handler(self, kind: str, model: type[Envelope]) -> Callable[[Msg], Any]:
        async def on(msg: Msg) -> None:
            try:
                m = decode(model, msg.data)
                node = self.subjects.node_of(msg.subject)
                if m.cluster != self.cfg.cluster or m.node != node \
                        or not self.cfg.has_node(node):
                    raise InvalidMessage(f"{kind} from {m.node!r} on {msg.subject}")
            except (InvalidMessage, IndexError):
                self.invalid += 1
                return
            self.latest[(node, kind)] = (m, self.clock())
            self._changed.set()
        return on

    def is_complete(self) -> bool:
        return all((n.name, k) in self.latest for n in self.cfg.nodes for k in self.KINDS)

    async def wait_complete(self, timeout: float) -> None:
        """Until every node's three reports were heard, or ``timeout`` seconds."""
        deadline = self.clock() + timeout
        while not self.is_complete():
            left = deadline - self.clock()
            if left <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return

    def heard(self) -> dict[str, Heard]:
        now = self.clock()
        out: dict[str, Heard] = {}
        for (node, kind), (m, at) in self.latest.items():
            h = out.setdefault(node, Heard())
            if kind == "heartbeat" and isinstance(m, Heartbeat):
                h.heartbeat, h.heartbeat_age = m, now - at
            elif kind == "storage" and isinstance(m, StorageReport):
                h.storage, h.storage_age = m, now - at
            elif isinstance(m, MgmtReport):
                h.mgmt, h.mgmt_age = m, now - at
        return out

    def listened(self) -> float:
        return self.clock() - self.started

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may be closing already
                continue
        self._subs.clear()


async def read_kv(nc: NATS, cfg: ClusterConfig, timeout: float = READ_TIMEOUT) -> Read:
    """The leader, group and pair records; raises UnknownCluster without the bucket."""
    subj = Subjects(cfg.cluster)
    try:
        kv = await bounded(nc.jetstream().key_value(subj.kv_bucket), timeout)
    except NotFoundError:
        raise UnknownCluster(f"cluster {cfg.cluster} is unknown on these servers: no KV "
                             f"bucket {subj.kv_bucket} (has it ever run there?)") from None

    async def get(key: str) -> tuple[bytes, int] | None:
        try:
            e = await bounded(kv.get(key), timeout)
        except NotFoundError:
            return None
        return None if e.value is None or e.revision is None else (e.value, e.revision)

    def valid(model: type[Any], got: tuple[bytes, int] | None) -> tuple[Any, int] | None:
        try:
            return None if got is None else (decode(model, got[0]), got[1])
        except InvalidMessage:
            return None

    read = Read(leader=valid(LeaderRecord, await get(subj.LEADER_KEY)))
    for g in cfg.groups():
        if (rec := valid(GroupRecord, await get(subj.group_key(g)))) is not None:
            read.groups[g] = rec
    for p in cfg.pairs:
        if (pair := valid(PairRecord, await get(subj.pair_key(p.name)))) is not None:
            read.pairs[p.name] = pair[0]
    return read


def snapshot(cfg: ClusterConfig, read: Read, collector: Collector,
             version: str) -> ClusterStatus:
    return build(cfg, read, collector.heard(), collector.listened(), time.time(), version)


async def gather(nc: NATS, cfg: ClusterConfig, version: str,
                 listen: float | None = None) -> ClusterStatus:
    """One status: listen to the reports (until every node's were heard, or ``listen``
    seconds) while reading the KV."""
    c = Collector(nc, cfg)
    await c.start()
    try:
        read, _ = await asyncio.gather(
            read_kv(nc, cfg), c.wait_complete(listen_window(cfg) if listen is None else listen))
        return snapshot(cfg, read, c, version)
    finally:
        await c.stop()
