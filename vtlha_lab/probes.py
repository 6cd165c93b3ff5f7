"""Tools that run inside the lab's namespaces (``python -m vtlha_lab.probes ...``).

    serve --port P --name NAME          a TCP service: answers every connection with NAME
    probe --target IP:PORT --out FILE   a client: connects every --interval seconds for
                                        --duration seconds and writes one JSON line per
                                        attempt {t (CLOCK_MONOTONIC), ok, who, error};
                                        --overlapping: an attempt starts every interval,
                                        not after the last one ended (lines as they end)
    arp --target IP --ifname IF --out FILE [--mac NODE=MAC ...]
                                        a client: a round of ARP requests for IP every
                                        --interval seconds for --duration seconds (the chaos
                                        observer's rounds); one JSON line whenever the set
                                        of nodes answering changes {type: arp, t (the
                                        round's CLOCK_MONOTONIC), addr, nodes}, and at the
                                        end {type: arp.stats, rounds, max_gap}

They are bounded and stop by themselves (probe, arp) or on SIGTERM (all). CLOCK_MONOTONIC
is one clock for every process on the host, so the test process can compare times."""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time


def serve(port: int, name: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))  # answers on every address the node holds, floating ones too
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        try:
            conn.sendall(name.encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()


def probe_once(ip: str, port: int, timeout: float) -> tuple[bool, str | None, str | None]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        data = s.recv(64)
        return True, data.decode().strip() or None, None
    except OSError as exc:
        return False, None, type(exc).__name__
    finally:
        s.close()


def probe(target: str, out: str, interval: float, duration: float, timeout: float) -> None:
    ip, port = target.rsplit(":", 1)
    end = time.monotonic() + duration
    with open(out, "a", buffering=1) as f:
        while time.monotonic() < end:
            t = time.monotonic()
            ok, who, err = probe_once(ip, int(port), timeout)
            f.write(json.dumps({"t": t, "ok": ok, "who": who, "error": err}) + "\n")
            delay = interval - (time.monotonic() - t)
            if delay > 0:
                time.sleep(delay)


def probe_overlapping(target: str, out: str, interval: float, duration: float,
                      timeout: float) -> None:
    """Like ``probe``, but an attempt starts every ``interval`` whatever the earlier ones
    are doing (non-blocking connects, each with its own ``timeout``): an address whose
    packets are dropped (a fenced node) does not hold the next attempt back for the whole
    timeout, so the first answer from a new holder is seen within ``interval`` of it
    answering, as it is when the old holder keeps answering. Lines are written as
    attempts end (so not in ``t`` order); ``t`` is when the attempt started."""
    ip, port = target.rsplit(":", 1)
    addr = (ip, int(port))
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, float] = {}  # socket -> when its attempt started
    end = time.monotonic() + duration
    next_start = time.monotonic()
    with open(out, "a", buffering=1) as f:

        def finish(s: socket.socket, ok: bool, who: str | None, err: str | None) -> None:
            t = pending.pop(s)
            sel.unregister(s)
            s.close()
            f.write(json.dumps({"t": t, "ok": ok, "who": who, "error": err}) + "\n")

        while time.monotonic() < end or pending:
            now = time.monotonic()
            if now >= next_start and now < end:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                pending[s] = now
                sel.register(s, selectors.EVENT_WRITE, s)
                code = s.connect_ex(addr)
                if code not in (0, errno.EINPROGRESS):
                    finish(s, False, None, errno.errorcode.get(code, str(code)))
                next_start = max(next_start + interval, now)
            due = [t + timeout for t in pending.values()]
            wake = min([*due, next_start] if now < end else due, default=now)
            for key, ev in sel.select(max(0.0, wake - time.monotonic())):
                s = key.data
                if ev & selectors.EVENT_WRITE:
                    code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        finish(s, False, None, errno.errorcode.get(code, str(code)))
                    else:
                        sel.modify(s, selectors.EVENT_READ, s)
                    continue
                try:
                    data = s.recv(64)
                except OSError as exc:
                    finish(s, False, None, type(exc).__name__)
                else:
                    finish(s, True, data.decode().strip() or None, None)
            now = time.monotonic()
            for s in [s for s, t in pending.items() if now >= t + timeout]:
                finish(s, False, None, "TimeoutError")


def arp_watch(target: str, ifname: str, out: str, interval: float, duration: float,
              macs: dict[str, str]) -> None:
    """Rounds of ARP requests for ``target`` out of ``ifname`` (run inside the client's
    namespace), with the chaos observer's machinery: a round's replies are told apart by
    the sender address its requests carry, so a late reply counts in its own round. A
    round's nodes are written (when they changed) with the time it was sent; a MAC in
    ``macs`` (node -> MAC) is written as the node's name."""
    from vtlha_lab.chaos.observer import ArpRounds, Interface, Out

    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    itf = Interface(ifname)
    itf.addresses.append(target)
    with open(out, "a", buffering=1) as f:
        rec = Out(f)
        rounds = ArpRounds([itf], {m.lower(): n for n, m in macs.items()}, rec)
        end = time.monotonic() + duration
        prev_sent: float | None = None
        max_gap = 0.0
        nxt = time.time()  # ArpRounds.receive waits on the wall clock
        while not stop and time.monotonic() < end:
            sent = time.monotonic()
            if prev_sent is not None:
                max_gap = max(max_gap, sent - prev_sent)
            rounds.send()
            nxt = max(nxt + interval, time.time())
            rounds.receive(nxt)
            rounds.finish(sent if prev_sent is None else prev_sent)  # the previous round
            prev_sent = sent
        rec.write({"type": "arp.stats", "t": time.monotonic(), "rounds": rounds.k,
                   "max_gap": round(max_gap, 4)})


def read_arp(path: str | os.PathLike[str]) -> list[tuple[float, frozenset[str]]]:
    """An ``arp`` output file as (round time, nodes answering) at each change."""
    out = []
    for e in read_timeline(str(path)):
        if e.get("type") == "arp":
            out.append((float(e["t"]), frozenset(e["nodes"])))  # type: ignore[arg-type,call-overload]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vtlha_lab.probes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--target", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.005)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=0.05)
    p.add_argument("--overlapping", action="store_true",
                   help="start an attempt every --interval, not after the last one ended")
    r = sub.add_parser("arp")
    r.add_argument("--target", required=True)
    r.add_argument("--ifname", default="eth0")
    r.add_argument("--out", required=True)
    r.add_argument("--interval", type=float, default=0.01)
    r.add_argument("--duration", type=float, default=30.0)
    r.add_argument("--mac", action="append", default=[], help="NODE=MAC")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        serve(a.port, a.name)
    elif a.cmd == "arp":
        arp_watch(a.target, a.ifname, a.out, a.interval, a.duration,
                  dict(m.split("=", 1) for m in a.mac))
    elif a.overlapping:
        probe_overlapping(a.target, a.out, a.interval, a.duration, a.timeout)
    else:
        probe(a.target, a.out, a.interval, a.duration, a.timeout)


def arp_responders(ns: str, src_ip: str, target: str, ifname: str = "eth0",
                   wait: float = 0.3) -> set[str]:
    """Send ARP requests for ``target`` from namespace ``ns`` (three over ``wait``
    seconds, raw AF_PACKET) and return the MACs that replied: two MACs = two nodes
    answering for one address."""
    from vtlha_lab.netns import in_netns


    def run() -> set[str]:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
        try:
            s.bind((ifname, 0))
            mac = s.getsockname()[4]
            spa, tpa = socket.inet_aton(src_ip), socket.inet_aton(target)
            pkt = (b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
                   + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + spa + b"\0" * 6 + tpa)
            macs: set[str] = set()
            end = time.monotonic() + wait
            next_send = 0.0
            while (left := end - time.monotonic()) > 0:
                if time.monotonic() >= next_send:  # three requests over the window
                    s.send(pkt)
                    next_send = time.monotonic() + wait / 3
                s.settimeout(max(0.001, min(left, next_send - time.monotonic())))
                try:
                    data = s.recv(2048)
                except TimeoutError:
                    continue
                if (len(data) >= 42 and data[20:22] == b"\x00\x02"
                        and data[28:32] == tpa and data[38:42] == spa):
                    macs.add(data[22:28].hex(":"))
            return macs
        finally:
            s.close()

    return in_netns(ns, run, timeout=wait + 5)


def read_timeline(path: str) -> list[dict[str, object]]:
    try:
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    # (an overlapping probe writes its attempts as they end: put them in start order)
    return sorted(lines, key=lambda e: float(e.get("t", 0.0)))


def answered_by(path: str | os.PathLike[str], who: str, since: float) -> bool:
    """Whether the timeline in ``path`` has an answer from ``who`` at or after ``since``."""
    return any(e["ok"] and e["who"] == who and float(e["t"]) >= since  # type: ignore[arg-type]
               for e in read_timeline(str(path)))


def outage(timeline: list[dict[str, object]], before: str, after: str,
           since: float) -> tuple[float, float, float] | None:
    """The client-observed outage of a move from ``before`` to ``after``: (start, end,
    gap) where end is the first answer from ``after`` at or after ``since`` and start the
    last answer from ``before`` ahead of it (``since`` when there was none)."""
    last_before = None
    for e in timeline:
        t = float(e["t"])  # type: ignore[arg-type]
        if e["ok"] and e["who"] == before:
            last_before = t
        if e["ok"] and e["who"] == after and t >= since:
            start = last_before if last_before is not None else since
            return start, t, t - start
    return None


if __name__ == "__main__":
    main()
