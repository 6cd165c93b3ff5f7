"""Client-observed failover outage in the network lab, vtl-ha beside keepalived (issue 20).

vtl-ha runs as ``vtlha_lab.lab.Lab`` of ``examples/cluster.yaml`` (its timings at a
heartbeat interval of 0.1 s; at 1 s every timing the example scales with it is scaled by
the same factor: ``bench.common.scale_timings``), node-a with one fatal process check (a
pid file). keepalived (Debian package, installed with apt-get when missing) runs in its
own namespace lab of the same shape (``bench.labkit.KaLab``: node-a master, node-b backup,
a client, one bridge) with the same address (node-a's data address 198.51.100.101) and
``advert_int`` equal to the heartbeat interval, at the services' scheduling priority. Both
are measured the same way in the same run, trial by trial in turn, from the client's
namespace: a TCP probe (``vtlha_lab.probes probe``: a connect every 5 ms, 50 ms timeout,
to a responder on every node that answers with its name) and an ARP probe (``vtlha_lab.
probes arp``: a round of requests every 10 ms); a per-node observer of what each kernel
answers for (DESIGN.md's definition) counts double holders, and right before the fault is
undone the client asks each node by its MAC (ARP and TCP) whether it still answers.

Cases (every fault hits node-a, the owner; node-b must take over):

    links       node-a's links (data and management) down        keepalived: eth0 down
    crash       every process of node-a SIGKILLed, links up        keepalived and responder
                (the fence must stop it answering)                 SIGKILLed
    frozen      every process of node-a SIGSTOPped, its            keepalived and responder
                nats-server too                                    SIGSTOPped
    fatal       node-a's fatal process check fails (its pid file   -
                removed); measured from the removal
    mgmt        node-a's management link down (the management      -
                address moves; probed on the management network)
    switchover  `vtlha switchover node-a-data` (planned)           -
    data        node-a crashes while the lab's tape client writes  -
                to its data portal: the longest gap between two
                acknowledged blocks
    split       node-a and node-b cut from each other (nftables),  the same cut
                the client and the witness reach both: nothing
                may answer twice (keepalived's partition)

The outage of a trial: ``links``, ``crash``, ``frozen``, ``fatal``, ``mgmt``: from the fault
to the first answer from node-b (TCP: a connection served by node-b; ARP: a round node-b
answered); ``switchover``: from the last answer from node-a to the first from node-b;
``data``: the longest gap between acknowledged blocks around the fault; ``split``: the
longest gap between two answers (TCP) or without an ARP answer. Per case and system:
p50/p90/p99/max, the ratio vtl-ha / keepalived, trials with two nodes answering at any
instant, and trials that ended (right before the fault was undone) with two holders.

Between trials the fault is undone and the baseline restored as the chaos suite does it
(links up, SIGCONT, dead processes started again, `vtlha clear-hold`, `vtlha failback`
until every group is served at home); one lab per interval, built again when a restore
fails. keepalived's lab is built for each trial (seconds).

Resumable: every finished trial is appended to a JSON-lines state file
(``--state``, default ``bench/results/failover-state.jsonl``); a rerun skips the trials
in it, and the table, the JSON (``bench/results/failover-<time>.json``) and the plot
(``docs/img/failover-outage.png``) cover every trial in it. Every wait is bounded;
namespaces and processes are removed on error, Ctrl-C and SIGTERM.

    .venv/bin/python bench/failover.py [--intervals 0.1 1] [--cases crash,links]
        [--trials N] [--state FILE] [--time-limit S] [--pause-file F] [--summary-only]

Needs root (network namespaces, nftables, keepalived): `sudo make bench`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The parts: the cases and settings (failover_cases.py), the probes and the measurement
# both systems share (failover_measure.py), vtl-ha's lab and trials (failover_ours.py),
# keepalived's (failover_keepalived.py), the state file (failover_state.py), the trials
# run in turn (failover_runner.py), the summary, table and plot (failover_report.py).
from bench.failover_cases import CASES, EXIT_PAUSED, PLOT, STATE  # noqa: E402
from bench.failover_report import report  # noqa: E402
from bench.failover_runner import Runner, Stopped, stoppable  # noqa: E402
from bench.labkit import ensure_keepalived  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--intervals", type=float, nargs="+", default=[0.1, 1.0],
                    help="heartbeat intervals / advert_int, s (default 0.1 1)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated, of {','.join(CASES)} (default all)")
    ap.add_argument("--trials", type=int, default=None,
                    help="trials per case and system (default 30 at 0.1 s, 10 at 1 s)")
    ap.add_argument("--state", type=Path, default=STATE,
                    help=f"the JSON-lines state file (default {STATE.relative_to(ROOT)})")
    ap.add_argument("--plot", type=Path, default=PLOT,
                    help=f"the PNG written (default {PLOT.relative_to(ROOT)})")
    ap.add_argument("--no-keepalived", action="store_true", help="vtl-ha's trials only")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="start no trial after this many seconds (rerun to resume)")
    ap.add_argument("--pause-file", default=None,
                    help="stop cleanly before the next trial while this file exists (a "
                         "shared machine's quiet time; rerun to resume); exit code 75")
    ap.add_argument("--summary-only", action="store_true",
                    help="run nothing: the table, JSON and plot from the state file")
    ap.add_argument("--markdown", action="store_true",
                    help="with --summary-only: the table as Markdown too (BENCHMARKS.md)")
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}: choose from {','.join(CASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "machine": platform.platform(), "cpus": os.cpu_count(),
                           "loadavg_before": os.getloadavg(),
                           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if args.summary_only:
        report(args.state, args.plot, run, markdown=args.markdown)
        return 0
    if os.geteuid() != 0:
        print("bench/failover.py needs root: it builds network namespaces, moves addresses, "
              "installs nftables fences and runs keepalived. Run it as root (e.g. `sudo make "
              "bench`); `--summary-only` reports an existing state file without root.",
              file=sys.stderr)
        return 2
    ka_version = None if args.no_keepalived else ensure_keepalived()
    run["keepalived"] = ka_version
    runner = Runner(args, ka_version)
    why = None
    with stoppable():
        try:
            for iv in args.intervals:
                why = runner.interval(iv)
                if why:
                    break
        except (Stopped, KeyboardInterrupt) as exc:
            why = f"stopped ({exc!s}); every lab removed; rerun to resume"
    run |= {"loadavg_after": os.getloadavg(), "trials_this_run": runner.ran,
            "elapsed_s": round(time.monotonic() - runner.t_start), "stopped": why}
    print(f"\n{runner.ran} trials this run in {run['elapsed_s']} s; load average "
          f"{run['loadavg_before'][0]:.2f} before, {run['loadavg_after'][0]:.2f} after"
          + (f"; {why}" if why else ""))
    report(args.state, args.plot, run)
    return EXIT_PAUSED if why and why.startswith("paused") else (1 if why else 0)


if __name__ == "__main__":
    sys.exit(main())
