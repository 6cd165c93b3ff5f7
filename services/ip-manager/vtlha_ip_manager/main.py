"""ip-manager: holds the floating addresses of each group exactly while its lease
holder's notice for the group is valid (level-triggered; the arbiter's commands make it
converge sooner), and reports the node's management-path health.

Backends (``--backend`` or the cluster file's ``ip.backend``): ``netlink`` configures
the floating addresses for real in the network namespace the process runs in (it
needs root: CAP_NET_ADMIN), ``recording`` only records them (the loopback mode).

At start it reconciles: an address it holds whose group its node does not own (by
the KV) is removed (event ``address.reconciled``). Acquiring what is held already or
releasing what is not held changes nothing and is reported (event ``address.noop``).

Management path (``ha.<cluster>.mgmt.<node>``): with the netlink backend and a
``mgmt_ip``, ``mgmt.MgmtMonitor`` watches the link and the gateway; the report goes out
every ``probe_interval`` and at once on a link event. Otherwise (loopback mode, or no
management address) the report says healthy and ``monitored: false``, and why."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import click
from prometheus_client import Counter, Gauge, Histogram
from pyroute2.netlink.exceptions import NetlinkError

from vtlha import bus
from vtlha.config import ClusterConfig
from vtlha.errors import FatalError, VtlhaError
from vtlha.executor import HoldingExecutor
from vtlha.fence import Fence
from vtlha.messages import MgmtReport, encode
from vtlha.service import service_command
from vtlha_ip_manager.backend import IpBackend, RecordingBackend
from vtlha_ip_manager.mgmt import MgmtMonitor, MgmtSnapshot, unmonitored
from vtlha_ip_manager.netlink import NetlinkBackend, ip_of

FENCE_CHECK_INTERVAL = 1.0  # seconds between checks that the fence tables are there
FENCE_WRITE_BOUND = 0.005  # a fence write slower than this is re-checked at once
TEST_PAUSE_FILE = "VTLHA_TEST_FENCE_PAUSE_FILE"


def address_lifetime(lease_ttl: float) -> int:
    """Kernel lifetime of a floating address (whole seconds): the backstop outlives the
    lease by at most a second or two and is extended at every renewal."""
    return max(1, math.ceil(lease_ttl)) + 1


def _test_pause_hook() -> None:
    """For tests only: when the file named by $VTLHA_TEST_FENCE_PAUSE_FILE exists, sleep
    (blocking, like a descheduled process) for the seconds it holds, once, between
    computing a fence element's timeout and writing it."""
    path = os.environ.get(TEST_PAUSE_FILE)
    if not path or not os.path.exists(path):
        return
    try:
        seconds = float(Path(path).read_text().strip() or 0)
        os.unlink(path)
    except (OSError, ValueError):
        return
    time.sleep(seconds)

NOT_ROOT = ("the netlink backend needs root (CAP_NET_ADMIN); run as root or use "
            "--backend recording")


def _gauge_value(value: bool | float | None) -> float:
    return math.nan if value is None else float(value)


class IpManager(HoldingExecutor):
    name = "ip-manager"
    noop_kind = "address.noop"
    http_port_key = "ip_manager"
    cli_options = [click.Option(["--backend"], type=click.Choice(["netlink", "recording"]),
                                default=None, help="IP backend (default: the cluster "
                                "file's ip.backend)")]

    def __init__(self, config: ClusterConfig, node: str, nats_urls: list[str],
                 state_root: Path, options: dict[str, Any] | None = None) -> None:
        options = options or {}
        kind = options.get("backend") or config.ip.backend
        # Refuse before anything is touched (not even the state directory).
        if kind == "netlink" and os.geteuid() != 0:
            raise FatalError(NOT_ROOT)
        if kind == "netlink" and not config.has_node(node):
            raise FatalError(f"the netlink backend serves a node of a pair; {node!r} is not one")
        super().__init__(config, node, nats_urls, state_root, options)
        self.backend_kind: str = kind
        self.backend: IpBackend = (
            NetlinkBackend(config, node, log=self.log) if kind == "netlink"
            else RecordingBackend(self.state_dir / "addresses.json"))
        self.held_groups: dict[str, list[str]] = {}
        self.fence: Fence | None = None
        self.fenced_until: dict[str, float] = {}
        if isinstance(self.backend, NetlinkBackend):
            self.fence = Fence([ip_of(a) for g in sorted(self.my_groups)
                                for a in self.config.group_addresses(g)])
            self.backend.lifetime = address_lifetime(self.config.timings.lease_ttl)
            self.backend.garp.may_send = self.may_announce
        self.fence_writes = Counter("vtlha_fence_writes_total", "Fence writes, by kind",
                                    ["kind"], registry=self.registry)
        self.fence_write_seconds = Histogram(
            "vtlha_fence_write_seconds", "Time one fence write (one batch) took",
            buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1.0),
            registry=self.registry)
        self.reconciled = False
        self.mgmt: MgmtMonitor | None = None
        self.mgmt_last: MgmtSnapshot | None = None
        self._unmonitored: MgmtSnapshot | None = None
        self.g_link_up = Gauge("vtlha_mgmt_link_up", "1 while the management link is up",
                               registry=self.registry)
        self.g_gateway_ok = Gauge("vtlha_mgmt_gateway_ok", "1 while the management gateway "
                                  "answers, 0 when it does not, NaN without a gateway",
                                  registry=self.registry)
        self.g_latency = Gauge("vtlha_mgmt_gateway_latency_seconds", "Round trip of the "
                               "last gateway probe (NaN when it failed)", registry=self.registry)
        self.g_healthy = Gauge("vtlha_mgmt_healthy", "1 while the management path is healthy "
                               "(after rise/fall hysteresis)", registry=self.registry)
        self.g_monitored = Gauge("vtlha_mgmt_monitored", "1 when the management path is "
                                 "really watched, 0 in loopback mode", registry=self.registry)
        self.mgmt_reports = Counter("vtlha_mgmt_reports_total", "Management-path reports "
                                    "published, by cause", ["cause"], registry=self.registry)

    async def start(self) -> None:
        if self.fence is not None:
            if not self.fence.is_installed():
                self.fence.install()
            self.log.info("fence installed", extra={"floating": self.fence.floating})
            self.every(FENCE_CHECK_INTERVAL, self._check_fence, "fence-check")
        await self.backend.start()
        self.log.info("ip backend", extra={"backend": self.backend.description})
        await bus.retry_js("reconcile", self.reconcile)
        await self.start_executor()
        await self.start_mgmt()

    async def stop(self) -> None:
        await super().stop()
        if self.mgmt is not None:
            await self.mgmt.close()
        await self.backend.close()

    # ---- management path ------------------------------------------------------
    async def start_mgmt(self) -> None:
        t = self.config.timings
        node = self.config.node(self.node) if self.config.has_node(self.node) else None
        if isinstance(self.backend, NetlinkBackend) and node is not None and node.mgmt_ip:
            self.mgmt = MgmtMonitor(
                interface=self.backend.interfaces["mgmt"].name, source_ip=ip_of(node.mgmt_ip),
                gateway=node.groups.mgmt.gateway, interval=t.probe_interval,
                timeout=t.probe_timeout, rise=t.rise, fall=t.fall,
                on_report=self.publish_mgmt, log=self.log)
            try:
                await self.mgmt.start()
            except (OSError, NetlinkError, VtlhaError, TimeoutError) as exc:
                raise FatalError(f"the management-path monitor cannot watch "
                                 f"{self.mgmt.interface}: {exc!r}") from exc
            self.spawn(self.mgmt.watch_links(), "mgmt-links")
            self.every(t.probe_interval, self.mgmt.tick, "mgmt-probe")
            return
        reason = ("loopback mode (recording backend)" if self.backend_kind == "recording"
                  else f"{self.node} has no mgmt_ip")
        self._unmonitored = unmonitored(reason)
        self.log.warning("management path not monitored", extra={"reason": reason})
        self.every(t.probe_interval, self._publish_unmonitored, "mgmt-static")

    async def _publish_unmonitored(self) -> None:
        assert self._unmonitored is not None
        await self.publish_mgmt(self._unmonitored, "static")

    async def publish_mgmt(self, snap: MgmtSnapshot, cause: str) -> None:
        self.mgmt_last = snap
        self.g_link_up.set(_gauge_value(snap.link_up))
        self.g_gateway_ok.set(_gauge_value(snap.gateway_ok))
        self.g_latency.set(_gauge_value(snap.latency))
        self.g_healthy.set(_gauge_value(snap.healthy))
        self.g_monitored.set(_gauge_value(snap.monitored))
        report = MgmtReport(cluster=self.config.cluster, node=self.node, link_up=snap.link_up,
                            gateway_ok=snap.gateway_ok, latency=snap.latency,
                            healthy=snap.healthy, monitored=snap.monitored, detail=snap.detail)
        await self.nc.publish(self.subjects.mgmt(self.node), encode(report))
        self.mgmt_reports.labels(cause).inc()

    # ---- addresses ----------------------------------------------------------------
    async def reconcile(self) -> None:
        """At start (once the KV bucket exists): remove addresses held for groups this
        node does not own (KV); for groups it owns, hold nothing beyond what a valid
        lease notice allows (the enforcement loop sees to that)."""
        records = await self.recall_owned(self.my_groups)
        held = await self.backend.held()
        for group in sorted(self.my_groups):
            rec = records.get(group)
            addrs = [a for a in self.config.group_addresses(group) if a in held]
            if not addrs:
                continue
            if rec is not None and rec.owner == self.node:
                self.held_groups[group] = addrs
                continue
            for a in addrs:
                await self.backend.remove(a)
            owner = rec.owner if rec else None
            await self.emit("address.reconciled",
                            f"{self.node} removed {', '.join(addrs)} of {group} at start: "
                            f"the group is owned by {owner or 'nobody'}", group=group,
                            data={"removed": addrs, "owner": owner})
        self.reconciled = True

    def may_announce(self, address: str) -> bool:
        """A gratuitous ARP for ``address`` only while its group is held by a valid lease
        right now (asked before every send: a frozen and resumed process whose group
        moved meanwhile announces nothing)."""
        now = time.monotonic()
        return any(address in self.config.group_addresses(g) and self.gate.should_hold(g, now)
                   for g in self.my_groups)

    # ---- holding (the Executor's hold rule calls these) ------------------------
    def holds(self, group: str) -> bool:
        return group in self.held_groups

    def held(self, group: str) -> list[str]:
        return list(self.held_groups.get(group, []))

    async def start_holding(self, group: str, epoch: int, until: float) -> None:
        addrs = self.config.group_addresses(group)
        self._fence_write(group, until)  # answer from the moment it is added
        for a in addrs:
            await self.backend.add(a)
        self.held_groups[group] = addrs
        self.log.info("holding", extra={"group": group, "addresses": addrs, "epoch": epoch})

    async def keep_holding(self, group: str, until: float) -> None:
        if self.fenced_until.get(group) != until:
            self._fence_write(group, until)
            for a in self.held_groups[group]:
                await self.backend.renew(a)

    async def stop_holding(self, group: str) -> None:
        await self._remove(group)

    def _fence_write(self, group: str, until: float) -> None:
        """Refresh the group's fence elements to expire at ``until`` (this host's monotonic
        clock): the timeout is computed right before the write, and re-checked after it —
        if the write took longer than FENCE_WRITE_BOUND (the process was descheduled or
        paused in between), the element is rewritten with the time really left, or
        removed when none is."""
        if self.fence is None:
            return
        ips = [ip_of(a) for a in self.config.group_addresses(group)]
        before = time.monotonic()
        left = until - before
        _test_pause_hook()
        if left <= 0:
            self.fence.remove(ips)
            self.fenced_until.pop(group, None)
            return
        self.fence.refresh(ips, left * 1000)
        after = time.monotonic()
        self.fence_write_seconds.observe(after - before)
        self.fence_writes.labels("refresh").inc()
        if after - before > FENCE_WRITE_BOUND:
            still = until - after
            if still > 0:
                self.fence.refresh(ips, still * 1000)
            else:
                self.fence.remove(ips)
            self.fence_writes.labels("corrected").inc()
            self.log.warning("fence write took too long: corrected", extra={
                "group": group, "took_s": round(after - before, 4),
                "left_s": round(still, 4), "window_s": round(time.monotonic() - after, 6)})
            self.emit_soon("fence.corrected", f"{self.node}: a fence write for {group} took "
                           f"{(after - before) * 1000:.0f} ms; the element was "
                           f"{'shortened' if still > 0 else 'removed'} at once", group=group,
                           data={"took_s": after - before, "left_s": still,
                                 "corrected_after_s": time.monotonic() - after})
        self.fenced_until[group] = until

    async def _check_fence(self) -> None:
        """Reinstall the fence if someone removed it, then refresh what is held."""
        assert self.fence is not None
        if self.fence.is_installed():
            return
        self.fence.install()
        self.fenced_until.clear()
        self.fence_writes.labels("repaired").inc()
        self.log.warning("fence was missing: reinstalled")
        self.emit_soon("fence.repaired", f"{self.node}'s fence tables were missing and were "
                       "reinstalled", data={"held_groups": sorted(self.held_groups)})
        await self.enforce_all()

    async def _remove(self, group: str) -> None:
        """Stop answering first (fence), then remove the addresses and verify."""
        if self.fence is not None:
            self.fence.remove([ip_of(a) for a in self.config.group_addresses(group)])
        self.fenced_until.pop(group, None)
        have = await self.backend.held()
        for a in self.config.group_addresses(group):
            if a in have:
                await self.backend.remove(a)
        self.held_groups.pop(group, None)

    def is_ready(self) -> bool:
        return self.reconciled

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend.description, "backend_kind": self.backend_kind,
                "backend_status": self.backend.status(), "held": self.held_groups,
                "term": self.fencing.term, "epochs": self.fencing.epochs,
                "leases": {g: {"verdict": self.gate.verdict(g, time.monotonic()).value,
                               "epoch": self.gate.epoch(g)} for g in sorted(self.my_groups)},
                "mgmt": self.mgmt_last.to_dict() if self.mgmt_last else None,
                "fence": (sorted(self.fence.held()) if self.fence is not None
                          else "none: loopback mode (recording backend)")}


main = service_command(IpManager)
