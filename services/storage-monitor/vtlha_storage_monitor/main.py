"""storage-monitor: probes every path to every device its node uses, through the SAN
target, and publishes ``ha.<cluster>.storage.<node>`` (per device, per path:
reachable, latency, error).

The SAN is the cluster file's ``san.kind``, behind one seam
(:mod:`vtlha_storage_monitor.backends`): the reference target (``reference``: a TCP
connection per path, ``--san HOST`` at port ``san.port + path``, registered for every
device the node has that path to) or a real iSCSI target with SCSI-3 persistent
reservations (``iscsi``: a read-only session per device and path for probes, a holder
session per held device, every PR OUT that grants access only with the hold rule's
permit; ``docs/storage.md``). A probe reads one block with a timeout
(``probe_timeout``); a connection that drops or times out is opened again for the next
probe. Each path index is probed by its own loop, so a path whose
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
``start`` (``vtlha.agents``; by default the tape data service). It hands the group's
data service the hold rule as a permit file (``vtlha.iscsi.permitfile``: renewed at
every lease notice, revoked before the resources stop); on iSCSI the data service
takes the reservation to its own sessions with it (Write Exclusive: the writer must
hold it) and acknowledges a write only while it is valid. A refused reservation
or a failing ``start`` leaves the group ``failed`` — reported in the storage report and
the event ``storage.start_failed``, never "served", and not retried on its own (no
retry storm). To stop holding it runs the agents' ``stop`` (the data service's I/O has
stopped when it returns) and then releases the reservations; the release is
acknowledged only when both are done (a reservation another node preempted counts as
given up). Events ``storage.takeover`` / ``storage.release`` name device, path, node
and epoch.

While a group is served its agents' ``monitor`` runs every ``monitor_interval``. A
failed monitor, or a failed ``start`` while the group is acquired, is a **failure** of
that resource on this node (``storage.agent_failed``), counted per (group, resource)
within the resource's ``failure_timeout`` (``vtlha.recovery``, Pacemaker's fail
counts). Below ``migration_threshold`` the resource is recovered here: ``stop`` then
``start`` of it and of the group's resources after it (as Pacemaker restarts a group's
members in order), each with its timeout, in a task of its own
(``storage.resource_restarted``); meanwhile the group is reported ``starting`` and
none of its monitors runs. When the threshold is reached, or the restart fails itself,
the group is given up: reported ``failed``, which the arbiter's storage rule
(``storage_local_failure``) reads like a lost device and moves the group to the
companion when the companion can serve it (an alarm, ``storage.global_failure``,
when it cannot). A release, or the lease lapsing, cancels a recovery under way (its
agent is killed) before the release's own ``stop``."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from vtlha import bus
from vtlha.agents import AgentResult, run_agent
from vtlha.config import ClusterConfig, Resource
from vtlha.executor import HoldingExecutor, ReleaseIncomplete
from vtlha.health import Hysteresis
from vtlha.iscsi.permitfile import FILE_NAME as PERMIT_FILE
from vtlha.iscsi.permitfile import revoke_permit, write_permit
from vtlha.iscsi.session import Permit
from vtlha.messages import GroupStorage, PathHealth, StorageReport, encode
from vtlha.protocol.hold import Why
from vtlha.recovery import FailCounts, Verdict
from vtlha.service import service_command
from vtlha_storage_monitor.backends import SanBackend, StorageError, make_backend

LOOPBACK = "127.0.0.1"
RELEASE_RETRY = 1.0  # seconds before an unfinished release is tried again
MONITOR_TICK = 0.5  # seconds between checks of which resource monitors are due
CANCEL_WAIT = 5.0  # seconds a release waits for a cancelled recovery to end


@dataclass
class PathState:
    device: str
    path: int
    #: rise/fall over the path's probe results (``vtlha.health.Hysteresis``)
    health: Hysteresis = field(default_factory=lambda: Hysteresis(1, 1))
    reachable: bool | None = None  # the health's state: None until the first result
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
    served_once: bool = False  # was served at this epoch (then a give-up is no start failure)
    #: a local restart (or the stop after a give-up) under way; a release cancels it
    recovery: asyncio.Task[None] | None = None

    @property
    def recovering(self) -> bool:
        return self.recovery is not None and not self.recovery.done()


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
            PathState(dev, i, Hysteresis(t.rise, t.fall))
            for dev, d in sorted(self.config.devices.items())
            for i in range(d.paths.get(self.node, 0))
        ]
        self.timeout = t.probe_timeout
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
        self.san: SanBackend = make_backend(
            config, node, self.san_host, self.executor_groups(), self.gate, self.timeout,
            lambda i: self.reconnects.labels(str(i)).inc())
        self.agent_runs = Counter("vtlha_storage_agent_runs_total", "Resource agent runs, by "
                                  "action and result", ["action", "result"],
                                  registry=self.registry)
        self.reservations = Counter("vtlha_storage_reservations_total", "Reservation "
                                    "requests to the SAN target, by op and result",
                                    ["op", "result"], registry=self.registry)
        self.restarts = Counter("vtlha_storage_resource_restarts_total", "Local restarts of "
                                "a failed resource (stop, then start), by resource and result "
                                "(ok, failed, cancelled)", ["resource", "result"],
                                registry=self.registry)
        self.resource_failures = Counter("vtlha_storage_resource_failures_total", "Failures "
                                         "of a resource on this node (failed monitor or start), "
                                         "by resource and what follows (restart, give_up)",
                                         ["resource", "next"], registry=self.registry)
        self.failcounts = FailCounts()
        self.reconciled = False

    async def start(self) -> None:
        interval = self.config.timings.probe_interval
        self.log.info("probing through the SAN target",
                      extra={"kind": self.san.name, **self.san.describe(),
                             "paths": len(self.paths)})
        for i in self.san.path_indices():
            self.every(interval, functools.partial(self._probe_path, i), f"probe{i}")
        self.every(interval, self._keep_fresh, "report")
        await bus.retry_js("reconcile", self.reconcile)
        await self.start_executor()
        self.every(MONITOR_TICK, self._monitor_resources, "monitor")

    async def stop(self) -> None:
        await super().stop()
        await self.san.close()

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

    async def _on_notice(self, msg: Msg) -> None:
        """Each lease notice also renews (or revokes) the data services' permits at once:
        a group's start (its agents) holds the group's lock for long, and its data
        service takes the reservation with the permit meanwhile."""
        await super()._on_notice(msg)
        for group, sv in list(self.serving.items()):
            if sv.state != "stopping":
                self._hand_permit(group, sv.epoch)

    def _permit_path(self, group: str) -> Path:
        return self.state_dir / "resources" / group / PERMIT_FILE

    def _hand_permit(self, group: str, epoch: int) -> None:
        """Write the hold rule's permit for the group's data service (iSCSI: it registers
        and reserves with it, and acknowledges a write only while it is valid;
        ``vtlha.iscsi.permitfile``): the executor's gate now, or revoked."""
        path = self._permit_path(group)
        permit = Permit.from_gate(self.gate, group, time.monotonic())
        if permit is None or permit.epoch != epoch:
            revoke_permit(path, group, epoch)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_permit(path, group, epoch, permit.valid_until)

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
                "VTLHA_SAN_KIND": self.config.san.kind,
                "VTLHA_PERMIT_FILE": str(self._permit_path(group)),
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
        """Take the device's reservation at the group's epoch (the backend's ``take``:
        reserve when free, preempt an older holder). Raises StorageError."""
        try:
            took = await self.san.take(sv.group, device, sv.epoch)
        except StorageError:
            self.reservations.labels("take", "refused").inc()
            raise
        self.reservations.labels(took.op, "ok").inc()
        sv.reserved[device] = took.path
        old = took.old_node
        self.emit_soon("storage.takeover", f"{self.node} holds {device} of {sv.group} at "
                       f"epoch {sv.epoch} ({took.op} on path {took.path}"
                       f"{f', preempting {old}' if old else ''})",
                       group=sv.group, epoch=sv.epoch, new=self.node, old=old,
                       data={"device": device, "path": took.path, "node": self.node,
                             "op": took.op, "old_epoch": took.old_epoch,
                             **({"key": took.key, "previous_key": took.previous_key}
                                if took.key else {})})

    async def start_holding(self, group: str, epoch: int, until: float) -> None:
        sv = Serving(group, epoch, "starting")
        self.serving[group] = sv
        self._hand_permit(group, epoch)
        await self._publish()
        try:
            for device in self.config.group_devices(group):
                await self._take(sv, device)
        except StorageError as exc:
            self.reservations.labels("take", "failed").inc()
            await self._fail(sv, f"reservation not taken: {exc}")
            return
        resources = self.config.group_resources(group)
        for i, r in enumerate(resources):
            res = await self._agent(group, epoch, r, "start")
            if not res.ok:
                why = f"resource {r.name}: start failed: {res.detail}"
                v = self._resource_failed(sv, r, "start", res.detail)
                if v.gives_up:
                    # As Pacemaker does after a failed start: stop what may be half started.
                    await self._agent(group, epoch, r, "stop")
                    await self._give_up(sv, f"{why}; {v.why}")
                else:  # stop, then start again, in a task a release can cancel
                    await self._begin_recovery(sv, r, resources[i:], why, restart=True)
                return
            self._started(sv, r)
        await self._now_served(sv)

    def _started(self, sv: Serving, r: Resource) -> None:
        sv.started.append(r)
        if r.monitor_interval > 0:
            sv.next_monitor[r.name] = time.monotonic() + r.monitor_interval

    async def _now_served(self, sv: Serving) -> None:
        sv.state, sv.reason, sv.served_once = "served", "", True
        self.log.info("serving", extra={"group": sv.group, "epoch": sv.epoch,
                                        "devices": sorted(sv.reserved),
                                        "resources": [r.name for r in sv.started]})
        self.emit_soon("storage.served", f"{self.node} serves {sv.group} at epoch {sv.epoch}: "
                       f"{len(sv.reserved)} reservation(s) held, resources "
                       f"{', '.join(r.name for r in sv.started) or 'none'} started",
                       group=sv.group, epoch=sv.epoch, new=self.node,
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

    # ---- a failed resource: restart here, or give the group up -------------------
    def _resource_failed(self, sv: Serving, r: Resource, action: str, detail: str,
                         restart_failed: bool = False) -> Verdict:
        """Count one failure of ``r`` on this node and say what follows (the event
        ``storage.agent_failed`` says it too)."""
        v = self.failcounts.record(sv.group, r.name, time.monotonic(),
                                   threshold=r.migration_threshold,
                                   failure_timeout=r.failure_timeout,
                                   restart_failed=restart_failed)
        self.resource_failures.labels(r.name, v.next.value).inc()
        self.log.warning("resource failed", extra={
            "group": sv.group, "epoch": sv.epoch, "resource": r.name, "action": action,
            "detail": detail, "failures": v.failures, "threshold": v.threshold,
            "next": v.next.value})
        self.emit_soon("storage.agent_failed", f"{self.node}: resource {r.name} of "
                       f"{sv.group}: {action} failed: {detail}; {v.why}", group=sv.group,
                       epoch=sv.epoch, data={"resource": r.name, "node": self.node,
                                             "action": action, "detail": detail,
                                             "failures": v.failures, "threshold": v.threshold,
                                             "next": v.next.value})
        return v

    async def _give_up(self, sv: Serving, reason: str) -> None:
        """The group is not served here and will not be restarted: reported ``failed``
        (the arbiter moves it when the companion can serve it)."""
        if not sv.served_once:
            await self._fail(sv, reason)  # never served at this epoch: a start failure
            return
        sv.state, sv.reason = "failed", reason
        self.log.error("group given up", extra={"group": sv.group, "epoch": sv.epoch,
                                                "reason": reason})
        await self._publish()

    async def _begin_recovery(self, sv: Serving, failed: Resource, chain: list[Resource],
                              why: str, restart: bool) -> None:
        """Stop ``chain`` (``failed`` and the group's resources after it), then, with
        ``restart``, start it again, in a task of its own that a release cancels."""
        for x in chain:
            sv.next_monitor.pop(x.name, None)
        sv.started = [x for x in sv.started if x not in chain]
        if restart:
            sv.state = "starting"
            sv.reason = f"restarting {', '.join(x.name for x in chain)} after: {why}"
            await self._publish()
        sv.recovery = self.spawn(self._recover(sv, failed, chain, restart),
                                 f"recover-{sv.group}", critical=False)

    def _still_mine(self, sv: Serving) -> bool:
        """The group is still held at this epoch and not being let go."""
        return (self.serving.get(sv.group) is sv and sv.state != "stopping"
                and self.gate.verdict(sv.group, time.monotonic()) is Why.HOLD)

    async def _recover(self, sv: Serving, failed: Resource, chain: list[Resource],
                       restart: bool) -> None:
        t0 = time.monotonic()
        try:
            done = await self._stop_then_start(sv, failed, chain, restart)
        except asyncio.CancelledError:
            if restart:
                self.restarts.labels(failed.name, "cancelled").inc()
            self.log.info("recovery cancelled: the group is let go",
                          extra={"group": sv.group, "epoch": sv.epoch, "resource": failed.name})
            raise
        finally:
            if sv.recovery is asyncio.current_task():
                sv.recovery = None
        if not restart or not done:
            return
        seconds = round(time.monotonic() - t0, 3)
        n = self.failcounts.count(sv.group, failed.name, time.monotonic(),
                                  failed.failure_timeout)
        self.restarts.labels(failed.name, "ok").inc()
        self.emit_soon("storage.resource_restarted", f"{self.node} restarted "
                       f"{', '.join(x.name for x in chain)} of {sv.group} at epoch {sv.epoch} "
                       f"in {seconds:g} s ({n} failure(s) of {failed.name} counted, "
                       f"migration_threshold {failed.migration_threshold})", group=sv.group,
                       epoch=sv.epoch, new=self.node,
                       data={"resource": failed.name, "node": self.node,
                             "resources": [x.name for x in chain], "failures": n,
                             "threshold": failed.migration_threshold, "seconds": seconds})
        if sv.served_once:
            sv.state, sv.reason = "served", ""
            self.log.info("serving again", extra={"group": sv.group, "epoch": sv.epoch,
                                                  "resources": [r.name for r in sv.started]})
            await self._publish()
        else:
            await self._now_served(sv)

    async def _stop_then_start(self, sv: Serving, failed: Resource, chain: list[Resource],
                               restart: bool) -> bool:
        """True when every resource of ``chain`` was stopped and (``restart``) started
        again; False when the group was let go meanwhile or given up."""
        for x in reversed(chain):
            if not self._still_mine(sv):
                return False
            res = await self._agent(sv.group, sv.epoch, x, "stop")
            if not res.ok and restart:
                return await self._restart_failed(sv, failed, x, "stop", res.detail)
        if not restart:
            return True
        for x in chain:
            if not self._still_mine(sv):
                return False
            res = await self._agent(sv.group, sv.epoch, x, "start")
            if not res.ok:
                await self._agent(sv.group, sv.epoch, x, "stop")  # as after any failed start
                return await self._restart_failed(sv, failed, x, "start", res.detail)
            self._started(sv, x)
        return True

    async def _restart_failed(self, sv: Serving, failed: Resource, x: Resource, action: str,
                              detail: str) -> bool:
        v = self._resource_failed(sv, x, action, detail, restart_failed=True)
        self.restarts.labels(failed.name, "failed").inc()
        if self._still_mine(sv):
            await self._give_up(sv, f"resource {x.name}: {action} failed while restarting "
                                f"after a failure of {failed.name}: {detail}; {v.why}")
        return False

    async def _cancel_recovery(self, sv: Serving) -> None:
        task = sv.recovery
        if task is None or task.done():
            return
        task.cancel()  # its agent is killed (vtlha.agents.run_agent)
        await asyncio.wait({task}, timeout=CANCEL_WAIT)
        if not task.done():
            self.log.error("a cancelled recovery did not end", extra={"group": sv.group})

    async def keep_holding(self, group: str, until: float) -> None:
        """The reservation does not expire; a holder session lost meanwhile (iSCSI) is
        taken again here, under the hold rule (the executor calls this only while the
        group's lease notice is valid)."""
        sv = self.serving.get(group)
        if sv is None or sv.state != "served":
            return
        # While its resources run, the data service holds the reservation with this
        # node's key (iSCSI): a lost holder of ours is not taken back from it.
        for line in await self.san.keep(group, sorted(sv.reserved), sv.epoch,
                                        leave_own=bool(sv.started)):
            self.log.warning("holder session", extra={"group": group, "epoch": sv.epoch,
                                                      "detail": line})
            self.emit_soon("storage.retaken", f"{self.node}: {group}: {line}", group=group,
                           epoch=sv.epoch, data={"node": self.node, "detail": line})

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
        revoke_permit(self._permit_path(group), group, sv.epoch)  # before any stop
        await self._cancel_recovery(sv)
        problems: list[str] = []
        for r in reversed(self.config.group_resources(group)):
            if r.name in sv.stopped:
                continue
            res = await self._agent(group, sv.epoch, r, "stop")
            if res.ok:
                sv.stopped.add(r.name)
            else:
                problems.append(f"resource {r.name}: stop failed: {res.detail}")
        for device in list(sv.reserved):
            try:
                how, path = await self.san.give_up(group, device, sv.epoch)
            except StorageError as exc:
                problems.append(f"{device}: reservation not released: {exc}")
                continue
            self.reservations.labels("release", "ok").inc()
            del sv.reserved[device]
            self.emit_soon("storage.release", f"{self.node} gave up {device} of {group} "
                           f"(epoch {sv.epoch}): {how}", group=group, epoch=sv.epoch,
                           old=self.node, data={"device": device, "path": path,
                                                "node": self.node, "how": how})
        if problems:
            sv.reason = "; ".join(problems)
            sv.retry_at = time.monotonic() + RELEASE_RETRY
            raise ReleaseIncomplete(f"{self.node} could not finish releasing {group}: "
                                    f"{sv.reason}")
        del self.serving[group]
        await self._publish()

    async def _monitor_resources(self) -> None:
        """Each served group's due monitors. A group being restarted or given up is not
        ``served``: none of its monitors runs meanwhile."""
        now = time.monotonic()
        for group, sv in list(self.serving.items()):
            for r in list(sv.started):
                due = sv.next_monitor.get(r.name)
                if sv.state != "served" or due is None or now < due:
                    continue
                sv.next_monitor[r.name] = now + r.monitor_interval
                async with self._group_locks[group]:
                    if self.serving.get(group) is not sv or sv.state != "served":
                        break
                    res = await self._agent(group, sv.epoch, r, "monitor")
                    if not res.ok:
                        await self._monitor_failed(sv, r, res.detail)

    async def _monitor_failed(self, sv: Serving, r: Resource, detail: str) -> None:
        if self.gate.verdict(sv.group, time.monotonic()) is not Why.HOLD:
            # The lease is gone (the group is being let go: its data service may have
            # ended itself on a refused write): no failure of this node's.
            self.log.info("monitor failed while the group is let go: not counted",
                          extra={"group": sv.group, "epoch": sv.epoch, "resource": r.name,
                                 "detail": detail})
            return
        v = self._resource_failed(sv, r, "monitor", detail)
        chain = sv.started[sv.started.index(r):]
        why = f"resource {r.name}: monitor failed: {detail}"
        if v.gives_up:
            await self._give_up(sv, f"{why}; {v.why}")
        await self._begin_recovery(sv, r, chain, why, restart=not v.gives_up)

    # ---- probing ---------------------------------------------------------------
    async def _probe_path(self, i: int) -> None:
        states = [s for s in self.paths if s.path == i]
        if self.stopping:
            return
        results = await self.san.probe_round(i, [st.device for st in states])
        for st, r in zip(states, results, strict=True):
            st.latency = r.latency if r.ok else None
            st.error = r.error
            self.probes.labels("ok" if r.ok else "failed").inc()
            self._apply(st, r.ok)
        await self._publish()

    def _apply(self, st: PathState, ok: bool) -> None:
        first = st.health.state is None
        st.reachable = st.health.update(ok)
        # the first result sets the state; only a failing one is worth a change event
        changed = (not ok) if first else st.health.changed
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

    def _failure_counts(self) -> dict[str, dict[str, int]]:
        """group -> resource -> failures on this node that still count."""
        timeouts = {(g, r.name): r.failure_timeout for g in self.executor_groups()
                    for r in self.config.group_resources(g)}
        out: dict[str, dict[str, int]] = {}
        for (g, r), n in sorted(self.failcounts.counts(time.monotonic(), timeouts).items()):
            out.setdefault(g, {})[r] = n
        return out

    def status(self) -> dict[str, Any]:
        return {"san": self.san_host if self.san.name == "reference" else self.san.describe(),
                "san_kind": self.san.name,
                #: iSCSI: per device, READ KEYS and READ RESERVATION as last read by a probe
                "reservations": self.san.reservations(),
                "groups": {g: {"epoch": sv.epoch, "state": sv.state, "reason": sv.reason,
                               "reserved": sv.reserved,
                               "resources": [r.name for r in sv.started],
                               "recovering": sv.recovering}
                           for g, sv in sorted(self.serving.items())},
                "failures": self._failure_counts(),
                "term": self.fencing.term, "epochs": self.fencing.epochs,
                "paths": [{"device": s.device, "path": s.path, "reachable": s.reachable,
                           "latency": s.latency, "error": s.error} for s in self.paths]}


main = service_command(StorageMonitor)
