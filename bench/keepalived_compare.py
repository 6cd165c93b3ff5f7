"""SIGKILL comparison, side by side in one run: vtl-ha's kernel fence vs keepalived.

A process that is SIGKILLed cannot remove the address it added. keepalived has no fence:
its killed master keeps the VIP configured on an up link, so it keeps answering while
the backup takes over. vtl-ha's ip-manager refreshes an nftables fence only on valid lease
notices, so a killed ip-manager's node stops answering within lease_ttl although the
address stays configured. "Answering" is DESIGN.md's definition (configured on an up
link AND, where a fence table exists, in its held set), polled from inside each node's
namespace by ``vtlha_lab.observer`` (the same observer for both systems; keepalived's nodes
have no fence table, so configured = answering), and cross-checked from the client's
namespace: an ARP request for the address (which nodes reply) and a TCP connect through
each node's MAC (a permanent neighbour entry): a reply or a RST is an answer, silence is
not.

  vtl-ha  (a Lab of examples/cluster.yaml in network namespaces, one per trial)
    ip-manager   SIGKILL node-a's ip-manager alone; after --leases leases: configured?
                 answering? Then (the heartbeat-stop step) SIGKILL node-a's heartbeat:
                 failover time = heartbeat kill -> node-b answers.
    whole node   SIGKILL every process of node-a, links up (Lab.crash(cut_links=False)):
                 failover time = kill -> node-b answers.
  keepalived (its own lab: two nodes and a client on a bridge in a switch namespace,
              VRRPv3, VIP 198.51.100.101/32 on eth0, one trial per lab)
    SIGKILL      SIGKILL the master's keepalived (its process group: parent and VRRP
                 child) at each --advert-int: failover time = kill -> backup holds the
                 VIP; then configured on both? answering on both?

keepalived is installed with apt-get when it is missing (root, Debian), and the script
says so. Every wait is bounded, and the whole run is bounded by --max-seconds (the
keepalived processes are killed and every namespace removed, also on error).

    .venv/bin/python bench/keepalived_compare.py [--trials 3] [--advert-int 0.1 1]  (root)

keepalived's lab and the checks are in ``bench/labkit.py`` (``bench/failover.py`` uses them
too).

Prints a table and writes JSON to bench/results/keepalived-compare-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import save_results  # noqa: E402
from bench.labkit import (  # noqa: E402
    EXAMPLE,
    NODES,
    PORT,
    VIP,
    KaLab,
    answers,
    client_view,
    configured,
    ensure_keepalived,
    fenced,
    first_change,
    mac_of,
    observer,
    overlap_s,
    tcp_via,
    wait_for,
)
from vtlha_lab.lab import Lab, OverlapObserver  # noqa: E402


class BenchTimeout(Exception):
    pass


# ---- vtl-ha ----------------------------------------------------------------------


def ours_trial(case: str, work: Path, leases: int) -> dict[str, Any]:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["state_dir"] = str(work / "state")
    raw["cluster"] = "bench-kacmp"
    cfg = work / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    lab = Lab(cfg, work)
    try:
        t_start = time.monotonic()
        lab.start()
        a_ns, b_ns, c_ns = lab.ns("node-a"), lab.ns("node-b"), lab.ns("client")
        lab.wait_for(lambda: lab.home_held() and configured(a_ns) and fenced(a_ns), 60,
                     what="node-a serving (configured and fenced in) its data address")
        for n in NODES:
            lab.spawn_in(n, "serve", [sys.executable, "-m", "vtlha_lab.probes", "serve",
                                      "--port", str(PORT), "--name", n])
        macs = {n: lab.mac(n) for n in NODES}
        client_ip = next(a for a in lab.addresses("client")
                         if a.startswith("198.51.100.")).split("/")[0]
        wait_for(lambda: tcp_via(c_ns, macs["node-a"]) == "served node-a", 10,
                 "the client served by node-a", interval=0.05)
        ready_s = time.monotonic() - t_start
        ttl = lab.cfg.timings.lease_ttl
        r: dict[str, Any] = {"lab_ready_s": ready_s, "lease_ttl_s": ttl}
        r["before"] = client_view(c_ns, client_ip, macs)
        with OverlapObserver(lab) as obs:
            t0 = time.monotonic()
            if case == "ip-manager":
                lab.procs.find("node-a", "ip-manager").signal(signal.SIGKILL)
            else:
                r["killed"] = lab.crash("node-a", cut_links=False)
            time.sleep(leases * ttl)
            r["after_s"] = time.monotonic() - t0
            r["a_configured"] = configured(a_ns)
            r["a_fenced"] = bool(fenced(a_ns))
            r["during"] = client_view(c_ns, client_ip, macs)
            r["a_answering"] = (r["a_configured"] and r["a_fenced"]) or \
                "node-a" in r["during"]["arp_replies_from"] or \
                answers(r["during"]["tcp"]["node-a"])
            if case == "ip-manager":
                # the backstop: the address's kernel lifetime (valid_lft) runs out
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda: not configured(a_ns), 6, "the backstop", 0.02)
                r["a_address_gone_s"] = (None if configured(a_ns)
                                         else time.monotonic() - t0)
                t1 = time.monotonic()
                lab.procs.find("node-a", "heartbeat").signal(signal.SIGKILL)
            else:
                t1 = t0
            wait_for(lambda: configured(b_ns) and fenced(b_ns), 30,
                     "node-b answering for node-a's address", 0.01)
            if case != "ip-manager":
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda: not configured(a_ns), 6, "the backstop", 0.02)
                r["a_address_gone_s"] = (None if configured(a_ns)
                                         else time.monotonic() - t0)
            time.sleep(2 * ttl)
            r["after_failover"] = client_view(c_ns, client_ip, macs)
        holders = obs.holders.get(f"{VIP}/32", [])
        a_stop = first_change(holders, t0, lambda who: "node-a" not in who)
        b_start = first_change(holders, t1, lambda who: "node-b" in who)
        r |= {"observer_samples": obs.samples, "observer_max_gap_s": obs.max_gap,
              "overlaps": obs.overlaps, "both_answering": bool(obs.overlaps),
              "a_stopped_answering_s": None if a_stop is None else a_stop - t0,
              "failover_s": None if b_start is None else b_start - t1,
              "failover_from": "heartbeat SIGKILL" if case == "ip-manager" else "crash"}
        # Never two answering in any client check either.
        r["both_answering"] |= any(
            len(v["arp_replies_from"]) > 1 or sum(map(answers, v["tcp"].values())) > 1
            for v in (r["before"], r["during"], r["after_failover"]))
        return r
    finally:
        lab.stop()


# ---- keepalived --------------------------------------------------------------------


def keepalived_trial(advert: float, work: Path) -> dict[str, Any]:
    lab = KaLab(work)
    try:
        t_start = time.monotonic()
        lab.build()
        a_ns, b_ns, c_ns = lab.ns["node-a"], lab.ns["node-b"], lab.ns["client"]
        for n in NODES:
            lab.spawn(n, "serve", [sys.executable, "-m", "vtlha_lab.probes", "serve",
                                   "--port", str(PORT), "--name", n])
        lab.start_keepalived("node-a", advert, master=True)
        wait_for(lambda: configured(a_ns), 20, "node-a (keepalived master) holding the VIP",
                 0.02)
        lab.start_keepalived("node-b", advert, master=False)
        settle = max(1.5, 5 * advert)  # node-b hears adverts and stays backup
        time.sleep(settle)
        if configured(b_ns) or not configured(a_ns):
            raise RuntimeError("keepalived did not settle with node-a master, node-b backup")
        macs = {n: mac_of(lab.ns[n]) for n in NODES}
        client_ip = KaLab.ADDR["client"].split("/")[0]
        wait_for(lambda: tcp_via(c_ns, macs["node-a"]) == "served node-a", 10,
                 "the client served by node-a", interval=0.05)
        r: dict[str, Any] = {"lab_ready_s": time.monotonic() - t_start, "advert_int_s": advert}
        r["before"] = client_view(c_ns, client_ip, macs)
        with observer({n: lab.ns[n] for n in NODES}, f"{VIP}/32",
                      work / "observer.json") as obs:
            t0 = time.monotonic()
            lab.kill_keepalived("node-a")
            wait_for(lambda: configured(b_ns), 10 + 5 * advert,
                     "node-b (keepalived backup) holding the VIP", 0.002)
            t_b = time.monotonic()
            time.sleep(max(1.0, 3 * advert))  # a few adverts later: settled
            r["after_s"] = time.monotonic() - t0
            r["a_configured"] = configured(a_ns)
            r["b_configured"] = configured(b_ns)
            r["during"] = client_view(c_ns, client_ip, macs)
            r["a_answering"] = r["a_configured"] or \
                "node-a" in r["during"]["arp_replies_from"] or \
                answers(r["during"]["tcp"]["node-a"])
        holders = obs["history"].get(f"{VIP}/32", [])
        b_start = first_change(holders, t0, lambda who: "node-b" in who)
        r |= {"observer_samples": obs["samples"], "observer_max_gap_s": obs["max_gap"],
              "overlaps": obs["overlaps"], "overlap_s": overlap_s(obs["overlaps"]),
              "failover_s": None if b_start is None else b_start - t0,
              "failover_polled_s": t_b - t0,
              "both_answering": bool(obs["overlaps"]) or any(
                  len(v["arp_replies_from"]) > 1
                  or sum(map(answers, v["tcp"].values())) > 1
                  for v in (r["before"], r["during"]))}
        logs = (work / "node-b-keepalived.log").read_text(errors="replace")
        r["backup_log_master"] = "Entering MASTER STATE" in logs
        return r
    finally:
        lab.teardown()


def ka_trial_at(advert: float) -> Callable[[Path], dict[str, Any]]:
    return lambda work: keepalived_trial(advert, work)


# ---- the run -------------------------------------------------------------------------


def run_trials(label: str, n: int, fn: Callable[[Path], dict[str, Any]],
               deadline: float, out: list[dict[str, Any]]) -> None:
    """Up to ``n`` trials, each in a fresh work directory; results appended to ``out``
    as they come (a BenchTimeout leaves the finished ones there)."""
    for i in range(n):
        if time.monotonic() > deadline:
            print(f"  {label}: out of time, {n - i} trial(s) skipped", flush=True)
            break
        work = Path(tempfile.mkdtemp(prefix="vtlha-kacmp-"))
        t = time.monotonic()
        try:
            r = fn(work)
        except BenchTimeout:
            print(f"  {label} trial {i + 1}: stopped (--max-seconds); files in {work}",
                  flush=True)
            raise
        except Exception as exc:
            print(f"  {label} trial {i + 1}/{n}: FAILED: {exc!r}; files in {work}", flush=True)
            out.append({"error": repr(exc), "work_dir": str(work)})
            continue
        r["trial_s"] = time.monotonic() - t
        shutil.rmtree(work, ignore_errors=True)
        fo = r.get("failover_s")
        print(f"  {label} trial {i + 1}/{n}: left configured={r['a_configured']}, "
              f"killed node answering={r['a_answering']}, both answering="
              f"{r['both_answering']}, failover "
              f"{'-' if fo is None else f'{fo * 1000:.0f} ms'} ({r['trial_s']:.0f} s)",
              flush=True)
        out.append(r)


def yes_count(rows: list[dict[str, Any]], key: str) -> str:
    ok = [r for r in rows if "error" not in r]
    k = sum(bool(r[key]) for r in ok)
    word = "yes" if k == len(ok) and ok else "no" if k == 0 else "mixed"
    return f"{word} {k}/{len(ok)}"


def ms_summary(xs: list[float | None]) -> dict[str, Any] | None:
    v = [x for x in xs if x is not None]
    if not v:
        return None
    return {"p50_ms": statistics.median(v) * 1000, "min_ms": min(v) * 1000,
            "max_ms": max(v) * 1000, "all_ms": [x * 1000 for x in v]}


def fmt_ms(s: dict[str, Any] | None) -> str:
    if s is None:
        return "-"
    return f"{s['p50_ms']:.0f} ms ({s['min_ms']:.0f}-{s['max_ms']:.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3, help="trials per row (default 3)")
    ap.add_argument("--advert-int", type=float, nargs="+", default=[0.1, 1.0],
                    help="keepalived advert_int values (default 0.1 1)")
    ap.add_argument("--leases", type=int, default=3,
                    help="vtl-ha: leases to wait after the kill before looking (default 3)")
    ap.add_argument("--no-whole-node", action="store_true",
                    help="skip vtl-ha's whole-node SIGKILL case")
    ap.add_argument("--max-seconds", type=int, default=1800,
                    help="the whole run stops (cleaning up) after this long (default 1800)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("keepalived_compare.py needs root (network namespaces, nftables, keepalived)")
    t_run = time.monotonic()
    ka_version = ensure_keepalived()

    def _alarm(*_: object) -> None:
        signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
        signal.alarm(120)  # cleanup itself must not hang either
        raise BenchTimeout(f"--max-seconds {args.max_seconds} reached")

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.max_seconds)
    deadline = t_run + args.max_seconds * 0.8  # start no trial after this
    load0 = os.getloadavg()
    rows: list[tuple[str, str, str, list[dict[str, Any]]]] = []

    def row(system: str, case: str, what: str, label: str,
            fn: Callable[[Path], dict[str, Any]]) -> None:
        rs: list[dict[str, Any]] = []
        rows.append((system, case, what, rs))
        run_trials(label, args.trials, fn, deadline, rs)

    stopped = None
    try:
        print(f"vtl-ha: SIGKILL node-a's ip-manager ({args.trials} trials)", flush=True)
        row("vtl-ha", "ip-manager SIGKILL", "heartbeat kill -> companion answers",
            "vtl-ha ip-manager", lambda w: ours_trial("ip-manager", w, args.leases))
        if not args.no_whole_node:
            print(f"vtl-ha: SIGKILL every process of node-a, links up ({args.trials} trials)",
                  flush=True)
            row("vtl-ha", "whole node SIGKILL", "kill -> companion answers",
                "vtl-ha whole node", lambda w: ours_trial("crash", w, args.leases))
        print(f"keepalived ({ka_version}): SIGKILL the master's keepalived", flush=True)
        for adv in args.advert_int:
            row("keepalived", f"SIGKILL, advert_int {adv:g} s", "kill -> backup holds VIP",
                f"keepalived advert_int {adv:g}", ka_trial_at(adv))
    except BenchTimeout as exc:
        stopped = str(exc)
        print(f"STOPPED: {stopped}; the table below has the trials that finished",
              flush=True)
    finally:
        signal.alarm(0)
    elapsed = time.monotonic() - t_run

    head = (f"{'system':<11} {'case':<26} {'trials':>6}  {'left configured':<16} "
            f"{'killed answers':<15} {'both answering':<15} {'failover p50 (min-max)':<24} "
            f"measured")
    print()
    print(head)
    print("-" * len(head))
    table: list[dict[str, Any]] = []
    for system, case, what, rs in rows:
        ok = [r for r in rs if "error" not in r]
        fo = ms_summary([r.get("failover_s") for r in ok])
        entry = {"system": system, "case": case, "trials": len(ok),
                 "failed_trials": len(rs) - len(ok),
                 "address_left_configured_on_killed_node": yes_count(rs, "a_configured"),
                 "killed_node_still_answering": yes_count(rs, "a_answering"),
                 "both_answering_at_any_instant": yes_count(rs, "both_answering"),
                 "failover": fo, "failover_measured": what, "runs": rs}
        table.append(entry)
        failed = f"+{len(rs) - len(ok)}F" if len(rs) > len(ok) else ""
        print(f"{system:<11} {case:<26} {str(len(ok)) + failed:>6}  "
              f"{entry['address_left_configured_on_killed_node']:<16} "
              f"{entry['killed_node_still_answering']:<15} "
              f"{entry['both_answering_at_any_instant']:<15} {fmt_ms(fo):<24} {what}")
    print()
    print("details (p50 over trials)")
    for e in table:
        ok = [r for r in e["runs"] if "error" not in r]
        if not ok:
            continue
        parts = [f"observer {statistics.median(r['observer_samples'] for r in ok):.0f} "
                 f"samples, longest gap "
                 f"{max(r['observer_max_gap_s'] for r in ok) * 1000:.0f} ms"]
        if e["system"] == "vtl-ha":
            stop = ms_summary([r["a_stopped_answering_s"] for r in ok])
            gone = ms_summary([r.get("a_address_gone_s") for r in ok])
            parts.append(f"node-a stopped answering {fmt_ms(stop)} after the kill "
                         f"(lease_ttl {ok[0]['lease_ttl_s'] * 1000:.0f} ms)")
            parts.append(f"backstop removed the address {fmt_ms(gone)} after the kill")
        else:
            parts.append(f"overlap {statistics.median(r['overlap_s'] for r in ok):.2f} s "
                         f"(observed until the end of each trial; it does not end)")
        d = ok[0]["during"]
        parts.append(f"client {ok[0]['after_s']:.1f} s after the kill: ARP replies from "
                     f"{d['arp_replies_from'] or 'nobody'}, TCP via node-a's MAC: "
                     f"{d['tcp']['node-a']}, via node-b's: {d['tcp']['node-b']}")
        print(f"  {e['system']} / {e['case']}: " + "; ".join(parts))
    load1 = os.getloadavg()
    print(f"\n{elapsed:.0f} s in all; load average {load0[0]:.2f} before, {load1[0]:.2f} "
          f"after, {os.cpu_count()} CPUs")

    summary = {"bench": "keepalived-compare",
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": platform.platform(), "cpus": os.cpu_count(),
               "keepalived": ka_version, "loadavg_before": load0, "loadavg_after": load1,
               "elapsed_s": elapsed, "args": vars(args), "stopped": stopped,
               "answering": "configured on an up link and, where the node has a fence, in "
                            "its held set (vtlha_lab.observer); cross-checked by ARP and TCP "
                            "per MAC from the client namespace",
               "rows": table}
    path = save_results("keepalived-compare", summary)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
