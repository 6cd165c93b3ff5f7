"""KV capacity: how many lease renewals per second the cluster's KV sustains.

Three nats-servers on loopback (the example cluster's, clustered, JetStream with
``sync_interval: always``), the KV bucket as the arbiter makes it (R3, file storage).
A renewal is what a node's lease holder does for each group it owns every
``heartbeat_interval``: a compare-and-set update of ``group.<g>`` with a record of the
real size, under a timeout of one renewal interval (a slower one fails).

The load rises step by step: at each step K keys are each renewed every ``--interval``
seconds (10 Hz: the example's heartbeat) for ``--seconds``, spread over ``--workers``
client processes (one connection each). A step is **sustained** when at least 95 % of
the renewals due succeeded within the interval; the ladder stops after the first step
that is not. From the highest sustained rate it says how many nodes the KV carries (each
node renews its two groups) at 10 Hz and at 1 Hz. The client processes share the
machine with the servers: on a small machine the result is the machine's limit, which
the table's load column shows.

Prints a table and writes JSON to ``bench/results/kv-capacity-<time>.json``.

    .venv/bin/python bench/kv_capacity.py [--steps 10,20,40,80,160] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import save_results  # noqa: E402
from vtlha.messages import GroupRecord, encode  # noqa: E402
from vtlha.subjects import Subjects  # noqa: E402
from vtlha_lab.localcluster import LocalCluster, prepare_config  # noqa: E402

GROUPS_PER_NODE = 2


def record(i: int, epoch: int) -> bytes:
    """A group record of the real shape and size."""
    return encode(GroupRecord(owner=f"node-{i:04d}", term=123456789, epoch=epoch,
                              state="held", renewed_by=f"node-{i:04d}"))


async def _worker(urls: list[str], cluster: str, keys: list[int], interval: float,
                  seconds: float, start_at: float) -> dict[str, Any]:
    import nats
    from nats.js.errors import KeyWrongLastSequenceError

    from vtlha.bounded import bounded

    nc = await nats.connect(urls, connect_timeout=5, allow_reconnect=False)
    kv = await nc.jetstream(timeout=5).key_value(Subjects(cluster).kv_bucket)
    subj = Subjects(cluster)
    revs: dict[int, int] = {}
    for i in keys:
        revs[i] = await kv.put(subj.group_key(f"g{i}"), record(i, 1))
    lat: list[float] = []
    counts = {"ok": 0, "late": 0, "conflict": 0, "error": 0}

    async def renew(i: int) -> None:
        # each key on its own fixed-rate schedule, offset so that keys do not align
        t_next = start_at + (i % 97) / 97 * interval
        end = start_at + seconds
        while t_next < end:
            await asyncio.sleep(max(0.0, t_next - time.time()))
            t0 = time.perf_counter()
            try:
                revs[i] = await bounded(kv.update(subj.group_key(f"g{i}"), record(i, 1),
                                                  last=revs[i]), interval)
                dt = time.perf_counter() - t0
                lat.append(dt)
                counts["ok"] += 1
            except KeyWrongLastSequenceError:
                counts["conflict"] += 1
                entry = await kv.get(subj.group_key(f"g{i}"))
                revs[i] = entry.revision or revs[i]
            except TimeoutError:
                counts["late"] += 1
                entry = await kv.get(subj.group_key(f"g{i}"))
                revs[i] = entry.revision or revs[i]
            except Exception:
                counts["error"] += 1
            t_next += interval

    await asyncio.gather(*(renew(i) for i in keys))
    await nc.close()
    return {"latencies": lat, **counts}


def worker(args: tuple[list[str], str, list[int], float, float, float]) -> dict[str, Any]:
    return asyncio.run(_worker(*args))


def step(pool: Any, urls: list[str], cluster: str, n_keys: int, workers: int,
         interval: float, seconds: float) -> dict[str, Any]:
    start_at = time.time() + 2.0  # every worker connected and its keys written by then
    shares = [list(range(w, n_keys, workers)) for w in range(workers)]
    results = pool.map(worker, [(urls, cluster, s, interval, seconds, start_at)
                                for s in shares if s])
    lat = sorted(x for r in results for x in r["latencies"])
    due = n_keys * int(seconds / interval)
    ok = sum(r["ok"] for r in results)
    p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: 0.0)
    return {"keys": n_keys, "target_per_s": n_keys / interval, "due": due, "ok": ok,
            "achieved_per_s": ok / seconds, "late": sum(r["late"] for r in results),
            "conflicts": sum(r["conflict"] for r in results),
            "errors": sum(r["error"] for r in results),
            "p50_ms": p(0.5), "p99_ms": p(0.99),
            "mean_ms": statistics.fmean(lat) * 1000 if lat else 0.0,
            "load_1min": os.getloadavg()[0], "sustained": ok >= 0.95 * due}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", default="10,20,40,80,160,320",
                    help="Keys per step (each renewed every --interval s).")
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vtlha-kvcap-"))
    c = LocalCluster(prepare_config(ROOT / "examples" / "cluster.yaml", work), work)
    rows: list[dict[str, Any]] = []
    try:
        c.start_nats()
        from vtlha import bus

        async def make_bucket() -> None:
            nc = await c.connect()
            try:
                await bus.ensure_kv(nc.jetstream(), Subjects(c.cfg.cluster), replicas=3)
            finally:
                await nc.close()

        asyncio.run(make_bucket())
        urls = c.client_urls()
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for n in (int(x) for x in args.steps.split(",")):
                r = step(pool, urls, c.cfg.cluster, n, args.workers, args.interval,
                         args.seconds)
                rows.append(r)
                print(f"  {n} keys: {r['achieved_per_s']:.0f}/s of {r['target_per_s']:.0f}/s, "
                      f"p99 {r['p99_ms']:.1f} ms, late {r['late']}, "
                      f"{'sustained' if r['sustained'] else 'NOT sustained'}", flush=True)
                if not r["sustained"]:
                    break
    finally:
        c.stop()
        shutil.rmtree(work, ignore_errors=True)
    best = max((r["achieved_per_s"] for r in rows if r["sustained"]), default=0.0)
    print()
    print(f"{'keys':>6} {'target/s':>9} {'achieved/s':>11} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'late':>6} {'load':>5}  sustained")
    for r in rows:
        print(f"{r['keys']:>6} {r['target_per_s']:>9.0f} {r['achieved_per_s']:>11.0f} "
              f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['late']:>6} {r['load_1min']:>5.1f}"
              f"  {'yes' if r['sustained'] else 'no'}")
    carried = {f"{hz:g} Hz": int(best / (GROUPS_PER_NODE * hz)) for hz in (10.0, 1.0)}
    print(f"\nhighest sustained: {best:.0f} renewals/s: {carried['10 Hz']} nodes at 10 Hz "
          f"heartbeats (lease_ttl 0.3 s), {carried['1 Hz']} at 1 Hz (lease_ttl 3 s), "
          f"{GROUPS_PER_NODE} groups a node")
    out = {"bench": "kv-capacity", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": platform.platform(), "cpus": os.cpu_count(), "interval_s": args.interval,
           "seconds": args.seconds, "workers": args.workers, "steps": rows,
           "sustained_per_s": best, "nodes_carried": carried}
    print(f"results: {save_results('kv-capacity', out)}")


if __name__ == "__main__":
    main()
