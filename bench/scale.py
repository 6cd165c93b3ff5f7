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
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The parts: the cluster file (scale_cluster.py), the load generator (scale_generator.py,
# run as `scale.py _generator`), one size set up and torn down (scale_testbed.py) and
# measured (scale_coordinator.py), the numbers (scale_measure.py), the arbiter's log and
# profile (scale_arbiter.py, `scale.py _arbiter_profiled`), the table and plot
# (scale_report.py). `from bench.scale import cluster_file` stays (bench/decide_cost.py).
from bench.common import RESULTS, save_results  # noqa: E402
from bench.scale_arbiter import arbiter_profiled  # noqa: E402
from bench.scale_cluster import cluster_file  # noqa: E402
from bench.scale_coordinator import one_size  # noqa: E402
from bench.scale_generator import generator_main  # noqa: E402
from bench.scale_report import plot, table  # noqa: E402

__all__ = ["cluster_file", "main"]


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
