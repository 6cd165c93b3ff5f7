"""Gratuitous ARP: tell the segment that a floating address now lives at our MAC.

The kernel sends none when an address is added (``arp_notify=0``), and the
neighbour ``locktime`` makes peers ignore ordinary ARP replies from a new MAC for a
second; a gratuitous ARP *request* (sender IP = target IP, broadcast destination)
overrides it (PLATFORM.md). So the ip-manager sends one right after adding an
address and repeats it ``garp_count - 1`` more times, ``garp_interval`` apart, in a
background task so that the takeover is not slowed down by the repeats.

Every send, the first and each repeat, first asks ``may_send(address)`` (the
ip-manager's "is this address's group held right now, by a valid lease"): a process
frozen between two repeats and resumed after the group moved sends nothing more for it,
even if its timers fire before the enforcement loop has removed the address (clients
would otherwise point at a fenced MAC for seconds).

One AF_PACKET raw socket serves every interface (the interface is named on each
send). It is opened in the process's own network namespace, or in a named one
(tests) through pyroute2, which forks a child into the namespace for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2 import netns as pr_netns

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
BROADCAST = b"\xff" * 6
SOCKET_TIMEOUT = 5.0  # seconds to open a socket inside a named namespace


@dataclass(frozen=True)
class Interface:
    """A link of this namespace, as resolved at start."""

    name: str
    index: int
    mac: str  # "aa:bb:cc:dd:ee:ff"


def mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not an Ethernet MAC address: {mac!r}")
    return raw


def garp_frame(mac: str, address: str) -> bytes:
    """An Ethernet frame holding an ARP request with sender IP = target IP, from
    ``mac`` to the broadcast address."""
    src = mac_bytes(mac)
    ip = ipaddress.IPv4Address(address).packed
    eth = BROADCAST + src + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST)
    return eth + arp + src + ip + b"\x00" * 6 + ip


def open_socket(family: int, kind: int, proto: int, netns: str | None) -> socket.socket:
    """A socket in this process's namespace, or in the existing namespace ``netns``
    (never created: flags=0)."""
    if netns is None:
        return socket.socket(family, kind, proto)
    sock: socket.socket = pr_netns.create_socket(netns, family, kind, proto, flags=0,
                                                 timeout=SOCKET_TIMEOUT)
    return sock


class GarpSender:
    """Sends gratuitous ARPs and keeps the repeat task of each address, so that a
    release cancels the announcements of an address it no longer holds."""

    def __init__(self, count: int, interval: float, log: logging.Logger,
                 netns: str | None = None) -> None:
        self.count = count
        self.interval = interval
        self.log = log
        self.netns = netns
        self._sock: socket.socket | None = None
        self._repeats: dict[str, asyncio.Task[None]] = {}
        self.sent = 0
        self.errors = 0
        self.withheld = 0  # sends skipped because the address was no longer held
        #: asked right before every send; the owner sets it (default: always)
        self.may_send: Callable[[str], bool] = lambda address: True

    def open(self) -> None:
        sock = open_socket(socket.AF_PACKET, socket.SOCK_RAW, 0, self.netns)
        sock.setblocking(False)
        self._sock = sock

    def send(self, iface: Interface, address: str) -> bool:
        """One gratuitous ARP, now. A failure (link down, buffer full) is logged and
        counted, never raised: the address is configured either way."""
        assert self._sock is not None, "GarpSender.open() first"
        ip = address.split("/", 1)[0]
        if not self.may_send(address):
            self.withheld += 1
            self.cancel(address)
            self.log.info("gratuitous arp withheld: the address is not held any more",
                          extra={"address": ip, "interface": iface.name})
            return False
        try:
            self._sock.sendto(garp_frame(iface.mac, ip), (iface.name, ETH_P_ARP))
        except OSError as exc:
            self.errors += 1
            self.log.warning("gratuitous arp not sent", extra={
                "address": ip, "interface": iface.name, "error": exc.strerror or repr(exc)})
            return False
        self.sent += 1
        return True

    def announce(self, iface: Interface, address: str) -> None:
        """Send the first gratuitous ARP now and schedule the repeats."""
        self.cancel(address)
        self.send(iface, address)
        if self.count > 1:
            self._repeats[address] = asyncio.create_task(
                self._repeat(iface, address), name=f"garp-{address}")

    async def _repeat(self, iface: Interface, address: str) -> None:
        try:
            for _ in range(self.count - 1):
                await asyncio.sleep(self.interval)
                self.send(iface, address)
        finally:
            if self._repeats.get(address) is asyncio.current_task():
                del self._repeats[address]

    def cancel(self, address: str) -> None:
        task = self._repeats.pop(address, None)
        if task is not None:
            task.cancel()

    def pending(self) -> list[str]:
        return sorted(self._repeats)

    async def close(self) -> None:
        tasks = list(self._repeats.values())
        self._repeats.clear()
        for t in tasks:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
