"""The netlink IP backend: floating addresses really configured, in-process (pyroute2).

The service runs inside its node's network namespace (``ip netns exec NS ...``), so
every socket here is opened in the process's own namespace. Tests pass ``netns`` to
work on a namespace of their own from outside (pyroute2 opens the sockets in it; the
namespace is never created here: ``flags=0``).

Where an address goes: data-group addresses on the data interface, management-group
addresses on the management interface. The interfaces are ``ip.data_interface`` /
``ip.mgmt_interface`` when set, else the interface that carries the node's
``service_ip`` resp. ``mgmt_ip``; a node without ``mgmt_ip`` puts management addresses
on the data interface. They are resolved once, at start, and a failure to resolve is
fatal and names the field, address or interface.

Floating addresses are added as /32 (PLATFORM.md: as /24 inside the primary's subnet
they would become secondary and vanish with the primary), announced by gratuitous ARP
at once and then repeated in the background, and a removal is verified by dumping the
addresses again.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vtlha.config import ClusterConfig
from vtlha.errors import FatalError, VtlhaError
from vtlha_ip_manager.garp import GarpSender, Interface

RTNL_TIMEOUT = 2.0  # seconds for one netlink request (they take ~0.2 ms)
T = TypeVar("T")


def ip_of(address: str) -> str:
    """'198.51.100.101/32' -> '198.51.100.101'."""
    return str(ipaddress.IPv4Interface(address).ip)


def open_rtnl(netns: str | None) -> AsyncIPRoute:
    """A route-netlink socket for requests (bound to no multicast group)."""
    if netns is None:
        return AsyncIPRoute()
    return AsyncIPRoute(netns=netns, flags=0)


async def bounded(aw: Awaitable[T], what: str, timeout: float = RTNL_TIMEOUT) -> T:
    """Await one netlink request with a timeout; a timeout is a VtlhaError naming it."""
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        raise VtlhaError(f"netlink: {what} got no answer within {timeout} s") from None


async def _collect(gen: Awaitable[AsyncIterator[Any]]) -> list[Any]:
    return [m async for m in await gen]


async def dump_addresses(ipr: AsyncIPRoute, timeout: float = RTNL_TIMEOUT) -> list[Any]:
    return await bounded(_collect(ipr.addr("dump", family=socket.AF_INET)),
                         "address dump", timeout)


async def dump_links(ipr: AsyncIPRoute, timeout: float = RTNL_TIMEOUT) -> list[Any]:
    return await bounded(_collect(ipr.link("dump")), "link dump", timeout)


def _interface(link: Any) -> Interface:
    return Interface(name=str(link.get("ifname")), index=int(link["index"]),
                     mac=str(link.get("address") or "00:00:00:00:00:00"))


async def resolve_interface(ipr: AsyncIPRoute, *, name: str | None, address: str | None,
                            what: str) -> Interface:
    """The interface called ``name`` if given, else the one carrying ``address``.
    ``what`` says where the name or address comes from, for the error."""
    links = await dump_links(ipr)
    if name is not None:
        for link in links:
            if link.get("ifname") == name:
                return _interface(link)
        raise FatalError(f"{what}: interface {name!r} does not exist in this network "
                         f"namespace (interfaces: "
                         f"{', '.join(str(lk.get('ifname')) for lk in links)})")
    if address is None:
        raise FatalError(f"{what}: neither an interface name nor an address to find it by")
    ip = ip_of(address)
    for a in await dump_addresses(ipr):
        if a.get("address") == ip:
            index = int(a["index"])
            for link in links:
                if int(link["index"]) == index:
                    return _interface(link)
    raise FatalError(f"{what}: address {ip} is configured on no interface in this network "
                     f"namespace; configure it or name the interface in the cluster file")


async def resolve_node_interfaces(ipr: AsyncIPRoute, config: ClusterConfig,
                                  node: str) -> dict[str, Interface]:
    """{"data": Interface, "mgmt": Interface} for ``node`` (see the module doc)."""
    n = config.node(node)
    data = await resolve_interface(
        ipr, name=config.ip.data_interface, address=n.service_ip,
        what="ip.data_interface" if config.ip.data_interface
        else f"{node}'s service_ip {n.service_ip}")
    if config.ip.mgmt_interface:
        mgmt = await resolve_interface(ipr, name=config.ip.mgmt_interface, address=None,
                                       what="ip.mgmt_interface")
    elif n.mgmt_ip is not None:
        mgmt = await resolve_interface(ipr, name=None, address=n.mgmt_ip,
                                       what=f"{node}'s mgmt_ip {n.mgmt_ip}")
    else:
        mgmt = data
    return {"data": data, "mgmt": mgmt}


class NetlinkBackend:
    """IpBackend over route netlink; see the module doc."""

    def __init__(self, config: ClusterConfig, node: str, log: logging.Logger | None = None,
                 netns: str | None = None, timeout: float = RTNL_TIMEOUT) -> None:
        self.config = config
        self.node = node
        self.netns = netns
        self.timeout = timeout
        self.log = log or logging.getLogger("vtlha.ip-manager.netlink")
        self.description = ("netlink: addresses configured in this network namespace"
                            if netns is None else
                            f"netlink: addresses configured in network namespace {netns}")
        pair = config.pair_of(node)
        fixed = {ip_of(n.service_ip) for n in pair.nodes} | {
            ip_of(n.mgmt_ip) for n in pair.nodes if n.mgmt_ip}
        #: floating address (as the config writes it) -> "data" | "mgmt"
        self.kinds: dict[str, str] = {}
        for n in pair.nodes:
            for kind, addrs in (("data", n.groups.data.addresses),
                                ("mgmt", n.groups.mgmt.addresses)):
                for a in addrs:
                    if ip_of(a) not in fixed:
                        self.kinds[a] = kind
        self._by_ip = {ip_of(a): a for a in self.kinds}
        self.interfaces: dict[str, Interface] = {}
        self.garp = GarpSender(config.ip.garp_count, config.ip.garp_interval, self.log, netns)
        self._ipr: AsyncIPRoute | None = None
        #: one netlink request at a time on the socket: the kernel refuses a second dump
        #: while one is under way (EBUSY), and every group's enforce loop asks
        self._rtnl_lock = asyncio.Lock()
        #: figures of the last add/remove, seconds (status and the bench read them)
        self.last_add: float | None = None
        self.last_remove: float | None = None

    # ---- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        """Open the sockets and resolve the interfaces; FatalError when it cannot."""
        try:
            self._ipr = open_rtnl(self.netns)
            self.interfaces = await resolve_node_interfaces(self._ipr, self.config, self.node)
            self.garp.open()
        except (OSError, NetlinkError) as exc:
            await self.close()
            raise FatalError(f"netlink backend: cannot open its sockets"
                             f"{f' in network namespace {self.netns}' if self.netns else ''}: "
                             f"{exc}") from exc
        except FatalError:
            await self.close()
            raise
        self.log.info("netlink backend ready", extra={
            "interfaces": {k: i.name for k, i in self.interfaces.items()},
            "floating": sorted(self.kinds), "netns": self.netns})

    async def close(self) -> None:
        await self.garp.close()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    @property
    def ipr(self) -> AsyncIPRoute:
        assert self._ipr is not None, "NetlinkBackend.start() first"
        return self._ipr

    def interface_of(self, address: str) -> Interface:
        kind = self.kinds.get(address)
        if kind is None:
            raise VtlhaError(f"{address} is not a floating address of {self.node}'s pair")
        return self.interfaces[kind]

    def status(self) -> dict[str, Any]:
        return {"interfaces": {k: i.name for k, i in self.interfaces.items()},
                "garp_sent": self.garp.sent, "garp_errors": self.garp.errors,
                "garp_withheld": self.garp.withheld,
                "garp_pending": self.garp.pending(),
                "last_add_s": self.last_add, "last_remove_s": self.last_remove}

    async def _rtnl(self, request: Callable[[], Awaitable[T]], what: str) -> T:
        """One netlink request, alone on the socket, with the timeout."""
        async with self._rtnl_lock:
            return await bounded(request(), what, self.timeout)

    # ---- IpBackend -----------------------------------------------------------
    async def _configured(self) -> dict[str, list[tuple[int, int]]]:
        """floating address -> [(ifindex, prefixlen)] where it is configured now."""
        out: dict[str, list[tuple[int, int]]] = {}
        dump: list[Any] = await self._rtnl(
            lambda: _collect(self.ipr.addr("dump", family=socket.AF_INET)), "address dump")
        for a in dump:
            addr = self._by_ip.get(str(a.get("address")))
            if addr is not None:
                out.setdefault(addr, []).append((int(a["index"]), int(a["prefixlen"])))
        return out

    async def held(self) -> set[str]:
        return set(await self._configured())

    #: kernel lifetime (valid_lft, whole seconds) of added addresses, extended by renew():
    #: the backstop that removes a dead ip-manager's address by itself (None: forever)
    lifetime: int | None = None

    def _lft(self) -> dict[str, int]:
        return {} if self.lifetime is None else {"valid_lft": self.lifetime,
                                                 "preferred_lft": self.lifetime}

    async def add(self, address: str) -> None:
        iface = self.interface_of(address)
        t0 = time.perf_counter()
        ip = ip_of(address)
        try:
            await self._rtnl(lambda: self.ipr.addr(
                "replace" if self.lifetime else "add", index=iface.index, address=ip,
                prefixlen=32, **self._lft()), f"add {ip}/32 on {iface.name}")
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise VtlhaError(f"cannot add {ip}/32 on {iface.name}: {exc}") from exc
        self.garp.announce(iface, address)
        self.last_add = time.perf_counter() - t0
        self.log.info("address added", extra={"address": address, "interface": iface.name,
                                              "add_s": round(self.last_add, 6)})

    async def renew(self, address: str) -> None:
        """Extend the address's kernel lifetime (no gratuitous ARP)."""
        if self.lifetime is None:
            return
        iface = self.interface_of(address)
        ip = ip_of(address)
        try:
            await self._rtnl(lambda: self.ipr.addr("replace", index=iface.index, address=ip,
                                                   prefixlen=32, **self._lft()),
                             f"renew {ip}/32")
        except NetlinkError as exc:
            raise VtlhaError(f"cannot renew {ip}/32 on {iface.name}: {exc}") from exc

    async def _delete(self, index: int, ip: str, prefixlen: int) -> bool:
        """Delete one address; False when it was not there (EADDRNOTAVAIL)."""
        try:
            await self._rtnl(lambda: self.ipr.addr("del", index=index, address=ip,
                                                   prefixlen=prefixlen),
                             f"delete {ip}/{prefixlen}")
        except NetlinkError as exc:
            if exc.code == errno.EADDRNOTAVAIL:
                return False
            raise VtlhaError(f"cannot delete {ip}/{prefixlen}: {exc}") from exc
        return True

    async def remove(self, address: str) -> None:
        """Delete the address where it is expected (/32 on its interface), then dump
        to verify: whatever is left (another prefix or interface) is deleted too, and
        an address still there after that is an error."""
        self.garp.cancel(address)  # never announce an address we no longer hold
        t0 = time.perf_counter()
        ip = ip_of(address)
        deleted: list[tuple[int, int]] = []
        if address in self.kinds:
            index = self.interface_of(address).index
            if await self._delete(index, ip, 32):
                deleted.append((index, 32))
        for _ in range(2):
            left = (await self._configured()).get(address, [])
            if not left:
                break
            for index, prefixlen in left:
                if await self._delete(index, ip, prefixlen):
                    deleted.append((index, prefixlen))
        else:
            raise VtlhaError(f"{ip} is still configured after its deletion "
                             f"(interface indexes {[i for i, _ in left]})")
        if not deleted:
            return
        self.last_remove = time.perf_counter() - t0
        self.log.info("address removed", extra={"address": address, "was_on": deleted,
                                                "remove_s": round(self.last_remove, 6)})
