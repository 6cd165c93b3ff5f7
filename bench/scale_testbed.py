"""One size of ``bench/scale.py``, set up and torn down: the cluster file, one nats-server
with the KV as after a first assignment, the load generators and the arbiter (each a
child process in its own session), how to talk to them (the generators' control
subject, the arbiter's HTTP), the wait until the arbiter has settled, and everything
stopped whatever happens."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import RESULTS
from bench.scale_arbiter import LogScan, print_profile, start_failure
from bench.scale_cluster import CLUSTER, GROUPS_PER_NODE, WITNESS, cluster_file, renewed_pairs
from bench.scale_generator import CTL
from bench.scale_measure import cpu_seconds
from vtlha.config import ClusterConfig, load_config
from vtlha.messages import GroupRecord, encode
from vtlha.subjects import Subjects

ROOT = Path(__file__).resolve().parent.parent
#: the entry point the children run again (``_generator``, ``_arbiter_profiled``)
SCRIPT = ROOT / "bench" / "scale.py"
#: the arbiter's own services path, so that its process runs this tree's code
SERVICE_PATHS = [ROOT, ROOT / "services" / "arbiter"]


def child_env() -> dict[str, str]:
    """The environment of every child: this tree's code first (the venv's editable
    install may point at another checkout)."""
    path = os.pathsep.join(str(p) for p in SERVICE_PATHS)
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{old}" if old else path}


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



class Testbed:
    """One size's processes, started, talked to and stopped."""

    def __init__(self, n_pairs: int, args: argparse.Namespace, work: Path) -> None:
        self.n_pairs = n_pairs
        self.args = args
        self.work = work
        self.procs = Procs(work)
        self.subjects = Subjects(CLUSTER)
        self.cfg: ClusterConfig
        self.nc: Any = None
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
