"""The executor side of commands, shared by ip-manager and storage-monitor.

Subscribes to ``ha.<cluster>.cmd.<node>.<service>``, validates each command (schema,
cluster, group of this node's pair, fencing tokens), carries it out and replies with
an Ack. Commands are handled one at a time, in arrival order, so an acquire and a
release of one group never interleave.

Holding executors keep the hold rule (``vtlha.protocol.hold``), level-triggered: a
group is held at epoch e exactly while a lease notice for (group, e) from the node's
lease holder is valid; an acquire command only makes it converge now, a release drops
the group at once and sets its release floor (persisted with the fencing tokens). Each
group has its own enforcement loop (a slow resource agent of one group never delays
another group's lapse), and a notice triggers one at once. Subclasses say how to
start, keep and stop holding.

The fencing tokens belong to one KV bucket (``vtlha.fencing``): at start the executor
waits for the bucket (only the arbiter creates it) and learns its identity; it reads it
again every ``BUCKET_CHECK`` seconds and when a command names another bucket. A new
bucket starts its tokens, floors and notices afresh.

Every executor answers liveness requests on ``ha.<cluster>.ping.<node>.<service>`` with
a ``Pong`` (its name, pid, uptime, readiness), from the moment it takes commands until
it stops: the heartbeat's built-in checks ("executor ip-manager alive") ask it every
``check_interval``. The answer comes from its own subscription, so a long command never
delays it."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter

from vtlha import bus
from vtlha.errors import InvalidMessage, VtlhaError
from vtlha.fencing import FencingStore
from vtlha.messages import Ack, Command, GroupRecord, LeaseNotice, Pong, decode, encode
from vtlha.ownership import read_groups
from vtlha.protocol.hold import HoldGate, Why
from vtlha.service import Service

ENFORCE_INTERVAL = 0.02  # seconds between checks of the hold rule (notices also trigger one)
#: before a held group's lease counts as expired, notices already received get this many
#: turns of the event loop (at most DRAIN_MAX seconds) to be applied
DRAIN_TURNS = 20
DRAIN_MAX = 0.005
BUCKET_CHECK = 1.0  # seconds between reads of the KV bucket's identity
IDENTITY_TIMEOUT = 0.5  # seconds for one read of it


class ReleaseIncomplete(VtlhaError):
    """A release could not be finished (the ack says so, ok false): the arbiter then
    waits the old owner's lease out instead."""


class Executor(Service):
    """Subclasses implement ``acquire(group, epoch)`` and ``release(group, epoch)`` and
    return what they hold for that group (for the Ack's ``held``)."""

    async def acquire(self, group: str, epoch: int) -> list[str]:
        raise NotImplementedError

    async def release(self, group: str, epoch: int) -> list[str]:
        raise NotImplementedError

    #: the command being carried out (for hooks that need more than group and epoch)
    command: Command | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fencing = FencingStore(self.state_dir / f"fencing-{self.name}.json")
        self.commands = Counter("vtlha_commands_total", "Commands received, by action and result",
                                ["action", "result"], registry=self.registry)
        self._cmd_lock = asyncio.Lock()
        self._cmd_sub: Subscription | None = None
        self._ping_sub: Subscription | None = None
        self._taking_commands_since: float | None = None
        pair = self.config.pair_of(self.node) if self.config.has_node(self.node) else None
        self.my_groups = (
            {g for n in pair.nodes for g in (n.data_group, n.mgmt_group)} if pair else set()
        )

    async def learn_bucket(self) -> None:
        """Wait until the KV bucket exists (the arbiter creates it) and adopt its
        identity: a bucket recreated while this executor was down starts its tokens
        afresh."""
        await bus.wait_for_kv(self.js, self.subjects, self.name)
        identity = await bus.retry_js("kv identity", lambda: bus.kv_identity(
            self.nc, self.subjects, IDENTITY_TIMEOUT), not_found_too=True)
        self._adopt_bucket(identity)

    async def _read_identity(self) -> str | None:
        try:
            return await bus.kv_identity(self.nc, self.subjects, IDENTITY_TIMEOUT)
        except Exception as exc:
            self.log.info("kv identity not read", extra={"error": repr(exc)})
            return None

    async def _check_bucket(self) -> None:
        identity = await self._read_identity()
        if identity is not None and self._adopt_bucket(identity):
            await self.bucket_changed()

    def _adopt_bucket(self, identity: str) -> bool:
        """Adopt the KV's current identity; True when it is a new bucket (tokens reset)."""
        old = self.fencing.bucket
        if not self.fencing.adopt(identity):
            return False
        self.log.warning("the KV bucket was recreated: fencing tokens start afresh",
                         extra={"old": old, "new": identity})
        self.emit_soon("fencing.new_bucket", f"{self.name} on {self.node}: the KV bucket "
                       f"is new ({identity}, was {old}); terms and epochs start afresh",
                       data={"old": old, "new": identity})
        return True

    async def bucket_changed(self) -> None:
        """The KV bucket is another one than before (hook: forget per-bucket state)."""

    async def start_executor(self) -> None:
        self.every(BUCKET_CHECK, self._check_bucket, "bucket-check")
        self._cmd_sub = await self.nc.subscribe(
            self.subjects.cmd(self.node, self.name),
            cb=self.subscribe_handler("command", self._on_command),
        )
        self._taking_commands_since = time.monotonic()
        self._ping_sub = await self.nc.subscribe(
            self.subjects.ping(self.node, self.name),
            cb=self.subscribe_handler("ping", self._on_ping),
        )

    async def stop(self) -> None:
        for sub in (self._ping_sub, self._cmd_sub):  # stop answering "alive" first
            if sub is not None:
                await sub.unsubscribe()

    async def _on_ping(self, msg: Msg) -> None:
        """Say that this executor runs. The request's body is ignored: nothing in it
        can make this do anything but answer."""
        if not msg.reply:
            return
        since = self._taking_commands_since or time.monotonic()
        pong = Pong(cluster=self.config.cluster, node=self.node, service=self.name,
                    pid=os.getpid(), uptime=round(time.monotonic() - since, 3),
                    ready=self.is_ready())
        await msg.respond(encode(pong))

    async def _on_command(self, msg: Msg) -> None:
        try:
            self.check_envelope(msg.data)  # another cluster's, or from no host: refused
            cmd = decode(Command, msg.data)
            if cmd.action != "term" and cmd.group not in self.my_groups:
                raise InvalidMessage(f"Command: group {cmd.group!r} is not of this node's pair")
        except InvalidMessage as exc:
            self.commands.labels("invalid", "refused").inc()
            if msg.reply:
                await msg.respond(encode(self._ack(False, str(exc), 0, 0, "")))
            raise
        async with self._cmd_lock:
            ack = await self._handle(cmd)
        if msg.reply:
            await msg.respond(encode(ack))

    async def _handle(self, cmd: Command) -> Ack:
        group = None if cmd.action == "term" else cmd.group
        refusal: str | None = None
        if self.fencing.is_other_bucket(cmd.bucket):
            current = await self._read_identity()
            if current == cmd.bucket:
                if self._adopt_bucket(current):
                    await self.bucket_changed()
            else:
                refusal = self.fencing.bucket_refusal(cmd.bucket, current)
        refusal = refusal or self.fencing.refusal(cmd.term, group, cmd.epoch)
        if refusal is not None:
            self.commands.labels(cmd.action, "refused").inc()
            self.log.warning("command refused", extra={"action": cmd.action, "group": cmd.group,
                                                       "term": cmd.term, "epoch": cmd.epoch,
                                                       "reason": refusal})
            self.emit_soon("command.refused", f"{self.name} on {self.node} refused "
                            f"{cmd.action} {cmd.group}: {refusal}", group=cmd.group,
                            term=cmd.term, epoch=cmd.epoch, data={"sender": cmd.node})
            return self._ack(False, refusal, cmd.term, cmd.epoch, cmd.group)
        self.fencing.record(cmd.term, group, cmd.epoch, release=cmd.action == "release")
        self.command = cmd
        if cmd.action == "cleanup":
            detail, restarted = await self.cleanup(cmd.group, cmd.epoch)
            self.commands.labels(cmd.action, "ok").inc()
            self.log.info("cleanup done", extra={"group": cmd.group, "term": cmd.term,
                                                 "epoch": cmd.epoch, "detail": detail})
            return self._ack(True, detail, cmd.term, cmd.epoch, cmd.group).model_copy(
                update={"restarted": restarted})
        try:
            if cmd.action == "term":
                held: list[str] = []
            elif cmd.action == "acquire":
                held = await self.acquire(cmd.group, cmd.epoch)
            else:
                held = await self.release(cmd.group, cmd.epoch)
        except ReleaseIncomplete as exc:
            self.commands.labels(cmd.action, "incomplete").inc()
            self.log.warning("command not finished", extra={
                "action": cmd.action, "group": cmd.group, "epoch": cmd.epoch, "reason": str(exc)})
            return self._ack(False, str(exc), cmd.term, cmd.epoch, cmd.group)
        self.commands.labels(cmd.action, "ok").inc()
        self.log.info("command done", extra={"action": cmd.action, "group": cmd.group,
                                             "term": cmd.term, "epoch": cmd.epoch, "held": held})
        return self._ack(True, f"{cmd.action} done", cmd.term, cmd.epoch, cmd.group, held)

    async def cleanup(self, group: str, epoch: int) -> tuple[str, bool]:
        """An operator's ``vtlha cleanup`` (a command, fenced as the others): forget the
        group's failures here and restart it if it failed; the reply's sentence and
        whether it restarted. An executor without resources has nothing to forget."""
        return f"{self.name} on {self.node} keeps no failures of {group}", False

    def _ack(self, ok: bool, reason: str, term: int, epoch: int, group: str,
             held: list[str] | None = None) -> Ack:
        return Ack(cluster=self.config.cluster, node=self.node, ok=ok, reason=reason, term=term,
                   epoch=epoch, group=group, service=self.name, held=held or [])


class HoldingExecutor(Executor):
    """Subclasses implement the holding hooks: ``holds(group)``, ``start_holding(group,
    epoch, until)``, ``keep_holding(group, until)``, ``stop_holding(group)`` and
    ``held(group)`` (addresses/devices held, for the Ack). ``until`` is when holding must
    stop (this host's monotonic clock) unless a newer notice extends it."""

    def holds(self, group: str) -> bool:
        raise NotImplementedError

    def held(self, group: str) -> list[str]:
        raise NotImplementedError

    async def start_holding(self, group: str, epoch: int, until: float) -> None:
        raise NotImplementedError

    async def keep_holding(self, group: str, until: float) -> None:
        raise NotImplementedError

    async def stop_holding(self, group: str) -> None:
        """Stop holding; raise ReleaseIncomplete when that cannot be finished."""
        raise NotImplementedError

    #: starting to hold may take long (resource agents): only the group's own loop
    #: starts it, never a notice or command handler
    slow_start = False

    #: the event kind of an acquire of what is held already, or a release of nothing
    noop_kind = "executor.noop"

    def noop(self, group: str, epoch: int, action: str, detail: str) -> None:
        self.emit_soon(self.noop_kind, f"{self.node}: {detail}", group=group,
                       epoch=epoch, data={"action": action, "service": self.name})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = HoldGate(margin=self.config.timings.margin,
                             floors=dict(self.fencing.floors))
        self._group_locks: dict[str, asyncio.Lock] = {g: asyncio.Lock() for g in self.my_groups}
        self.notices_ignored = Counter(
            "vtlha_lease_notices_other_bucket_total", "Lease notices of another KV bucket "
            "than this executor's, ignored", registry=self.registry)
        self._checking_bucket = False
        self._lease_sub: Subscription | None = None
        self._kicked: dict[str, asyncio.Task[None]] = {}  # group -> its notice's enforcement
        self._kick_again: set[str] = set()
        self.notices_drained = Counter(
            "vtlha_lease_expiry_drains_total", "Held leases found expired by a check, by "
            "what applying the notices already received showed (held: a newer notice was "
            "waiting; expired: none)", ["result"], registry=self.registry)

    def executor_groups(self) -> set[str]:
        """The groups this executor holds anything for (all of the pair's by default)."""
        return self.my_groups

    async def recall_owned(self, groups: set[str]) -> dict[str, GroupRecord]:
        """At start: wait for the KV bucket (never create it), learn its identity, and
        read each group's record (what an earlier run left behind is cleaned up against
        it). Nothing is held before a valid lease notice arrives."""
        await self.learn_bucket()
        self.gate.reset(dict(self.fencing.floors))
        return {g: rec for g, (rec, _) in
                (await read_groups(self.js, self.subjects, sorted(groups))).items()}

    async def bucket_changed(self) -> None:
        """A new KV bucket: its epochs start again, so notices and floors of the old one
        mean nothing; converge on what the lease holder says from now on."""
        self.gate.reset(dict(self.fencing.floors))
        await self.enforce_all()

    async def start_executor(self) -> None:
        """Lease notices, commands, and one enforcement loop per group."""
        self._lease_sub = await self.nc.subscribe(
            self.subjects.lease(self.node), cb=self.subscribe_handler("lease", self._on_notice))
        await super().start_executor()
        for g in sorted(self.executor_groups()):
            self.every(ENFORCE_INTERVAL, functools.partial(self.enforce, g), f"enforce-{g}")

    # ---- holding: a valid lease notice (level-triggered) --------------------------
    async def _on_notice(self, msg: Msg) -> None:
        n = decode(LeaseNotice, msg.data)
        if n.node != self.node or n.group not in self.my_groups:
            raise InvalidMessage(f"LeaseNotice: {n.node}/{n.group} is not for this executor")
        if n.bucket and self.fencing.bucket and n.bucket != self.fencing.bucket:
            # Another bucket's epochs (the lease holder or this executor has not noticed
            # the recreated bucket yet): an old one's notice after this executor's reset
            # would otherwise stand above every epoch of the new bucket (issue 14).
            self.notices_ignored.inc()
            if not self._checking_bucket:  # this executor may be the one behind
                self._checking_bucket = True
                self.spawn(self._check_bucket_now(), "bucket-check-now", critical=False)
            return
        self.gate.on_notice(n.group, n.epoch, n.valid_until, n.revoked, n.since)
        # At once, unless starting to hold may take long (resource agents): then the
        # group's own loop acts on it. Never awaited here: nats-py runs a subscription's
        # callbacks one at a time, and an enforcement waiting on a group's lock or the
        # shared netlink lock (another group's address added or removed, 30-170 ms under
        # load) queued every later notice of every group behind it: leases lapsed with
        # their renewals waiting in line, and each release made more such work (chaos
        # iteration 77: 7 s of flapping after one real lapse).
        if n.group in self.executor_groups() and not self.slow_start:
            self._kick(n.group)

    def _kick(self, group: str) -> None:
        """Enforce ``group`` soon, in a task of its own: one at a time per group; a kick
        while one runs makes it run once more (with the newest notice) when it ends."""
        running = self._kicked.get(group)
        if running is not None and not running.done():
            self._kick_again.add(group)
            return
        self._kicked[group] = self.spawn(self._enforce_kicked(group), f"notice-{group}",
                                         critical=False)

    async def _enforce_kicked(self, group: str) -> None:
        while True:
            self._kick_again.discard(group)
            await self.enforce(group)
            if group not in self._kick_again:
                return

    async def _check_bucket_now(self) -> None:
        try:
            await self._check_bucket()
        finally:
            self._checking_bucket = False

    async def enforce_all(self) -> None:
        await asyncio.gather(*(self.enforce(g) for g in self.executor_groups()))

    async def _drain_notices(self, group: str) -> None:
        """A held group's lease looks expired: first let the lease notices this process
        has already received be applied. After a stall (the event loop blocked, a tick
        overran) the newest notices can sit in the socket or the subscription's queue
        while a check runs ahead of them, and the group would be released on a lease
        that a waiting notice extends. A few turns of the loop (the socket read, the
        parse, the callback), stopped once nothing is queued or after ``DRAIN_MAX``.
        Safe: a notice's validity is the lease holder's CLOCK_MONOTONIC when it was
        sent, so applying it late never extends it; only what was received counts."""
        t0 = time.monotonic()
        for turn in range(DRAIN_TURNS):
            await asyncio.sleep(0)
            sub = self._lease_sub
            if (turn >= 2 and (sub is None or sub.pending_msgs == 0)) \
                    or time.monotonic() - t0 > DRAIN_MAX:
                break
        held = self.gate.verdict(group, time.monotonic()) is Why.HOLD
        self.notices_drained.labels("held" if held else "expired").inc()

    async def enforce(self, group: str) -> None:
        """Make what is held match the hold rule for ``group``."""
        if self.holds(group) and self.gate.verdict(group, time.monotonic()) is Why.EXPIRED:
            await self._drain_notices(group)
        async with self._group_locks[group]:
            why = self.gate.verdict(group, time.monotonic())
            if why is Why.HOLD:
                until = self.gate.valid_until(group)
                epoch = self.gate.epoch(group)
                assert until is not None and epoch is not None
                if not self.holds(group):
                    await self.start_holding(group, epoch, until)
                else:
                    await self.keep_holding(group, until)
            elif self.holds(group):
                try:
                    await self.stop_holding(group)
                except ReleaseIncomplete as exc:
                    self.log.warning("release not finished; will try again",
                                     extra={"group": group, "reason": str(exc)})
                    return
                if why in (Why.EXPIRED, Why.REVOKED, Why.NO_NOTICE):
                    self.log.info("released on its own", extra={
                        "group": group, "why": str(why), "now": time.monotonic(),
                        "notice": self.gate.notices.get(group),
                        "floor": self.gate.floors.get(group)})
                    kind = "lease.revoked" if why is Why.REVOKED else "lease.expired"
                    self.emit_soon(kind, f"{self.name} on {self.node} released {group} "
                                   f"on its own: {why}", group=group,
                                   epoch=self.gate.epoch(group))

    async def acquire(self, group: str, epoch: int) -> list[str]:
        """The arbiter's acquire: converge now. Holding is the lease notices' business
        (a valid notice for the group at its epoch), with or without this command."""
        already = self.holds(group) and self.gate.epoch(group) == epoch
        self.gate.on_acquire(group, epoch)
        if group in self.executor_groups() and not self.slow_start:
            await self.enforce(group)
        if already:
            self.noop(group, epoch, "acquire", f"{self.name} already holds {group}")
        return self.held(group) if group in self.executor_groups() else []

    async def release(self, group: str, epoch: int) -> list[str]:
        """Release now, and hold no more on a notice below ``epoch`` (the release
        floor); the ack goes out only after holding has really stopped."""
        self.gate.on_release(group, epoch)
        if group not in self.executor_groups():
            return []
        async with self._group_locks[group]:
            was_held = self.holds(group)
            await self.stop_holding(group)
        if not was_held:
            self.noop(group, epoch, "release", f"{self.name} holds nothing of {group}: "
                      "nothing to release")
        return []
