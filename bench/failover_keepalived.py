"""keepalived's side of ``bench/failover.py``: a lab of its own for each trial
(``bench.labkit.KaLab``), each case's fault injected into it, and one trial measured as
vtl-ha's, with the bounds and scheduling priority vtl-ha's cluster file sets."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.failover_cases import LOG, A, B, Case
from bench.failover_measure import (
    Probes,
    bounds,
    fault_time,
    finish_measures,
    probe_argvs,
    random_phase,
    wait_answered_by,
    wait_takeover,
)
from bench.failover_ours import lab_config
from bench.labkit import (
    NODES,
    PORT,
    VIP,
    KaLab,
    client_view,
    configured,
    mac_of,
    observer,
    tcp_via,
    two_answering,
    wait_for,
)
from vtlha.priority import raise_priority


def ka_split(lab: KaLab, cut: bool) -> None:
    """node-a and node-b drop what comes from each other (VRRP adverts included); the
    client reaches both."""
    for me, peer in ((A, B), (B, A)):
        peer_ip = KaLab.ADDR[peer].split("/")[0]
        script = (f"table inet bench_split {{\n  chain in {{ type filter hook input priority "
                  f"-300;\n    ip saddr {peer_ip} drop;\n  }}\n}}\n" if cut
                  else "delete table inet bench_split\n")
        subprocess.run(["ip", "netns", "exec", lab.ns[me], "nft", "-f", "-"],
                       input=script.encode(), check=cut, timeout=10, capture_output=True)


def ka_inject(lab: KaLab, case: str, interval: float, nice: int) -> Callable[[], object]:
    if case == "links":
        lab.set_link(A, up=False)
        return lambda: lab.set_link(A, up=True)
    if case == "crash":
        lab.signal_host(A, signal.SIGKILL)

        def restart() -> None:  # node-a comes back: its responder and keepalived
            ka_responder(lab, A)
            lab.start_keepalived(A, interval, master=True, nice=nice)
        return restart
    if case == "frozen":
        lab.signal_host(A, signal.SIGSTOP)
        return lambda: lab.signal_host(A, signal.SIGCONT)
    if case == "split":
        ka_split(lab, True)
        return lambda: ka_split(lab, False)
    raise ValueError(case)


def ka_responder(lab: KaLab, host: str) -> None:
    lab.spawn(host, "serve", [sys.executable, "-m", "vtlha_lab.probes", "serve", "--port",
                              str(PORT), "--name", host])


def ka_up(lab: KaLab, interval: float, nice: int) -> dict[str, str]:
    lab.build()
    for n in NODES:
        ka_responder(lab, n)
    lab.start_keepalived(A, interval, master=True, nice=nice)
    wait_for(lambda: configured(lab.ns[A]), 20, "node-a (keepalived master) holding the VIP",
             0.02)
    lab.start_keepalived(B, interval, master=False, nice=nice)
    time.sleep(max(1.5, 5 * interval))  # node-b hears adverts and stays backup
    if configured(lab.ns[B]) or not configured(lab.ns[A]):
        raise RuntimeError("keepalived did not settle with node-a master, node-b backup")
    macs = {n: mac_of(lab.ns[n]) for n in NODES}
    wait_for(lambda: tcp_via(lab.ns["client"], macs[A]) == "served node-a", 10,
             "the client served by node-a", interval=0.05)
    return macs


def ka_timings(interval: float) -> tuple[int, float, float, float]:
    """What keepalived's trials take from vtl-ha's cluster file at ``interval``: the same
    bounds on waiting, and the services' scheduling priority: (nice, lease_ttl, dead_after,
    margin)."""
    from vtlha.config import load_config

    work = Path(tempfile.mkdtemp(prefix="vtlha-bench-cfg-"))
    try:
        cfg = load_config(lab_config(work, interval))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t = cfg.timings
    return cfg.scheduling.nice, t.lease_ttl, t.dead_after, t.margin


def ka_trial(case: Case, interval: float, nice: int, lease_ttl: float, dead_after: float,
             margin: float) -> dict[str, Any]:
    """One keepalived trial in a lab of its own, measured as vtl-ha's."""
    work = Path(tempfile.mkdtemp(prefix=f"vtlha-bench-ka-{case.name}-"))
    lab = KaLab(work, prefix="kafo")
    bound, hold = bounds(interval, lease_ttl, dead_after, margin)
    r: dict[str, Any] = {"advert_int_s": interval}
    try:
        macs = ka_up(lab, interval, nice)
        tcp_argv, arp_argv, tcp, arp = probe_argvs(work, VIP, "eth0", macs,
                                                   bound + 4 * hold + 30)
        probes = Probes(tcp, arp, [lab.spawn("client", "tcp-probe", tcp_argv),
                                   lab.spawn("client", "arp-probe", arp_argv)])
        for p in probes.procs:
            raise_priority(nice, LOG, p.pid)
        with observer({n: lab.ns[n] for n in NODES}, f"{VIP}/32", work / "obs.json",
                      nice=nice) as obs:
            wait_answered_by(probes, A)
            random_phase(r, interval)
            t0 = time.monotonic()
            undo = ka_inject(lab, case.name, interval, nice)
            t0, _ = fault_time(case.name, r, t0, time.time())
            if case.name == "split":
                time.sleep(1 + 6 * interval)
                r["took_s"] = None
            else:
                r["took_s"] = wait_takeover(probes, B, t0, bound)
            time.sleep(hold)
            probes.stop_tcp()
            t_end = time.monotonic()
            client_ip = KaLab.ADDR["client"].split("/")[0]
            r["end"] = client_view(lab.ns["client"], client_ip, macs)
            r["end"]["configured"] = [n for n in NODES if configured(lab.ns[n])]
            undo()
            time.sleep(hold)
        probes.stop()
        r |= finish_measures(case.name, probes, t0, t_end)
        r |= {"observer_samples": obs["samples"], "observer_max_gap_s": obs["max_gap"],
              "overlaps": obs["overlaps"], "overlaps_observed": obs.get("observed", []),
              "double_holders": bool(obs["overlaps"]) or r["arp_double_s"] > 0
              or two_answering(r["end"]),
              "ended_two_holders": two_answering(r["end"])}
        shutil.rmtree(work, ignore_errors=True)
        return r
    finally:
        lab.teardown()
