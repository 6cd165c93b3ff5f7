"""Management-path health: the management link's state and the gateway's reachability.

The manual: each node keeps probing its gateway from its fixed management address,
so that it notices when its management path has failed and when it has healed.

- **Link state** (administratively up AND carrier, ``IFF_UP|IFF_LOWER_UP``) comes from
  netlink events (a socket of its own, bound to the link group): ``ip link set ...
  down`` or a carrier loss is seen in milliseconds and reported at once. Each tick also
  re-reads the link by name, a safety net for a lost event, for an interface deleted
  and created again, and for the kernel's linkwatch: it sends the event of a carrier
  change it deems non-urgent up to one second late (one batch per second, for the
  whole machine), while the carrier flag itself is current.
- **Gateway**: an ICMP echo from the fixed management address (raw socket bound to
  the address and the interface, non-blocking, on the event loop) every tick, with a
  timeout; its round trip is the latency. Without a configured gateway, the link
  alone decides.
- **Health** = link up AND gateway reachable, with hysteresis (keepalived's rise and
  fall): it changes only after ``rise`` good or ``fall`` bad ticks in a row. Only ticks
  count, so a burst of link events cannot shortcut the hysteresis; the first tick sets
  the starting state (there is no history to be hysteretic about).

Every change of link, gateway or health is logged once. The monitor knows nothing of
NATS: it hands each snapshot to ``on_report`` (the ip-manager publishes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_LINK

from vtlha.errors import VtlhaError
from vtlha.health import Hysteresis
from vtlha_ip_manager.garp import open_socket
from vtlha_ip_manager.netlink import RTNL_TIMEOUT, dump_links, open_rtnl

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000  # carrier, as the driver says (IFF_RUNNING lags behind linkwatch)
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8


@dataclass(frozen=True)
class MgmtSnapshot:
    """What the ip-manager publishes (as a MgmtReport) and shows in its status."""

    link_up: bool
    gateway_ok: bool | None
    latency: float | None  # seconds, the last successful gateway probe of this tick
    healthy: bool
    monitored: bool = True
    detail: str = ""
    interface: str | None = None
    gateway: str | None = None
    link_events: int = 0
    at: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unmonitored(reason: str) -> MgmtSnapshot:
    """The report of a node whose management path is not watched (loopback mode, no
    management address): healthy by assumption, and it says so."""
    return MgmtSnapshot(link_up=True, gateway_ok=None, latency=None, healthy=True,
                        monitored=False, detail=f"not monitored: {reason}")


# ---- ICMP echo ----------------------------------------------------------------

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    csum = _checksum(head + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload


def parse_echo_reply(packet: bytes) -> tuple[int, int] | None:
    """(ident, seq) of an IPv4 packet holding an ICMP echo reply, else None."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl:ihl + 8]
    if len(icmp) < 8:
        return None
    kind, _code, _csum, ident, seq = struct.unpack("!BBHHH", icmp)
    return (ident, seq) if kind == ICMP_ECHO_REPLY else None


class IcmpProber:
    """ICMP echo to a gateway from a fixed source address and interface. The socket
    is opened on first use and opened again after an error (the address or the
    interface may come back)."""

    def __init__(self, source_ip: str, interface: str, netns: str | None = None) -> None:
        self.source_ip = source_ip
        self.interface = interface
        self.netns = netns
        self.ident = os.getpid() & 0xFFFF
        self.seq = 0
        self._sock: socket.socket | None = None

    def _open(self) -> socket.socket:
        sock = open_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP, self.netns)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                            self.interface.encode())
            sock.bind((self.source_ip, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _drain(self, sock: socket.socket) -> None:
        """Drop replies that arrived after an earlier probe gave up."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            for _ in range(64):
                sock.recv(2048)

    async def probe(self, gateway: str, timeout: float) -> tuple[float | None, str | None]:
        """(round-trip seconds, None) or (None, why not)."""
        loop = asyncio.get_running_loop()
        try:
            if self._sock is None:
                self._sock = self._open()
        except OSError as exc:
            return None, (f"cannot open an ICMP socket on {self.interface} from "
                          f"{self.source_ip}: {exc.strerror or exc}")
        sock = self._sock
        self._drain(sock)
        self.seq = (self.seq + 1) & 0xFFFF
        seq = self.seq
        packet = echo_request(self.ident, seq, struct.pack("!d", time.monotonic()) * 2)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_sendto(sock, packet, (gateway, 0))
                while True:
                    data, (src, _port) = await loop.sock_recvfrom(sock, 2048)
                    if src == gateway and parse_echo_reply(data) == (self.ident, seq):
                        return time.perf_counter() - t0, None
        except TimeoutError:
            return None, f"no echo reply from {gateway} within {timeout:g} s"
        except OSError as exc:
            self.close()
            return None, f"echo to {gateway} failed: {exc.strerror or exc}"


# ---- the monitor ----------------------------------------------------------------

ReportFn = Callable[[MgmtSnapshot, str], Awaitable[None]]


class MgmtMonitor:
    """Watches one node's management path; see the module doc.

    Drive it with ``start()``, then ``watch_links()`` as a task and ``tick()`` every
    ``interval``; ``close()`` at the end. ``on_report(snapshot, cause)`` gets every
    snapshot, ``cause`` being "probe" (a tick) or "link" (a link event)."""

    def __init__(self, *, interface: str, source_ip: str, gateway: str | None,
                 interval: float, timeout: float, rise: int, fall: int,
                 on_report: ReportFn, log: logging.Logger | None = None,
                 netns: str | None = None) -> None:
        self.interface = interface
        self.source_ip = source_ip
        self.gateway = gateway
        self.interval = interval
        # A probe never outlasts its tick, so reports keep their cadence.
        self.timeout = min(timeout, interval)
        self.on_report = on_report
        self.log = log or logging.getLogger("vtlha.ip-manager.mgmt")
        self.netns = netns
        self.health = Hysteresis(rise, fall)
        self.prober = IcmpProber(source_ip, interface, netns)
        self.link_up = False
        self.gateway_ok: bool | None = None
        self.latency: float | None = None
        self.detail = "starting"
        self.link_events = 0
        self.last_link_event: float | None = None  # time.monotonic() of the last change seen
        self._index: int | None = None
        self._ipr: AsyncIPRoute | None = None
        self._events: AsyncIPRoute | None = None
        self._closed = False

    # ---- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        self._ipr = open_rtnl(self.netns)
        await self._open_events()
        up, detail = await self._read_link()
        self.link_up = up
        self.detail = detail
        self.log.info("management path monitor started", extra={
            "interface": self.interface, "source": self.source_ip, "gateway": self.gateway,
            "link_up": up, "netns": self.netns})

    async def _open_events(self) -> None:
        if self._events is not None:
            self._events.close()
        ev = open_rtnl(self.netns)
        await asyncio.wait_for(ev.bind(groups=RTMGRP_LINK), RTNL_TIMEOUT)
        self._events = ev

    async def close(self) -> None:
        self._closed = True
        for s in (self._events, self._ipr):
            if s is not None:
                s.close()
        self._events = self._ipr = None
        self.prober.close()

    # ---- state -----------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        if self.health.state is not None:
            return self.health.state
        return self.link_up and self.gateway_ok is not False

    def snapshot(self) -> MgmtSnapshot:
        return MgmtSnapshot(link_up=self.link_up, gateway_ok=self.gateway_ok,
                            latency=self.latency, healthy=self.healthy, monitored=True,
                            detail=self.detail, interface=self.interface, gateway=self.gateway,
                            link_events=self.link_events)

    @staticmethod
    def _is_up(flags: int) -> bool:
        return bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)

    async def _read_link(self) -> tuple[bool, str]:
        assert self._ipr is not None, "MgmtMonitor.start() first"
        for link in await dump_links(self._ipr):
            if link.get("ifname") == self.interface:
                self._index = int(link["index"])
                up = self._is_up(int(link.get("flags") or 0))
                return up, f"link {self.interface} {'up' if up else 'down'}"
        self._index = None
        return False, f"interface {self.interface} does not exist"

    def _set_link(self, up: bool, source: str, detail: str) -> bool:
        if up == self.link_up:
            return False
        self.link_up = up
        self.detail = detail
        if source == "event":
            self.link_events += 1
            self.last_link_event = time.monotonic()
        log = self.log.info if up else self.log.warning
        log(f"management link {'up' if up else 'down'}",
            extra={"interface": self.interface, "link_up": up, "source": source})
        return True

    def _set_gateway(self, ok: bool | None, latency: float | None, detail: str) -> None:
        if ok != self.gateway_ok and self.gateway is not None:
            log = self.log.info if ok else self.log.warning
            log(f"management gateway {'reachable' if ok else 'unreachable'}",
                extra={"gateway": self.gateway, "gateway_ok": ok, "detail": detail})
        self.gateway_ok, self.latency, self.detail = ok, latency, detail

    async def _report(self, cause: str) -> None:
        try:
            await self.on_report(self.snapshot(), cause)
        except Exception as exc:  # a report that cannot go out never stops the watch
            self.log.warning("management report not delivered",
                             extra={"cause": cause, "error": repr(exc)})

    # ---- link events -----------------------------------------------------------
    async def watch_links(self) -> None:
        """Loop over link events until closed; a change of the management link is
        reported at once. Lost events (ENOBUFS) or a broken socket: open a new one and
        re-read the state."""
        while not self._closed:
            try:
                await self._read_events()
            except (OSError, NetlinkError, VtlhaError, TimeoutError) as exc:
                if self._closed:
                    return
                self.log.warning("link events lost; resynchronising",
                                 extra={"interface": self.interface, "error": repr(exc)})
                await self._resync()

    async def _read_events(self) -> None:
        assert self._events is not None, "MgmtMonitor.start() first"
        got = False
        async for msg in self._events.get():
            got = True
            await self._on_link_message(msg)
        if not got and not self._closed:  # a terminator: the socket went away
            raise VtlhaError("link event socket closed")

    async def _resync(self) -> None:
        try:
            await self._open_events()
            up, detail = await self._read_link()
        except (OSError, NetlinkError, VtlhaError, TimeoutError) as exc:
            self.log.warning("link event socket not reopened; retrying",
                             extra={"interface": self.interface, "error": repr(exc)})
            await asyncio.sleep(self.interval)
            return
        if self._set_link(up, "resync", detail):
            await self._report("link")

    async def _on_link_message(self, msg: Any) -> None:
        index = msg.get("index")
        if index != self._index and msg.get("ifname") != self.interface:
            return
        if msg.get("event") == "RTM_DELLINK":
            up, detail = False, f"interface {self.interface} deleted"
            self._index = None
        else:
            self._index = int(index)
            up = self._is_up(int(msg.get("flags") or 0))
            detail = f"link {self.interface} {'up' if up else 'down'}"
        if self._set_link(up, "event", detail):
            if not up and self.gateway is not None:
                self._set_gateway(False, None, f"{detail}; gateway {self.gateway} not probed")
            await self._report("link")

    # ---- ticks -------------------------------------------------------------------
    async def tick(self) -> None:
        """Re-read the link, probe the gateway, feed the hysteresis, report."""
        try:
            up, detail = await self._read_link()
        except (OSError, NetlinkError, VtlhaError) as exc:
            up, detail = False, f"cannot read link {self.interface}: {exc}"
        self._set_link(up, "poll", detail)
        if self.gateway is None:
            gw_ok, latency = None, None
        elif not up:
            gw_ok, latency = False, None
            detail = f"{detail}; gateway {self.gateway} not probed"
        else:
            latency, err = await self.prober.probe(self.gateway, self.timeout)
            gw_ok = err is None
            detail = (f"{detail}; gateway {self.gateway} answered in {latency * 1000:.2f} ms"
                      if latency is not None else f"{detail}; {err}")
        self._set_gateway(gw_ok, latency, detail)
        ok = up and gw_ok is not False
        self.health.update(ok)
        if self.health.changed:
            log = self.log.info if ok else self.log.warning
            log(f"management path {'healthy' if ok else 'failed'}",
                extra={"interface": self.interface, "healthy": ok, "detail": detail,
                       "rise": self.health.rise, "fall": self.health.fall})
        await self._report("probe")
