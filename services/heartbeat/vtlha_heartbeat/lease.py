"""The lease holder's I/O: drives ``vtlha.protocol.lease.LeaseHolder`` with the KV, the
companion's lease holder and this node's executors.

- renewals: compare-and-set on ``group.<g>`` with a short timeout (one renewal interval);
  a conflict is followed by a read of the key, so the state machine can tell a taken
  group from our own timed-out write that committed;
- lease notices: ``ha.<c>.lease.<node>`` (local to the host), one per successful renewal
  or granted promise, and a revoked one when a group is taken;
- promises: requests answered on ``ha.<c>.promise.<node>``; asked of the companion when a
  renewal finds the KV unavailable, through this node's connection **and**, at once, over
  a connection of its own straight to the companion's NATS server (``companion_url``):
  after a long cut heals, the route between the two nodes' servers can stay stalled in
  TCP retransmission backoff for seconds while the rejoining server's higher raft term
  already forces a KV election (docs/safety.md, "A node rejoining"); the companion's
  lease holder sits on its own server, so the direct connection reaches it without any
  route. The first grant counts (each is a promise the companion's lease holder made);
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
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge

from vtlha import bus
from vtlha.errors import InvalidMessage
from vtlha.messages import (
    GroupRecord,
    LeaseNotice,
    LeaseState,
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
    Phase,
    Probe,
    PromiseAnswer,
    Renew,
)
from vtlha.protocol.watch import WatchMonitor

if TYPE_CHECKING:
    from vtlha_heartbeat.main import HeartbeatService

TICK = 0.01  # seconds between lease-holder ticks (gates open within this)
QUIET_POLL = 0.005  # seconds between looks for a quiet moment to move the connection
#: the direct connection to the companion's server: a dead one is noticed after
#: ``DIRECT_PING`` x (``DIRECT_PINGS_OUT`` + 1) s at most, then made again every
#: ``DIRECT_RETRY`` s, each try bounded by 4 x ``DIRECT_RETRY`` (a try begun while the
#: link was down waits on ARP: short tries make the path come back ~0.2 s after a heal)
DIRECT_PING = 1
DIRECT_PINGS_OUT = 2
DIRECT_RETRY = 0.05


class TryGivenUp(TimeoutError):
    """A connect try given up (``bounded_try``)."""


async def bounded_try(connect: Awaitable[None], kick: asyncio.Event, first: float,
                      limit: float) -> None:
    """Await ``connect`` for at most ``limit`` s; once it has run ``first`` s, give it up
    as soon as ``kick`` is set (a promise is needed now, and a try begun while the link
    was cut waits on a lost SYN). Raises TryGivenUp when it was given up or ran out."""
    task = asyncio.ensure_future(connect)
    try:
        done, _ = await asyncio.wait({task}, timeout=first)
        if not done:
            kick.clear()
            waiter: asyncio.Future[Any] = asyncio.ensure_future(kick.wait())
            either: set[asyncio.Future[Any]] = {task, waiter}
            try:
                done_any, _ = await asyncio.wait(either, timeout=limit - first,
                                                 return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if task not in done_any:
                raise TryGivenUp("connect try given up")
        task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def companion_url(servers: list[str], urls: list[str], node: str,
                  companion: str) -> str | None:
    """The companion's own NATS server among a service's ``urls``: they list this node's
    server first, then the other configured ``servers`` in the configured order (the
    cluster file's default, and the lab's). None when that cannot be told (the lists do
    not match, or the companion runs no server)."""
    if companion not in servers or len(urls) != len(servers):
        return None
    order = ([node] if node in servers else []) + [s for s in servers if s != node]
    return urls[order.index(companion)]


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
        #: a timer for the next acquiring group's first renewal or gate (``_arm_gate``)
        self._gate_timer: asyncio.TimerHandle | None = None
        self._gate_due: float | None = None
        self.direct_url = companion_url(list(svc.config.nats.servers), list(svc.nats_urls),
                                        svc.node, companion)
        self.direct: NATS | None = None
        #: set when a promise is asked while the direct path is down: a connect try that
        #: has run ``DIRECT_RETRY`` s already is given up and made afresh at once (a try
        #: begun during a cut waits on a lost SYN; the promise is needed now)
        self.direct_kick = asyncio.Event()
        reg = svc.registry
        self.renewals = Counter("vtlha_lease_renewals_total", "Lease renewals, by result",
                                ["result"], registry=reg)
        self.promises = Counter("vtlha_promises_total", "Failsafe promises, asked/answered, "
                                "by result", ["direction", "result"], registry=reg)
        self.watch_restarts = Counter("vtlha_lease_watch_restarts_total", "KV watches "
                                      "restarted because they stalled", registry=reg)
        self.early_acquires = Counter(
            "vtlha_lease_early_acquires_total", "Acquire commands that came before this "
            "node saw their claim (kept, and applied when it arrives)", registry=reg)
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
        svc.spawn(self._watch_forever(self.watcher, self.lh.generation), "lease-watch")
        await svc.nc.subscribe(svc.subjects.promise(svc.node),
                               cb=svc.subscribe_handler("promise", self._on_promise_request))
        svc.every(TICK, self._tick, "lease")
        if self.direct_url is not None:
            svc.spawn(self._connect_direct(self.direct_url), "promise-direct", critical=False)

    async def _connect_direct(self, url: str) -> None:
        """Keep a connection to the companion's server, and to that server only: nats-py
        would reconnect to any server it learnt of (INFO ``connect_urls``) and buffer
        requests meanwhile, so it does not reconnect at all; a connection that closes
        (pings unanswered: dead within ``DIRECT_PING`` x (``DIRECT_PINGS_OUT`` + 1) s) is
        made again here every ``DIRECT_RETRY`` s."""
        async def _quiet(exc: Exception) -> None:
            pass

        lost = False
        while not self.svc.stopping:
            closed = asyncio.Event()

            async def _closed(ev: asyncio.Event = closed) -> None:
                ev.set()

            nc = NATS()
            try:
                # nats-py retries even a first connect without end: bound it here
                await self._direct_try(nc.connect(
                    servers=[url], name=f"heartbeat@{self.svc.node}-promise",
                    connect_timeout=DIRECT_RETRY * 2,  # type: ignore[arg-type]
                    allow_reconnect=False,
                    ping_interval=DIRECT_PING, max_outstanding_pings=DIRECT_PINGS_OUT,
                    error_cb=_quiet, closed_cb=_closed))
            except (OSError, nats.errors.Error, TimeoutError):
                with contextlib.suppress(Exception):
                    await nc.close()
                if not lost:
                    lost = True
                    self.svc.log.info("no promise path to the companion's server",
                                      extra={"server": url})
                self.direct_kick.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.direct_kick.wait(), DIRECT_RETRY)
                continue
            self.direct = nc
            if lost:
                lost = False
                self.svc.log.info("promise path to the companion's server back",
                                  extra={"server": url})
            await closed.wait()

    async def _direct_try(self, connect: Awaitable[None]) -> None:
        await bounded_try(connect, self.direct_kick, DIRECT_RETRY, DIRECT_RETRY * 4)

    async def stop(self) -> None:
        if self._gate_timer is not None:
            self._gate_timer.cancel()
        if self.watcher is not None:
            with contextlib.suppress(Exception):
                await self.watcher.stop()  # type: ignore[no-untyped-call]
        if self.direct is not None:
            with contextlib.suppress(Exception):
                await self.direct.close()

    def _kv(self) -> KeyValue:
        assert self.kv is not None
        return self.kv

    # ---- inputs --------------------------------------------------------------
    async def _watch_forever(self, watcher: KeyValue.KeyWatcher, gen: int) -> None:
        """Deliver the watch's entries; when it ends (stopped because it stalled, or the
        bucket was recreated) start a new one. ``gen``: the bucket generation the watch
        was made in (an entry of an older one is ignored)."""
        while True:
            async for entry in watcher:
                if entry is not None and entry.revision is not None:
                    await self._entry(entry.key, entry.value, entry.revision, gen,
                                      watched=True)
            if self.svc.stopping:
                return
            gen = self.lh.generation
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

    async def _entry(self, key: str, value: bytes | None, revision: int, gen: int,
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
        await self._run(self.lh.on_record(group, rec, revision, time.monotonic(), gen))

    async def _check_watch(self, now: float) -> None:
        """Restart a stalled watch; read every record directly when that is due."""
        why = self.wm.stalled(now)
        if why is not None and self.watcher is not None:
            self.wm.on_restart()
            self.watch_restarts.inc()
            self.svc.log.warning("kv watch stalled: restarting it", extra={"reason": why})
            self.svc.emit_soon("lease.watch_restarted", f"{self.svc.node}'s lease holder "
                               f"restarted its KV watch: {why}")
            # not awaited here: this is the renewals' tick, and an unsubscribe can wait on
            # the connection's flusher (a server that stopped reading)
            self.svc.spawn(self._stop_watch(self.watcher), "lease-watch-stop", critical=False)
        if self.wm.read_due(now) and not self._reading:
            self.wm.on_read(now)
            self._reading = True
            self.svc.spawn(self._read_all(), "lease-read", critical=False)

    async def _stop_watch(self, watcher: KeyValue.KeyWatcher) -> None:
        """Stop a watch (its ``_watch_forever`` then starts a new one), within one
        operation's timeout; a stop that does not finish in time is left to finish."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(watcher.stop()),  # type: ignore[no-untyped-call]
                                   self.op_timeout)

    async def _read_all(self) -> None:
        """The backstop: every group's record read directly (a follower may answer
        behind the leader: the monotonic filter ignores what is older)."""
        try:
            for group in sorted(self.svc.my_groups):
                gen = self.lh.generation
                try:
                    entry = await self._kv().get(self.svc.subjects.group_key(group))
                except Exception:
                    continue  # absent, or the KV unreachable: the next read tries again
                if entry.revision is not None and entry.value:
                    await self._entry(entry.key, entry.value, entry.revision, gen)
        finally:
            self._reading = False

    def on_new_bucket(self) -> None:
        """The KV bucket was recreated (the heartbeat's identity check saw it). The lease
        holder forgets the old bucket at once, in the same step as the service adopted
        the new identity: every notice after this one is of the new bucket and says so
        (``LeaseNotice.bucket``)."""
        effects = self.lh.on_new_bucket()
        self.svc.spawn(self._new_bucket(effects), "lease-new-bucket", critical=False)

    async def _new_bucket(self, effects: list[Effect]) -> None:
        await self._run(effects)
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
            gen = self.lh.generation
            try:
                entry = await self._kv().get(self.svc.subjects.group_key(group))
            except Exception as exc:
                # the command is still kept below: the watch brings the claim later
                self.svc.log.info("could not read a claimed group", extra={"group": group,
                                                                         "error": repr(exc)})
            else:
                if entry.value and entry.revision is not None:
                    rec = decode(GroupRecord, entry.value)
                    await self._run(self.lh.on_record(group, rec, entry.revision,
                                                      time.monotonic(), gen))
        if wait is not None:
            await self._run(self.lh.on_acquire_command(group, epoch, wait, time.monotonic()))
            if self.lh.early_acquires.get(group, (0, 0.0))[0] == epoch:
                self.early_acquires.inc()
                self.svc.log.info("an acquire command came before its claim: kept until the "
                                  "claim is seen", extra={"group": group, "epoch": epoch,
                                                          "wait": wait})

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
        """Carry out what the lease holder said; its notices name the bucket it was in
        when it said so (read here, before any await: the effects were computed just
        before this call)."""
        bucket = self.svc.fencing.bucket
        self._arm_gate()
        for e in effects:
            if isinstance(e, Notice):
                await self._notice(e, bucket)
            elif isinstance(e, Renew):
                self.svc.spawn(self._renew(e), f"renew-{e.group}", critical=False)
            elif isinstance(e, AskPromise):
                self.svc.spawn(self._ask(e), "ask-promise", critical=False)
            elif isinstance(e, Probe):
                self.svc.spawn(self._probe(), "kv-probe", critical=False)
            elif isinstance(e, Note):
                self.svc.log.info(e.message, extra={"group": e.group, "note": e.kind})
                self.svc.emit_soon(e.kind, e.message, group=e.group)

    def _arm_gate(self) -> None:
        """Tick when an acquiring group's first renewal or gate is due, not at the next
        regular tick (up to TICK later): a takeover's last step waits for nothing else.
        Called whenever the lease holder was given an input (the due time moves then)."""
        due = self.lh.next_due(time.monotonic())
        if due is None or (self._gate_due is not None and self._gate_due <= due):
            return
        if self._gate_timer is not None:
            self._gate_timer.cancel()
        self._gate_due = due
        self._gate_timer = asyncio.get_running_loop().call_later(
            max(0.0, due - time.monotonic()), self._gate_fire)

    def _gate_fire(self) -> None:
        self._gate_timer = self._gate_due = None
        self.svc.spawn(self._gate_tick(), "lease-gate", critical=False)

    async def _gate_tick(self) -> None:
        await self._run(self.lh.tick(time.monotonic()))

    async def _notice(self, n: Notice, bucket: str) -> None:
        msg = LeaseNotice(cluster=self.svc.config.cluster, node=self.svc.node, group=n.group,
                          epoch=n.epoch, valid_until=n.valid_until, revoked=n.revoked,
                          reason=n.reason, since=n.since, bucket=bucket)
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
        req = encode(PromiseRequest(cluster=self.svc.config.cluster, node=self.svc.node,
                                    groups=list(a.groups), duration=a.duration, partial=True))
        subject = self.svc.subjects.promise(a.companion)
        conns = [self.svc.nc]
        if self.direct is not None and self.direct.is_connected:
            conns.append(self.direct)  # straight to the companion's server: no route
        elif self.direct_url is not None:
            self.direct_kick.set()  # needed now: make it again at once
        answer: PromiseAnswer | None = None
        errors: list[str] = []
        for done in asyncio.as_completed([self._ask_on(nc, subject, req) for nc in conns]):
            got, error = await done
            if error:
                errors.append(error)
            if got is not None and (answer is None or not answer.granted):
                answer = got
            if answer is not None and answer.granted:
                break  # the first grant counts; the other request runs out on its own
        if answer is None:
            self.svc.log.info("no promise answer", extra={"from": a.companion,
                                                          "error": "; ".join(errors)})
        result = "none" if answer is None else ("granted" if answer.granted else "refused")
        self.promises.labels("asked", result).inc()
        self.svc.log.info(f"promise asked: {result}",
                          extra={"from": a.companion, "groups": list(a.groups),
                                 "reason": answer.reason if answer else "",
                                 "paths": len(conns)})
        await self._run(self.lh.on_promise_reply(a.sent_at, answer, a.groups))

    async def _ask_on(self, nc: NATS, subject: str,
                      req: bytes) -> tuple[PromiseAnswer | None, str]:
        try:
            raw = await nc.request(subject, req, timeout=self.op_timeout)
            rep = decode(PromiseReply, raw.data)
        except (nats.errors.Error, TimeoutError, InvalidMessage) as exc:
            return None, repr(exc)
        return PromiseAnswer(rep.granted, rep.duration, rep.reason,
                             None if rep.groups is None else tuple(rep.groups)), ""

    async def _probe(self) -> None:
        try:
            await self._kv().put(self.svc.subjects.probe_key(self.svc.node), b"1")
            result = KvResult.OK
        except Exception:
            result = KvResult.UNAVAILABLE
        self.lh.on_probe_result(result)

    def reconnected(self) -> None:
        """The service connection was made again: renewals sent on the old one will get
        no reply (each would wait out its timeout, and the next renewal an interval more:
        chaos iteration 42, a node's own nats-server killed, lapsed its leases). Renew
        them at the next tick."""
        abandoned = self.lh.abandon_in_flight()
        if abandoned:
            self.svc.log.info("renewals in flight abandoned after a reconnect; renewing "
                              "at once", extra={"groups": abandoned})

    async def ready_to_move(self) -> bool:
        """Wait (up to two renewal intervals, at least 0.2 s) for a moment with nothing
        in flight right after a renewal (``LeaseHolder.quiet``): the NATS connection may
        move home then without losing a renewal's reply (chaos iteration 131)."""
        deadline = time.monotonic() + max(2 * self.t.heartbeat_interval, 0.2)
        while not self.lh.quiet(time.monotonic()):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(QUIET_POLL)
        return True

    def states(self, now: float) -> list[LeaseState]:
        """Each group's lease for the heartbeat (operators' view, durations only). The
        age counts from the send of the renewal that gave the validity: ``lease_ttl``
        before it runs out (a promise shorter than ``lease_ttl`` makes it look older)."""
        out = []
        for g in sorted(self.lh.groups.values(), key=lambda g: g.group):
            left = max(0.0, g.valid_until - now)
            holding = g.phase is Phase.HOLDING
            age = max(0.0, self.lh.lease_ttl - left) if holding and g.valid_until else None
            out.append(LeaseState(group=g.group, epoch=g.epoch, phase=g.phase.value,
                                  valid_for=round(left, 3),
                                  age=None if age is None else round(age, 3)))
        return out

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
            "promise_direct": {"server": self.direct_url,
                               "connected": bool(self.direct and self.direct.is_connected)},
        }
