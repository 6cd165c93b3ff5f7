"""The chaos observer: what a client and the kernels see, trusting no service.

It shares no code with the services (it imports nothing of ``vtlha``; the standard
library only) and runs as a process of its own inside the lab's **client** namespace:

    ip netns exec CLIENT_NS python -m vtlha_lab.chaos.observer --out FILE \\
        --address 198.51.100.101=eth0 ... --mac node-a=MAC,MAC ... \\
        --node node-a=NODE_NS ... [--reservations FILE] [--interval 0.02]

- every ``--interval`` (≤ 20 ms) a **round**: an ARP request for every floating address
  out of the client's interface on that network (its own raw socket); the replies of the
  round say who answers. A fenced node sends no ARP reply, so two MACs of two nodes in
  one round is a double answer and none is unavailability. Each round's requests carry
  one of four sender addresses (the client's and the three after it), so a late reply is
  counted in its own round;
- every ``--kernel-interval``: each node's kernel state (floating addresses configured on
  an up link: ``ip -j addr``; the fence's held set: ``nft list set``, parsed here);
- the SAN target's reservations, read from the file it persists them in.

Output: JSON lines appended to FILE, written when something changes (``arp``,
``kernel``, ``reservation``) and once a second (``observer.stats``: rounds, the longest
gap between two rounds). Times are wall-clock seconds (``time.time()``), as the other
records of a chaos history."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Any, TextIO

ETH_P_ARP = 0x0806
TAGS = 4
FENCE_TABLE = "vtlha_fence"
_IP = re.compile(r"\d+\.\d+\.\d+\.\d+")
_ELEMENTS = re.compile(r"elements\s*=\s*\{([^}]*)\}", re.S)


class Out:
    """One JSON line per record; one lock, flushed per line."""

    def __init__(self, f: TextIO) -> None:
        self.f = f
        self.lock = threading.Lock()

    def write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, separators=(",", ":"))
        with self.lock:
            self.f.write(line + "\n")
            self.f.flush()


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def mac_str(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    eth = b"\xff" * 6 + src_mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac,
                      socket.inet_aton(src_ip), b"\0" * 6, socket.inet_aton(target_ip))
    return eth + arp


def parse_arp_reply(frame: bytes) -> tuple[str, str, str] | None:
    """(sender MAC, sender IP, target IP) of an ARP reply, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    _, _, _, _, op, sha, spa, _, tpa = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
    if op != 2:
        return None
    return mac_str(sha), socket.inet_ntoa(spa), socket.inet_ntoa(tpa)


class Interface:
    """A raw ARP socket on one of the client's interfaces and its sender addresses."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        self.sock.bind((name, ETH_P_ARP))
        self.sock.setblocking(False)
        self.mac = self.sock.getsockname()[4][:6]
        out = subprocess.run(["ip", "-4", "-j", "addr", "show", "dev", name],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        info = json.loads(out)[0]["addr_info"][0]
        base = ipaddress.IPv4Address(info["local"])
        self.senders = [str(base + i) for i in range(TAGS)]
        self.addresses: list[str] = []

    def tag_of(self, ip: str) -> int | None:
        with contextlib.suppress(ValueError):
            return self.senders.index(ip)
        return None


class ArpRounds:
    """Rounds of ARP requests over the client's interfaces; a round's answers are final
    one round later (a reply carries its round's tag in the address it answers)."""

    def __init__(self, ifaces: list[Interface], mac_node: dict[str, str], out: Out) -> None:
        self.ifaces = ifaces
        self.mac_node = mac_node
        self.out = out
        self.answers: dict[int, dict[str, set[str]]] = {}
        self.last: dict[str, tuple[str, ...]] = {}
        self.k = 0

    def send(self) -> None:
        self.answers[self.k] = {}
        for itf in self.ifaces:
            for addr in itf.addresses:
                with contextlib.suppress(OSError):
                    itf.sock.send(arp_request(itf.mac, itf.senders[self.k % TAGS], addr))

    def _drain(self, itf: Interface) -> None:
        while True:
            try:
                frame = itf.sock.recv(128)
            except (BlockingIOError, InterruptedError):
                return
            got = parse_arp_reply(frame)
            if got is None:
                continue
            sha, spa, tpa = got
            tag = itf.tag_of(tpa)
            if tag is None or spa not in itf.addresses:
                continue
            r = self.answers.get(self.k - (self.k - tag) % TAGS)
            if r is not None:
                r.setdefault(spa, set()).add(self.mac_node.get(sha, sha))

    def receive(self, deadline: float) -> None:
        socks = {i.sock: i for i in self.ifaces}
        while (left := deadline - time.time()) > 0:
            ready, _, _ = select.select(list(socks), [], [], left)
            for sock in ready:
                self._drain(socks[sock])

    def finish(self, t_round: float) -> None:
        """Write the previous round's answers where they changed; forget old rounds."""
        done = self.answers.pop(self.k - 1, None)
        if done is not None:
            for itf in self.ifaces:
                for addr in itf.addresses:
                    who = tuple(sorted(done.get(addr, ())))
                    if self.last.get(addr) != who:
                        self.last[addr] = who
                        self.out.write({"type": "arp", "t": t_round, "addr": addr,
                                        "nodes": list(who)})
        for old in [r for r in self.answers if r < self.k - TAGS]:
            del self.answers[old]
        self.k += 1


def arp_loop(ifaces: list[Interface], mac_node: dict[str, str], interval: float,
             out: Out, stop: threading.Event) -> None:
    """A round every ``interval`` on a fixed grid (a late round is not made up for)."""
    rounds = ArpRounds(ifaces, mac_node, out)
    max_gap, prev, stats_at = 0.0, 0.0, time.time()
    nxt = time.time()
    while not stop.is_set():
        t0 = time.time()
        if prev:
            max_gap = max(max_gap, t0 - prev)
        prev = t0
        rounds.send()
        nxt = max(nxt + interval, t0)
        rounds.receive(nxt)
        rounds.finish(t0 - interval)
        if t0 - stats_at >= 1.0:
            out.write({"type": "observer.stats", "t": t0, "rounds": rounds.k,
                       "max_gap": round(max_gap, 4)})
            stats_at, max_gap = t0, 0.0


def node_kernel(ns: str, floating: set[str]) -> tuple[list[str], list[str] | None]:
    """(floating addresses configured on an up link, the fence's held set or None)."""
    out = subprocess.run(["ip", "-n", ns, "-4", "-j", "addr", "show"], capture_output=True,
                         text=True, timeout=5, check=False).stdout
    configured = []
    for link in json.loads(out or "[]"):
        if link.get("operstate") not in ("UP", "UNKNOWN") or "UP" not in link.get("flags", []):
            continue
        for a in link.get("addr_info", []):
            if a.get("local") in floating:
                configured.append(a["local"])
    fence = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "set", "inet",
                            FENCE_TABLE, "held"], capture_output=True, text=True, timeout=5,
                           check=False)
    held: list[str] | None = None
    if fence.returncode == 0:
        m = _ELEMENTS.search(fence.stdout)
        held = sorted(_IP.findall(m.group(1))) if m else []
    return sorted(configured), held


def reservations(path: str) -> dict[str, tuple[str | None, int]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return {d: (v.get("holder"), int(v.get("epoch", 0)))
            for d, v in data.get("devices", {}).items()}


def kernel_loop(nodes: dict[str, str], floating: set[str], res_path: str | None,
                interval: float, out: Out, stop: threading.Event) -> None:
    last: dict[str, Any] = {}
    while not stop.is_set():
        t0 = time.time()
        # Each record's time is taken right after its read: what it shows was so by then.
        for node, ns in nodes.items():
            try:
                state = node_kernel(ns, floating)
            except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
                out.write({"type": "observer.error", "t": time.time(), "node": node,
                           "error": repr(exc)})
                continue
            if last.get(node) != state:
                last[node] = state
                out.write({"type": "kernel", "t": time.time(), "node": node,
                           "addresses": state[0], "fence": state[1]})
        if res_path:
            res, t_read = reservations(res_path), time.time()
            for dev, (holder, epoch) in res.items():
                if last.get("res:" + dev) != (holder, epoch):
                    last["res:" + dev] = (holder, epoch)
                    out.write({"type": "reservation", "t": t_read, "device": dev,
                               "holder": holder, "epoch": epoch})
        stop.wait(max(0.0, interval - (time.time() - t0)))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m vtlha_lab.chaos.observer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--address", action="append", required=True, help="IP=CLIENT_IFNAME")
    ap.add_argument("--mac", action="append", default=[], help="NODE=MAC[,MAC...]")
    ap.add_argument("--node", action="append", default=[], help="NODE=NAMESPACE")
    ap.add_argument("--reservations", default=None)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--kernel-interval", type=float, default=0.25)
    a = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with contextlib.suppress(PermissionError):
        os.nice(-10)
    ifaces: dict[str, Interface] = {}
    for spec in a.address:
        ip, ifname = spec.split("=", 1)
        ifaces.setdefault(ifname, Interface(ifname)).addresses.append(ip)
    mac_node = {m.lower(): n for spec in a.mac for n, ms in [spec.split("=", 1)]
                for m in ms.split(",")}
    nodes = dict(n.split("=", 1) for n in a.node)
    floating = {ip for i in ifaces.values() for ip in i.addresses}
    with open(a.out, "a") as f:
        out = Out(f)
        out.write({"type": "observer.start", "t": time.time(), "pid": os.getpid(),
                   "interval": a.interval, "addresses": sorted(floating)})
        threads = [threading.Thread(target=arp_loop, args=(list(ifaces.values()), mac_node,
                                                           a.interval, out, stop)),
                   threading.Thread(target=kernel_loop, args=(nodes, floating, a.reservations,
                                                              a.kernel_interval, out, stop))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.write({"type": "observer.stop", "t": time.time()})


if __name__ == "__main__":
    main()
