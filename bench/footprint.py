"""Footprint: RSS and CPU of each service, idle (1 Hz heartbeats) and at 10 Hz (the
example's 0.1 s), on loopback with the example cluster (two nodes, a witness, three
nats-servers, every service; the reference SAN target and the tape data services run
too but are not services of a node and are listed apart).

Per case: start the cluster, wait until every group is held at home and let it settle
(``--settle`` s), then sample each process's RSS (``VmRSS``) and CPU time (``utime +
stime`` from ``/proc/PID/stat``) over ``--window`` seconds: CPU is the share of one
core over the window, RSS the largest sample. Prints a table and writes JSON to
``bench/results/footprint-<time>.json``. The issue's target: each service ≤ 60 MB RSS.

    .venv/bin/python bench/footprint.py [--window 20] [--settle 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import save_results, scale_timings  # noqa: E402
from vtlha_lab.localcluster import LocalCluster, prepare_config  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
TARGET_RSS_MB = 60.0


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def rss_mb(pid: int) -> float | None:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * PAGE / 2**20


def processes(c: LocalCluster) -> dict[str, int]:
    """``host/service`` -> pid of every running process the cluster started, and the
    storage-monitors' tape services (``host/tape <group>``, a standby ``(standby)``)."""
    out = {ch.name: ch.proc.pid for ch in c.procs.children if ch.alive}
    for name, srv in c.servers.items():
        if srv.proc is not None:
            out[f"{name}/nats-server"] = srv.proc.pid
    for ch in c.procs.children:
        if ch.alive and ch.service == "storage-monitor":
            out |= tape_services(c, ch.host, ch.proc.pid)
    return out


def tape_services(c: LocalCluster, host: str, parent: int) -> dict[str, int]:
    kids = []  # children are listed per thread that started them (starts run in threads)
    for task in Path(f"/proc/{parent}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            kids += task.read_text().split()
    out = {}
    for pid in map(int, kids):
        try:
            if b"vtlha.tape.service" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            env = dict(e.split(b"=", 1) for e in
                       Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        group = env.get(b"VTLHA_GROUP", b"?").decode()
        pid_file = c.state_root / host / "resources" / group / "tape" / "pid"
        try:
            serving = pid_file.read_text().split()[0] == str(pid)
        except (OSError, IndexError):
            serving = False
        out[f"{host}/tape {group}{'' if serving else ' (standby)'}"] = pid
    return out


def measure(c: LocalCluster, window: float) -> dict[str, dict[str, float]]:
    pids = processes(c)
    t0 = time.monotonic()
    cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
    peak: dict[str, float] = {}
    while time.monotonic() - t0 < window:
        for n, p in pids.items():
            r = rss_mb(p)
            if r is not None:
                peak[n] = max(peak.get(n, 0.0), r)
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    out = {}
    for n, p in pids.items():
        a, b = cpu0[n], cpu_seconds(p)
        if a is None or b is None or n not in peak:
            continue
        out[n] = {"rss_mb": round(peak[n], 1), "cpu_share": round((b - a) / elapsed, 4)}
    return out


def case(name: str, scale: float, window: float, settle: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="vtlha-footprint-"))
    try:
        cfg_path = prepare_config(ROOT / "examples" / "cluster.yaml", work)
        raw = yaml.safe_load(cfg_path.read_text())
        scale_timings(raw, scale)  # the idle case: 1 Hz heartbeats
        cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        c = LocalCluster(cfg_path, work)
        try:
            c.start()
            c.wait_for(c.home_held, 60, what="every group held by its home node")
            time.sleep(settle)  # steady state, not the start-up (a duration, not a wait)
            print(f"  {name}: measuring {window:g} s", flush=True)
            procs = measure(c, window)
        finally:
            c.stop()
        return {"case": name, "heartbeat_interval_s": raw["timings"]["heartbeat_interval"],
                "window_s": window, "processes": procs}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(cases: list[dict[str, Any]]) -> None:
    names = sorted({n for c in cases for n in c["processes"]})
    head = f"{'process':<28}" + "".join(
        f"{c['case'] + ' RSS MB':>18}{c['case'] + ' CPU %':>16}" for c in cases)
    print(head)
    for n in names:
        row = f"{n:<28}"
        for c in cases:
            p = c["processes"].get(n)
            row += (f"{p['rss_mb']:>16.1f}{p['cpu_share'] * 100:>14.2f}" if p
                    else f"{'-':>16}{'-':>14}")
        print(row)
    worst = max((p["rss_mb"], n) for c in cases for n, p in c["processes"].items()
                if not n.endswith(("nats-server", "san-target")) and "tape" not in n)
    print(f"\nlargest service RSS {worst[0]:.1f} MB ({worst[1]}); target "
          f"≤ {TARGET_RSS_MB:g} MB: {'met' if worst[0] <= TARGET_RSS_MB else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=5.0)
    args = ap.parse_args()
    cases = [case("idle 1 Hz", 10.0, args.window, args.settle),
             case("10 Hz", 1.0, args.window, args.settle)]
    print()
    table(cases)
    out = {"bench": "footprint", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": platform.platform(), "cpus": os.cpu_count(),
           "load_1min": os.getloadavg()[0], "target_rss_mb": TARGET_RSS_MB, "cases": cases}
    print(f"results: {save_results('footprint', out)}")


if __name__ == "__main__":
    main()
