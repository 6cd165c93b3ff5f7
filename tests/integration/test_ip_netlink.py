"""The netlink IP backend and the management-path monitor, in real network namespaces.

Each test builds its own topology (pyroute2): a "node" namespace and a "client"
namespace joined by two veth pairs, one on the data network and one on the management
network, where the client side also holds the management gateway:

    node  vd0 198.51.100.1/24  <-->  vc0 198.51.100.50/24   client
    node  vm0 203.0.113.1/24   <-->  vg0 203.0.113.254/24   client (the gateway)

Everything is removed in the fixture's teardown, failed test or not. The backend and
the monitor are driven in-process through their ``netns`` parameter (tests only: the
service opens its sockets in its own namespace); one test runs the real service inside
the node namespace (``ip netns exec``) against a nats-server in the client namespace.

Synchronisation is a poll with a deadline or a wait for a report with a deadline,
never a bare sleep. Figures (add/remove latency, time until the gratuitous ARP took
effect, link-event detection time) are printed (``pytest -s``) and kept in FIGURES."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import orjson
import pytest
import yaml
from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2 import netns as pr_netns
from vtlha_ip_manager.main import NOT_ROOT
from vtlha_ip_manager.mgmt import MgmtMonitor, MgmtSnapshot
from vtlha_ip_manager.netlink import NetlinkBackend

from tests.integration.natsutil import metric
from vtlha import bus, eventlog
from vtlha.config import ClusterConfig, parse_config
from vtlha.errors import FatalError
from vtlha.health import Hysteresis
from vtlha.messages import Ack, Command, LeaseNotice, MgmtReport, decode, encode
from vtlha.subjects import Subjects
from vtlha_lab.natsserver import NatsServer, NatsServerSpec
from vtlha_lab.ports import free_port

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
BIN = Path(sys.executable).parent
NUD_STALE = 0x04
DEADLINE = 5.0  # seconds for anything that should take milliseconds
FIGURES: dict[str, list[float]] = {}
_seq = itertools.count()
T = TypeVar("T")


def figure(name: str, seconds: float) -> None:
    FIGURES.setdefault(name, []).append(seconds)
    print(f"[figure] {name}: {seconds * 1000:.3f} ms")


# ---- topology -----------------------------------------------------------------------

@dataclass
class Topo:
    node: str
    client: str
    macs: dict[str, str]  # node-side interface -> MAC

    # client-side names and addresses
    CLIENT_DATA = "vc0"
    CLIENT_MGMT = "vg0"
    CLIENT_IP = "198.51.100.50"
    GATEWAY = "203.0.113.254"


def _ifindex(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    assert found, f"no interface {name}"
    return int(found[0])


def _build(node: str, client: str) -> dict[str, str]:
    """Links and addresses of the topology (namespaces exist already)."""
    macs: dict[str, str] = {}
    with IPRoute(netns=client, flags=0) as ipr:
        # Take two interface indexes in the client, so that no veth end has the same
        # index as its peer: the kernel's linkwatch takes such a veth for one with no
        # lower device and delays its carrier events by up to a second.
        ipr.link("add", ifname="vx0", kind="veth", peer={"ifname": "vx1"})
    with IPRoute(netns=node, flags=0) as ipr:
        ipr.link("add", ifname="vd0", kind="veth", peer={"ifname": "vc0", "net_ns_fd": client})
        ipr.link("add", ifname="vm0", kind="veth", peer={"ifname": "vg0", "net_ns_fd": client})
        for name, addr in (("vd0", "198.51.100.1"), ("vm0", "203.0.113.1")):
            i = _ifindex(ipr, name)
            ipr.addr("add", index=i, address=addr, prefixlen=24)
            ipr.link("set", index=i, state="up")
            macs[name] = str(ipr.get_links(i)[0].get("address"))
        ipr.link("set", index=_ifindex(ipr, "lo"), state="up")
    with IPRoute(netns=client, flags=0) as ipr:
        for name, addr in (("vc0", Topo.CLIENT_IP), ("vg0", Topo.GATEWAY)):
            i = _ifindex(ipr, name)
            ipr.addr("add", index=i, address=addr, prefixlen=24)
            ipr.link("set", index=i, state="up")
        ipr.link("set", index=_ifindex(ipr, "lo"), state="up")
    return macs


@pytest.fixture
def topo() -> Iterator[Topo]:
    n = next(_seq)
    node, client = f"vtlt-{os.getpid()}-{n}n", f"vtlt-{os.getpid()}-{n}c"
    made: list[str] = []
    try:
        for ns in (node, client):
            pr_netns.create(ns)
            made.append(ns)
        yield Topo(node=node, client=client, macs=_build(node, client))
    finally:
        for ns in made:  # removing a namespace removes its veth ends too
            pr_netns.remove(ns)


def make_config(**ip: Any) -> ClusterConfig:
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    raw["ip"] = {"backend": "netlink", "garp_count": 3, "garp_interval": 0.05, **ip}
    return parse_config(raw, "test")


async def poll(check: Callable[[], Awaitable[T | None]], what: str,
               timeout: float = DEADLINE, interval: float = 0.001) -> T:
    """Await ``check()`` until it returns something other than None or False."""
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def addresses(ipr: AsyncIPRoute) -> dict[str, tuple[str, int]]:
    """ip -> (interface name, prefixlen) of every IPv4 address in ``ipr``'s namespace."""
    names = {int(lk["index"]): str(lk.get("ifname")) async for lk in await ipr.link("dump")}
    return {str(a.get("address")): (names[int(a["index"])], int(a["prefixlen"]))
            async for a in await ipr.addr("dump", family=socket.AF_INET)}


async def lladdr(ipr: AsyncIPRoute, ifname: str, ip: str) -> str | None:
    index = (await ipr.link_lookup(ifname=ifname))[0]
    async for n in await ipr.neigh("dump", ifindex=index):
        if n.get("dst") == ip:
            return str(n.get("lladdr"))
    return None


async def backend_in(topo: Topo, cfg: ClusterConfig | None = None,
                     node: str = "node-a") -> NetlinkBackend:
    b = NetlinkBackend(cfg or make_config(), node, netns=topo.node)
    await b.start()
    return b


# ---- the backend ----------------------------------------------------------------------

@pytest.mark.parametrize(("address", "interface"), [("198.51.100.101/32", "vd0"),
                                                    ("203.0.113.101/32", "vm0"),
                                                    ("198.51.100.102/32", "vd0"),  # companion's
                                                    ("203.0.113.102/32", "vm0")])
async def test_add_puts_a_32_on_the_interface_of_its_group(topo: Topo, address: str,
                                                           interface: str) -> None:
    b = await backend_in(topo)
    try:
        assert b.interfaces["data"].name == "vd0" and b.interfaces["mgmt"].name == "vm0"
        t0 = time.perf_counter()
        await b.add(address)
        figure("add", time.perf_counter() - t0)
        async with AsyncIPRoute(netns=topo.node, flags=0) as ipr:
            ip = address.split("/")[0]
            assert (await addresses(ipr))[ip] == (interface, 32)
        assert await b.held() == {address}
    finally:
        await b.close()


@pytest.mark.parametrize(("address", "node_if", "client_if"),
                         [("198.51.100.101/32", "vd0", Topo.CLIENT_DATA),
                          ("203.0.113.101/32", "vm0", Topo.CLIENT_MGMT)])
async def test_gratuitous_arp_moves_the_clients_neighbour_entry(
        topo: Topo, address: str, node_if: str, client_if: str) -> None:
    """The client believes the address is at another MAC (a stale entry, as after the
    companion held it); the gratuitous ARP sent right after the add moves it to ours."""
    ip = address.split("/")[0]
    other = "02:00:00:00:00:99"
    b = await backend_in(topo)
    try:
        async with AsyncIPRoute(netns=topo.client, flags=0) as cli:
            index = (await cli.link_lookup(ifname=client_if))[0]
            await cli.neigh("replace", dst=ip, lladdr=other, ifindex=index, state=NUD_STALE)
            assert await lladdr(cli, client_if, ip) == other
            t0 = time.perf_counter()
            await b.add(address)
            mac = await poll(lambda: _mac_if(cli, client_if, ip, topo.macs[node_if]),
                             f"the client's neighbour entry for {ip} to show {node_if}'s MAC")
            figure("garp_effect", time.perf_counter() - t0)
            assert mac == topo.macs[node_if]
    finally:
        await b.close()


async def _mac_if(cli: AsyncIPRoute, ifname: str, ip: str, want: str) -> str | None:
    got = await lladdr(cli, ifname, ip)
    return got if got == want else None


def _arp_sniffer(topo: Topo) -> socket.socket:
    s: socket.socket = pr_netns.create_socket(topo.client, socket.AF_PACKET, socket.SOCK_RAW,
                                              socket.htons(0x0806), flags=0)
    s.bind((Topo.CLIENT_DATA, 0x0806))
    s.setblocking(False)
    return s


async def _count_garps(s: socket.socket, ip: str, mac: str, until: float) -> int:
    """Gratuitous ARP frames for ``ip`` from ``mac`` seen until ``until`` (monotonic)."""
    loop = asyncio.get_running_loop()
    want_ip = socket.inet_aton(ip)
    n = 0
    while (left := until - time.monotonic()) > 0:
        try:
            frame = await asyncio.wait_for(loop.sock_recv(s, 2048), left)
        except TimeoutError:
            break
        arp = frame[14:42]
        op = struct.unpack("!H", arp[6:8])[0]
        sha, spa, tpa = arp[8:14], arp[14:18], arp[24:28]
        if op == 1 and spa == tpa == want_ip and sha.hex(":") == mac:
            n += 1
    return n


async def test_gratuitous_arp_is_repeated_garp_count_times(topo: Topo) -> None:
    s = _arp_sniffer(topo)
    b = await backend_in(topo, make_config(garp_count=4, garp_interval=0.05))
    try:
        await b.add("198.51.100.101/32")
        # add() returned with repeats still to send: it did not wait for them
        assert b.garp.pending(), "add() must not wait for the repeats"
        await poll(lambda: _done(b), "the repeats to end", timeout=2.0)
        n = await _count_garps(s, "198.51.100.101", topo.macs["vd0"], time.monotonic() + 0.1)
        assert n == 4 == b.garp.sent
    finally:
        s.close()
        await b.close()


async def _done(b: NetlinkBackend) -> bool:
    return not b.garp.pending()


async def test_remove_cancels_the_repeats(topo: Topo) -> None:
    """Never announce an address after it was released."""
    s = _arp_sniffer(topo)
    b = await backend_in(topo, make_config(garp_count=50, garp_interval=0.02))
    try:
        await b.add("198.51.100.101/32")
        await poll(lambda: _sent_at_least(b, 3), "three gratuitous ARPs")
        await b.remove("198.51.100.101/32")
        sent = b.garp.sent
        assert b.garp.pending() == []
        # Nothing more may arrive: watch for ten more intervals.
        n = await _count_garps(s, "198.51.100.101", topo.macs["vd0"], time.monotonic() + 0.2)
        assert n == sent
    finally:
        s.close()
        await b.close()


async def test_no_gratuitous_arp_once_the_group_is_no_longer_held(topo: Topo) -> None:
    """Issue 14: an ip-manager frozen just after adding an address and resumed after its
    lease ran out (the group moved) must not send the repeats that fell due meanwhile.
    The freeze is a blocking sleep of the whole event loop (as SIGSTOP: every timer is
    due at once on resume, before the enforcement loop could remove the address); the
    lease is ``may_send``, as the ip-manager wires it to its hold rule."""
    s = _arp_sniffer(topo)
    b = await backend_in(topo, make_config(garp_count=5, garp_interval=0.05))
    lease_until = time.monotonic() + 0.1
    b.garp.may_send = lambda address: time.monotonic() < lease_until
    try:
        await b.add("198.51.100.101/32")  # the first announcement goes out at once
        time.sleep(0.4)  # frozen: the lease runs out, four repeats fall due  # noqa: ASYNC251
        await poll(lambda: _done(b), "the repeats to end", timeout=2.0)
        n = await _count_garps(s, "198.51.100.101", topo.macs["vd0"], time.monotonic() + 0.2)
        assert (n, b.garp.sent) == (1, 1)
        assert b.garp.withheld == 1  # the first due repeat is withheld and ends the rest
    finally:
        s.close()
        await b.close()


async def _sent_at_least(b: NetlinkBackend, n: int) -> bool:
    return b.garp.sent >= n


async def test_remove_deletes_and_verifies(topo: Topo) -> None:
    b = await backend_in(topo)
    try:
        for a in ("198.51.100.101/32", "203.0.113.101/32"):
            await b.add(a)
        async with AsyncIPRoute(netns=topo.node, flags=0) as ipr:
            # one configured by hand with another prefix still counts, and goes too
            await ipr.addr("add", index=(await ipr.link_lookup(ifname="vd0"))[0],
                           address="198.51.100.102", prefixlen=24)
            assert await b.held() == {"198.51.100.101/32", "203.0.113.101/32",
                                      "198.51.100.102/32"}
            for a in ("198.51.100.101/32", "198.51.100.102/32"):
                t0 = time.perf_counter()
                await b.remove(a)
                figure("remove", time.perf_counter() - t0)
            have = await addresses(ipr)
            assert "198.51.100.101" not in have and "198.51.100.102" not in have
            assert have["203.0.113.101"] == ("vm0", 32)
            assert await b.held() == {"203.0.113.101/32"}
    finally:
        await b.close()


async def test_held_lists_only_the_pairs_floating_addresses(topo: Topo) -> None:
    b = await backend_in(topo)
    try:
        assert await b.held() == set()  # the fixed service and mgmt IPs are not floating
        async with AsyncIPRoute(netns=topo.node, flags=0) as ipr:
            vd0 = (await ipr.link_lookup(ifname="vd0"))[0]
            await ipr.addr("add", index=vd0, address="198.51.100.77", prefixlen=32)  # not ours
            await b.add("203.0.113.102/32")
            assert await b.held() == {"203.0.113.102/32"}
            assert "198.51.100.77" in await addresses(ipr)
    finally:
        await b.close()


async def test_add_and_remove_are_idempotent(topo: Topo) -> None:
    b = await backend_in(topo)
    try:
        await b.remove("198.51.100.101/32")  # not held: nothing happens
        await b.add("198.51.100.101/32")
        await b.add("198.51.100.101/32")  # held: no EEXIST, just announced again
        assert await b.held() == {"198.51.100.101/32"}
        await b.remove("198.51.100.101/32")
        await b.remove("198.51.100.101/32")
        assert await b.held() == set()
    finally:
        await b.close()


async def test_concurrent_requests_share_the_socket_without_ebusy(topo: Topo) -> None:
    """Every group's enforce loop asks at once (the chaos suite saw NetlinkError 16,
    'Device or resource busy': a second dump on the socket while one is under way)."""
    b = await backend_in(topo)
    addrs = ["198.51.100.101/32", "198.51.100.102/32", "203.0.113.101/32",
             "203.0.113.102/32"]
    try:
        for _ in range(5):
            await asyncio.gather(*(b.add(a) for a in addrs), *(b.held() for _ in range(20)))
            assert await b.held() == set(addrs)
            await asyncio.gather(*(b.remove(a) for a in addrs),
                                 *(b.held() for _ in range(20)))
            assert await b.held() == set()
    finally:
        await b.close()


async def test_without_mgmt_ip_mgmt_addresses_go_on_the_data_interface(topo: Topo) -> None:
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    del raw["pairs"][0]["nodes"][0]["mgmt_ip"]
    b = await backend_in(topo, parse_config(raw, "test"))
    try:
        assert b.interfaces["mgmt"].name == "vd0"
        await b.add("203.0.113.101/32")
        async with AsyncIPRoute(netns=topo.node, flags=0) as ipr:
            assert (await addresses(ipr))["203.0.113.101"] == ("vd0", 32)
    finally:
        await b.close()


async def test_named_interfaces_win_and_unknown_ones_are_fatal(topo: Topo) -> None:
    # Named in the cluster file: data addresses on vm0 (odd, but asked for).
    b = await backend_in(topo, make_config(data_interface="vm0"))
    try:
        assert b.interfaces["data"].name == "vm0"
    finally:
        await b.close()
    with pytest.raises(FatalError, match=r"ip\.mgmt_interface: interface 'nope0' does not"):
        await backend_in(topo, make_config(mgmt_interface="nope0"))
    # node-b's service IP is not configured in this namespace: the error names it.
    with pytest.raises(FatalError, match=r"node-b's service_ip 198\.51\.100\.2/24.*198\.51\."
                                         r"100\.2 is configured on no interface"):
        await backend_in(topo, node="node-b")


# ---- the management-path monitor -------------------------------------------------------

class Reports:
    """Collects the monitor's snapshots; waits for one that matches, with a deadline."""

    def __init__(self) -> None:
        self.items: list[tuple[float, str, MgmtSnapshot]] = []
        self._changed = asyncio.Condition()

    async def __call__(self, snap: MgmtSnapshot, cause: str) -> None:
        async with self._changed:
            self.items.append((time.perf_counter(), cause, snap))
            self._changed.notify_all()

    async def wait(self, pred: Callable[[str, MgmtSnapshot], bool], what: str,
                   after: int = 0, timeout: float = DEADLINE) -> tuple[int, float, MgmtSnapshot]:
        """(index, perf_counter at report, snapshot) of the first match from ``after`` on."""

        def first() -> tuple[int, float, MgmtSnapshot] | None:
            for i, (t, cause, snap) in enumerate(self.items[after:], after):
                if pred(cause, snap):
                    return i, t, snap
            return None

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: first() is not None),
                                       timeout)
            except TimeoutError:
                last = self.items[-1][2] if self.items else None
                raise AssertionError(
                    f"no report {what} within {timeout} s; last: {last}") from None
            found = first()
            assert found is not None
            return found

    def ticks_between(self, start: int, end: int) -> int:
        return sum(1 for _, cause, _ in self.items[start + 1:end + 1] if cause == "probe")


class Driven:
    """Runs a MgmtMonitor as the service does: link events in one task, ticks at the
    interval in another."""

    def __init__(self, mon: MgmtMonitor) -> None:
        self.mon = mon
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Driven:
        await self.mon.start()
        self.tasks = [asyncio.create_task(self.mon.watch_links()),
                      asyncio.create_task(self._ticks())]
        return self

    async def _ticks(self) -> None:
        while True:
            t0 = time.monotonic()
            await self.mon.tick()
            await asyncio.sleep(max(0.0, self.mon.interval - (time.monotonic() - t0)))

    async def __aexit__(self, *exc: object) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.mon.close()


INTERVAL = 0.1
RISE, FALL = 2, 3


def monitor(topo: Topo, reports: Reports, gateway: str | None = Topo.GATEWAY) -> MgmtMonitor:
    return MgmtMonitor(interface="vm0", source_ip="203.0.113.1", gateway=gateway,
                       interval=INTERVAL, timeout=1.0, rise=RISE, fall=FALL,
                       on_report=reports, netns=topo.node)


def _healthy(cause: str, s: MgmtSnapshot) -> bool:
    return cause == "probe" and s.healthy and s.link_up and s.gateway_ok is True


async def _set_link(ns: str, ifname: str, state: str) -> float:
    async with AsyncIPRoute(netns=ns, flags=0) as ipr:
        index = (await ipr.link_lookup(ifname=ifname))[0]
        t0 = time.perf_counter()
        await ipr.link("set", index=index, state=state)
        return t0


async def test_mgmt_link_down_is_reported_at_once_and_fails_after_fall(topo: Topo) -> None:
    reports = Reports()
    async with Driven(monitor(topo, reports)):
        i0, _, snap = await reports.wait(_healthy, "healthy with the gateway answering")
        assert snap.latency is not None and 0 < snap.latency < INTERVAL
        figure("gateway_rtt", snap.latency)

        t0 = await _set_link(topo.node, "vm0", "down")
        i1, t1, snap = await reports.wait(lambda c, s: c == "link" and not s.link_up,
                                          "of the link going down", after=i0)
        figure("link_event_detection", t1 - t0)
        assert snap.healthy, "one link event must not skip the hysteresis"
        i2, _, snap = await reports.wait(lambda c, s: not s.healthy, "unhealthy", after=i1,
                                         timeout=(FALL + 2) * INTERVAL + 1)
        assert not snap.link_up and snap.gateway_ok is False
        assert reports.ticks_between(i1, i2) == FALL

        t0 = await _set_link(topo.node, "vm0", "up")
        i3, t3, _ = await reports.wait(lambda c, s: c == "link" and s.link_up,
                                       "of the link coming up", after=i2)
        figure("link_event_detection", t3 - t0)
        i4, _, snap = await reports.wait(_healthy, "healthy again", after=i3,
                                         timeout=(RISE + 2) * INTERVAL + 1)
        assert reports.ticks_between(i3, i4) == RISE


async def test_mgmt_carrier_loss_from_the_peer_is_a_link_down(topo: Topo) -> None:
    reports = Reports()
    async with Driven(monitor(topo, reports)):
        i0, _, _ = await reports.wait(_healthy, "healthy")
        t0 = await _set_link(topo.client, Topo.CLIENT_MGMT, "down")
        _, t1, _ = await reports.wait(lambda c, s: c == "link" and not s.link_up,
                                      "of the carrier loss", after=i0)
        figure("carrier_loss_detection", t1 - t0)
        await reports.wait(lambda c, s: not s.healthy, "unhealthy", after=i0)


async def _gateway_address(topo: Topo, command: str) -> None:
    async with AsyncIPRoute(netns=topo.client, flags=0) as ipr:
        index = (await ipr.link_lookup(ifname=Topo.CLIENT_MGMT))[0]
        await ipr.addr(command, index=index, address=Topo.GATEWAY, prefixlen=24)


async def test_mgmt_gateway_unreachable_fails_after_fall(topo: Topo) -> None:
    reports = Reports()
    async with Driven(monitor(topo, reports)):
        i0, _, _ = await reports.wait(_healthy, "healthy")
        await _gateway_address(topo, "del")
        i1, _, snap = await reports.wait(lambda c, s: s.gateway_ok is False,
                                         "with the gateway unreachable", after=i0)
        assert snap.link_up and snap.healthy and snap.latency is None
        assert f"no echo reply from {Topo.GATEWAY}" in snap.detail
        i2, _, snap = await reports.wait(lambda c, s: not s.healthy, "unhealthy", after=i1)
        assert snap.link_up and snap.gateway_ok is False
        assert reports.ticks_between(i1, i2) == FALL - 1  # i1 itself was the first bad tick
        await _gateway_address(topo, "add")
        await reports.wait(_healthy, "healthy again", after=i2)


async def test_mgmt_without_gateway_watches_the_link_only(topo: Topo) -> None:
    reports = Reports()
    async with Driven(monitor(topo, reports, gateway=None)):
        i0, _, snap = await reports.wait(lambda c, s: c == "probe" and s.healthy, "healthy")
        assert snap.gateway_ok is None and snap.latency is None
        await _set_link(topo.node, "vm0", "down")
        _, _, snap = await reports.wait(lambda c, s: not s.healthy, "unhealthy", after=i0)
        assert snap.gateway_ok is None


def test_hysteresis_needs_rise_and_fall_in_a_row() -> None:
    """The management path's health uses vtlha.health.Hysteresis (one implementation)."""
    h = Hysteresis(rise=2, fall=3)

    def feed(ok: bool) -> bool:
        h.update(ok)
        return h.changed

    assert feed(True) and h.state is True  # the first sample sets it
    assert [feed(x) for x in (False, False, True, False, False)] == [False] * 5
    assert h.state is True
    assert feed(False) and h.state is False  # third bad in a row
    assert not feed(True) and feed(True) and h.state is True


# ---- the service -----------------------------------------------------------------------

def test_netlink_backend_is_refused_without_root(tmp_path: Path) -> None:
    state = tmp_path / "never"
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         str(BIN / "vtlha-ip-manager"), "--config", str(EXAMPLE), "--node", "node-a",
         "--backend", "netlink", "--nats", "nats://127.0.0.1:1", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    lines = [orjson.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert any(rec.get("msg") == "fatal" and rec.get("error") == NOT_ROOT for rec in lines), \
        proc.stderr
    assert not state.exists()


class NsLoop:
    """An event loop on a thread of its own that lives in a network namespace (setns
    changes only the calling thread), so the test can talk to NATS and HTTP there.
    Never use run_in_executor/to_thread on it: those threads are in the host's one."""

    def __init__(self, ns: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        ready = threading.Event()

        def _run() -> None:
            try:
                pr_netns.setns(ns, flags=0, fork=False)
            except BaseException as exc:
                self.error = exc
                ready.set()
                return
            asyncio.set_event_loop(self.loop)
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=_run, name=f"netns-{ns}", daemon=True)
        self.thread.start()
        if not ready.wait(DEADLINE) or self.error is not None:
            raise RuntimeError(f"cannot enter namespace {ns}: {self.error!r}")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run a blocking ``fn`` on the namespace's thread (it blocks its loop)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def _do() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(_do)
        return fut.result(timeout)

    def http(self, url: str) -> tuple[int, bytes]:
        def _get() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(url, timeout=1.0) as r:
                    return int(r.status), bytes(r.read())
            except urllib.error.HTTPError as exc:
                return exc.code, b""

        return self.call(_get)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()


def _wait(check: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def _node_addresses(topo: Topo) -> dict[str, tuple[str, int]]:
    with IPRoute(netns=topo.node, flags=0) as ipr:
        names = {int(lk["index"]): str(lk.get("ifname")) for lk in ipr.get_links()}
        return {str(a.get("address")): (names[int(a["index"])], int(a["prefixlen"]))
                for a in ipr.get_addr(family=socket.AF_INET)}


class Bus:
    """The test's NATS client, in the client namespace; collects mgmt reports."""

    def __init__(self, ns: NsLoop, url: str, cluster: str) -> None:
        self.ns = ns
        self.subjects = Subjects(cluster)
        self.cluster = cluster
        self.reports: list[MgmtReport] = []

        async def _connect() -> Any:
            nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)

            async def _on(msg: Any) -> None:
                self.reports.append(decode(MgmtReport, msg.data))

            await nc.subscribe(self.subjects.mgmt("node-a"), cb=_on)
            # The arbiter creates the event stream and the KV bucket; none runs here.
            await bus.ensure_events_stream(nc.jetstream(), self.subjects, replicas=1,
                                           max_bytes=1 << 20, max_age=3600.0)
            await bus.ensure_kv(nc.jetstream(), self.subjects, replicas=1)
            return nc

        self.nc = ns.run(_connect())

    def command(self, action: str, group: str, epoch: int = 1) -> Ack:
        cmd = Command(cluster=self.cluster, node="witness", term=1, epoch=epoch, group=group,
                      action=action)
        reply = self.ns.run(self.nc.request(self.subjects.cmd("node-a", "ip-manager"),
                                            encode(cmd), timeout=3.0))
        return decode(Ack, reply.data)

    def notice(self, group: str, epoch: int = 1, valid_for: float = 60.0) -> None:
        """Stand in for node-a's lease holder: a lease notice for ``group`` (the
        ip-manager holds a group only with an acquire command AND a valid notice)."""
        n = LeaseNotice(cluster=self.cluster, node="node-a", group=group, epoch=epoch,
                        valid_until=time.monotonic() + valid_for)
        self.ns.run(self.nc.publish(self.subjects.lease("node-a"), encode(n)))
        self.ns.run(self.nc.flush())

    def events(self, kind: str) -> list[Any]:
        evs = self.ns.run(eventlog.read(self.nc.jetstream(), self.subjects))
        return [e for _, e in evs if e.kind == kind]

    def report_after(self, n: int, pred: Callable[[MgmtReport], bool]) -> MgmtReport | None:
        return next((r for r in self.reports[n:] if pred(r)), None)

    def close(self) -> None:
        self.ns.run(self.nc.close())


def test_service_with_netlink_backend_in_a_namespace(topo: Topo, tmp_path: Path) -> None:
    """The real service, started with `ip netns exec` and no netns argument: reconcile,
    commands (acquire, no-op acquire, companion's group, release, no-op release), the
    management report on the bus, /status and /metrics, SIGTERM."""
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    raw["cluster"] = f"ipnl{os.getpid()}"
    raw["nats"] = {"servers": ["witness"], "replicas": 1}  # one server, in the client ns
    raw["state_dir"] = str(tmp_path / "state")
    raw["ip"] = {"backend": "netlink", "garp_count": 2, "garp_interval": 0.05}
    raw["timings"].update(probe_interval=0.1, rise=2, fall=2)
    cfg_path = tmp_path / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))

    spec = NatsServerSpec(name="nsnats", client_port=4222, monitor_port=8222,
                          store_dir=tmp_path / "nats" / "js", host=Topo.CLIENT_IP)
    srv = NatsServer(spec, tmp_path / "nats.log", prefix=["ip", "netns", "exec", topo.client])
    cns = NsLoop(topo.client)
    nns = NsLoop(topo.node)
    svc: subprocess.Popen[bytes] | None = None
    client: Bus | None = None
    log = tmp_path / "ip-manager.log"
    try:
        srv.start()
        srv.wait_ready(fetch=lambda p: cns.http(f"http://{Topo.CLIENT_IP}:8222{p}")[0])
        client = Bus(cns, spec.url, raw["cluster"])
        with IPRoute(netns=topo.node, flags=0) as ipr:  # left over from an earlier run
            ipr.addr("add", index=_ifindex(ipr, "vd0"), address="198.51.100.101", prefixlen=32)
        with open(log, "wb") as out:
            svc = subprocess.Popen(
                ["ip", "netns", "exec", topo.node, str(BIN / "vtlha-ip-manager"), "--config",
                 str(cfg_path), "--node", "node-a", "--nats", spec.url, "--http-port", "9103"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        status_url = "http://127.0.0.1:9103"

        def ready() -> bool:
            assert svc is not None and svc.poll() is None, f"the service exited: {svc}"
            return nns.http(f"{status_url}/readyz")[0] == 200

        _wait(ready, "the service to be ready", timeout=15)

        # Reconciled at start: nobody owns node-a-data in the KV.
        assert "198.51.100.101" not in _node_addresses(topo)
        assert [e.group for e in client.events("address.reconciled")] == ["node-a-data"]

        # The management report: measured, healthy, with the gateway's latency.
        rep = _wait(lambda: client.report_after(0, lambda r: r.monitored and r.healthy
                                             and r.gateway_ok is True), "a healthy report")
        assert rep.latency is not None and rep.latency > 0

        # Level-triggered: the lease notices alone make it hold, no command needed.
        client.notice("node-a-data")
        client.notice("node-b-mgmt")
        _wait(lambda: {"198.51.100.101", "203.0.113.102"} <= set(_node_addresses(topo)),
              "the addresses added on the notices alone")
        assert _node_addresses(topo)["198.51.100.101"] == ("vd0", 32)
        assert _node_addresses(topo)["203.0.113.102"] == ("vm0", 32)
        ack = client.command("acquire", "node-a-data")  # held already: changes nothing
        assert ack.ok and ack.held == ["198.51.100.101/32"]
        assert client.command("acquire", "node-b-mgmt").held == ["203.0.113.102/32"]
        _wait(lambda: len(client.events("address.noop")) == 2, "two address.noop events")
        assert {(e.group, e.data["action"]) for e in client.events("address.noop")} == {
            ("node-a-data", "acquire"), ("node-b-mgmt", "acquire")}

        # A release at epoch 2 (the new owner's, as the arbiter sends it): gone at once,
        # and the lease holder's notices of epoch 1 no longer make it hold.
        ack = client.command("release", "node-a-data", epoch=2)
        assert ack.ok and ack.held == []
        assert "198.51.100.101" not in _node_addresses(topo)
        client.notice("node-a-data")
        assert client.command("release", "node-a-data", epoch=2).ok
        assert "198.51.100.101" not in _node_addresses(topo)
        _wait(lambda: len(client.events("address.noop")) == 3, "a third address.noop event")
        noops = client.events("address.noop")
        assert noops[-1].data["action"] == "release"
        assert "nothing to release" in noops[-1].reason

        # A link event is published at once, the health follows after `fall` probes.
        n = len(client.reports)
        with IPRoute(netns=topo.node, flags=0) as ipr:
            ipr.link("set", index=_ifindex(ipr, "vm0"), state="down")
        _wait(lambda: client.report_after(n, lambda r: not r.link_up), "a link-down report")
        _wait(lambda: client.report_after(n, lambda r: not r.healthy), "an unhealthy report")

        code, body = nns.http(f"{status_url}/status")
        st = orjson.loads(body)
        assert code == 200 and st["backend"] == "netlink: addresses configured in this " \
            "network namespace"
        assert st["mgmt"]["link_up"] is False and st["mgmt"]["monitored"] is True
        assert st["held"] == {"node-b-mgmt": ["203.0.113.102/32"]}
        assert st["leases"]["node-a-data"]["verdict"] == "released at a newer epoch"
        text = nns.http(f"{status_url}/metrics")[1].decode()
        assert metric(text, "vtlha_mgmt_monitored") == 1.0
        assert metric(text, "vtlha_mgmt_link_up") == 0.0
        assert (metric(text, "vtlha_mgmt_reports_total", cause="link") or 0) >= 1

        svc.send_signal(signal.SIGTERM)
        assert svc.wait(10) == 0
    except BaseException:
        print(log.read_text() if log.exists() else "(no service log)")
        raise
    finally:
        if svc is not None and svc.poll() is None:
            os.killpg(svc.pid, signal.SIGKILL)
            svc.wait(5)
        if client is not None:
            client.close()
        srv.stop()
        cns.close()
        nns.close()



def _free_port() -> int:
    return free_port()


def test_recording_backend_reports_the_mgmt_path_as_not_monitored(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """Loopback mode: the report says healthy, and that nothing was measured."""
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    raw["cluster"] = f"iprec{os.getpid()}"
    raw["nats"] = {"servers": ["witness"], "replicas": 1}
    raw["state_dir"] = str(tmp_path / "state")
    raw["timings"].update(probe_interval=0.1)
    cfg_path = tmp_path / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    port = _free_port()
    subject = Subjects(raw["cluster"]).mgmt("node-a")

    async def first_report() -> MgmtReport:
        nc = await nats.connect(nats_server.spec.url, connect_timeout=2,
                                max_reconnect_attempts=0)
        try:
            sub = await nc.subscribe(subject)
            # The arbiter creates the KV bucket (none runs here): the service waits for it.
            await bus.ensure_kv(nc.jetstream(), Subjects(raw["cluster"]), replicas=1)
            msg = await sub.next_msg(timeout=15)
            return decode(MgmtReport, msg.data)
        finally:
            await nc.close()

    log = tmp_path / "ip-manager.log"
    with open(log, "wb") as out:
        svc = subprocess.Popen(
            [str(BIN / "vtlha-ip-manager"), "--config", str(cfg_path), "--node", "node-a",
             "--backend", "recording", "--nats", nats_server.spec.url,
             "--http-port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        rep = asyncio.run(first_report())
        assert (rep.monitored, rep.healthy, rep.link_up, rep.gateway_ok) == (
            False, True, True, None)
        assert rep.detail == "not monitored: loopback mode (recording backend)"

        def mgmt_status() -> dict[str, Any] | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1) as r:
                st: dict[str, Any] = orjson.loads(r.read())
            return st if st.get("mgmt") else None

        st = _wait(mgmt_status, "the status to show the mgmt report")
        assert st["mgmt"]["monitored"] is False and st["backend_kind"] == "recording"
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(10) == 0
    except BaseException:
        print(log.read_text())
        raise
    finally:
        if svc.poll() is None:
            svc.kill()
            svc.wait(5)
