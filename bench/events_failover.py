"""Failover time with the event stream healthy vs its raft leader killed during the
failover (issue 16: nothing on the failover path waits for the event stream), in the
network lab (root). Each trial starts a lab of examples/cluster.yaml with the stream
leaders left where the trial puts them: the KV's on the witness; the event stream's on
the witness ("healthy") or on node-a ("leader killed": it dies with node-a). Then node-a
crashes (every process and its nats-server, links down) and the trial times until node-b
holds both of node-a's groups in the KV, and until the stream holds the failover's
events; it also checks that each of them is stored once. Prints a table and writes JSON
to bench/results/.

    .venv/bin/python bench/events_failover.py [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import save_results  # noqa: E402
from vtlha_lab.eventcheck import copies, failover_trial  # noqa: E402
from vtlha_lab.lab import Lab  # noqa: E402


def trial(work: Path, kill_events_leader: bool, n: int) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "examples" / "cluster.yaml").read_text())
    raw["state_dir"] = str(work / "state")
    raw["cluster"] = f"bench-ev-{n}"
    raw["nats"]["keep_leaders_on_witness"] = False
    cfg = work / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    lab = Lab(cfg, work)
    try:
        lab.start()
        got = failover_trial(lab, kill_events_leader)
        evs = got.pop("events")
        got["events"] = len(evs)
        got["doubled"] = len(copies(evs))
        got["load1"] = os.getloadavg()[0]
        return got
    finally:
        lab.stop()


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"p50": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    rows: dict[str, list[dict[str, Any]]] = {"healthy": [], "leader killed": []}
    n = 0
    for i in range(args.trials):
        for case, kill in (("healthy", False), ("leader killed", True)):
            n += 1
            d = Path(tempfile.mkdtemp(prefix="vtlha-bench-ev-"))
            try:
                r = trial(d, kill, n)
            except Exception:
                print(f"  {case} trial {i + 1} failed; logs kept in {d / 'logs'}", flush=True)
                raise
            shutil.rmtree(d, ignore_errors=True)
            rows[case].append(r)
            print(f"  {case:<14} {i + 1}/{args.trials}: failover {r['failover_s'] * 1000:.0f} "
                  f"ms, events stored by +{r['events_stored_s']:.1f} s ({r['events']} events, "
                  f"{r['doubled']} doubled, load {r['load1']:.1f})", flush=True)
    summary = {
        "bench": "events-failover-lab",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.platform(),
        "trials": args.trials,
        "cases": {case: {"failover_s": _stats([r["failover_s"] for r in rs]),
                         "events_stored_s": _stats([r["events_stored_s"] for r in rs]),
                         "doubled": sum(r["doubled"] for r in rs),
                         "load1": [r["load1"] for r in rs]}
                  for case, rs in rows.items()},
    }
    print()
    print(f"{'event stream':<16} {'trials':>6} {'failover p50':>13} {'min':>7} {'max':>7} "
          f"{'events stored p50':>18} {'doubled':>8}")
    for case, c in summary["cases"].items():
        f, e = c["failover_s"], c["events_stored_s"]
        print(f"{case:<16} {args.trials:>6} {f['p50'] * 1000:>10.0f} ms {f['min'] * 1000:>4.0f} ms "
              f"{f['max'] * 1000:>4.0f} ms {e['p50']:>16.1f} s {c['doubled']:>8}")
    path = save_results("events-failover", summary)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
