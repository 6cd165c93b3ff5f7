"""The arbiter's decision cost against pairs, in-process: one ``ClusterView.snapshot`` and
one ``policy.decide`` per tick, as the real decision loop makes them (``decider.py``).

For each size a cluster file of N pairs as ``bench/scale.py`` writes it, a ``ClusterView``
in steady state (every node's heartbeat just heard, every group held by its home node at
epoch 1, a storage report from every node reaching every device) and then, per tick, the
snapshot, the decision and a decision event's inputs (what every event of a decision
carries: ``Snapshot.for_pairs([its pair]).to_inputs()``). The tick period is
``heartbeat_interval / 2`` (the example's: 50 ms): a snapshot and decision taking
longer cannot keep up on one core. No I/O: this is the arbiter's own CPU per tick, the
part ``bench/scale.py`` cannot separate from the KV and the load generator.
``--profile`` prints the top functions of the largest size (cProfile).

Prints a table and writes JSON to ``bench/results/decide-cost-<time>.json``.

    .venv/bin/python bench/decide_cost.py [--pairs 10,100,1000,2000] [--ticks 20]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "services" / "arbiter"))

from vtlha_arbiter.pairstate import PairState  # noqa: E402
from vtlha_arbiter.view import ClusterView  # noqa: E402

from bench.common import save_results  # noqa: E402
from bench.scale_cluster import cluster_file  # noqa: E402
from vtlha import policy  # noqa: E402
from vtlha.config import ClusterConfig, load_config  # noqa: E402
from vtlha.messages import (  # noqa: E402
    GroupRecord,
    Heartbeat,
    PathHealth,
    StorageReport,
)


def steady_view(cfg: ClusterConfig, now: float) -> ClusterView:
    """Every node heard just now, every group held at home, every device reached."""
    view = ClusterView(cfg, started_at=now - 60.0)
    view.pairs = PairState(None, None, cfg, None)  # type: ignore[arg-type]  # no KV: reads only
    for rev, (g, (home, _)) in enumerate(cfg.groups().items(), start=1):
        view.set_record(g, GroupRecord(owner=home, term=1, epoch=1, state="held",
                                       renewed_by=home), rev, now=now)
    for n in cfg.nodes:
        view.heartbeat(Heartbeat(cluster=cfg.cluster, node=n.name, incarnation="i", seq=1,
                                 interval=cfg.timings.heartbeat_interval), n.name, now)
        paths = [PathHealth(device=d, path=i, reachable=True)
                 for d, dev in cfg.devices.items() if n.name in dev.paths
                 for i in range(dev.paths[n.name])]
        view.storage_report(StorageReport(cluster=cfg.cluster, node=n.name, seq=1,
                                          paths=paths, groups=[]), n.name, now)
    return view


def one_size(n_pairs: int, ticks: int, work: Path, profile: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = load_config(cluster_file(n_pairs, work, 4222, 8222))
    load_s = time.perf_counter() - t0
    now = time.monotonic()
    view = steady_view(cfg, now)
    gc.collect()  # as every service does once started (vtlha.service)
    gc.freeze()
    snap_s, decide_s, inputs_s, sizes, actions = [], [], [], [], 0
    prof = cProfile.Profile() if profile else None
    for k in range(ticks):
        t = now + k * cfg.timings.heartbeat_interval / 2
        for n in cfg.nodes:  # heartbeats keep arriving: nobody is silent
            view.nodes[n.name].last_heartbeat = t
        if prof:
            prof.enable()
        a = time.perf_counter()
        snap = view.snapshot(t, time.time(), frozenset())
        b = time.perf_counter()
        decision = policy.decide(snap, t)
        c = time.perf_counter()
        pair = cfg.pairs[k % len(cfg.pairs)].name  # a decision event's: its pair's part
        body = orjson.dumps({"snapshot": snap.for_pairs([pair]).to_inputs(), "now": t})
        d = time.perf_counter()
        if prof:
            prof.disable()
        snap_s.append(b - a)
        decide_s.append(c - b)
        inputs_s.append(d - c)
        sizes.append(len(body))
        actions += len(decision.actions)
    gc.unfreeze()
    med = sorted
    row: dict[str, Any] = {
        "pairs": n_pairs, "nodes": 2 * n_pairs, "groups": 4 * n_pairs, "ticks": ticks,
        "load_config_s": round(load_s, 3),
        "snapshot_ms": round(1000 * med(snap_s)[len(snap_s) // 2], 3),
        "decide_ms": round(1000 * med(decide_s)[len(decide_s) // 2], 3),
        "inputs_ms": round(1000 * med(inputs_s)[len(inputs_s) // 2], 3),
        "inputs_bytes": sizes[-1],
        "actions": actions,  # steady state: none expected
        "tick_ms": round(1000 * cfg.timings.heartbeat_interval / 2, 1),
    }
    row["tick_share"] = round((row["snapshot_ms"] + row["decide_ms"]) / row["tick_ms"], 3)
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(15)
        row["profile_top"] = out.getvalue()
    return row


def table(rows: list[dict[str, Any]]) -> None:
    print(f"{'pairs':>6} {'groups':>6} {'snapshot':>10} {'decide':>9} {'per tick':>9} "
          f"{'of 50 ms':>8} {'event inputs':>12} {'size':>9} {'config load':>11}")
    for r in rows:
        per = r["snapshot_ms"] + r["decide_ms"]
        print(f"{r['pairs']:>6} {r['groups']:>6} {r['snapshot_ms']:>8.2f}ms "
              f"{r['decide_ms']:>7.2f}ms {per:>7.2f}ms {100 * r['tick_share']:>7.1f}% "
              f"{r['inputs_ms']:>10.2f}ms {r['inputs_bytes'] / 1024:>6.1f}KiB "
              f"{r['load_config_s']:>10.2f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="10,100,1000,2000", help="sizes, comma-separated")
    ap.add_argument("--ticks", type=int, default=20, help="decisions measured per size")
    ap.add_argument("--profile", action="store_true",
                    help="print cProfile's top functions of the largest size")
    args = ap.parse_args()
    sizes = [int(x) for x in args.pairs.split(",") if x.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vtlha-decide-") as tmp:
        for n in sizes:
            work = Path(tmp) / str(n)
            work.mkdir()
            print(f"{n} pairs ...", file=sys.stderr, flush=True)
            rows.append(one_size(n, args.ticks, work, args.profile and n == max(sizes)))
    table(rows)
    for r in rows:
        if "profile_top" in r:
            print(r.pop("profile_top"))
    path = save_results("decide-cost", {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "load": os.getloadavg()},
        "rows": rows})
    print(f"results: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
