"""The split-brain observer: which node answers for each floating address, read from
inside each node's network namespace every ``--interval`` seconds, in a process of its
own (at raised priority, so a loaded machine does not stretch its polls).

    python -m vtlha_lab.observer --node node-a=NS_A --node node-b=NS_B \\
        --address 198.51.100.101/32 ... --out FILE [--interval 0.005]

A node **answers** for an address (DESIGN.md "Safety") when the address is configured in
its namespace on a link that is up AND — when the node's fence is installed — the address
is in the fence's held set. One thread per node joins that node's namespace (a thread's
network namespace is its own) and polls there with netlink and libnftables. On SIGTERM
it merges the per-node histories and writes a JSON summary to FILE: samples, the longest
gap between two polls of one node, every overlap (a time span in which two nodes both
answered for an address, from their polls) and, per address, who answered when.

An overlap spans from one node's first poll that saw it answering to the other's first
poll that saw it no longer answering: it may lie within the second node's gap between
two polls (the observer's threads descheduled), when it stopped answering before the
first began. ``observed`` lists the overlaps that the polls themselves saw: each node was
seen answering at a poll no earlier than the other's first answering poll — two nodes
seen answering at once, not merely not excluded."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute

from vtlha.fence import TABLE, FenceError, Nft, parse_held
from vtlha_lab.netns import CLONE_NEWNET, NETNS_RUN_DIR, _libc

LINK_EVERY = 4  # link states are re-read every 4th poll (addresses every poll)


@dataclass
class NodeLog:
    name: str
    ns: str
    samples: int = 0
    max_gap: float = 0.0
    # (time, answering addresses) at each change; the first entry is the first poll
    changes: list[tuple[float, frozenset[str]]] = field(default_factory=list)
    # per change, the time of the last poll that still saw its answering set
    seen_until: list[float] = field(default_factory=list)
    last_poll: float = 0.0
    error: str = ""

    def record(self, now: float, answering: frozenset[str]) -> None:
        """One poll's result: a change, or one more poll that saw the same."""
        if not self.changes or self.changes[-1][1] != answering:
            self.changes.append((now, answering))
            self.seen_until.append(now)
        else:
            self.seen_until[-1] = now
        self.samples += 1


def poll_node(log: NodeLog, floating: set[str], interval: float, stop: threading.Event) -> None:
    try:
        fd = os.open(os.path.join(NETNS_RUN_DIR, log.ns), os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(f"setns({log.ns}) failed")
        finally:
            os.close(fd)
        nft = Nft()
        ipr = IPRoute()
    except Exception as exc:
        log.error = repr(exc)
        return
    up: set[int] = set()
    try:
        while not stop.is_set():
            now = time.monotonic()
            if log.samples:
                log.max_gap = max(log.max_gap, now - log.last_poll)
            log.last_poll = now
            if log.samples % LINK_EVERY == 0:
                up = {lk["index"] for lk in ipr.get_links()
                      if lk.get_attr("IFLA_OPERSTATE") == "UP"}
            configured = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                          for a in ipr.get_addr(family=2) if a["index"] in up} & floating
            held = fence_held(nft)
            answering = frozenset(configured if held is None else
                                  {a for a in configured if a.split("/")[0] in held})
            log.record(now, answering)
            stop.wait(max(0.0, interval - (time.monotonic() - now)))
    finally:
        ipr.close()


def fence_held(nft: Nft) -> set[str] | None:
    """Addresses in the node's fence held set; None when there is no fence table (then
    the kernel drops nothing)."""
    try:
        out = nft.run(f"list set inet {TABLE} held")
    except FenceError:
        return None
    return set(parse_held(out))


def spans(changes: list[tuple[float, frozenset[str]]], end: float,
          addr: str) -> list[tuple[float, float]]:
    """Time spans (from poll times) in which ``addr`` was answered for."""
    return [(s, e) for s, e, _ in seen_spans(changes, [t for t, _ in changes], end, addr)]


def seen_spans(changes: list[tuple[float, frozenset[str]]], seen_until: list[float],
               end: float, addr: str) -> list[tuple[float, float, float]]:
    """(start, end, last poll that saw it answering) of each span of ``addr``."""
    out: list[tuple[float, float, float]] = []
    start: float | None = None
    last = 0.0
    for (t, answering), seen in zip(changes, seen_until, strict=True):
        if addr in answering:
            if start is None:
                start = t
            last = seen
        elif start is not None:
            out.append((start, t, last))
            start = None
    if start is not None:
        out.append((start, end, last))
    return out


def merge(logs: list[NodeLog], floating: set[str], end: float) -> dict[str, Any]:
    overlaps: list[tuple[float, float, str, list[str]]] = []
    observed: list[tuple[float, float, str, list[str]]] = []
    history: dict[str, list[tuple[float, str]]] = {}
    for addr in sorted(floating):
        seen = {lg.name: seen_spans(lg.changes, lg.seen_until, end, addr) for lg in logs}
        per = {n: [(s, e) for s, e, _ in sp] for n, sp in seen.items()}
        names = sorted(per)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                for s1, e1, l1 in seen[a]:
                    for s2, e2, l2 in seen[b]:
                        lo, hi = max(s1, s2), min(e1, e2)
                        if lo < hi:
                            overlaps.append((lo, hi, addr, [a, b]))
                            if lo <= min(l1, l2):
                                observed.append((lo, min(l1, l2), addr, [a, b]))
        points = sorted({t for lg in logs for t, _ in lg.changes})
        h: list[tuple[float, str]] = []
        for t in points:
            who = ",".join(lg.name for lg in logs if any(s <= t < e for s, e in per[lg.name]))
            if not h or h[-1][1] != who:
                h.append((t, who))
        history[addr] = h
    return {"samples": min((lg.samples for lg in logs), default=0),
            "max_gap": max((lg.max_gap for lg in logs), default=0.0),
            "overlaps": overlaps, "observed": observed, "history": history,
            "errors": {lg.name: lg.error for lg in logs if lg.error}}


def observe(nodes: dict[str, str], floating: set[str], interval: float, out: str) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(PermissionError):
        os.nice(-10)
    logs = [NodeLog(n, ns) for n, ns in nodes.items()]
    threads = [threading.Thread(target=poll_node, args=(lg, floating, interval, stop),
                                daemon=True) for lg in logs]
    for t in threads:
        t.start()
    while not stop.is_set() and not all(lg.samples or lg.error for lg in logs):
        stop.wait(0.005)
    with open(out + ".ready", "w") as f:  # every node polled once: watching from now on
        f.write("ready\n")
    stop.wait()
    for t in threads:
        t.join(5)
    with open(out, "w") as f:
        json.dump(merge(logs, floating, time.monotonic()), f)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m vtlha_lab.observer")
    ap.add_argument("--node", action="append", required=True, help="NAME=NAMESPACE")
    ap.add_argument("--address", action="append", required=True)
    ap.add_argument("--interval", type=float, default=0.005)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    nodes = dict(n.split("=", 1) for n in a.node)
    observe(nodes, set(a.address), a.interval, a.out)


if __name__ == "__main__":
    main()
