"""Scale: one active arbiter facing 10 to 2,000 pairs at 10 Hz heartbeats.

Per size N (pairs): a cluster file of N pairs (``pairs[]`` as ``examples/cluster.yaml``
declares them: two nodes, each with its data group — one floating address, two
devices with two paths from each node of the pair — and its management group; the
example's timings: ``heartbeat_interval`` 0.1 s, ``dead_after`` 0.3 s); **one**
nats-server with JetStream (``sync_interval: always``; the KV and the event stream R1 —
not a deployment's three servers, so not partition-safe); the real ``vtlha-arbiter``
process as the witness's (and only, so active) arbiter; and a load generator.

What is real and what is simulated:

- the arbiter: the real service, the worktree's code, unchanged (its process is what
  is measured);
- the traffic it receives: every node's heartbeats (``Heartbeat``, every
  ``heartbeat_interval``), storage reports (``StorageReport``) and management-path
  reports (``MgmtReport``, both every ``probe_interval``), built with vtlha's own message
  models and subjects and published on the real bus by the load generator (one or more
  asyncio processes, a shard of pairs each) — the nodes' services themselves do not
  run: no heartbeat, storage-monitor or ip-manager process;
- the KV: real. The group records are written before the arbiter starts (every group
  held by its home node, epoch 1, as after a first assignment). The lease holders'
  renewals (compare-and-set of ``group.<g>`` every ``heartbeat_interval``, the record a
  real lease holder writes) are **simulated by the generator and written to the real
  KV only within a budget** (``--renew-budget``, default 6,400/s: what
  ``bench/kv_capacity.py`` measured this KV sustains here): every node of the first
  pairs up to the budget is renewed at 10 Hz, the rest are never renewed (their records
  stay as written). Beyond that budget **the KV, not the arbiter, is the limit**: at
  10 Hz a cluster needs 20 renewals/s a node;
- the nodes' side of a move (command acks; the lease holder's acquisition: the
  ``held`` write after the arbiter's gate, then renewals; the storage report saying the
  data group is served at its epoch) is simulated by the generator in the project's
  formats (``Command`` -> ``Ack``, ``GroupRecord``, ``StorageReport``).

Measured per size, after the arbiter is active and its reconciliation is over:

- steady state (``--window`` s, no silences): the arbiter's CPU (share of one core,
  ``utime + stime`` from ``/proc``), its largest RSS, its event-loop lag (p50/p99 from
  its own histogram ``vtlha_event_loop_lag_seconds``, interpolated within buckets as
  Prometheus' ``histogram_quantile`` does), the heartbeats it validated against those
  published, the decisions it made (any is a false alarm here), what the generator and
  nats-server cost, the machine's load;
- detection (``--silences`` K): one random node at a time (a new one every
  ``--silence-every`` s, each of another pair) goes silent — heartbeats, reports,
  renewals and command answers all stop, as when a node dies — until the arbiter has
  declared it down and claimed what it owned (or ``--detect-bound`` s), then comes back
  with a new incarnation. Detection latency = the ``node.down`` event's ``sent_at``
  (stamped when the arbiter decided, read from the event stream) minus when the node's
  last heartbeat was published; claim latency = the takeover's claim in the KV
  (``GroupRecord.since``, stamped by the arbiter) minus the same. The issue's target:
  1,000 pairs at 10 Hz, detection p99 <= (k + 1) x heartbeat_interval with k =
  dead_after / heartbeat_interval (0.4 s here), on <= 50 % of one core, cost linear or
  better.

Prints a table, writes JSON (``bench/results/scale-<time>.json``; after each size also
``scale-partial.json``, which ``--resume`` continues) and plots arbiter CPU and
detection latency against pairs (``--plot``, default ``docs/img/scale.png``).

    .venv/bin/python bench/scale.py [--pairs 10,100,1000,2000] [--silences 20]
        [--window 20] [--renew-budget 6400] [--generators auto] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, save_results  # noqa: E402
from vtlha.config import ClusterConfig, load_config  # noqa: E402
from vtlha.iscsi.scsi import node_tag  # noqa: E402
from vtlha.messages import (  # noqa: E402
    Ack,
    CheckResult,
    Command,
    Event,
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
from vtlha.subjects import Subjects  # noqa: E402

CLUSTER = "scale"
WITNESS = "witness"
GROUPS_PER_NODE = 2
SLOTS = 20  # the generator spreads each heartbeat interval over this many slots
CTL = "bench.scale.ctl"  # the coordinator's requests to the generators (bench only)
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
#: the arbiter's own services path, so that its process runs this tree's code
SERVICE_PATHS = [ROOT, ROOT / "services" / "arbiter"]
MSG_LIMIT = 64 * 1024  # vtlha.messages.MAX_MESSAGE_BYTES: what decode accepts by default


def child_env() -> dict[str, str]:
    """The environment of every child: this tree's code first (the venv's editable
    install may point at another checkout)."""
    path = os.pathsep.join(str(p) for p in SERVICE_PATHS)
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{old}" if old else path}


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of xs; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# ---- the cluster file ------------------------------------------------------------


def node_names(n_pairs: int) -> list[tuple[str, str, str]]:
    """(pair, node a, node b) for each pair; a node whose SCSI reservation key tag (3
    bytes of a hash, vtlha.iscsi.scsi.node_tag) collides with an earlier one's is renamed,
    as an operator would have to (the config refuses such a cluster)."""
    tags: set[int] = set()
    out = []

    def name(base: str) -> str:
        cand, k = base, 0
        while node_tag(CLUSTER, cand) in tags:
            k += 1
            cand = f"{base}x{k}"
        tags.add(node_tag(CLUSTER, cand))
        return cand

    for p in range(1, n_pairs + 1):
        out.append((f"pair-{p:04d}", name(f"n{p:04d}a"), name(f"n{p:04d}b")))
    return out


def _ip(net: int, i: int, prefix: int) -> str:
    return f"10.{net}.{i // 250}.{i % 250 + 1}/{prefix}"


def cluster_file(n_pairs: int, work: Path, client_port: int, monitor_port: int) -> Path:
    """Write the cluster file of ``n_pairs`` pairs; its timings are the example's."""
    example = yaml.safe_load((ROOT / "examples" / "cluster.yaml").read_text())
    pairs, devices = [], {}
    i = 0
    for pair, a, b in node_names(n_pairs):
        nodes = []
        for n in (a, b):
            devs = [f"d{n}{k}" for k in range(2)]
            for d in devs:
                devices[d] = {"backing": f"san/{d}.img", "paths": {a: 2, b: 2}}
            nodes.append({
                "name": n, "service_ip": _ip(1, i, 16), "mgmt_ip": _ip(3, i, 16),
                "groups": {"data": {"addresses": [_ip(2, i, 32)], "devices": devs},
                           "mgmt": {"addresses": [_ip(4, i, 32)], "gateway": "10.3.255.254"}},
                "checks": []})
            i += 1
        pairs.append({"name": pair, "failback": "manual", "nodes": nodes})
    raw = {
        "cluster": CLUSTER, "timings": example["timings"],
        "nats": {"servers": [WITNESS], "listen": {WITNESS: {
            "host": "127.0.0.1", "client_port": client_port, "cluster_port": client_port + 1,
            "monitor_port": monitor_port}}},
        "witness": {"host": WITNESS, "service_ip": "10.5.0.1/16"},
        "state_dir": str(work / "state"), "pairs": pairs,
        "san": {"host": WITNESS, "port": 3260}, "devices": devices,
    }
    path = work / "cluster.yaml"
    path.write_text(yaml.dump(raw, Dumper=yaml.CSafeDumper, sort_keys=False))
    return path


def renewed_pairs(cfg: ClusterConfig, budget: float) -> int:
    """How many pairs (from the first) the renewal budget carries at full rate."""
    per_node = GROUPS_PER_NODE / cfg.timings.heartbeat_interval
    return min(len(cfg.pairs), int(budget // (2 * per_node)))


# ---- the load generator: one process per shard of pairs ---------------------------


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


# ---- the coordinator ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(f[11]) + int(f[12])) / TICK


def rss_mb(pid: int) -> float | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return None


def parse_metrics(text: str, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{metric name: {label string: value}} for the named metrics (a plain scan: the
    arbiter's page has a few lines per node and group)."""
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for line in text.splitlines():
        if not line.startswith(names):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        if name in out:
            with contextlib.suppress(ValueError):
                out[name][labels.rstrip("}")] = float(value)
    return out


def histogram_quantile(q: float, before: dict[str, float], after: dict[str, float]
                       ) -> float | None:
    """Prometheus' histogram_quantile over the buckets' increase between two scrapes."""
    buckets = []
    for labels, v in after.items():
        le = labels.split('le="')[1].split('"')[0]
        bound = math.inf if le == "+Inf" else float(le)
        buckets.append((bound, v - before.get(labels, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank, lo, below = q * total, 0.0, 0.0
    for bound, cum in buckets:
        if cum >= rank:
            if math.isinf(bound):
                return lo
            span = cum - below
            return lo + (bound - lo) * ((rank - below) / span if span else 1.0)
        lo, below = bound, cum
    return lo


class Procs:
    """Every child process of one size, each in its own session; all stopped at the
    end whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=child_env())
        log.close()
        self.children[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.children.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def stop_all(self) -> None:
        for name in list(self.children):
            self.stop(name, 5.0)


@dataclass
class Silence:
    node: str
    renewed: bool
    groups: list[str]
    last_hb: float
    down: asyncio.Future[tuple[float, float]]  # (sent_at, seen)
    claims: dict[str, asyncio.Future[tuple[float, float]]]  # group -> (since, seen)


class Coordinator:
    """One size: start everything, measure, stop everything."""

    def __init__(self, n_pairs: int, args: argparse.Namespace, work: Path) -> None:
        self.n_pairs = n_pairs
        self.args = args
        self.work = work
        self.procs = Procs(work)
        self.subjects = Subjects(CLUSTER)
        self.cfg: ClusterConfig
        self.nc: Any = None
        self.events: list[dict[str, Any]] = []
        self.silences: dict[str, Silence] = {}
        self.ever_silenced: set[str] = set()
        self.http_port = 0
        self.nats: Any = None
        self.shard_of: dict[str, int] = {}
        self.t_start = time.monotonic()

    def say(self, what: str) -> None:
        print(f"  [{self.n_pairs} pairs, {time.monotonic() - self.t_start:6.1f} s] {what}",
              flush=True)

    # ---- set-up ------------------------------------------------------------------------
    async def setup(self) -> dict[str, Any]:
        from vtlha_lab.natsserver import NatsServer, NatsServerSpec
        from vtlha_lab.ports import free_block

        base = free_block(4)
        client, monitor, self.http_port = base, base + 2, base + 3
        t0 = time.monotonic()
        path = cluster_file(self.n_pairs, self.work, client, monitor)
        t1 = time.monotonic()
        self.cfg = load_config(path)  # what every service does at start
        info: dict[str, Any] = {"config_bytes": path.stat().st_size,
                                "config_write_s": round(t1 - t0, 2),
                                "config_load_s": round(time.monotonic() - t1, 2)}
        self.say(f"cluster file: {len(self.cfg.nodes)} nodes, "
                 f"{info['config_bytes'] / 2**20:.1f} MB, load_config {info['config_load_s']} s")
        self.nats = NatsServer(NatsServerSpec(WITNESS, client, monitor, self.work / "nats" / "js"),
                               self.work / "nats-server.log", nice=self.cfg.scheduling.nice)
        self.nats.start()
        self.nats.wait_ready(30)
        await self._prepare_kv()
        return info

    async def _prepare_kv(self) -> None:
        """The bucket and the stream as the arbiter makes them (the same functions), and
        every group held by its home node at epoch 1."""
        import nats

        from vtlha import bus

        self.nc = await nats.connect(self.nats.spec.url, name="scale-coordinator",
                                     connect_timeout=5, max_reconnect_attempts=-1)
        js = self.nc.jetstream(timeout=10)
        n = self.cfg.nats
        kv = await bus.ensure_kv(js, self.subjects, n.stream_replicas)
        await bus.ensure_events_stream(js, self.subjects, n.stream_replicas, n.events_max_bytes,
                                       n.events_max_age, n.events_duplicate_window,
                                       n.stream_max_msgs)
        sem = asyncio.Semaphore(64)

        async def put(group: str, home: str) -> None:
            rec = GroupRecord(owner=home, term=1, epoch=1, state="held", renewed_by=home)
            async with sem:
                await kv.put(self.subjects.group_key(group), encode(rec))

        t0 = time.monotonic()
        await asyncio.gather(*(put(g, h) for g, (h, _) in self.cfg.groups().items()))
        self.say(f"KV: {len(self.cfg.groups())} group records written in "
                 f"{time.monotonic() - t0:.1f} s")

    def generators(self) -> int:
        if self.args.generators != "auto":
            return max(1, int(self.args.generators))
        nodes = 2 * self.n_pairs
        per: int = self.args.nodes_per_generator
        return max(1, min(os.cpu_count() or 1, math.ceil(nodes / per)))

    async def start_generators(self) -> dict[str, Any]:
        k = self.generators()
        rp = renewed_pairs(self.cfg, self.args.renew_budget)
        for i, p in enumerate(self.cfg.pairs):
            for nd in p.nodes:
                self.shard_of[nd.name] = i % k
        for s in range(k):
            self.procs.spawn(f"generator-{s}", [
                sys.executable, str(SCRIPT), "_generator",
                "--config", str(self.work / "cluster.yaml"), "--nats", self.nats.spec.url,
                "--shard", str(s), "--shards", str(k), "--renew-pairs", str(rp)])
        deadline = time.monotonic() + 60 + self.n_pairs / 20
        for s in range(k):
            while True:
                try:
                    await self.ctl(s, {"op": "stats"}, timeout=2.0)
                    break
                except Exception:
                    if time.monotonic() > deadline or self.procs.children[
                            f"generator-{s}"].poll() is not None:
                        raise RuntimeError(f"generator {s} did not start; see "
                                           f"{self.work}/generator-{s}.log") from None
                    await asyncio.sleep(0.5)
        renew_due = rp * 2 * GROUPS_PER_NODE / self.cfg.timings.heartbeat_interval
        self.say(f"{k} generator process(es) publishing; {rp} of {self.n_pairs} pairs renewed "
                 f"in the KV ({renew_due:.0f} renewals/s due)")
        return {"generators": k, "renewed_pairs": rp, "renewed_nodes": 2 * rp,
                "renewals_due_per_s": renew_due}

    async def ctl(self, shard: int, req: dict[str, Any], timeout: float = 5.0) -> Any:
        reply = await self.nc.request(f"{CTL}.{shard}", orjson.dumps(req), timeout=timeout)
        return orjson.loads(reply.data)

    async def gen_stats(self, reset: bool = False) -> list[dict[str, Any]]:
        return [await self.ctl(s, {"op": "stats", "reset": reset}, timeout=10.0)
                for s in range(self.generators())]

    async def follow_events(self) -> None:
        """Every event the stream stores, as it is stored (an ordered consumer; read raw:
        a decision event carries the whole snapshot and may exceed what ``decode``
        accepts by default, which is recorded)."""
        from nats.js.api import ConsumerConfig, DeliverPolicy

        async def on_event(msg: Any) -> None:
            seen = time.time()
            try:
                ev = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                return
            kind = ev.get("kind")
            rec = {"kind": kind, "old": ev.get("old"), "new": ev.get("new"),
                   "sent_at": ev.get("sent_at"), "seen": seen, "bytes": len(msg.data)}
            self.events.append(rec)
            if kind == "node.down":
                try:  # the real format (whatever its size)
                    decode(Event, msg.data, max_bytes=len(msg.data) + 1)
                except Exception:
                    rec["invalid"] = True
                s = self.silences.get(rec["old"])
                if s is not None and not s.down.done() and rec["sent_at"] >= s.last_hb:
                    s.down.set_result((rec["sent_at"], seen))

        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        await self.nc.jetstream().subscribe(self.subjects.events_all, ordered_consumer=True,
                                            config=cfg, cb=on_event)

    # ---- the arbiter -------------------------------------------------------------------
    def start_arbiter(self) -> subprocess.Popen[bytes]:
        args = ["--config", str(self.work / "cluster.yaml"), "--node", WITNESS,
                "--nats", self.nats.spec.url, "--state-dir", str(self.work / "state"),
                "--http-port", str(self.http_port)]
        if self.args.profile:
            argv = [sys.executable, str(SCRIPT), "_arbiter_profiled",
                    str(self.work / "arbiter.prof"), *args]
        else:
            argv = [str(Path(sys.executable).parent / "vtlha-arbiter"), *args]
        return self.procs.spawn("arbiter", argv)

    async def http(self, path: str, timeout: float = 30.0) -> tuple[int, bytes, float]:
        import aiohttp

        t0 = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
                s.get(f"http://127.0.0.1:{self.http_port}{path}") as r:
            return r.status, await r.read(), time.monotonic() - t0

    async def wait_settled(self) -> dict[str, Any]:
        """Until the arbiter acts, has reconciled every group (its log says so) and has
        no move in flight (bounded by --settle-max); the time of each step from its
        start."""
        t0 = time.monotonic()
        out: dict[str, Any] = {"ready_s": None, "acting_s": None, "reconciled_s": None,
                               "settled_s": None}
        deadline = t0 + self.args.settle_max
        log = LogScan(self.work / "arbiter.log")
        arb = self.procs.children["arbiter"]
        while time.monotonic() < deadline:
            if arb.poll() is not None:
                out["exited"] = {"code": arb.returncode,
                                 "after_s": round(time.monotonic() - t0, 1),
                                 "cpu_share": round((out.get("cpu_s") or 0.0)
                                                    / (time.monotonic() - t0), 3),
                                 **start_failure(self.work / "arbiter.log")}
                self.say(f"the arbiter EXITED during its start: {out['exited']}")
                return out
            out["cpu_s"] = cpu_seconds(arb.pid)
            if out["reconciled_s"] is None and log.has('"reconciled every group"'):
                out["reconciled_s"] = round(time.monotonic() - t0, 1)
                self.say("arbiter reconciled every group")
            with contextlib.suppress(Exception):
                status, body, _ = await self.http("/status", timeout=20)
                st = orjson.loads(body) if status == 200 else {}
                out["ready_s"] = out["ready_s"] or (round(time.monotonic() - t0, 1)
                                                    if status == 200 else None)
                if st.get("acting") and out["acting_s"] is None:
                    out["acting_s"] = round(time.monotonic() - t0, 1)
                    self.say(f"arbiter acting (term {st.get('term')})")
                if st.get("acting") and out["reconciled_s"] is not None \
                        and not st.get("in_flight"):
                    out["settled_s"] = round(time.monotonic() - t0, 1)
                    break
            await asyncio.sleep(2.0)
        self.say("arbiter settled" if out["settled_s"] is not None else
                 f"arbiter NOT settled within {self.args.settle_max:g} s (measuring anyway)")
        return out

    # ---- measuring ------------------------------------------------------------------------
    async def scrape(self) -> tuple[dict[str, dict[str, float]], float, int]:
        _, body, took = await self.http("/metrics", timeout=60)
        names = ("vtlha_event_loop_lag_seconds_bucket", "vtlha_heartbeats_received_total",
                 "vtlha_decisions_total", "vtlha_arbiter_term", "vtlha_arbiter_active",
                 "vtlha_invalid_messages_total")
        return parse_metrics(body.decode(), names), took, len(body)

    async def sample(self, seconds: float, extra: Any = None) -> dict[str, Any]:
        """CPU and RSS of the arbiter, nats-server and the generators over ``seconds``
        (while ``extra``, a coroutine, runs: the silences), with the arbiter's metrics
        before and after."""
        arb = self.procs.children["arbiter"].pid
        gens = [p.pid for n, p in self.procs.children.items() if n.startswith("generator")]
        assert self.nats.proc is not None
        pids = {"arbiter": [arb], "nats": [self.nats.proc.pid], "generators": gens}
        m0, scrape_s, scrape_bytes = await self.scrape()
        g0 = await self.gen_stats(reset=True)
        cpu0 = {k: [cpu_seconds(p) or 0.0 for p in v] for k, v in pids.items()}
        t0, peak = time.monotonic(), 0.0
        task = asyncio.ensure_future(extra) if extra is not None else None
        while time.monotonic() - t0 < seconds or (task is not None and not task.done()):
            peak = max(peak, rss_mb(arb) or 0.0)
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - t0
        cpu = {k: sum((cpu_seconds(p) or 0.0) - c for p, c in zip(v, cpu0[k], strict=True))
               / elapsed for k, v in pids.items()}
        g1 = await self.gen_stats()
        m1, scrape2_s, _ = await self.scrape()
        lag0 = m0["vtlha_event_loop_lag_seconds_bucket"]
        lag1 = m1["vtlha_event_loop_lag_seconds_bucket"]
        received = sum(m1["vtlha_heartbeats_received_total"].values()) - sum(
            m0["vtlha_heartbeats_received_total"].values())

        def gsum(key: str) -> float:
            return float(sum(b[key] - a[key] for a, b in zip(g0, g1, strict=True)))

        decisions = {k.split('"')[1]: v - m0["vtlha_decisions_total"].get(k, 0.0)
                     for k, v in m1["vtlha_decisions_total"].items()
                     if v - m0["vtlha_decisions_total"].get(k, 0.0) > 0}
        out = {
            "seconds": round(elapsed, 1),
            "arbiter_cpu": round(cpu["arbiter"], 3), "arbiter_rss_mb": round(peak, 1),
            "nats_cpu": round(cpu["nats"], 3), "generators_cpu": round(cpu["generators"], 3),
            "lag_p50_s": histogram_quantile(0.5, lag0, lag1),
            "lag_p99_s": histogram_quantile(0.99, lag0, lag1),
            "hb_published_per_s": round(gsum("hb") / elapsed, 1),
            "hb_validated_per_s": round(received / elapsed, 1),
            "reports_published_per_s": round((gsum("storage") + gsum("mgmt")) / elapsed, 1),
            "renewals_ok_per_s": round(gsum("renew_ok") / elapsed, 1),
            "renewals_late": int(gsum("renew_late")),
            "renewals_skipped": int(gsum("renew_skipped")),
            "renewals_conflict": int(gsum("renew_conflict")),
            "renewals_error": int(gsum("renew_error")),
            "renew_p99_s": max((g["renew_p99"] or 0.0 for g in g1), default=None),
            "generator_slot_late_p99_s": max((g["slot_late_p99"] or 0.0 for g in g1),
                                             default=None),
            "generator_overruns": int(gsum("overruns")),
            "decisions": decisions,
            "term_changed": m1["vtlha_arbiter_term"].get("", 0) != m0["vtlha_arbiter_term"].get(
                "", 0),
            "active_at_start": m0["vtlha_arbiter_active"].get("", 0.0) == 1.0,
            "active_at_end": m1["vtlha_arbiter_active"].get("", 0.0) == 1.0,
            "metrics_scrape_s": round(max(scrape_s, scrape2_s), 2),
            "metrics_bytes": scrape_bytes, "load_1min": os.getloadavg()[0],
        }
        if task is not None:
            out["result"] = task.result()
        return out

    # ---- silences -------------------------------------------------------------------------
    async def silence(self, node: str) -> dict[str, Any]:
        """One node goes silent until it is declared down and what it owned is claimed
        (or the bound), then comes back."""
        loop = asyncio.get_running_loop()
        shard = self.shard_of[node]
        rep = await self.ctl(shard, {"op": "silence", "node": node})
        groups = rep["groups"]
        s = Silence(node, self._renewed(node), groups, rep["last_hb"], loop.create_future(),
                    {g: loop.create_future() for g in groups})
        self.silences[node] = s
        self.ever_silenced.add(node)
        subs = []
        for g in groups:
            subs.append(await self.nc.subscribe(self.subjects.kv_subject(
                self.subjects.group_key(g)), cb=self._claim_cb(s, g)))
        await asyncio.wait([s.down, *s.claims.values()], timeout=self.args.detect_bound)
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self.ctl(shard, {"op": "resume", "node": node})
        del self.silences[node]
        first_claim = min((f.result()[0] for f in s.claims.values() if f.done()), default=None)
        return {"node": node, "renewed": s.renewed, "groups": groups, "last_hb": s.last_hb,
                "down_s": s.down.result()[0] - s.last_hb if s.down.done() else None,
                "down_seen_s": s.down.result()[1] - s.last_hb if s.down.done() else None,
                "claim_s": first_claim - s.last_hb if first_claim is not None else None,
                "claimed": sum(f.done() for f in s.claims.values())}

    async def _silence_then_free(self, node: str, pair: str,
                                 busy: dict[str, float]) -> dict[str, Any]:
        try:
            return await self.silence(node)
        finally:
            busy[pair] = time.monotonic() + 2.0

    def _claim_cb(self, s: Silence, group: str) -> Any:
        async def cb(msg: Any) -> None:
            fut = s.claims[group]
            if fut.done() or not msg.data:
                return
            with contextlib.suppress(Exception):
                rec = decode(GroupRecord, msg.data)
                if rec.owner != s.node:
                    fut.set_result((rec.since, time.time()))
        return cb

    def _renewed(self, node: str) -> bool:
        rp = renewed_pairs(self.cfg, self.args.renew_budget)
        return any(nd.name == node for p in self.cfg.pairs[:rp] for nd in p.nodes)

    async def silences_run(self) -> list[dict[str, Any]]:
        """``--silences`` silences, a new one every ``--silence-every`` s, each of a node
        of a pair nobody else in it is silent (nor came back in the last 2 s)."""
        rng = random.Random(self.args.seed * 1000 + self.n_pairs)
        pairs = list(self.cfg.pairs)
        busy: dict[str, float] = {}  # pair -> until when it is left alone
        tasks = []
        for i in range(self.args.silences):
            now = time.monotonic()
            free = [p for p in pairs if busy.get(p.name, 0.0) < now]
            if not free:
                await asyncio.sleep(self.args.silence_every)
                continue
            p = rng.choice(free)
            node = rng.choice(p.nodes).name
            busy[p.name] = math.inf
            tasks.append(asyncio.ensure_future(self._silence_then_free(node, p.name, busy)))
            if (i + 1) % 5 == 0:
                self.say(f"{i + 1} of {self.args.silences} silences started")
            await asyncio.sleep(self.args.silence_every)
        return list(await asyncio.gather(*tasks))

    # ---- one size, end to end ----------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pairs": self.n_pairs}
        out |= await self.setup()
        out |= {"nodes": len(self.cfg.nodes), "groups": len(self.cfg.groups())}
        out |= await self.start_generators()
        await self.follow_events()
        self.start_arbiter()
        self.say("arbiter started")
        out["startup"] = await self.wait_settled()
        if "exited" in out["startup"]:
            return out  # nothing to measure: the table says why
        await asyncio.sleep(self.args.settle)
        n_ev = len(self.events)
        self.say(f"steady state: measuring {self.args.window:g} s")
        try:
            out["steady"] = await self.sample(self.args.window)
        except Exception:
            arb = self.procs.children["arbiter"]
            if arb.poll() is None:
                raise
            # it died after the settle wait (its start failed late): say so
            out["startup"]["exited"] = {"code": arb.returncode, "after_s": None,
                                        "cpu_share": None,
                                        **start_failure(self.work / "arbiter.log")}
            self.say(f"the arbiter EXITED: {out['startup']['exited']}")
            return out
        out["steady"]["events"] = self._kinds(self.events[n_ev:])
        self.say(f"steady: arbiter {out['steady']['arbiter_cpu'] * 100:.0f} % of a core, "
                 f"lag p99 {fmt_s(out['steady']['lag_p99_s'])}")
        n_ev = len(self.events)
        self.say(f"{self.args.silences} silences")
        sil = await self.sample(0.0, self.silences_run())
        rows = sil.pop("result")
        evs = self.events[n_ev:]
        sil["events"] = self._kinds(evs)
        sil["false_downs"] = sum(1 for e in evs if e["kind"] == "node.down"
                                 and e["old"] not in self.ever_silenced)
        downs = [e["bytes"] for e in self.events if e["kind"] == "node.down"]
        sil["node_down_event_bytes"] = max(downs, default=None)
        # what vtlha's own readers (decode's default limit: vtlha events) would skip
        sil["node_down_over_64k"] = sum(1 for b in downs if b > MSG_LIMIT)
        sil["silences"] = rows
        sil |= summarise(rows)
        out["silence"] = sil
        out["arbiter_log"] = log_summary(self.work / "arbiter.log")
        self.say(f"detection p50 {fmt_s(sil['down_p50_s'])} p99 {fmt_s(sil['down_p99_s'])} "
                 f"({sil['detected']} of {len(rows)} seen as node.down)")
        return out

    def _kinds(self, evs: list[dict[str, Any]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in evs:
            out[e["kind"]] = out.get(e["kind"], 0) + 1
        return out

    async def close(self) -> None:
        for s in range(len([n for n in self.procs.children if n.startswith("generator")])):
            with contextlib.suppress(Exception):
                await self.ctl(s, {"op": "stop"}, timeout=2.0)
        self.procs.stop("arbiter", 20.0)  # SIGTERM: a profile is written at exit
        if self.args.profile and (self.work / "arbiter.prof").exists():
            dest = RESULTS / f"scale-arbiter-{self.n_pairs}-{time.strftime('%Y%m%d-%H%M%S')}.prof"
            RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.work / "arbiter.prof", dest)
            print_profile(dest)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.procs.stop_all()
        if self.nats is not None:
            self.nats.stop()


class LogScan:
    """Looks for a line in a growing log file, reading only what was added."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.tail = b""

    def has(self, needle: str) -> bool:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return False
        self.offset += len(data)
        chunk, self.tail = self.tail + data, data[-len(needle):]
        return needle.encode() in chunk


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    down = [r["down_s"] for r in rows if r["down_s"] is not None]
    claim = [r["claim_s"] for r in rows if r["claim_s"] is not None]
    return {"detected": len(down), "down_p50_s": pct(down, 0.5), "down_p99_s": pct(down, 0.99),
            "down_max_s": max(down, default=None),
            "claimed": len(claim), "claim_p50_s": pct(claim, 0.5),
            "claim_p99_s": pct(claim, 0.99), "claim_max_s": max(claim, default=None)}


def start_failure(path: Path) -> dict[str, Any]:
    """Why the arbiter's start failed, from its log: the error, the innermost frame of
    vtl-ha's own code it came from, what its start was waiting for (``bus.retry_js``)
    and how often it had retried that."""
    error, where, what, retries = None, None, None, 0
    first, failed = None, None
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if first is None and line.startswith("{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    first = float(orjson.loads(line).get("ts"))
            if '"jetstream not ready, retrying"' not in line and '"start failed"' not in line:
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                rec = orjson.loads(line)
                if rec.get("msg") == "jetstream not ready, retrying":
                    retries, what = retries + 1, rec.get("what")
                    continue
                error, failed = rec.get("error"), rec.get("ts")
                frames = [ln.strip() for ln in str(rec.get("exc", "")).splitlines()
                          if ln.strip().startswith("File ") and "vtlha" in ln
                          and "site-packages" not in ln and "bounded.py" not in ln]
                if frames:
                    f = frames[-1].split('"')
                    where = f"{Path(f[1]).name}{f[2].replace(', line ', ':').split(',')[0]}" \
                        f" in {frames[-1].rsplit(' in ', 1)[-1]}"
    return {"error": f"{error} at {where}" if where else error, "waiting_for": what,
            "jetstream_retries": retries,
            "failed_after_s": round(failed - first, 1) if first and failed else None}


def log_summary(path: Path) -> dict[str, Any]:
    """The arbiter's own warnings about itself: ticks that overran (by loop) and the
    worst overrun."""
    overruns: dict[str, int] = {}
    worst = 0.0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if '"tick overran"' not in line:
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                rec = orjson.loads(line)
                overruns[rec.get("loop", "?")] = overruns.get(rec.get("loop", "?"), 0) + 1
                worst = max(worst, float(rec.get("late_s", 0.0)))
    return {"tick_overruns": overruns, "worst_overrun_s": worst}


def print_profile(path: Path) -> None:
    import io
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumulative").print_stats(40)
    text = buf.getvalue()
    path.with_suffix(".txt").write_text(text)
    print(f"  profile: {path} (top functions: {path.with_suffix('.txt')})")
    print("\n".join(text.splitlines()[:60]))


def arbiter_profiled(argv: list[str]) -> None:
    """The real arbiter's entry point under cProfile (``--profile``); the profile is
    written when it exits (SIGTERM)."""
    import cProfile

    out, rest = argv[0], argv[1:]
    from vtlha_arbiter.main import main as arbiter_main

    prof = cProfile.Profile()
    prof.enable()
    try:
        arbiter_main(rest)
    except SystemExit:
        pass
    finally:
        prof.disable()
        prof.dump_stats(out)


# ---- output ----------------------------------------------------------------------------


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def table(rows: list[dict[str, Any]], target: float, interval: float) -> None:
    print()
    print(f"{'pairs':>6} {'nodes':>6} {'gen':>4} {'renewed':>8} {'arb CPU':>8} {'RSS MB':>7} "
          f"{'lag p99':>8} {'hb pub':>7} {'hb ok':>6} {'detect p50':>11} {'p99':>8} "
          f"{'claim p99':>10} {'found':>6} {'false':>6} {'active':>7} {'load':>5}")
    for r in rows:
        if "exited" in r["startup"]:
            ex = r["startup"]["exited"]
            print(f"{r['pairs']:>6} {r['nodes']:>6} {r['generators']:>4} {r['renewed_nodes']:>8}"
                  f"  the arbiter EXITED {ex.get('failed_after_s') or ex['after_s']} s into its "
                  f"start: {ex['error']}, waiting for {ex.get('waiting_for')} "
                  f"({(ex['cpu_share'] or 0) * 100:.0f} % of a core until then)")
            continue
        st, si = r["steady"], r["silence"]
        kept = st["hb_validated_per_s"] / st["hb_published_per_s"] \
            if st["hb_published_per_s"] else 0.0
        pub = st["hb_published_per_s"] * interval / r["nodes"]  # of the heartbeats due
        print(f"{r['pairs']:>6} {r['nodes']:>6} {r['generators']:>4} {r['renewed_nodes']:>8} "
              f"{st['arbiter_cpu'] * 100:>7.0f}% {st['arbiter_rss_mb']:>7.1f} "
              f"{fmt_s(st['lag_p99_s']):>8} {pub * 100:>6.0f}% {kept * 100:>5.0f}% "
              f"{fmt_s(si['down_p50_s']):>11} {fmt_s(si['down_p99_s']):>8} "
              f"{fmt_s(si['claim_p99_s']):>10} "
              f"{si['detected']:>3}/{len(si['silences']):<2} {si['false_downs']:>6} "
              f"{acting(st):>7} {st['load_1min']:>5.1f}")
    print("(hb pub: heartbeats the generator published, of those due; hb ok: of those, "
          "the ones the arbiter validated)")
    print(f"\ntarget (issue 20): 1,000 pairs at 10 Hz, detection p99 <= {fmt_s(target)} "
          f"((k+1) x heartbeat_interval), arbiter <= 50 % of one core, cost linear or better")
    steady = [(r["pairs"], r["steady"]["arbiter_cpu"]) for r in rows if "steady" in r]
    for (n1, c1), (n2, c2) in itertools.pairwise(steady):
        if c1 > 0 and c2 > 0:
            print(f"  CPU {n1} -> {n2} pairs: x{c2 / c1:.1f} for x{n2 / n1:.0f} pairs "
                  f"(exponent {math.log(c2 / c1) / math.log(n2 / n1):.2f}; 1 = linear; "
                  f"flattens once the arbiter's one core is saturated)")


def acting(st: dict[str, Any]) -> str:
    """Whether the arbiter was active through the steady window."""
    a, b = st.get("active_at_start"), st.get("active_at_end")
    if a is None:
        return "?"
    return "yes" if a and b else "no" if not a and not b else "lost" if a else "gained"


def plot(rows: list[dict[str, Any]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if "steady" in r]
    died = [r for r in rows if "exited" in r["startup"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
    a1.plot([r["pairs"] for r in ran], [r["steady"]["arbiter_cpu"] * 100 for r in ran], "o-",
            label="steady (no silences)")
    a1.plot([r["pairs"] for r in ran], [r["silence"]["arbiter_cpu"] * 100 for r in ran], "s--",
            label="during the silences")
    if died:
        a1.plot([r["pairs"] for r in died],
                [(r["startup"]["exited"]["cpu_share"] or 0) * 100 for r in died], "rx", ms=10,
                label="start failed: the arbiter exited")
    a1.axhline(50, color="red", ls=":", label="target: <= 50 % at 1,000 pairs")
    a1.set_xscale("log")
    a1.set_ylim(0, 110)
    a1.set_xlabel("pairs (2 nodes each), 10 Hz heartbeats")
    a1.set_ylabel("arbiter CPU, % of one core")
    a1.set_title("Arbiter CPU")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    for key, style, label in (("down_p50_s", "o-", "detection p50 (node.down)"),
                              ("down_p99_s", "o--", "detection p99 (node.down)"),
                              ("claim_p99_s", "s:", "claim in the KV, p99")):
        pts = [(r["pairs"], r["silence"][key]) for r in ran if r["silence"][key] is not None]
        if pts:
            a2.plot([p for p, _ in pts], [v for _, v in pts], style, label=label)
    for k, r in enumerate(rows):
        if "exited" in r["startup"] or not r["silence"]["detected"]:
            why = "the arbiter\nexited at start" if "exited" in r["startup"] else \
                "no silence\ndetected"
            y = target * (1.2 + 0.5 * (k % 2))
            a2.annotate(f"{r['pairs']} pairs:\n{why}", (r["pairs"], y), fontsize=7,
                        ha="center", color="darkred")
    for r in ran:
        if not r["steady"].get("active_at_start", True):
            y = r["steady"]["arbiter_cpu"] * 100 + 6
            a1.annotate("not active\n(never acted)", (r["pairs"], y), fontsize=7, ha="center",
                        color="darkred")
    top = max([r["silence"][k] or 0.0 for r in ran for k in ("down_p99_s", "claim_p99_s")]
              + [target * 2.2])
    a2.axhline(target, color="red", ls=":", label=f"target p99: {target:g} s")
    a2.set_xscale("log")
    a2.set_xlim(min(r["pairs"] for r in rows) / 1.5, max(r["pairs"] for r in rows) * 1.5)
    a2.set_ylim(0, top * 1.1)
    a2.set_xlabel("pairs (2 nodes each), 10 Hz heartbeats")
    a2.set_ylabel("seconds from the last heartbeat")
    a2.set_title("Detection latency of a silent node")
    a2.legend(fontsize=8, loc="lower left")
    a2.grid(alpha=0.3, which="both")
    fig.suptitle("One arbiter facing N pairs (bench/scale.py: the real arbiter, one "
                 "nats-server, simulated nodes)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# ---- main ---------------------------------------------------------------------------------


async def one_size(n_pairs: int, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"vtlha-scale-{n_pairs}-"))
    c = Coordinator(n_pairs, args, work)
    try:
        return await asyncio.wait_for(c.run(), args.max_minutes * 60)
    except BaseException:
        print(f"  [{n_pairs} pairs] FAILED; logs in {work} (kept)", flush=True)
        args.keep = True
        raise
    finally:
        await c.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_generator":
        generator_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_arbiter_profiled":
        arbiter_profiled(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="10,100,1000,2000", help="sizes, comma-separated")
    ap.add_argument("--silences", type=int, default=20, help="silent nodes per size")
    ap.add_argument("--silence-every", type=float, default=1.0,
                    help="seconds between the starts of two silences")
    ap.add_argument("--detect-bound", type=float, default=15.0,
                    help="seconds a silent node waits to be declared down and claimed")
    ap.add_argument("--window", type=float, default=20.0, help="steady-state seconds")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds after the arbiter settled, before measuring")
    ap.add_argument("--settle-max", type=float, default=120.0,
                    help="seconds to wait for the arbiter to act and finish reconciling")
    ap.add_argument("--renew-budget", type=float, default=6400.0,
                    help="lease renewals/s written to the KV (bench/kv_capacity.py)")
    ap.add_argument("--generators", default="auto",
                    help="load generator processes (auto: one per --nodes-per-generator)")
    ap.add_argument("--nodes-per-generator", type=int, default=2000)
    ap.add_argument("--max-minutes", type=float, default=12.0, help="bound per size")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true",
                    help="run the arbiter under cProfile (slower: not for the table)")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "scale.png"),
                    help="where the PNG goes ('' for none)")
    ap.add_argument("--resume", default=None,
                    help="a scale-partial.json: its sizes are kept, not run again")
    ap.add_argument("--wait-while", default=None, metavar="FILE",
                    help="before each size, wait while FILE exists (a shared machine's "
                    "'do not disturb' flag)")
    ap.add_argument("--keep", action="store_true", help="keep each size's work directory")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleanup runs (finally)
    sizes = [int(x) for x in args.pairs.split(",") if x]
    done: dict[int, dict[str, Any]] = {}
    if args.resume:
        for r in orjson.loads(Path(args.resume).read_bytes()).get("sizes", []):
            done[r["pairs"]] = r
        print(f"resuming: {sorted(done)} done already")
    name = "scale-profile" if args.profile else "scale"  # a profiled arbiter is slower
    partial = RESULTS / f"{name}-partial.json"
    meta = {"bench": "scale", "machine": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "args": vars(args),
            "load_before": os.getloadavg()}
    for n in sizes:
        if n in done:
            continue
        while args.wait_while and Path(args.wait_while).exists():
            print(f"waiting: {args.wait_while} exists", flush=True)
            time.sleep(30)
        print(f"{n} pairs:", flush=True)
        try:
            done[n] = asyncio.run(one_size(n, args))
        except Exception as exc:  # recorded; the other sizes still run
            print(f"  {n} pairs: {exc!r}", flush=True)
            done[n] = {"pairs": n, "error": repr(exc)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(orjson.dumps({**meta, "sizes": [done[k] for k in sorted(done)]},
                                         option=orjson.OPT_INDENT_2))
    every = [done[k] for k in sorted(done) if k in sizes or args.resume]
    rows = [r for r in every if "error" not in r]
    for r in every:
        if "error" in r:
            print(f"{r['pairs']} pairs: not measured: {r['error']}")
    cfg_t = yaml.safe_load((ROOT / "examples" / "cluster.yaml").read_text())["timings"]
    target = cfg_t["heartbeat_interval"] * (cfg_t["dead_after"] / cfg_t["heartbeat_interval"]
                                            + 1)
    table(rows, target, cfg_t["heartbeat_interval"])
    if args.plot and not args.profile and rows:
        plot(rows, target, Path(args.plot))
    out = {**meta, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_after": os.getloadavg(), "target_detection_p99_s": target, "sizes": every,
           "simulated": "nodes' services (heartbeats, reports, command acks, lease holders' "
           "acquisitions) by the load generator; renewals only within --renew-budget"}
    print(f"results: {save_results(name, out)}")


if __name__ == "__main__":
    main()
