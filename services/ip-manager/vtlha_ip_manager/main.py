"""ip-manager: carries out address takeover and release on the arbiter's commands, and
reports the node's management-path health.

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
from pathlib import Path
from typing import Any

import click
from nats.js.errors import KeyNotFoundError, NotFoundError
from prometheus_client import Counter, Gauge
from pyroute2.netlink.exceptions import NetlinkError

from vtlha import bus
from vtlha.config import ClusterConfig
from vtlha.errors import FatalError, VtlhaError
from vtlha.executor import Executor
from vtlha.messages import GroupRecord, MgmtReport, decode, encode
from vtlha.service import service_command
from vtlha_ip_manager.backend import IpBackend, RecordingBackend
from vtlha_ip_manager.mgmt import MgmtMonitor, MgmtSnapshot, unmonitored
from vtlha_ip_manager.netlink import NetlinkBackend, ip_of

NOT_ROOT = ("the netlink backend needs root (CAP_NET_ADMIN); run as root or use "
            "--backend recording")


def _gauge_value(value: bool | float | None) -> float:
    return math.nan if value is None else float(value)


class IpManager(Executor):
    name = "ip-manager"
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
        """Remove addresses held for groups this node does not own; remember the rest."""
        kv = await bus.ensure_kv(self.js, self.subjects, replicas=self.config.nats.stream_replicas)
        held = await self.backend.held()
        for group in sorted(self.my_groups):
            addrs = [a for a in self.config.group_addresses(group) if a in held]
            if not addrs:
                continue
            owner: str | None = None
            try:
                entry = await kv.get(self.subjects.group_key(group))
                if entry.value:
                    owner = decode(GroupRecord, entry.value).owner
            except (KeyNotFoundError, NotFoundError):
                owner = None
            if owner == self.node:
                self.held_groups[group] = addrs
                continue
            for a in addrs:
                await self.backend.remove(a)
            await self.emit("address.reconciled",
                            f"{self.node} removed {', '.join(addrs)} of {group} at start: "
                            f"the group is owned by {owner or 'nobody'}", group=group,
                            data={"removed": addrs, "owner": owner})
        self.reconciled = True

    async def acquire(self, group: str, epoch: int) -> list[str]:
        want = self.config.group_addresses(group)
        have = await self.backend.held()
        for a in want:
            if a not in have:
                await self.backend.add(a)
        if all(a in have for a in want):
            await self.emit("address.noop", f"{self.node} already holds {group}", group=group,
                            epoch=epoch, data={"action": "acquire", "addresses": want})
        self.held_groups[group] = want
        return want

    async def release(self, group: str, epoch: int) -> list[str]:
        have = await self.backend.held()
        gone = [a for a in self.config.group_addresses(group) if a in have]
        for a in gone:
            await self.backend.remove(a)
        if not gone:
            await self.emit("address.noop", f"{self.node} holds no address of {group}: "
                            "nothing to release", group=group, epoch=epoch,
                            data={"action": "release"})
        self.held_groups.pop(group, None)
        return []

    def is_ready(self) -> bool:
        return self.reconciled

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend.description, "backend_kind": self.backend_kind,
                "backend_status": self.backend.status(), "held": self.held_groups,
                "term": self.fencing.term, "epochs": self.fencing.epochs,
                "mgmt": self.mgmt_last.to_dict() if self.mgmt_last else None}


main = service_command(IpManager)
