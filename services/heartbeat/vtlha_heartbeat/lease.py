"""The lease holder's I/O: drives ``vtlha.protocol.lease.LeaseHolder`` with the KV, the
companion's lease holder and this node's executors.

- renewals: compare-and-set on ``group.<g>`` with a short timeout (one renewal interval);
  a conflict is followed by a read of the key, so the state machine can tell a taken
  group from our own timed-out write that committed;
- lease notices: ``ha.<c>.lease.<node>`` (local to the host), one per successful renewal
  or granted promise, and a revoked one when a group is taken;
- promises: requests answered on ``ha.<c>.promise.<node>``; asked of the companion when a
  renewal finds the KV unavailable;
- the KV watch on ``group.>`` tells it what the node owns and when it was given a group;
  a watch that stops showing this node's own renewals is restarted
  (``vtlha.protocol.watch``), and every group's record is also read directly every
  ``read_every`` (the backstop: a claim is seen even with no watch at all). Every record,
  watched or read, goes through the state machine's monotonic filter;
- the bucket is never created here: it waits for the arbiter to create it.
Every call has a timeout; the state machine is called from the event loop only, so
promise and acquire decisions are taken one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge

from vtlha import bus
from vtlha.errors import InvalidMessage
from vtlha.messages import (
    GroupRecord,
    LeaseNotice,
    PromiseReply,
    PromiseRequest,
    decode,
    encode,
)
from vtlha.protocol.lease import (
    AskPromise,
    Effect,
    KvResult,
    LeaseHolder,
    Note,
    Notice,
    Probe,
    PromiseAnswer,
    Renew,
)
from vtlha.protocol.watch import WatchMonitor

if TYPE_CHECKING:
    from vtlha_heartbeat.main import HeartbeatService

TICK = 0.01  # seconds between lease-holder ticks (gates open within this)


def watch_bounds(interval: float) -> tuple[float, float]:
    """(stall_after, read_every): a watch that has not shown our own renewal for five
    renewal intervals (at least 0.5 s) is restarted; the records are read directly as
    often."""
    bound = max(5 * interval, 0.5)
    return bound, bound


class LeaseRunner:
    def __init__(self, svc: HeartbeatService) -> None:
        self.svc = svc
        t = svc.config.timings
        self.t = t
        companion = svc.config.companion(svc.node).name
        self.lh = LeaseHolder(node=svc.node, companion=companion, lease_ttl=t.lease_ttl,
                              margin=t.margin, interval=t.heartbeat_interval,
                              started_at=time.monotonic())
        self.op_timeout = min(t.heartbeat_interval, t.lease_ttl / 3)
        self.kv: KeyValue | None = None
        self.watcher: KeyValue.KeyWatcher | None = None
        stall_after, read_every = watch_bounds(t.heartbeat_interval)
        self.wm = WatchMonitor(stall_after=stall_after, read_every=read_every)
        self._reading = False
        reg = svc.registry
        self.renewals = Counter("vtlha_lease_renewals_total", "Lease renewals, by result",
                                ["result"], registry=reg)
        self.promises = Counter("vtlha_promises_total", "Failsafe promises, asked/answered, "
                                "by result", ["direction", "result"], registry=reg)
        self.watch_restarts = Counter("vtlha_lease_watch_restarts_total", "KV watches "
                                      "restarted because they stalled", registry=reg)
        self.valid_for = Gauge("vtlha_lease_valid_seconds", "Seconds of lease left, by group",
                               ["group"], registry=reg)

    # ---- start/stop ----------------------------------------------------------
    async def start(self) -> None:
        svc = self.svc
        await bus.wait_for_kv(svc.js, svc.subjects, "lease holder")
        fast = svc.nc.jetstream(timeout=self.op_timeout)
        self.kv = await bus.retry_js("kv", lambda: fast.key_value(svc.subjects.kv_bucket),
                                     not_found_too=True)
        self.watcher = await bus.retry_js("kv watch", lambda: self._kv().watch("group.>"))
        svc.spawn(self._watch_forever(self.watcher), "lease-watch")
        await svc.nc.subscribe(svc.subjects.promise(svc.node),
                               cb=svc.subscribe_handler("promise", self._on_promise_request))
        svc.every(TICK, self._tick, "lease")

    async def stop(self) -> None:
        if self.watcher is not None:
            with contextlib.suppress(Exception):
                await self.watcher.stop()  # type: ignore[no-untyped-call]

    def _kv(self) -> KeyValue:
        assert self.kv is not None
        return self.kv

    # ---- inputs --------------------------------------------------------------
    async def _watch_forever(self, watcher: KeyValue.KeyWatcher) -> None:
        """Deliver the watch's entries; when it ends (stopped because it stalled) start
        a new one."""
        while True:
            async for entry in watcher:
                if entry is not None and entry.revision is not None:
                    await self._entry(entry.key, entry.value, entry.revision, watched=True)
            if self.svc.stopping:
                return
            watcher = await self._new_watch()

    async def _new_watch(self) -> KeyValue.KeyWatcher:
        attempt = 0
        while True:
            try:
                w = await self._kv().watch("group.>")
            except Exception as exc:
                attempt += 1
                self.svc.log.info("kv watch not restarted yet", extra={
                    "attempt": attempt, "error": repr(exc)})
                await asyncio.sleep(min(1.0, 0.05 * 2 ** min(attempt, 5)))
                continue
            self.watcher = w
            return w

    async def _entry(self, key: str, value: bytes | None, revision: int,
                     watched: bool = False) -> None:
        group = key.removeprefix("group.")
        if group not in self.svc.my_groups:
            return
        if watched:  # only the watch's own deliveries say it is alive
            self.wm.on_delivery(group, revision)
        rec: GroupRecord | None = None
        if value:
            try:
                rec = decode(GroupRecord, value)
            except InvalidMessage as exc:
                self.svc.invalid_messages.labels("group-record").inc()
                self.svc.log.warning("invalid group record", extra={"error": str(exc)})
                return
        await self._run(self.lh.on_record(group, rec, revision, time.monotonic()))

    async def _check_watch(self, now: float) -> None:
        """Restart a stalled watch; read every record directly when that is due."""
        why = self.wm.stalled(now)
        if why is not None and self.watcher is not None:
            self.wm.on_restart()
            self.watch_restarts.inc()
            self.svc.log.warning("kv watch stalled: restarting it", extra={"reason": why})
            self.svc.emit_soon("lease.watch_restarted", f"{self.svc.node}'s lease holder "
                               f"restarted its KV watch: {why}")
            with contextlib.suppress(Exception):
                await self.watcher.stop()  # type: ignore[no-untyped-call]
        if self.wm.read_due(now) and not self._reading:
            self.wm.on_read(now)
            self._reading = True
            self.svc.spawn(self._read_all(), "lease-read", critical=False)

    async def _read_all(self) -> None:
        """The backstop: every group's record read directly (a follower may answer
        behind the leader: the monotonic filter ignores what is older)."""
        try:
            for group in sorted(self.svc.my_groups):
                try:
                    entry = await self._kv().get(self.svc.subjects.group_key(group))
                except Exception:
                    continue  # absent, or the KV unreachable: the next read tries again
                if entry.revision is not None and entry.value:
                    await self._entry(entry.key, entry.value, entry.revision)
        finally:
            self._reading = False

    def on_new_bucket(self) -> None:
        """The KV bucket was recreated (the heartbeat's identity check saw it)."""
        self.svc.spawn(self._new_bucket(), "lease-new-bucket", critical=False)

    async def _new_bucket(self) -> None:
        await self._run(self.lh.on_new_bucket())
        self.wm.seen.clear()
        self.wm.on_restart()
        if self.watcher is not None:
            with contextlib.suppress(Exception):
                await self.watcher.stop()  # type: ignore[no-untyped-call]

    def on_acquire(self, group: str, epoch: int, wait: float | None) -> None:
        """The arbiter gave this node ``group`` at ``epoch``. The KV watch may lag (its
        consumer can sit on a server that was just cut off), so when the claim is not
        known yet, read the key directly first."""
        self.svc.spawn(self._acquire(group, epoch, wait), f"acquire-{group}", critical=False)

    async def _acquire(self, group: str, epoch: int, wait: float | None) -> None:
        known = self.lh.groups.get(group)
        if known is None or known.epoch < epoch:
            try:
                entry = await self._kv().get(self.svc.subjects.group_key(group))
            except Exception as exc:
                self.svc.log.info("could not read a claimed group", extra={"group": group,
                                                                         "error": repr(exc)})
                return
            if entry.value and entry.revision is not None:
                rec = decode(GroupRecord, entry.value)
                await self._run(self.lh.on_record(group, rec, entry.revision,
                                                  time.monotonic()))
        if wait is not None:
            await self._run(self.lh.on_acquire_command(group, epoch, wait, time.monotonic()))

    async def _tick(self) -> None:
        now = time.monotonic()
        await self._check_watch(now)
        await self._run(self.lh.tick(now))
        for g in self.lh.groups.values():
            self.valid_for.labels(g.group).set(max(0.0, g.valid_until - now))

    async def _on_promise_request(self, msg: Msg) -> None:
        req = decode(PromiseRequest, msg.data)
        if req.cluster != self.svc.config.cluster:
            raise InvalidMessage(f"PromiseRequest: cluster {req.cluster!r} is not ours")
        ans = self.lh.on_promise_request(req.node, list(req.groups), req.duration,
                                         time.monotonic(), partial=req.partial)
        self.promises.labels("given", "granted" if ans.granted else "refused").inc()
        reply = PromiseReply(cluster=self.svc.config.cluster, node=self.svc.node,
                             granted=ans.granted, duration=ans.duration, reason=ans.reason,
                             groups=None if ans.groups is None else list(ans.groups))
        if msg.reply:
            await msg.respond(encode(reply))
        self.svc.log.info("promise " + ("granted" if ans.granted else "refused"),
                          extra={"to": req.node, "groups": req.groups, "reason": ans.reason})

    # ---- effects -------------------------------------------------------------
    async def _run(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Notice):
                await self._notice(e)
            elif isinstance(e, Renew):
                self.svc.spawn(self._renew(e), f"renew-{e.group}", critical=False)
            elif isinstance(e, AskPromise):
                self.svc.spawn(self._ask(e), "ask-promise", critical=False)
            elif isinstance(e, Probe):
                self.svc.spawn(self._probe(), "kv-probe", critical=False)
            elif isinstance(e, Note):
                self.svc.log.info(e.message, extra={"group": e.group, "note": e.kind})
                self.svc.emit_soon(e.kind, e.message, group=e.group)

    async def _notice(self, n: Notice) -> None:
        msg = LeaseNotice(cluster=self.svc.config.cluster, node=self.svc.node, group=n.group,
                          epoch=n.epoch, valid_until=n.valid_until, revoked=n.revoked,
                          reason=n.reason, since=n.since)
        await self.svc.nc.publish(self.svc.subjects.lease(self.svc.node), encode(msg))

    async def _renew(self, r: Renew) -> None:
        key = self.svc.subjects.group_key(r.group)
        try:
            rev = await self._kv().update(key, encode(r.record), last=r.last)
        except KeyWrongLastSequenceError:
            self.renewals.labels("conflict").inc()
            await self._after_conflict(r, key)
            return
        except Exception as exc:  # unavailable, or anything unexpected: extends nothing
            known = isinstance(exc, bus.JS_UNAVAILABLE)
            self.renewals.labels("unavailable" if known else "error").inc()
            self.svc.log.log(20 if known else 30, "renewal failed: KV unavailable"
                             if known else "renewal failed", extra={"group": r.group,
                                                                    "error": repr(exc)})
            await self._run(self.lh.on_renew_result(r.group, r.sent_at, KvResult.UNAVAILABLE,
                                                    now=time.monotonic()))
            return
        self.renewals.labels("ok").inc()
        self.wm.on_own_write(r.group, rev, time.monotonic())
        await self._run(self.lh.on_renew_result(r.group, r.sent_at, KvResult.OK, revision=rev,
                                                now=time.monotonic()))

    async def _after_conflict(self, r: Renew, key: str) -> None:
        try:
            entry = await self._kv().get(key)
        except NotFoundError:
            current, cur_rev = None, None
        except Exception:
            # The KV answered the conflict but not the read: treat it as unavailable
            # (extends nothing); the next renewal will read again.
            await self._run(self.lh.on_renew_result(r.group, r.sent_at, KvResult.UNAVAILABLE,
                                                    now=time.monotonic()))
            return
        else:
            try:
                current = decode(GroupRecord, entry.value or b"")
            except InvalidMessage:
                current = None
            cur_rev = entry.revision
        await self._run(self.lh.on_renew_result(r.group, r.sent_at, KvResult.CONFLICT,
                                                current=current, current_revision=cur_rev,
                                                now=time.monotonic()))

    async def _ask(self, a: AskPromise) -> None:
        req = PromiseRequest(cluster=self.svc.config.cluster, node=self.svc.node,
                             groups=list(a.groups), duration=a.duration, partial=True)
        answer: PromiseAnswer | None = None
        try:
            raw = await self.svc.nc.request(self.svc.subjects.promise(a.companion), encode(req),
                                            timeout=self.op_timeout)
            rep = decode(PromiseReply, raw.data)
            answer = PromiseAnswer(rep.granted, rep.duration, rep.reason,
                                   None if rep.groups is None else tuple(rep.groups))
        except (nats.errors.Error, TimeoutError, InvalidMessage) as exc:
            self.svc.log.info("no promise answer", extra={"from": a.companion,
                                                          "error": repr(exc)})
        result = "none" if answer is None else ("granted" if answer.granted else "refused")
        self.promises.labels("asked", result).inc()
        self.svc.log.info(f"promise asked: {result}",
                          extra={"from": a.companion, "groups": list(a.groups),
                                 "reason": answer.reason if answer else ""})
        await self._run(self.lh.on_promise_reply(a.sent_at, answer, a.groups))

    async def _probe(self) -> None:
        try:
            await self._kv().put(self.svc.subjects.probe_key(self.svc.node), b"1")
            result = KvResult.OK
        except Exception:
            result = KvResult.UNAVAILABLE
        self.lh.on_probe_result(result)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "kv_reachable": self.lh.kv_reachable,
            "groups": {g.group: {"phase": g.phase.value, "epoch": g.epoch,
                                 "revision": g.revision,
                                 "valid_for_s": round(max(0.0, g.valid_until - now), 3)}
                       for g in self.lh.groups.values()},
            "promises_given": {g: round(u - now, 3) for g, u in self.lh.promises_given.items()},
            "embargo_left_s": round(max(0.0, self.lh.started_at + self.lh.lease_ttl - now), 3),
            "watch_restarts": self.wm.restarts,
        }
