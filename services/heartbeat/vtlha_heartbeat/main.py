"""heartbeat: publishes ``ha.<cluster>.hb.<node>`` every ``heartbeat_interval``.

Each heartbeat carries the node's incarnation (new per process start), a sequence
number, the process checks, and the node's own storage verdict (summarised from its
storage-monitor's reports, as the manual says).

The process checks are the configured ones plus one built-in fatal check per local
executor ("executor ip-manager alive", "executor storage-monitor alive": a ping over
NATS). They run every ``check_interval``; each is reported after hysteresis over its
runs (``fall`` failing / ``rise`` passing runs in a row before its state changes; the
first run sets it), so the arbiter takes the reported states as they are. See
``vtlha.checks`` for the details and the executors' start-up grace."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from vtlha.checks import (
    EXECUTOR_START_GRACE,
    Debounce,
    ExecutorLiveness,
    checked_executors,
    ping_executor,
    ping_timeout,
    run_check,
)
from vtlha.executor import Executor
from vtlha.messages import CheckResult, Heartbeat, StorageReport, StorageVerdict, decode, encode
from vtlha.service import service_command
from vtlha_heartbeat.lease import LeaseRunner


class HeartbeatService(Executor):
    """Heartbeats, process checks, and the node's lease holder (``lease.LeaseRunner``).
    As an executor it takes the arbiter's ``term`` announcements and ``acquire`` commands
    (whose ``wait`` opens the acquire gate early); it never releases anything itself."""

    name = "heartbeat"
    http_port_key = "heartbeat"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lease = LeaseRunner(self)
        self.incarnation = uuid.uuid4().hex[:16]
        self.seq = 0
        self.node_cfg = self.config.node(self.node)
        self.check_results: dict[str, CheckResult] = {}  # reported (after hysteresis)
        t = self.config.timings
        self.debounce = {c.name: Debounce(t.rise, t.fall) for c in self.node_cfg.checks}
        self.liveness: list[ExecutorLiveness] = []  # made at the first check run
        self.executors = checked_executors(self.config, self.node)
        self.storage_report: StorageReport | None = None
        self.storage_received: float | None = None
        self.published = Counter("vtlha_heartbeats_published_total", "Heartbeats published",
                                 registry=self.registry)
        self.check_ok = Gauge("vtlha_check_ok", "1 if the process check passed", ["check"],
                              registry=self.registry)

    async def start(self) -> None:
        await self.lease.start()
        await self.learn_bucket()
        await self.start_executor()
        await self.nc.subscribe(self.subjects.storage(self.node),
                                cb=self.subscribe_handler("storage", self._on_storage))
        if self.node_cfg.checks or self.executors:
            t = self.config.timings
            now = time.monotonic()  # the executors' start-up grace counts from here
            self.liveness = [ExecutorLiveness(s, t.rise, t.fall, EXECUTOR_START_GRACE, now)
                             for s in self.executors]
            await self._run_checks()
            self.every(t.check_interval, self._run_checks, "checks")
        self.every(self.config.timings.heartbeat_interval, self._beat, "heartbeat")

    async def _on_storage(self, msg: Msg) -> None:
        report = decode(StorageReport, msg.data)
        if report.node != self.node:
            return
        self.storage_report = report
        self.storage_received = time.monotonic()

    async def _run_checks(self) -> None:
        """One run of every check; what is reported is each check's state after
        hysteresis over its runs."""
        timeout = ping_timeout(self.config)
        runs, pings = await asyncio.gather(
            asyncio.gather(*(run_check(c) for c in self.node_cfg.checks)),
            asyncio.gather(*(ping_executor(self.nc, self.subjects.ping(self.node, x.service),
                                           self.node, x.service, timeout)
                             for x in self.liveness)))
        now = time.monotonic()
        changed = False
        for run in runs:
            d = self.debounce[run.name]
            self._report(d.update(run), d.changed)
            changed |= d.changed
        for x, (ok, detail) in zip(self.liveness, pings, strict=True):
            self._report(x.update(ok, detail, now), x.changed)
            changed |= x.changed
        if changed:
            # A check's state changed: the arbiter hears it now, not at the next beat
            # (up to a heartbeat interval later: a fatal check's failover waits on it).
            await self._beat()

    def _report(self, r: CheckResult, changed: bool) -> None:
        if changed:
            (self.log.info if r.ok else self.log.warning)(
                "check " + ("passes" if r.ok else "fails"),
                extra={"check": r.name, "ok": r.ok, "fatal": r.fatal, "detail": r.detail})
        self.check_results[r.name] = r
        self.check_ok.labels(r.name).set(1 if r.ok else 0)

    def storage_verdict(self) -> StorageVerdict | None:
        if self.storage_report is None or self.storage_received is None:
            return None
        reachable: dict[str, bool] = {}
        for p in self.storage_report.paths:
            reachable[p.device] = reachable.get(p.device, False) or p.reachable
        failed = sorted(d for d, ok in reachable.items() if not ok)
        return StorageVerdict(ok=not failed, failed_devices=failed,
                              age=round(time.monotonic() - self.storage_received, 3))

    async def _beat(self) -> None:
        # the sequence number taken before the publish: a beat sent on a check's change
        # and the periodic one never share one (the arbiter drops a repeated seq)
        seq, self.seq = self.seq, self.seq + 1
        hb = Heartbeat(cluster=self.config.cluster, node=self.node, incarnation=self.incarnation,
                       seq=seq, interval=self.config.timings.heartbeat_interval,
                       checks=list(self.check_results.values()), storage=self.storage_verdict(),
                       leases=self.lease.states(time.monotonic()))
        await self.nc.publish(self.subjects.hb(self.node), encode(hb))
        self.published.inc()

    async def acquire(self, group: str, epoch: int) -> list[str]:
        self.lease.on_acquire(group, epoch, self.command.wait if self.command else None)
        return []

    async def ready_to_move(self) -> bool:
        return await self.lease.ready_to_move()

    async def reconnected(self) -> None:
        self.lease.reconnected()

    async def release(self, group: str, epoch: int) -> list[str]:
        return []  # executors release; the lease holder only stops renewing when taken

    async def bucket_changed(self) -> None:
        self.lease.on_new_bucket()

    async def stop(self) -> None:
        await super().stop()
        await self.lease.stop()

    def status(self) -> dict[str, Any]:
        verdict = self.storage_verdict()
        return {"incarnation": self.incarnation, "seq": self.seq, "lease": self.lease.status(),
                "checks": [c.model_dump() for c in self.check_results.values()],
                "storage": verdict.model_dump() if verdict else None}


main = service_command(HeartbeatService)
