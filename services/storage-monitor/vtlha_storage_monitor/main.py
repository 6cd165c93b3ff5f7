"""storage-monitor: probes every path to every device its node uses, through the SAN
target, and publishes ``ha.<cluster>.storage.<node>`` (per device, per path:
reachable, latency, error; per held data group, its state).

The SAN is the cluster file's ``san.kind``, behind one seam
(:mod:`vtlha_storage_monitor.backends`): the reference target (``reference``: a TCP
connection per path, ``--san HOST`` at port ``san.port + path``, registered for every
device the node has that path to) or a real iSCSI target with SCSI-3 persistent
reservations (``iscsi``: a read-only session per device and path for probes, a holder
session per held device, every PR OUT that grants access only with the hold rule's
permit; ``docs/storage.md``). A probe reads one block with a timeout
(``probe_timeout``): :mod:`vtlha_storage_monitor.paths`.

Storage takeover and release (an :class:`~vtlha.executor.Executor`: level-triggered
on a valid lease notice, as the ip-manager), here: to hold a data group it takes
each device's reservation at the group's epoch (``reserve``, or ``preempt`` when
another node holds it; a refused take is tried again ``TAKE_TRIES`` times, a back-off
apart, while the lease stays valid), then runs the group's resource agents' ``start``
(``vtlha.agents``; by default the tape data service). It hands the group's data
service the hold rule as a permit file (``vtlha.iscsi.permitfile``: renewed at every
lease notice, revoked before the resources stop); on iSCSI the data service takes the
reservation to its own sessions with it (Write Exclusive: the writer must hold it) and
acknowledges a write only while it is valid. A reservation never taken leaves the
group ``failed`` — reported in the storage report and the event
``storage.start_failed``, never "served" — which the arbiter's storage rule acts on
(the companion takes it over when it can serve it). To stop holding it runs the
agents' ``stop`` (the data service's I/O has stopped when it returns) and then
releases the reservations; the release is acknowledged only when both are done (a
reservation another node preempted counts as given up). Events ``storage.takeover`` /
``storage.release`` name device, path, node and epoch.

Once started, the resources' monitors, restarts after a failure (with a back-off after
a failed start), giving a group up, and the operator's ``vtlha cleanup``:
:mod:`vtlha_storage_monitor.resources`."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any

import click
from nats.aio.msg import Msg
from prometheus_client import Counter

from vtlha import bus
from vtlha.agents import AgentResult, drop_prepared, prepare, run_agent
from vtlha.config import ClusterConfig, Resource
from vtlha.executor import HoldingExecutor, ReleaseIncomplete
from vtlha.iscsi.permitfile import FILE_NAME as PERMIT_FILE
from vtlha.iscsi.permitfile import revoke_permit, write_permit
from vtlha.iscsi.session import Permit
from vtlha.messages import GroupStorage, StorageReport, encode
from vtlha.service import service_command
from vtlha_storage_monitor.backends import SanBackend, StorageError, make_backend
from vtlha_storage_monitor.paths import Paths
from vtlha_storage_monitor.resources import MONITOR_TICK, Resources, Serving

LOOPBACK = "127.0.0.1"
RELEASE_RETRY = 1.0  # seconds before an unfinished release is tried again
TAKE_TRIES = 3  # a refused reservation take is tried this often before the group fails
TAKE_BACKOFF = 0.25  # seconds before the second try, doubling
#: seconds after a resource's stop before its next start is prepared (a standby tape
#: service's imports take ~0.25 s of CPU: not while the companion takes the group over)
PREPARE_DELAY = 2.0


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
        self.san_host: str = self.options.get("san") or default_san_host(config)
        self.paths = Paths(self)
        self.timeout = self.config.timings.probe_timeout
        self.seq = 0
        self.last_report = 0.0
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
        self.resources = Resources(self)
        self.reconciled = False

    async def start(self) -> None:
        interval = self.config.timings.probe_interval
        self.log.info("probing through the SAN target",
                      extra={"kind": self.san.name, **self.san.describe(),
                             "paths": len(self.paths.states)})
        for i in self.san.path_indices():
            self.every(interval, functools.partial(self.paths.probe, i), f"probe{i}")
        self.every(interval, self._keep_fresh, "report")
        await bus.retry_js("reconcile", self.reconcile)
        for group in sorted(self.executor_groups()):
            for r in self.config.group_resources(group):
                self.prepare(group, r)
        await self.start_executor()
        self.every(MONITOR_TICK, self.resources.monitor, "monitor")

    async def stop(self) -> None:
        await super().stop()
        drop_prepared()
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
                    res = await self.run_agent(group, 0, r, "stop")
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

    def prepare(self, group: str, r: Resource) -> None:
        """The resource's next start got ready ahead (``vtlha.agents.prepare``: the
        built-in tape agent's standby service); a failure only makes that start slower.
        Not for a group held or being started here (its start has been)."""
        if self.stopping or group in self.serving:
            return
        try:
            prepare(r, self._run_dir(group, r), self._agent_env(group, 0))
        except OSError as exc:
            self.log.warning("resource start not prepared", extra={
                "group": group, "resource": r.name, "error": str(exc)})

    async def run_agent(self, group: str, epoch: int, r: Resource,
                        action: str) -> AgentResult:
        res = await run_agent(r, action, self._agent_env(group, epoch), self._run_dir(group, r))
        if action == "stop":  # for the group's next start here, once the move is done
            asyncio.get_running_loop().call_later(PREPARE_DELAY, self.prepare, group, r)
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
        await self.publish()
        for device in self.config.group_devices(group):
            problem = await self._take_with_retries(sv, device)
            if problem is not None:
                self.reservations.labels("take", "failed").inc()
                await self.fail(sv, f"reservation not taken: {problem}")
                return
        resources = self.config.group_resources(group)
        for i, r in enumerate(resources):
            res = await self.run_agent(group, epoch, r, "start")
            if not res.ok:
                await self.resources.start_failed(sv, r, resources[i:], res.detail)
                return
            self.started(sv, r)
        await self.now_served(sv)

    async def _take_with_retries(self, sv: Serving, device: str) -> str | None:
        """Take the device's reservation, ``TAKE_TRIES`` times at most, a back-off apart,
        while the group's lease stays valid; None when taken, else the last refusal."""
        delay = TAKE_BACKOFF
        for attempt in range(1, TAKE_TRIES + 1):
            try:
                await self._take(sv, device)
                return None
            except StorageError as exc:
                problem = str(exc)
            if attempt == TAKE_TRIES or not self.resources.still_mine(sv):
                break
            self.log.warning("reservation not taken; trying again", extra={
                "group": sv.group, "epoch": sv.epoch, "device": device, "attempt": attempt,
                "delay": delay, "error": problem})
            await asyncio.sleep(delay)
            delay *= 2
        return problem

    def started(self, sv: Serving, r: Resource) -> None:
        sv.started.append(r)
        if r.monitor_interval > 0:
            sv.next_monitor[r.name] = time.monotonic() + r.monitor_interval

    async def now_served(self, sv: Serving) -> None:
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
        await self.publish()

    async def fail(self, sv: Serving, reason: str) -> None:
        sv.state, sv.reason = "failed", reason
        self.log.error("group not served", extra={"group": sv.group, "epoch": sv.epoch,
                                                  "reason": reason})
        self.emit_soon("storage.start_failed", f"{self.node} does not serve {sv.group} "
                       f"(epoch {sv.epoch}): {reason}", group=sv.group, epoch=sv.epoch,
                       new=self.node, data={"node": self.node, "reason": reason})
        await self.publish()

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
        await self.resources.cancel_recovery(sv)
        problems: list[str] = []
        for r in reversed(self.config.group_resources(group)):
            if r.name in sv.stopped:
                continue
            res = await self.run_agent(group, sv.epoch, r, "stop")
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
        await self.publish()

    # ---- reports ---------------------------------------------------------------
    async def _keep_fresh(self) -> None:
        if time.monotonic() - self.last_report >= self.config.timings.probe_interval:
            await self.publish()

    async def publish(self) -> None:
        if not self.paths.all_probed:
            return  # not every path probed yet: no report that would guess
        report = StorageReport(cluster=self.config.cluster, node=self.node, seq=self.seq,
                               paths=self.paths.health(),
                               groups=[GroupStorage(group=g, epoch=sv.epoch, state=sv.state,
                                                    reason=sv.reason)
                                       for g, sv in sorted(self.serving.items())])
        self.seq += 1
        self.last_report = time.monotonic()
        await self.nc.publish(self.subjects.storage(self.node), encode(report))

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
                "failures": self.resources.counts(),
                "term": self.fencing.term, "epochs": self.fencing.epochs,
                "paths": self.paths.status()}

    # ---- the resources' side (vtlha_storage_monitor.resources) -----------------------
    def group_lock(self, group: str) -> asyncio.Lock:
        return self._group_locks[group]

    def served_by_me(self, device: str) -> tuple[str | None, int | None]:
        """The data group of ``device`` and its epoch, when this node holds that group."""
        for g, sv in self.serving.items():
            if device in self.config.group_devices(g):
                return g, sv.epoch
        return None, None

    async def cleanup(self, group: str, epoch: int) -> tuple[str, bool]:
        return await self.resources.cleanup(group, epoch)


main = service_command(StorageMonitor)
