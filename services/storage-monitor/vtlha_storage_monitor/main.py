"""storage-monitor: probes every path to every device its node uses, through the SAN
target, and publishes ``ha.<cluster>.storage.<node>`` (per device, per path:
reachable, latency, error).

A path is one TCP connection to the SAN target (``--san HOST``, port ``san.port +
path``): one :class:`~vtlha.san.SanClient` per path index, registered for every device
the node has that path to. A probe reads one block with a timeout (``probe_timeout``);
a connection that drops or times out is opened again (and the devices registered
again) for the next device's probe; when that fails, the path's other devices fail with
it in this round. Each path index is probed by its own loop, so a path whose
reads hang or whose packets are dropped delays no other path; a report is published
after each path's round (and at least every ``probe_interval`` meanwhile). A path's
state changes only after ``fall`` failures or ``rise`` successes in a row; each change
is an event (``storage.path_down`` / ``storage.path_up``), and a device with no path
left is ``storage.device_lost``. Events are published in the background, never
waited for.

Storage takeover and release (an :class:`~vtlha.executor.Executor`: level-triggered
on a valid lease notice, as the ip-manager): to hold a data group it takes
each device's reservation at the SAN target at the group's epoch (``reserve``, or
``preempt`` when another node holds it), then runs the group's resource agents'
``start`` (``vtlha.agents``; by default the tape data service). A refused reservation
or a failing ``start`` leaves the group ``failed`` — reported in the storage report and
the event ``storage.start_failed``, never "served", and not retried on its own (no
retry storm). To stop holding it runs the agents' ``stop`` (the data service's I/O has
stopped when it returns) and then releases the reservations; the release is
acknowledged only when both are done (a reservation another node preempted counts as
given up). Events ``storage.takeover`` / ``storage.release`` name device, path, node
and epoch. While a group is served its agents' ``monitor`` runs every
``monitor_interval``; a failure is reported (``storage.agent_failed``)."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from prometheus_client import Counter, Gauge

from vtlha import bus
from vtlha.agents import AgentResult, run_agent
from vtlha.config import ClusterConfig, Resource
from vtlha.executor import HoldingExecutor, ReleaseIncomplete
from vtlha.messages import GroupStorage, PathHealth, StorageReport, encode
from vtlha.san import SanClient, SanError, SanRefused
from vtlha.san.multipath import Multipath
from vtlha.service import service_command

LOOPBACK = "127.0.0.1"
RELEASE_RETRY = 1.0  # seconds before an unfinished release is tried again
MONITOR_TICK = 0.5  # seconds between checks of which resource monitors are due


@dataclass
class PathState:
    device: str
    path: int
    reachable: bool | None = None  # None until the first result
    streak: int = 0  # results in a row that disagree with `reachable`
    latency: float | None = None
    error: str | None = None


@dataclass
class Serving:
    """A data group this node holds (or is starting, or failed to start)."""

    group: str
    epoch: int
    state: str  # starting | served | failed | stopping
    reason: str = ""
    started: list[Resource] = field(default_factory=list)
    reserved: dict[str, int] = field(default_factory=dict)  # device -> path it was taken on
    next_monitor: dict[str, float] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)  # resources stopped since the release began
    retry_at: float = 0.0  # a release that could not be finished is tried again from then


def default_san_host(config: ClusterConfig) -> str:
    """The SAN target's address from the cluster file: the service IP of the host named
    by ``san.host`` (without prefix); loopback when it has none."""
    host = config.san.host
    ip: str | None = None
    if host == config.witness.host:
        ip = config.witness.service_ip
    elif config.has_node(host):
        ip = config.node(host).service_ip
    return ip.split("/")[0] if ip else LOOPBACK


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SanRefused):
        return exc.reason
    return str(exc)


class StorageMonitor(HoldingExecutor):
    name = "storage-monitor"
    http_port_key = "storage_monitor"
    noop_kind = "storage.noop"
    slow_start = True
    cli_options = [click.Option(["--san"], default=None, metavar="HOST",
                                help="Address of the SAN target (default: the service IP "
                                "of the cluster file's san.host; 127.0.0.1 without one)"),
                   click.Option(["--portal-host"], default=None, metavar="HOST",
                                help="Data services listen on HOST at the group home's "
                                "loopback-mode tape port (loopback mode) instead of on the "
                                "group's first address at ports.tape")]

    def __init__(self, config: ClusterConfig, node: str, nats_urls: list[str],
                 state_root: Path, options: dict[str, Any] | None = None) -> None:
        super().__init__(config, node, nats_urls, state_root, options)
        t = self.config.timings
        self.san_host: str = self.options.get("san") or default_san_host(config)
        self.paths: list[PathState] = [
            PathState(dev, i)
            for dev, d in sorted(self.config.devices.items())
            for i in range(d.paths.get(self.node, 0))
        ]
        self.rise, self.fall, self.timeout = t.rise, t.fall, t.probe_timeout
        n_paths = max((s.path + 1 for s in self.paths), default=0)
        self.clients: dict[int, SanClient] = {
            i: SanClient(self.san_host, config.san.port + i, node, i, timeout=self.timeout)
            for i in range(n_paths)}
        self.seq = 0
        self.last_report = 0.0
        self.probes = Counter("vtlha_storage_probes_total", "Path probes, by result", ["result"],
                              registry=self.registry)
        self.path_up = Gauge("vtlha_storage_path_up", "1 if the path is reachable",
                             ["device", "path"], registry=self.registry)
        self.reconnects = Counter("vtlha_storage_reconnects_total",
                                  "Connections (re)opened to the SAN target, by path",
                                  ["path"], registry=self.registry)
        self.serving: dict[str, Serving] = {}
        self.multipath: dict[str, Multipath] = {
            g: Multipath(config, node, self.san_host, config.group_devices(g), self.timeout)
            for g in self.executor_groups()}
        self.agent_runs = Counter("vtlha_storage_agent_runs_total", "Resource agent runs, by "
                                  "action and result", ["action", "result"],
                                  registry=self.registry)
        self.reservations = Counter("vtlha_storage_reservations_total", "Reservation "
                                    "requests to the SAN target, by op and result",
                                    ["op", "result"], registry=self.registry)
        self.reconciled = False

    async def start(self) -> None:
        interval = self.config.timings.probe_interval
        self.log.info("probing through the SAN target",
                      extra={"san": self.san_host, "port_base": self.config.san.port,
                             "paths": len(self.paths)})
        for i in self.clients:
            self.every(interval, functools.partial(self._probe_path, i), f"probe{i}")
        self.every(interval, self._keep_fresh, "report")
        await bus.retry_js("reconcile", self.reconcile)
        await self.start_executor()
        self.every(MONITOR_TICK, self._monitor_resources, "monitor")

    async def stop(self) -> None:
        await super().stop()
        # A call stuck on a connection ends at once (its reader sees the close).
        await asyncio.gather(*(c.close() for c in self.clients.values()),
                             *(m.close() for m in self.multipath.values()))

    def executor_groups(self) -> set[str]:
        """Data groups with devices: the ones with storage to take over."""
        return {g for g in self.my_groups if self.config.group_devices(g)}

    def is_ready(self) -> bool:
        return self.reconciled

    # ---- storage takeover and release (the Executor's hold rule calls these) --------
    async def reconcile(self) -> None:
        """At start (once the KV bucket exists): stop the resources of groups this node
        does not own (KV) that an earlier run left running. What it owns it holds again
        when a valid lease notice arrives."""
        records = await self.recall_owned(self.executor_groups())
        for group in sorted(self.executor_groups()):
            rec = records.get(group)
            if rec is not None and rec.owner == self.node:
                continue
            for r in self.config.group_resources(group):
                if (self._run_dir(group, r) / "pid").exists():
                    res = await self._agent(group, 0, r, "stop")
                    self.emit_soon("storage.reconciled", f"{self.node} stopped {r.name} of "
                                   f"{group} at start: the group is owned by "
                                   f"{rec.owner if rec else 'nobody'} ({res.detail})",
                                   group=group, data={"resource": r.name, "ok": res.ok})
        self.reconciled = True

    def holds(self, group: str) -> bool:
        return group in self.serving

    def held(self, group: str) -> list[str]:
        sv = self.serving.get(group)
        return sorted(sv.reserved) if sv is not None and sv.state == "served" else []

    def _run_dir(self, group: str, r: Resource) -> Path:
        return self.state_dir / "resources" / group / r.name

    def _portal(self, group: str) -> str:
        home = self.config.groups()[group][0]
        portal_host = self.options.get("portal_host")
        if portal_host:
            return f"{portal_host}:{self.config.port(home, 'tape')}"
        addrs = self.config.group_addresses(group)
        ip = addrs[0].split("/")[0] if addrs else LOOPBACK
        return f"{ip}:{self.config.ports.tape}"

    def _agent_env(self, group: str, epoch: int) -> dict[str, str]:
        return {"VTLHA_CLUSTER": self.config.cluster, "VTLHA_NODE": self.node,
                "VTLHA_GROUP": group, "VTLHA_EPOCH": str(epoch),
                "VTLHA_DEVICES": ",".join(self.config.group_devices(group)),
                "VTLHA_PORTAL": self._portal(group), "VTLHA_SAN_HOST": self.san_host,
                "VTLHA_SAN_PORT": str(self.config.san.port),
                "VTLHA_CONFIG": str(self.options.get("config_path", ""))}

    async def _agent(self, group: str, epoch: int, r: Resource, action: str) -> AgentResult:
        res = await run_agent(r, action, self._agent_env(group, epoch), self._run_dir(group, r))
        self.agent_runs.labels(action, "ok" if res.ok else "failed").inc()
        (self.log.info if res.ok or res.not_running else self.log.warning)(
            "resource agent", extra={"group": group, "epoch": epoch, "resource": r.name,
                                     "action": action, "ok": res.ok, "code": res.code,
                                     "seconds": round(res.seconds, 3), "detail": res.detail})
        return res

    async def _take(self, sv: Serving, device: str) -> None:
        """Take the device's reservation at the group's epoch: reserve when it is free
        (or ours), preempt when another node holds it. Raises SanError."""
        mp = self.multipath[sv.group]
        try:
            reply = await mp.call(lambda c: c.reserve(device, sv.epoch))
            op = "reserve"
        except SanRefused as exc:
            if "conflict" not in exc.reason:
                self.reservations.labels("reserve", "refused").inc()
                raise
            reply = await mp.call(lambda c: c.preempt(device, sv.epoch))
            op = "preempt"
        self.reservations.labels(op, "ok").inc()
        sv.reserved[device] = mp.path
        old = reply.get("old_holder")
        self.emit_soon("storage.takeover", f"{self.node} holds {device} of {sv.group} at "
                       f"epoch {sv.epoch} ({op} on path {mp.path}"
                       f"{f', preempting {old}' if old and old != self.node else ''})",
                       group=sv.group, epoch=sv.epoch, new=self.node,
                       old=old if old != self.node else None,
                       data={"device": device, "path": mp.path, "node": self.node,
                             "op": op, "old_epoch": reply.get("old_epoch")})

    async def start_holding(self, group: str, epoch: int, until: float) -> None:
        sv = Serving(group, epoch, "starting")
        self.serving[group] = sv
        await self._publish()
        try:
            for device in self.config.group_devices(group):
                await self._take(sv, device)
        except SanError as exc:
            self.reservations.labels("take", "failed").inc()
            await self._fail(sv, f"reservation not taken: {exc}")
            return
        for r in self.config.group_resources(group):
            res = await self._agent(group, epoch, r, "start")
            if not res.ok:
                # As Pacemaker does after a failed start: stop what may be half started.
                await self._agent(group, epoch, r, "stop")
                await self._fail(sv, f"resource {r.name}: start failed: {res.detail}")
                return
            sv.started.append(r)
            if r.monitor_interval > 0:
                sv.next_monitor[r.name] = time.monotonic() + r.monitor_interval
        sv.state = "served"
        self.log.info("serving", extra={"group": group, "epoch": epoch,
                                        "devices": sorted(sv.reserved),
                                        "resources": [r.name for r in sv.started]})
        self.emit_soon("storage.served", f"{self.node} serves {group} at epoch {epoch}: "
                       f"{len(sv.reserved)} reservation(s) held, resources "
                       f"{', '.join(r.name for r in sv.started) or 'none'} started",
                       group=group, epoch=epoch, new=self.node,
                       data={"devices": sorted(sv.reserved),
                             "resources": [r.name for r in sv.started]})
        await self._publish()

    async def _fail(self, sv: Serving, reason: str) -> None:
        sv.state, sv.reason = "failed", reason
        self.log.error("group not served", extra={"group": sv.group, "epoch": sv.epoch,
                                                  "reason": reason})
        self.emit_soon("storage.start_failed", f"{self.node} does not serve {sv.group} "
                       f"(epoch {sv.epoch}): {reason}", group=sv.group, epoch=sv.epoch,
                       new=self.node, data={"node": self.node, "reason": reason})
        await self._publish()

    async def keep_holding(self, group: str, until: float) -> None:
        return None  # the reservation does not expire; the target fences by epoch

    async def stop_holding(self, group: str) -> None:
        """Stop the resources (their I/O has stopped when ``stop`` returns), then give
        the reservations up. ReleaseIncomplete when either cannot be done."""
        sv = self.serving.get(group)
        if sv is None:
            return
        if time.monotonic() < sv.retry_at:
            raise ReleaseIncomplete(f"{self.node} could not finish releasing {group}: "
                                    f"{sv.reason} (tried again shortly)")
        sv.state = "stopping"
        problems: list[str] = []
        for r in reversed(self.config.group_resources(group)):
            if r.name in sv.stopped:
                continue
            res = await self._agent(group, sv.epoch, r, "stop")
            if res.ok:
                sv.stopped.add(r.name)
            else:
                problems.append(f"resource {r.name}: stop failed: {res.detail}")
        mp = self.multipath[group]
        for device in list(sv.reserved):
            try:
                await mp.call(functools.partial(SanClient.release, device=device, epoch=sv.epoch))
                how = "released"
            except SanRefused as exc:
                how = f"not ours any more ({exc.reason})"
            except SanError as exc:
                problems.append(f"{device}: reservation not released: {exc}")
                continue
            self.reservations.labels("release", "ok").inc()
            del sv.reserved[device]
            self.emit_soon("storage.release", f"{self.node} gave up {device} of {group} "
                           f"(epoch {sv.epoch}): {how}", group=group, epoch=sv.epoch,
                           old=self.node, data={"device": device, "path": mp.path,
                                                "node": self.node, "how": how})
        if problems:
            sv.reason = "; ".join(problems)
            sv.retry_at = time.monotonic() + RELEASE_RETRY
            raise ReleaseIncomplete(f"{self.node} could not finish releasing {group}: "
                                    f"{sv.reason}")
        del self.serving[group]
        await self._publish()

    async def _monitor_resources(self) -> None:
        now = time.monotonic()
        for group, sv in list(self.serving.items()):
            if sv.state != "served":
                continue
            for r in sv.started:
                due = sv.next_monitor.get(r.name)
                if due is None or now < due:
                    continue
                sv.next_monitor[r.name] = now + r.monitor_interval
                async with self._group_locks[group]:
                    if self.serving.get(group) is not sv or sv.state != "served":
                        return
                    res = await self._agent(group, sv.epoch, r, "monitor")
                    if not res.ok:
                        sv.state = "failed"
                        sv.reason = f"resource {r.name}: monitor failed: {res.detail}"
                        self.emit_soon("storage.agent_failed", f"{self.node}: {sv.reason}",
                                       group=group, epoch=sv.epoch,
                                       data={"resource": r.name, "node": self.node})
                        await self._publish()

    # ---- probing ---------------------------------------------------------------
    async def _connect(self, i: int, states: list[PathState]) -> None:
        client = self.clients[i]
        await client.connect()
        self.reconnects.labels(str(i)).inc()
        for st in states:
            try:
                await client.register(st.device)
            except SanRefused as exc:  # this device's reads will say why, the others go on
                self.log.warning("not registered", extra={"device": st.device, "path": i,
                                                          "error": exc.reason})

    async def _probe_path(self, i: int) -> None:
        states = [s for s in self.paths if s.path == i]
        client = self.clients[i]
        no_conn: str | None = None  # this round's connect failed: the path is down
        for st in states:
            if self.stopping:
                return
            t0 = time.monotonic()
            try:
                if no_conn is not None:
                    raise SanError(no_conn)
                if not client.connected:
                    try:
                        await self._connect(i, states)
                    except SanError as exc:
                        no_conn = _reason(exc)
                        raise
                block = self.config.devices[st.device].block_size
                data = await client.read(st.device, 0, 1, timeout=self.timeout)
                if len(data) < block:
                    raise SanError(f"short read ({len(data)} of {block} bytes)")
                ok, err = True, None
            except SanRefused as exc:
                ok, err = False, exc.reason
            except SanError as exc:  # the client closed the connection: open it anew
                ok, err = False, _reason(exc)  # (and register again) for the next device
            st.latency = time.monotonic() - t0 if ok else None
            st.error = err
            self.probes.labels("ok" if ok else "failed").inc()
            self._apply(st, ok)
        await self._publish()

    def _apply(self, st: PathState, ok: bool) -> None:
        changed = False
        if st.reachable is None:
            st.reachable = ok
            changed = not ok
        elif ok == st.reachable:
            st.streak = 0
        else:
            st.streak += 1
            if st.streak >= (self.rise if ok else self.fall):
                st.reachable, st.streak = ok, 0
                changed = True
        self.path_up.labels(st.device, str(st.path)).set(1 if st.reachable else 0)
        if not changed:
            return
        self.log.warning("path changed", extra={"device": st.device, "path": st.path,
                                                "reachable": ok, "error": st.error})
        group, epoch = self._served_by_me(st.device)
        data = {"device": st.device, "path": st.path, "node": self.node, "epoch": epoch,
                "error": st.error}
        if ok:
            self.emit_soon("storage.path_up", f"{st.device} path {st.path} is reachable "
                           f"again from {self.node}", group=group, epoch=epoch, data=data)
            return
        self.emit_soon("storage.path_down", f"{st.device} path {st.path} is unreachable "
                       f"from {self.node}: {st.error}", group=group, epoch=epoch, data=data)
        same = [s for s in self.paths if s.device == st.device]
        if all(s.reachable is False for s in same):
            self.emit_soon("storage.device_lost", f"{st.device}: no path left from "
                           f"{self.node}", group=group, epoch=epoch,
                           data={"device": st.device, "paths": [s.path for s in same],
                                 "node": self.node, "epoch": epoch})

    def _served_by_me(self, device: str) -> tuple[str | None, int | None]:
        """The data group of ``device`` and its epoch, when this node holds that group."""
        for g, sv in self.serving.items():
            if device in self.config.group_devices(g):
                return g, sv.epoch
        return None, None

    # ---- reports ---------------------------------------------------------------
    async def _keep_fresh(self) -> None:
        if time.monotonic() - self.last_report >= self.config.timings.probe_interval:
            await self._publish()

    async def _publish(self) -> None:
        if any(s.reachable is None for s in self.paths):
            return  # not every path probed yet: no report that would guess
        report = StorageReport(cluster=self.config.cluster, node=self.node, seq=self.seq,
                               paths=[PathHealth(device=s.device, path=s.path,
                                                 reachable=bool(s.reachable), latency=s.latency,
                                                 error=s.error) for s in self.paths],
                               groups=[GroupStorage(group=g, epoch=sv.epoch, state=sv.state,
                                                    reason=sv.reason)
                                       for g, sv in sorted(self.serving.items())])
        self.seq += 1
        self.last_report = time.monotonic()
        await self.nc.publish(self.subjects.storage(self.node), encode(report))

    def status(self) -> dict[str, Any]:
        return {"san": self.san_host,
                "groups": {g: {"epoch": sv.epoch, "state": sv.state, "reason": sv.reason,
                               "reserved": sv.reserved,
                               "resources": [r.name for r in sv.started]}
                           for g, sv in sorted(self.serving.items())},
                "term": self.fencing.term, "epochs": self.fencing.epochs,
                "paths": [{"device": s.device, "path": s.path, "reachable": s.reachable,
                           "latency": s.latency, "error": s.error} for s in self.paths]}


main = service_command(StorageMonitor)
