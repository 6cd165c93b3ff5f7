"""What vtl-ha's and keepalived's trials of ``bench/failover.py`` share: the client's TCP
and ARP probes (started, waited on, stopped) and the outage measured from their
timelines (TCP, ARP, the case's headline figure, the fault's time, the bounds on
waiting)."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.failover_cases import ARP_INTERVAL, TCP_INTERVAL, TCP_PROBE, TCP_TIMEOUT, A, B
from bench.labkit import PORT, wait_for
from vtlha_lab.chaos.live import Tail
from vtlha_lab.probes import read_arp, read_timeline


@dataclass
class Probes:
    """The client's TCP and ARP probes of one trial (processes in the client's namespace)."""

    tcp: Path
    arp: Path
    procs: list[subprocess.Popen[bytes]]

    def stop_tcp(self) -> None:
        terminate(self.procs[:1])

    def stop(self) -> None:
        terminate(self.procs)


def terminate(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def probe_argvs(work: Path, addr: str, ifname: str, macs: dict[str, str],
                duration: float) -> tuple[list[str], list[str], Path, Path]:
    tcp, arp = work / "tcp.jsonl", work / "arp.jsonl"
    py = [sys.executable, "-m", "vtlha_lab.probes"]
    tcp_argv = [*py, "probe", "--target", f"{addr}:{PORT}", "--out", str(tcp), "--interval",
                str(TCP_INTERVAL), "--timeout", str(TCP_TIMEOUT), "--duration", str(duration),
                *(["--overlapping"] if TCP_PROBE == "overlapping" else [])]
    arp_argv = [*py, "arp", "--target", addr, "--ifname", ifname, "--out", str(arp),
                "--interval", str(ARP_INTERVAL), "--duration", str(duration)]
    for n, m in macs.items():
        arp_argv += ["--mac", f"{n}={m}"]
    return tcp_argv, arp_argv, tcp, arp


def wait_answered_by(p: Probes, node: str, timeout: float = 15.0) -> None:
    """Both probes see ``node`` answering (the trial's starting point)."""
    tcp, arp = Tail(p.tcp), Tail(p.arp)
    seen = {"tcp": False, "arp": False}

    def ok() -> bool:
        for e in tcp.read():
            seen["tcp"] = bool(e.get("ok") and e.get("who") == node)
        for e in arp.read():
            if e.get("type") == "arp":
                seen["arp"] = e.get("nodes") == [node]
        return seen["tcp"] and seen["arp"]
    wait_for(ok, timeout, f"the client's probes answered by {node}", 0.02)


def answered_from(path: Path, since: float, test: Callable[[dict[str, Any]], bool]
                  ) -> Callable[[], bool]:
    """A check, read incrementally: has a line of the JSON-lines file ``path`` with a
    time ``t`` at or after ``since`` passed ``test``?"""
    tail, seen = Tail(path), [False]

    def check() -> bool:
        for e in tail.read():
            if not seen[0] and float(e.get("t", 0)) >= since and test(e):
                seen[0] = True
        return seen[0]
    return check


def wait_takeover(p: Probes, node: str, since: float, timeout: float,
                  also: Callable[[], bool] = lambda: True) -> float | None:
    """Until the TCP probe is served by ``node`` at or after ``since`` (and ``also``);
    the time it took, None after ``timeout``."""
    served = answered_from(p.tcp, since, lambda e: bool(e.get("ok") and e.get("who") == node))
    try:
        wait_for(lambda: served() and also(), timeout, f"{node} answering", 0.02)
    except TimeoutError:
        return None
    return time.monotonic() - since


def tcp_measures(tl: list[dict[str, Any]], t0: float, old: str, new: str) -> dict[str, Any]:
    """From the TCP probe's timeline: first answer from ``new`` at or after ``t0``, the
    last from ``old`` before it, and the longest gap between two answers from ``t0`` on."""
    ok = [(float(e["t"]), e["who"]) for e in tl if e["ok"]]
    first_new = next((t for t, w in ok if w == new and t >= t0), None)
    last_old = max((t for t, w in ok if w == old and (first_new is None or t < first_new)),
                   default=None)
    times = [t for t, _ in ok]
    before = [t for t in times if t < t0]
    after = [t for t in times if t >= t0]
    seq = before[-1:] + after
    gaps = [b - a for a, b in itertools.pairwise(seq)]
    r: dict[str, Any] = {
        "tcp_probe": TCP_PROBE, "tcp_attempts": len(tl),
        "tcp_from_fault_s": None if first_new is None
        else first_new - t0,
        "tcp_gap_s": None if first_new is None
        else first_new - (last_old if last_old is not None else t0),
        "tcp_longest_gap_s": max(gaps, default=None)}
    return r


def arp_measures(changes: list[tuple[float, frozenset[str]]], t0: float, end: float,
                 old: str, new: str) -> dict[str, Any]:
    """From the ARP probe's changes (round time, nodes answering): when ``new`` first
    answered from ``t0`` on, how long nobody answered before that, how long two nodes
    answered at once, and the longest time without an answer."""
    spans = [(t, changes[i + 1][0] if i + 1 < len(changes) else end, who)
             for i, (t, who) in enumerate(changes)]
    first_new = None
    for t, te, who in spans:
        if new in who and te > t0:
            first_new = max(t, t0)
            break
    last_old_end = max((te for t, te, who in spans
                        if old in who and (first_new is None or t < first_new)), default=None)
    double = [(max(t, t0), te) for t, te, who in spans if len(who) > 1 and te > t0]
    nobody = [te - max(t, t0) for t, te, who in spans if not who and te > t0]
    return {"arp_changes": len(changes),
            "arp_from_fault_s": None if first_new is None else first_new - t0,
            "arp_gap_s": None if first_new is None
            else max(0.0, first_new - (last_old_end if last_old_end is not None else t0)),
            "arp_nobody_longest_s": max(nobody, default=0.0),
            "arp_double_s": sum(te - t for t, te in double)}


def headline(case: str, m: dict[str, Any]) -> tuple[float | None, float | None]:
    """The case's outage, by TCP (the tape client's longest gap for ``data``) and by ARP."""
    if case == "switchover":
        return m.get("tcp_gap_s"), m.get("arp_gap_s")
    if case == "split":
        return m.get("tcp_longest_gap_s"), m.get("arp_nobody_longest_s")
    if case.startswith("data"):
        return m.get("ack_longest_gap_s"), m.get("arp_from_fault_s")
    return m.get("tcp_from_fault_s"), m.get("arp_from_fault_s")


def finish_measures(case: str, p: Probes, t0: float, end: float) -> dict[str, Any]:
    old, new = A, B
    m = tcp_measures(read_timeline(str(p.tcp)), t0, old, new)
    m |= arp_measures(read_arp(p.arp), t0, end, old, new)
    return m


#: faults in effect only once the call that makes them returns (a link set down, an
#: nftables table written: what the client sees changes then); a signal takes effect
#: when it is sent, the start of the call (the rest is reaping)
EFFECT_ON_RETURN = ("links", "mgmt", "split")


def random_phase(r: dict[str, Any], period: float) -> None:
    """Sleep a random part of ``period`` before the fault, and record it: the trials'
    fixed waits would otherwise keep the fault at about the same moment of the system's
    own loop (the process checks, every 0.2 s; the heartbeats and adverts) trial after
    trial, and a run's outages would all share one phase of it."""
    r["phase_s"] = random.uniform(0.0, period)
    time.sleep(r["phase_s"])


def fault_time(case: str, r: dict[str, Any], t_call: float, wall_call: float
               ) -> tuple[float, float]:
    """The fault's time (monotonic, wall) from the injection call's start (the call has
    just returned); the call's duration goes to ``r['inject_s']``."""
    now, wall = time.monotonic(), time.time()
    r["inject_s"] = now - t_call
    return (now, wall) if case in EFFECT_ON_RETURN else (t_call, wall_call)


def bounds(interval: float, lease_ttl: float, dead_after: float, margin: float
           ) -> tuple[float, float]:
    """(how long to wait for a takeover at most, how long to watch after it and after
    the fault is undone)."""
    return 15.0 + 10 * (dead_after + lease_ttl + margin), max(1.0, 3 * interval)
