"""A node's processes: the lease holder (the shipped ``LeaseHolder``) and the executors
(the shipped ``HoldGate`` and ``FencingStore``), wired as the services wire them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from vtlha_heartbeat.lease import watch_bounds

from vtlha.fencing import FencingStore
from vtlha.messages import GroupRecord
from vtlha.protocol.hold import HoldGate
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

from .kv import Answer, Conflict, Entry, Ok
from .timings import GROUPS, HOSTS, NODES, companion, executors_of

if TYPE_CHECKING:
    from .runner import Sim


class MemoryFencing(FencingStore):
    """The shipped fencing store, persisted in memory: it survives the process."""

    def _load(self) -> None:
        pass

    def _save(self) -> None:
        pass


@dataclass(frozen=True)
class Cmd:
    term: int
    group: str
    epoch: int
    action: str  # acquire | release | term
    wait: float | None = None
    bucket: str = ""  # the KV bucket's identity the tokens are from ("" unknown)


BUCKET_CHECK = 1.0  # as vtlha.executor: seconds between reads of the bucket's identity


def group_key(group: str) -> str:
    return f"group.{group}"


class LeaseProc:
    """The heartbeat service as ``vtlha_heartbeat.lease.LeaseRunner`` wires it: the lease
    holder, its watch (restarted when it stalls, ``WatchMonitor``) and the direct reads
    of every record (the backstop), the bucket's identity, heartbeats, promises."""

    def __init__(self, sim: Sim, node: str) -> None:
        self.sim, self.node = sim, node
        self.name = f"{node}/lease"
        self.lh: LeaseHolder

    def now(self) -> float:
        return self.sim.w.local(self.node)

    def start(self) -> None:
        s, t = self.sim, self.sim.t
        self.lh = s.variant.lease_holder(
            node=self.node, companion=companion(self.node), lease_ttl=t.lease_ttl,
            margin=t.margin, interval=t.interval, started_at=self.now())
        self.wm = WatchMonitor(*watch_bounds(t.interval))
        self.bucket = s.kv.bucket
        self.reading = False
        s.kv.watch(self.name, "group.", self.watch_cb(), s.plan.watch_lag)
        s.w.timer(self.name, s.w.rng.uniform(0.0, t.tick), self.tick)
        s.w.timer(self.name, s.w.rng.uniform(0.0, t.interval), self.heartbeat)
        # (a phase that draws no random number: histories without a recreated bucket
        # stay as they were)
        phase = (s.w.seed + 3 * NODES.index(self.node) + s.w.procs[self.name].inc + 5) % 10
        s.w.timer(self.name, BUCKET_CHECK * phase / 10, self.bucket_tick)

    def started_long_ago(self) -> None:
        self.lh.started_at = self.now() - 10.0

    # ---- inputs -----------------------------------------------------------------
    def watch_cb(self) -> Callable[[str, GroupRecord | None, int], None]:
        """The callback of a watch made now: its deliveries carry this generation."""
        return partial(self.on_watch, gen=self.lh.generation)

    def on_watch(self, key: str, value: GroupRecord | None, rev: int, gen: int = 0) -> None:
        group = key.removeprefix("group.")
        if group in GROUPS:
            self.wm.on_delivery(group, rev)
            self.run(self.lh.on_record(group, value, rev, self.now(), **self.gen_arg(gen)))

    def tick(self) -> None:
        now = self.now()
        self.check_watch(now)
        self.run(self.lh.tick(now))
        self.sim.w.timer(self.name, self.sim.t.tick, self.tick)

    def bucket_tick(self) -> None:
        """The heartbeat service reads the bucket's identity every ``BUCKET_CHECK`` (it
        is an executor: ``Executor._check_bucket``) and tells the lease holder of a new
        one (``bucket_changed`` -> ``LeaseRunner.on_new_bucket``)."""
        s = self.sim
        if s.variant.bucket_identity and s.kv.available(self.node) \
                and s.kv.bucket != self.bucket:
            self.bucket = s.kv.bucket
            s.w.log(self.name, "new KV bucket")
            self.run(self.lh.on_new_bucket())
            self.wm.seen.clear()
            self.wm.on_restart()
            s.kv.watch(self.name, "group.", self.watch_cb(), s.plan.watch_lag)
        s.w.timer(self.name, BUCKET_CHECK, self.bucket_tick)

    def check_watch(self, now: float) -> None:
        """Restart a stalled watch; read every record directly when due."""
        s = self.sim
        why = self.wm.stalled(now)
        if why is not None:
            self.wm.on_restart()
            s.w.log(self.name, "watch restarted: %s", why)
            s.kv.watch(self.name, "group.", self.watch_cb(), s.plan.watch_lag)
        if self.wm.read_due(now) and not self.reading:
            self.wm.on_read(now)
            self.read_all()

    def read_all(self) -> None:
        s = self.sim
        self.reading = True
        left = list(GROUPS)

        def next_one(ans: Answer | None = None, group: str = "", gen: int = 0) -> None:
            if isinstance(ans, Entry) and ans.value is not None:
                self.run(self.lh.on_record(group, ans.value, ans.revision, self.now(),
                                           **self.gen_arg(gen)))
            if not left:
                self.reading = False
                return
            g = left.pop(0)
            s.kv.call(self.name, partial(s.kv.read_now, group_key(g)),
                      partial(next_one, group=g, gen=self.lh.generation))
        next_one()

    def gen_arg(self, gen: int) -> dict[str, int]:
        """The read's bucket generation, for a lease holder that takes it."""
        return {"generation": gen} if self.sim.variant.read_generation else {}

    def heartbeat(self) -> None:
        s = self.sim
        for host in HOSTS:
            s.net.send(self.node, host, partial(s.arbiters[host].on_heartbeat, self.node))
        s.w.timer(self.name, s.t.interval, self.heartbeat)

    def on_command(self, cmd: Cmd, reply: Callable[[bool], None]) -> None:
        """The arbiter's acquire: read the key first when the claim is not known yet."""
        known = self.lh.groups.get(cmd.group)
        if known is None or known.epoch < cmd.epoch:
            e = self.sim.kv.read_now(group_key(cmd.group))
            self.run(self.lh.on_record(cmd.group, e.value, e.revision, self.now()))
        if cmd.wait is not None:
            self.run(self.lh.on_acquire_command(cmd.group, cmd.epoch, cmd.wait, self.now()))
        reply(True)

    def on_promise_request(self, requester: str, groups: tuple[str, ...], duration: float,
                           reply: Callable[[PromiseAnswer], None]) -> None:
        ans = self.lh.on_promise_request(requester, list(groups), duration, self.now())
        self.sim.w.log(self.name, "promise to %s: %s (%s)", requester, ans.granted, ans.reason)
        reply(ans)

    # ---- effects ------------------------------------------------------------------
    def run(self, effects: list[Effect]) -> None:
        bucket = f"bucket-{self.bucket}"  # the bucket its notices name (as LeaseRunner)
        for e in effects:
            if isinstance(e, Renew):
                self.renew(e)
            elif isinstance(e, Notice):
                self.notify(e, bucket)
            elif isinstance(e, AskPromise):
                self.ask_promise(e)
            elif isinstance(e, Probe):
                self.probe()
            elif isinstance(e, Note):
                self.sim.w.log(self.name, "%s: %s", e.kind, e.message)

    def renew(self, r: Renew) -> None:
        s = self.sim

        def op() -> Answer:
            ans = s.kv.update_now(group_key(r.group), r.record, r.last, self.name)
            if isinstance(ans, Ok):
                s.check.renewed(self.node, r.group, r.record.epoch, r.sent_at)
            return ans

        def done(ans: Answer | None) -> None:
            now = self.now()
            if ans is None:
                out = self.lh.on_renew_result(r.group, r.sent_at, KvResult.UNAVAILABLE, now=now)
            elif isinstance(ans, Ok):
                self.wm.on_own_write(r.group, ans.revision, now)
                out = self.lh.on_renew_result(r.group, r.sent_at, KvResult.OK,
                                              revision=ans.revision, now=now)
            else:
                assert isinstance(ans, Conflict)
                out = self.lh.on_renew_result(r.group, r.sent_at, KvResult.CONFLICT,
                                              current=ans.value, current_revision=ans.revision,
                                              now=now)
            self.run(out)
        s.kv.call(self.name, op, done)

    def probe(self) -> None:
        s = self.sim

        def done(ans: Answer | None) -> None:
            self.lh.on_probe_result(KvResult.UNAVAILABLE if ans is None else KvResult.OK)
        s.kv.call(self.name, lambda: s.kv.update_now(f"probe.{self.node}", 1, None, self.name)
                  if f"probe.{self.node}" not in s.kv.keys else Entry(1, s.kv.rev), done)

    def notify(self, n: Notice, bucket: str) -> None:
        s = self.sim
        if n.revoked or n.reason:
            s.w.log(self.name, "notice %s epoch %d %s %s", n.group, n.epoch,
                    "revoked" if n.revoked else "until", n.reason or n.valid_until)
        for svc in executors_of(n.group):
            ex = s.execs[f"{self.node}/{svc}"]
            s.net.send(self.node, self.node, partial(s.w.run_in, ex.name,
                                                     partial(ex.on_notice, n, bucket)))

    def ask_promise(self, ap: AskPromise) -> None:
        s = self.sim
        comp = s.leases[ap.companion]
        inc, answered = s.w.procs[self.name].inc, [False]

        def answer(ans: PromiseAnswer | None) -> None:
            if answered[0]:
                return
            answered[0] = True
            self.run(self.lh.on_promise_reply(ap.sent_at, ans, ap.groups))

        def granted(ans: PromiseAnswer) -> None:
            if ans.granted:
                s.check.promised(self.node, ap.groups, ap.sent_at + min(ans.duration,
                                                                        s.t.lease_ttl))
            s.net.send(ap.companion, self.node,
                       lambda: s.w.run_in(self.name, lambda: answer(ans), inc))

        s.w.log(self.name, "asks %s for a promise", ap.companion)
        s.w.timer(self.name, s.t.promise_timeout, lambda: answer(None))
        s.net.send(self.node, ap.companion, lambda: s.w.run_in(
            comp.name, lambda: comp.on_promise_request(self.node, ap.groups, ap.duration,
                                                       granted)))


class ExecProc:
    """An executor (ip-manager ``ip`` or storage-monitor ``sm``) as ``vtlha.executor``
    wires it: its hold rule (level-triggered), its fencing tokens and release floors
    (persisted), the KV bucket's identity. What it holds is ``HoldGate.should_hold`` on
    its host's clock, for the running incarnation and for those that died with a fence
    element still valid (the kernel enforces it; a release by the next incarnation
    removes it)."""

    def __init__(self, sim: Sim, node: str, svc: str) -> None:
        self.sim, self.node, self.svc = sim, node, svc
        self.name = f"{node}/{svc}"
        self.groups = tuple(g for g in GROUPS if svc in executors_of(g))
        self.fencing = MemoryFencing(Path("/nonexistent"))
        self.gate: HoldGate = sim.variant.gate(margin=sim.t.margin)
        self.ghosts: list[HoldGate] = []
        self.fencing.adopt(self.bucket_id())

    def now(self) -> float:
        return self.sim.w.local(self.node)

    def bucket_id(self) -> str:
        return f"bucket-{self.sim.kv.bucket}"

    def start(self, restart: bool) -> None:
        """A (re)started executor learns the bucket's identity, restores its floors, and
        holds nothing until a notice; it checks the bucket every ``BUCKET_CHECK``."""
        s = self.sim
        if restart:
            self.ghosts.append(self.gate)
            self.gate = s.variant.gate(margin=s.t.margin)
        self.check_bucket()
        self.gate.reset(dict(self.fencing.floors))
        for g in self.groups:
            e = s.kv.read_now(group_key(g))
            if isinstance(e.value, GroupRecord) and e.value.owner == self.node:
                s.variant.recall(self.gate, g, e.value.epoch)
        s.w.timer(self.name, s.w.rng.uniform(0.0, BUCKET_CHECK), self.bucket_tick)

    def bucket_tick(self) -> None:
        self.check_bucket()
        self.sim.w.timer(self.name, BUCKET_CHECK, self.bucket_tick)

    def check_bucket(self) -> bool:
        """Read the KV's identity (when it is reachable) and adopt it: a new bucket
        starts the tokens, floors and notices afresh."""
        if not self.sim.kv.available(self.node) or not self.sim.variant.bucket_identity:
            return False
        if self.fencing.adopt(self.bucket_id()):
            self.sim.w.log(self.name, "new KV bucket: tokens start afresh")
            self.gate.reset(dict(self.fencing.floors))
        return True
    def holds(self, group: str) -> int | None:
        """The epoch at which this executor holds ``group`` now, or None."""
        now = self.now()
        for gate in (self.gate, *self.ghosts):
            if gate.should_hold(group, now):
                return gate.epoch(group)
        return None

    def serves(self, group: str) -> bool:
        """The running incarnation holds ``group`` (a dead one's fence does not serve)."""
        return self.gate.should_hold(group, self.now())

    def hold_end(self, group: str) -> float:
        ends = [u for gate in (self.gate, *self.ghosts)
                if (u := gate.valid_until(group)) is not None]
        return max(ends, default=0.0)

    def verdict(self, group: str) -> str:
        return str(self.gate.verdict(group, self.now()))

    def on_notice(self, n: Notice, bucket: str = "") -> None:
        """As ``HoldingExecutor._on_notice``: a notice of another bucket than this
        executor's is ignored, and the identity read at once (it may be the one behind)."""
        if self.sim.variant.notice_bucket and bucket and self.fencing.bucket \
                and bucket != self.fencing.bucket:
            self.sim.w.log(self.name, "ignores a notice of %s (%s epoch %d)", bucket,
                           n.group, n.epoch)
            self.check_bucket()
            return
        self.gate.on_notice(n.group, n.epoch, n.valid_until, n.revoked, n.since)
        self.sim.check.step(n.group)

    def on_command(self, cmd: Cmd, reply: Callable[[bool], None]) -> None:
        why: str | None = None
        if self.sim.variant.bucket_identity and self.fencing.is_other_bucket(cmd.bucket):
            current = self.bucket_id() if self.sim.kv.available(self.node) else None
            if current == cmd.bucket:
                self.check_bucket()
            else:
                why = self.fencing.bucket_refusal(cmd.bucket, current)
        why = why or self.fencing.refusal(cmd.term, None if cmd.action == "term"
                                          else cmd.group, cmd.epoch)
        if why is not None:
            self.sim.w.log(self.name, "refuses %s %s epoch %d term %d: %s", cmd.action,
                           cmd.group, cmd.epoch, cmd.term, why)
            reply(False)
            return
        if cmd.action == "term":
            self.fencing.record(cmd.term)
        else:
            self.fencing.record(cmd.term, cmd.group, cmd.epoch,
                                release=cmd.action == "release")
        if cmd.action == "acquire":
            self.gate.on_acquire(cmd.group, cmd.epoch)
        elif cmd.action == "release":
            self.gate.on_release(cmd.group, cmd.epoch)
            for ghost in self.ghosts:
                ghost.on_release(cmd.group, cmd.epoch)
        if cmd.action != "term":
            self.sim.w.log(self.name, "%s %s epoch %d (term %d)", cmd.action, cmd.group,
                           cmd.epoch, cmd.term)
            self.sim.check.step(cmd.group)
        reply(True)


__all__ = ["NODES", "Cmd", "ExecProc", "LeaseProc", "MemoryFencing", "group_key"]
