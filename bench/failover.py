"""Failover time on loopback: SIGKILL every process of node-a, measure until node-b
holds both of node-a's groups in the KV (state ``held``, read by compare of the KV
record, polled every 5 ms). Prints a table and writes JSON to bench/results/.

    .venv/bin/python bench/failover.py [--trials N]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import save_results  # noqa: E402
from vtlha_lab.localcluster import LocalCluster, prepare_config  # noqa: E402


def trial(work: Path) -> dict[str, float]:
    cfg_path = prepare_config(ROOT / "examples" / "cluster.yaml", work)
    c = LocalCluster(cfg_path, work)
    try:
        c.start()
        c.wait_for(c.home_held, 30, what="every group held by its home node")
        time.sleep(0.5)  # let heartbeats settle to steady state before the kill
        t0 = time.monotonic()
        c.procs.kill_host("node-a")
        mine = ["node-a-data", "node-a-mgmt"]
        c.wait_for(lambda: all(c.held_by().get(g) == "node-b" for g in mine), 15,
                   interval=0.005, what="node-b to hold node-a's groups")
        return {"kill_to_takeover_s": time.monotonic() - t0}
    finally:
        c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    results = []
    for i in range(args.trials):
        d = Path(tempfile.mkdtemp(prefix="vtlha-bench-"))
        try:
            r = trial(d)
        except Exception:
            print(f"  trial {i + 1} failed; logs kept in {d / 'logs'}", flush=True)
            raise
        shutil.rmtree(d, ignore_errors=True)
        results.append(r["kill_to_takeover_s"])
        print(f"  trial {i + 1}/{args.trials}: {r['kill_to_takeover_s'] * 1000:.0f} ms",
              flush=True)
    from vtlha.config import load_config

    t = load_config(ROOT / "examples" / "cluster.yaml").timings
    summary = {
        "bench": "failover-loopback",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.platform(),
        "heartbeat_interval_s": t.heartbeat_interval,
        "dead_after_s": t.dead_after,
        "trials": len(results),
        "kill_to_takeover_s": {
            "p50": statistics.median(results), "min": min(results), "max": max(results),
            "all": results,
        },
    }
    print()
    print(f"{'case':<38} {'trials':>6} {'p50 ms':>8} {'min ms':>8} {'max ms':>8}")
    print(f"{'SIGKILL node-a (loopback, recorded)':<38} {len(results):>6} "
          f"{summary['kill_to_takeover_s']['p50'] * 1000:>8.0f} {min(results) * 1000:>8.0f} "
          f"{max(results) * 1000:>8.0f}")
    print(f"(heartbeat {t.heartbeat_interval} s, dead_after {t.dead_after} s; keepalived at "
          f"advert_int 0.1 s: 0.339 s p50 client outage, PLATFORM.md)")
    path = save_results("failover", summary)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
