"""The load generator of ``bench/scale.py``: one process per shard of pairs (run as
``scale.py _generator``), whose simulated nodes publish their heartbeats, storage and
management reports in the project's formats, renew their leases in the KV within the
budget, answer the arbiter's commands (an acquisition included) and obey the
coordinator's requests (stats, silence, resume, stop) on ``CTL``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.scale_measure import pct
from vtlha.config import ClusterConfig, load_config
from vtlha.messages import (
    Ack,
    CheckResult,
    Command,
    GroupRecord,
    GroupStorage,
    Heartbeat,
    LeaseState,
    MgmtReport,
    PathHealth,
    StorageReport,
    StorageVerdict,
    decode,
    encode,
)
from vtlha.subjects import Subjects

SLOTS = 20  # the generator spreads each heartbeat interval over this many slots
CTL = "bench.scale.ctl"  # the coordinator's requests to the generators (bench only)


@dataclass
class Lease:
    """A group a simulated node owns: its epoch, the KV revision its lease holder last
    wrote or read, and the record a renewal writes (state held, renewed by the node)."""

    epoch: int
    revision: int
    body: bytes
    in_flight: bool = False


@dataclass
class SimNode:
    name: str
    pair: str
    index: int  # in the cluster file (spreads its reports over the cycles)
    devices: list[str]  # the devices of its pair (it probes each through two paths)
    renewed: bool
    subjects: Subjects
    interval: float
    owned: dict[str, Lease] = field(default_factory=dict)
    silenced: bool = False
    last_hb_wall: float = 0.0
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    hb_seq: int = 0
    st_seq: int = 0
    hb_tpl: dict[str, Any] = field(default_factory=dict)
    st_tpl: dict[str, Any] = field(default_factory=dict)
    mg_tpl: dict[str, Any] = field(default_factory=dict)

    def rebuild(self) -> None:
        """Templates of its three messages, built with the models (validated); each
        send only sets ``seq`` and ``sent_at``: the bytes are what ``encode`` makes."""
        c = self.subjects.cluster
        checks = [CheckResult(name=f"executor {s} alive", ok=True, fatal=True,
                              detail="answered in 1.4 ms")
                  for s in ("ip-manager", "storage-monitor")]
        leases = [LeaseState(group=g, epoch=le.epoch, phase="holding",
                             valid_for=round(self.interval * 2.7, 3),
                             age=round(self.interval * 0.3, 3))
                  for g, le in sorted(self.owned.items())]
        self.hb_tpl = Heartbeat(cluster=c, node=self.name, incarnation=self.incarnation,
                                seq=0, interval=self.interval, checks=checks,
                                storage=StorageVerdict(ok=True, age=0.05),
                                leases=leases).model_dump(mode="json")
        paths = [PathHealth(device=d, path=p, reachable=True, latency=0.0004)
                 for d in self.devices for p in (0, 1)]
        groups = [GroupStorage(group=g, epoch=le.epoch, state="served")
                  for g, le in sorted(self.owned.items()) if g.endswith("-data")]
        self.st_tpl = StorageReport(cluster=c, node=self.name, seq=0, paths=paths,
                                    groups=groups).model_dump(mode="json")
        self.mg_tpl = MgmtReport(cluster=c, node=self.name, link_up=True, gateway_ok=True,
                                 latency=0.0003, healthy=True, monitored=True,
                                 detail="gateway 10.3.255.254 answers").model_dump(mode="json")

    def heartbeat(self, wall: float) -> bytes:
        self.hb_tpl["seq"], self.hb_tpl["sent_at"] = self.hb_seq, wall
        self.hb_seq += 1
        return orjson.dumps(self.hb_tpl)

    def storage(self, wall: float) -> bytes:
        self.st_tpl["seq"], self.st_tpl["sent_at"] = self.st_seq, wall
        self.st_seq += 1
        return orjson.dumps(self.st_tpl)

    def mgmt(self, wall: float) -> bytes:
        self.mg_tpl["sent_at"] = wall
        return orjson.dumps(self.mg_tpl)


class Shard:
    """One generator process: the nodes of its pairs."""

    def __init__(self, cfg: ClusterConfig, shard: int, shards: int, renew_pairs: int) -> None:
        self.cfg = cfg
        self.t = cfg.timings
        self.subjects = Subjects(cfg.cluster)
        self.shard = shard
        self.nodes: dict[str, SimNode] = {}
        self.pair_of: dict[str, list[SimNode]] = {}
        index = {h: i for i, h in enumerate(cfg.hosts)}
        for k, pair in enumerate(cfg.pairs):
            if k % shards != shard:
                continue
            devs = [d for n in pair.nodes for d in n.groups.data.devices]
            members = [SimNode(n.name, pair.name, index[n.name], devs, renewed=k < renew_pairs,
                               subjects=self.subjects, interval=self.t.heartbeat_interval)
                       for n in pair.nodes]
            self.nodes |= {sn.name: sn for sn in members}
            self.pair_of[pair.name] = members
        self.stats: dict[str, float] = {k: 0 for k in (
            "hb", "storage", "mgmt", "renew_ok", "renew_late", "renew_conflict",
            "renew_error", "renew_skipped", "commands", "acquired", "overruns")}
        self.slot_late: list[float] = []
        self.renew_lat: list[float] = []
        self.gates: dict[tuple[str, str, int], asyncio.Event] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.stop = asyncio.Event()
        self.nc: Any = None
        self.kv: Any = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self, url: str) -> None:
        import nats

        self.nc = await nats.connect(url, name=f"scale-gen-{self.shard}",
                                     connect_timeout=5, max_reconnect_attempts=-1,
                                     pending_size=64 * 1024 * 1024)
        self.kv = await self.nc.jetstream(timeout=5).key_value(self.subjects.kv_bucket)
        for n in self.nodes.values():  # the records the coordinator wrote: held at home
            for g in (f"{n.name}-data", f"{n.name}-mgmt"):
                entry = await self.kv.get(self.subjects.group_key(g))
                rec = decode(GroupRecord, entry.value)
                n.owned[g] = Lease(rec.epoch, int(entry.revision), entry.value)
            n.rebuild()
        self._self_check()
        await self.nc.subscribe(self.subjects.cmd("*", "*"), cb=self.on_command)
        await self.nc.subscribe(f"{CTL}.{self.shard}", cb=self.on_ctl)

    def _self_check(self) -> None:
        """What is published is what the arbiter accepts (its own decode)."""
        n = next(iter(self.nodes.values()))
        w = time.time()
        decode(Heartbeat, n.heartbeat(w))
        decode(StorageReport, n.storage(w))
        decode(MgmtReport, n.mgmt(w))
        n.hb_seq = n.st_seq = 0

    # ---- publishing ------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        step = self.t.heartbeat_interval / SLOTS
        report_every = max(1, round(self.t.probe_interval / self.t.heartbeat_interval))
        order = sorted(self.nodes.values(), key=lambda n: n.index)
        slots = [order[i::SLOTS] for i in range(SLOTS)]
        due, k = loop.time(), 0
        while not self.stop.is_set():
            late = loop.time() - due
            self.slot_late.append(late)
            if late > self.t.heartbeat_interval:  # fell a whole interval behind: resync
                self.stats["overruns"] += 1
                due = loop.time()
            await self._slot(slots[k % SLOTS], k // SLOTS, report_every)
            k += 1
            due += step
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def _slot(self, nodes: list[SimNode], cycle: int, report_every: int) -> None:
        wall = time.time()
        pub = self.nc.publish
        for n in nodes:
            if n.silenced:
                continue
            await pub(self.subjects.hb(n.name), n.heartbeat(wall))
            n.last_hb_wall = wall
            self.stats["hb"] += 1
            if (cycle + n.index) % report_every == 0:
                await pub(self.subjects.storage(n.name), n.storage(wall))
                await pub(self.subjects.mgmt(n.name), n.mgmt(wall))
                self.stats["storage"] += 1
                self.stats["mgmt"] += 1
            if n.renewed:
                for g, lease in list(n.owned.items()):
                    self._renew(n, g, lease)

    # ---- the lease holder's side -----------------------------------------------------
    def _renew(self, n: SimNode, group: str, lease: Lease) -> None:
        if lease.in_flight:
            self.stats["renew_skipped"] += 1
            return
        lease.in_flight = True
        self._spawn(self._renewal(n, group, lease))

    async def _renewal(self, n: SimNode, group: str, lease: Lease) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        from vtlha.bounded import bounded

        key = self.subjects.group_key(group)
        t0 = time.perf_counter()
        try:
            rev = await bounded(self.kv.update(key, lease.body, last=lease.revision),
                                self.t.heartbeat_interval)
            lease.revision = max(lease.revision, int(rev))
            self.stats["renew_ok"] += 1
            self.renew_lat.append(time.perf_counter() - t0)
        except KeyWrongLastSequenceError:
            self.stats["renew_conflict"] += 1
            await self._after_conflict(n, group, lease)
        except TimeoutError:
            self.stats["renew_late"] += 1
            await self._after_conflict(n, group, lease)
        except Exception:
            self.stats["renew_error"] += 1
        finally:
            lease.in_flight = False

    async def _after_conflict(self, n: SimNode, group: str, lease: Lease) -> None:
        """As the lease holder: taken (owner or epoch changed) -> drop; else our own
        write committed late -> adopt its revision."""
        with contextlib.suppress(Exception):
            entry = await self.kv.get(self.subjects.group_key(group))
            rec = decode(GroupRecord, entry.value)
            if rec.owner != n.name or rec.epoch != lease.epoch:
                if n.owned.get(group) is lease:
                    del n.owned[group]
                    n.rebuild()
            else:
                lease.revision = max(lease.revision, int(entry.revision))

    async def on_command(self, msg: Any) -> None:
        """The node's services answering the arbiter (a silenced node does not)."""
        tok = msg.subject.split(".")
        n = self.nodes.get(tok[3]) if len(tok) == 5 else None
        if n is None or n.silenced or not msg.reply:
            return
        try:
            cmd = decode(Command, msg.data)
        except Exception:
            return
        if tok[4] == "heartbeat" and cmd.action == "acquire":
            self._acquire(n, cmd)
        self.stats["commands"] += 1
        ack = Ack(cluster=self.cfg.cluster, node=n.name, ok=True, reason=f"{cmd.action} done",
                  term=cmd.term, epoch=cmd.epoch, group=cmd.group, service=tok[4])
        await msg.respond(encode(ack))

    def _acquire(self, n: SimNode, cmd: Command) -> None:
        lease = n.owned.get(cmd.group)
        if lease is not None and lease.epoch >= cmd.epoch:
            return  # held already (a new active arbiter's reconciliation)
        key = (n.name, cmd.group, cmd.epoch)
        gate = self.gates.get(key)
        if gate is not None:
            if cmd.wait == 0:
                gate.set()  # every executor of the old owner released: open now
            return
        gate = self.gates[key] = asyncio.Event()
        wait = cmd.wait if cmd.wait is not None else self.t.lease_ttl + self.t.margin
        self._spawn(self._acquisition(n, cmd.group, cmd.epoch, gate, wait))

    async def _acquisition(self, n: SimNode, group: str, epoch: int, gate: asyncio.Event,
                           wait: float) -> None:
        """The acquire gate, then the first renewal: the record turns ``held``."""
        from nats.js.errors import KeyWrongLastSequenceError

        key = self.subjects.group_key(group)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gate.wait(), wait)
            for _ in range(5):
                if n.silenced:
                    return
                entry = await asyncio.wait_for(self.kv.get(key), 2.0)
                rec = decode(GroupRecord, entry.value)
                if rec.owner != n.name or rec.epoch != epoch:
                    return
                body = encode(rec.model_copy(update={"state": "held", "renewed_by": n.name}))
                try:
                    rev = await asyncio.wait_for(
                        self.kv.update(key, body, last=entry.revision), 2.0)
                except KeyWrongLastSequenceError:
                    continue
                self._take(n, group, Lease(epoch, int(rev), body))
                self.stats["acquired"] += 1
                return
        except Exception:
            return
        finally:
            self.gates.pop((n.name, group, epoch), None)

    def _take(self, n: SimNode, group: str, lease: Lease) -> None:
        for m in self.pair_of[n.pair]:
            if m is not n and m.owned.pop(group, None) is not None:
                m.rebuild()
        n.owned[group] = lease
        n.rebuild()

    # ---- the coordinator's requests --------------------------------------------------
    async def on_ctl(self, msg: Any) -> None:
        req = orjson.loads(msg.data)
        op = req.get("op")
        out: dict[str, Any] = {"ok": True}
        if op == "stats":
            out |= {**self.stats, "slot_late_p50": pct(self.slot_late, 0.5),
                    "slot_late_p99": pct(self.slot_late, 0.99),
                    "slot_late_max": max(self.slot_late, default=None),
                    "renew_p50": pct(self.renew_lat, 0.5),
                    "renew_p99": pct(self.renew_lat, 0.99), "pid": os.getpid()}
            if req.get("reset"):
                self.slot_late, self.renew_lat = [], []
        elif op == "silence":
            n = self.nodes[req["node"]]
            n.silenced = True
            out |= {"last_hb": n.last_hb_wall, "groups": sorted(n.owned)}
        elif op == "resume":
            n = self.nodes[req["node"]]
            n.incarnation, n.hb_seq, n.st_seq = uuid.uuid4().hex[:16], 0, 0
            n.rebuild()
            n.silenced = False
        elif op == "stop":
            self.stop.set()
        await msg.respond(orjson.dumps(out))


def generator_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scale.py _generator")
    ap.add_argument("--config", required=True)
    ap.add_argument("--nats", required=True)
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--shards", type=int, required=True)
    ap.add_argument("--renew-pairs", type=int, required=True)
    a = ap.parse_args(argv)
    cfg = load_config(a.config)
    import logging

    from vtlha.priority import raise_priority

    # the nodes are other machines: the arbiter's priority must not starve them here
    raise_priority(cfg.scheduling.nice, logging.getLogger("scale.generator"))

    async def _main() -> None:
        shard = Shard(cfg, a.shard, a.shards, a.renew_pairs)
        await shard.start(a.nats)
        runner = asyncio.ensure_future(shard.run())
        await shard.stop.wait()
        runner.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await shard.nc.drain()

    asyncio.run(_main())
