"""A data group's resources on this node once they run: their monitors, what a failure
of one leads to (a restart here, or the group given up), and the operator's cleanup.

A failed ``monitor``, or a failed ``start`` while the group is acquired, is a
**failure** of that resource on this node (``storage.agent_failed``), counted per
(group, resource) within the resource's ``failure_timeout`` (``vtlha.recovery``,
Pacemaker's fail counts). Below ``migration_threshold`` the resource is recovered here:
``stop`` then ``start`` of it and of the group's resources after it (as Pacemaker
restarts a group's members in order), each with its timeout, in a task of its own
(``storage.resource_restarted``); after a failed ``start`` the new start waits a
back-off first (``vtlha.recovery.restart_delay``: 0.5 s, doubling with each counted
failure, at most 8 s), so a resource that cannot start is not started in a storm.
Meanwhile the group is reported ``starting`` and none of its monitors runs. When the
threshold is reached, or the restart fails itself, the group is given up: reported
``failed``, which the arbiter's storage rule (``storage_local_failure``) reads like a
lost device and moves the group to the companion when the companion can serve it (an
alarm, ``storage.global_failure``, when it cannot). A release, or the lease lapsing,
cancels a recovery under way (its agent is killed) before the release's own ``stop``.

``vtlha cleanup GROUP`` (a fenced ``cleanup`` command from the active arbiter) forgets
the group's failures here and, when this node holds the group at the command's epoch
under a valid lease and reports it ``failed``, stops what runs of it and starts it
afresh (reservations, then every resource)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import Counter

from vtlha.config import Resource
from vtlha.protocol.hold import Why
from vtlha.recovery import FailCounts, Verdict, restart_delay

if TYPE_CHECKING:
    from vtlha_storage_monitor.main import StorageMonitor

MONITOR_TICK = 0.5  # seconds between checks of which resource monitors are due
CANCEL_WAIT = 5.0  # seconds a release waits for a cancelled recovery to end


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


class Resources:
    """The storage-monitor's resource failures and restarts (one per service)."""

    def __init__(self, mon: StorageMonitor) -> None:
        self.mon = mon
        self.failcounts = FailCounts()
        self.restarts = Counter("vtlha_storage_resource_restarts_total", "Local restarts of "
                                "a failed resource (stop, then start), by resource and result "
                                "(ok, failed, cancelled)", ["resource", "result"],
                                registry=mon.registry)
        self.failures = Counter("vtlha_storage_resource_failures_total", "Failures "
                                "of a resource on this node (failed monitor or start), "
                                "by resource and what follows (restart, give_up)",
                                ["resource", "next"], registry=mon.registry)
        self.cleanups = Counter("vtlha_storage_cleanups_total", "Operator cleanups of a "
                                "group on this node, by what followed (forgotten, restarted)",
                                ["result"], registry=mon.registry)

    # ---- a failure: count it, say what follows --------------------------------------
    def failed(self, sv: Serving, r: Resource, action: str, detail: str,
               restart_failed: bool = False) -> Verdict:
        """Count one failure of ``r`` on this node and say what follows (the event
        ``storage.agent_failed`` says it too)."""
        mon = self.mon
        v = self.failcounts.record(sv.group, r.name, time.monotonic(),
                                   threshold=r.migration_threshold,
                                   failure_timeout=r.failure_timeout,
                                   restart_failed=restart_failed)
        # after a failed start the restart waits a back-off (none after a monitor failure)
        delay = restart_delay(v.failures) if action == "start" and not v.gives_up else 0.0
        self.failures.labels(r.name, v.next.value).inc()
        mon.log.warning("resource failed", extra={
            "group": sv.group, "epoch": sv.epoch, "resource": r.name, "action": action,
            "detail": detail, "failures": v.failures, "threshold": v.threshold,
            "next": v.next.value})
        later = f" in {delay:g} s" if delay > 0 else ""
        mon.emit_soon("storage.agent_failed", f"{mon.node}: resource {r.name} of "
                      f"{sv.group}: {action} failed: {detail}; {v.why}{later}", group=sv.group,
                      epoch=sv.epoch, data={"resource": r.name, "node": mon.node,
                                            "action": action, "detail": detail,
                                            "failures": v.failures, "threshold": v.threshold,
                                            "next": v.next.value, "delay": delay})
        return v

    async def start_failed(self, sv: Serving, r: Resource, chain: list[Resource],
                           detail: str) -> None:
        """``r``'s ``start`` failed while the group is acquired (``chain``: it and the
        group's resources after it): restart after a back-off, or give the group up."""
        why = f"resource {r.name}: start failed: {detail}"
        v = self.failed(sv, r, "start", detail)
        if v.gives_up:
            # As Pacemaker does after a failed start: stop what may be half started.
            await self.mon.run_agent(sv.group, sv.epoch, r, "stop")
            await self.give_up(sv, f"{why}; {v.why}")
        else:  # stop, then start again, in a task a release can cancel
            await self.begin_recovery(sv, r, chain, why, restart=True,
                                      delay=restart_delay(v.failures))

    async def give_up(self, sv: Serving, reason: str) -> None:
        """The group is not served here and will not be restarted: reported ``failed``
        (the arbiter moves it when the companion can serve it)."""
        mon = self.mon
        if not sv.served_once:
            await mon.fail(sv, reason)  # never served at this epoch: a start failure
            return
        sv.state, sv.reason = "failed", reason
        mon.log.error("group given up", extra={"group": sv.group, "epoch": sv.epoch,
                                               "reason": reason})
        await mon.publish()

    # ---- a restart here ----------------------------------------------------------
    async def begin_recovery(self, sv: Serving, failed: Resource, chain: list[Resource],
                             why: str, restart: bool, delay: float = 0.0) -> None:
        """Stop ``chain`` (``failed`` and the group's resources after it), then, with
        ``restart``, start it again ``delay`` seconds later, in a task of its own that a
        release cancels."""
        for x in chain:
            sv.next_monitor.pop(x.name, None)
        sv.started = [x for x in sv.started if x not in chain]
        if restart:
            sv.state = "starting"
            later = f" in {delay:g} s" if delay > 0 else ""
            sv.reason = f"restarting {', '.join(x.name for x in chain)}{later} after: {why}"
            await self.mon.publish()
        sv.recovery = self.mon.spawn(self._recover(sv, failed, chain, restart, delay),
                                     f"recover-{sv.group}", critical=False)

    def still_mine(self, sv: Serving) -> bool:
        """The group is still held at this epoch and not being let go."""
        mon = self.mon
        return (mon.serving.get(sv.group) is sv and sv.state != "stopping"
                and mon.gate.verdict(sv.group, time.monotonic()) is Why.HOLD)

    async def _recover(self, sv: Serving, failed: Resource, chain: list[Resource],
                       restart: bool, delay: float) -> None:
        mon = self.mon
        t0 = time.monotonic()
        try:
            done = await self._stop_then_start(sv, failed, chain, restart, delay)
        except asyncio.CancelledError:
            if restart:
                self.restarts.labels(failed.name, "cancelled").inc()
            mon.log.info("recovery cancelled: the group is let go",
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
        mon.emit_soon("storage.resource_restarted", f"{mon.node} restarted "
                      f"{', '.join(x.name for x in chain)} of {sv.group} at epoch {sv.epoch} "
                      f"in {seconds:g} s ({n} failure(s) of {failed.name} counted, "
                      f"migration_threshold {failed.migration_threshold})", group=sv.group,
                      epoch=sv.epoch, new=mon.node,
                      data={"resource": failed.name, "node": mon.node,
                            "resources": [x.name for x in chain], "failures": n,
                            "threshold": failed.migration_threshold, "seconds": seconds,
                            "delay": delay})
        if sv.served_once:
            sv.state, sv.reason = "served", ""
            mon.log.info("serving again", extra={"group": sv.group, "epoch": sv.epoch,
                                                 "resources": [r.name for r in sv.started]})
            await mon.publish()
        else:
            await mon.now_served(sv)

    async def _stop_then_start(self, sv: Serving, failed: Resource, chain: list[Resource],
                               restart: bool, delay: float) -> bool:
        """True when every resource of ``chain`` was stopped and (``restart``) started
        again; False when the group was let go meanwhile or given up."""
        mon = self.mon
        for x in reversed(chain):
            if not self.still_mine(sv):
                return False
            res = await mon.run_agent(sv.group, sv.epoch, x, "stop")
            if not res.ok and restart:
                return await self._restart_failed(sv, failed, x, "stop", res.detail)
        if not restart:
            return True
        if delay > 0:
            await asyncio.sleep(delay)  # the back-off after a failed start
        for x in chain:
            if not self.still_mine(sv):
                return False
            res = await mon.run_agent(sv.group, sv.epoch, x, "start")
            if not res.ok:
                await mon.run_agent(sv.group, sv.epoch, x, "stop")  # as after any failed start
                return await self._restart_failed(sv, failed, x, "start", res.detail)
            mon.started(sv, x)
        return True

    async def _restart_failed(self, sv: Serving, failed: Resource, x: Resource, action: str,
                              detail: str) -> bool:
        v = self.failed(sv, x, action, detail, restart_failed=True)
        self.restarts.labels(failed.name, "failed").inc()
        if self.still_mine(sv):
            await self.give_up(sv, f"resource {x.name}: {action} failed while restarting "
                               f"after a failure of {failed.name}: {detail}; {v.why}")
        return False

    async def cancel_recovery(self, sv: Serving) -> None:
        task = sv.recovery
        if task is None or task.done():
            return
        task.cancel()  # its agent is killed (vtlha.agents.run_agent)
        await asyncio.wait({task}, timeout=CANCEL_WAIT)
        if not task.done():
            self.mon.log.error("a cancelled recovery did not end", extra={"group": sv.group})

    # ---- monitors ------------------------------------------------------------------
    async def monitor(self) -> None:
        """Each served group's due monitors. A group being restarted or given up is not
        ``served``: none of its monitors runs meanwhile."""
        mon = self.mon
        now = time.monotonic()
        for group, sv in list(mon.serving.items()):
            for r in list(sv.started):
                due = sv.next_monitor.get(r.name)
                if sv.state != "served" or due is None or now < due:
                    continue
                sv.next_monitor[r.name] = now + r.monitor_interval
                async with mon.group_lock(group):
                    if mon.serving.get(group) is not sv or sv.state != "served":
                        break
                    res = await mon.run_agent(group, sv.epoch, r, "monitor")
                    if not res.ok:
                        await self._monitor_failed(sv, r, res.detail)

    async def _monitor_failed(self, sv: Serving, r: Resource, detail: str) -> None:
        if self.mon.gate.verdict(sv.group, time.monotonic()) is not Why.HOLD:
            # The lease is gone (the group is being let go: its data service may have
            # ended itself on a refused write): no failure of this node's.
            self.mon.log.info("monitor failed while the group is let go: not counted",
                              extra={"group": sv.group, "epoch": sv.epoch,
                                     "resource": r.name, "detail": detail})
            return
        v = self.failed(sv, r, "monitor", detail)
        chain = sv.started[sv.started.index(r):]
        why = f"resource {r.name}: monitor failed: {detail}"
        if v.gives_up:
            await self.give_up(sv, f"{why}; {v.why}")
        await self.begin_recovery(sv, r, chain, why, restart=not v.gives_up)

    def counts(self) -> dict[str, dict[str, int]]:
        """group -> resource -> failures on this node that still count."""
        mon = self.mon
        timeouts = {(g, r.name): r.failure_timeout for g in mon.executor_groups()
                    for r in mon.config.group_resources(g)}
        out: dict[str, dict[str, int]] = {}
        for (g, r), n in sorted(self.failcounts.counts(time.monotonic(), timeouts).items()):
            out.setdefault(g, {})[r] = n
        return out

    # ---- the operator's cleanup ------------------------------------------------------
    async def cleanup(self, group: str, epoch: int) -> tuple[str, bool]:
        """Forget the group's failures here; restart it when this node holds it at
        ``epoch`` under a valid lease and reports it failed. The reply's sentence, and
        whether it restarted."""
        mon = self.mon
        forgotten = self.failcounts.forget(group)
        parts = [f"{mon.node}: " + (
            "forgot " + ", ".join(f"{n} failure{'s' if n != 1 else ''} of {r}"
                                  for r, n in sorted(forgotten.items()))
            if forgotten else f"no failure of {group} was counted")]
        sv = mon.serving.get(group)
        restarted = False
        if sv is None or sv.state != "failed":
            parts.append(f"{group} is {sv.state if sv else 'not held here'}: nothing to restart")
        elif sv.epoch != epoch:
            parts.append(f"{group} failed here at epoch {sv.epoch}, not {epoch}: not restarted")
        elif not self.still_mine(sv):
            parts.append(f"the lease on {group} is not valid here: not restarted")
        else:
            restarted = True
            parts.append(f"{group} (failed: {sv.reason}) is started again at epoch {epoch}")
            sv.state, sv.reason = "starting", "started again by an operator's cleanup"
            sv.recovery = mon.spawn(self._start_afresh(sv), f"cleanup-{group}", critical=False)
        self.cleanups.labels("restarted" if restarted else "forgotten").inc()
        mon.log.info("cleanup", extra={"group": group, "epoch": epoch,
                                       "forgotten": forgotten, "restarted": restarted})
        await mon.publish()
        return "; ".join(parts), restarted

    async def _start_afresh(self, sv: Serving) -> None:
        """Stop what runs of the failed group, forget it, and hold it again from the
        start (the executor's own path: reservations, then every resource)."""
        mon = self.mon
        async with mon.group_lock(sv.group):
            for r in reversed(mon.config.group_resources(sv.group)):
                if not self.still_mine(sv):
                    return
                await mon.run_agent(sv.group, sv.epoch, r, "stop")
            if mon.serving.get(sv.group) is sv:
                del mon.serving[sv.group]
        if sv.recovery is asyncio.current_task():
            sv.recovery = None
        await mon.enforce(sv.group)
