"""The mover: the moves in flight, each one ``vtlha.protocol.takeover.Mover`` (the
sans-I/O state machine) carried out over the KV and the executors' commands.

The policy's moves (Takeover, Assign, Resume), the operator's moves (``admin.py``) and a
new active arbiter's reconciliation (``reconcile.py``) all run here, the same way: the
machine says what to do (claim, read, release, acquire, emit), a task does it and feeds
the result back; every few milliseconds the machine also gets the time, the group's
record as the view has it, the new owner's storage word, whether the new owner was
declared down and whether this activation is still acting. Events go out without
waiting (``emit_soon``): nothing on the failover path waits for the event stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from prometheus_client import Counter, Histogram

from vtlha import bus, policy
from vtlha.errors import InvalidMessage
from vtlha.eventstate import StartedMove, outcome
from vtlha.messages import Ack, GroupRecord
from vtlha.policy import Assign, Resume, Takeover
from vtlha.protocol import takeover as tk
from vtlha_arbiter.host import Host
from vtlha_arbiter.pairstate import PairState
from vtlha_arbiter.records import GroupRecords
from vtlha_arbiter.term import EXECUTORS, Activation
from vtlha_arbiter.view import ClusterView

ACQUIRE_DEADLINE = 10.0  # seconds an acquire is retried before the policy resumes it
POLL = 0.005  # seconds between looks at the view while a move waits


@dataclass(frozen=True)
class Claimed:
    """An operator's move whose claim succeeded: the epoch written, the event family and
    the id of its ``<kind>.started`` event (None: not recorded)."""

    epoch: int
    kind: str
    started: str | None


@dataclass
class Job:
    """One move and what its events say. ``family``: the takeover's event family
    (failover, failback, switchover); ``announce``: a finished assignment or resume is
    announced (``group.assigned`` / ``group.resumed``); ``finishes``: the
    ``<kind>.started`` events (family, id) this move ends."""

    move: tk.Move
    pair: str
    status: str
    inputs: dict[str, Any]
    rule: policy.Rule | None = None
    data: dict[str, Any] = field(default_factory=dict)
    family: str | None = None
    announce: bool = False
    finishes: list[tuple[str, str | None]] = field(default_factory=list)


class Mover:
    def __init__(self, host: Host, view: ClusterView, records: GroupRecords,
                 activation: Activation) -> None:
        self.host = host
        self.t = host.config.timings
        self.view = view
        self.records = records
        self.act = activation
        self.pairs: PairState | None = None
        self.runs: dict[str, Run] = {}
        #: group -> the move whose ``<kind>.started`` went out and whose end did not yet
        #: (kept in the KV by ``eventbook``: a new active arbiter ends it)
        self.started: dict[str, StartedMove] = {}
        self.takeovers = Counter("vtlha_takeovers_total", "Takeovers, by result", ["result"],
                                 registry=host.registry)
        self.takeover_seconds = Histogram(
            "vtlha_takeover_duration_seconds", "From the decision to the acquire ack",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=host.registry)

    @property
    def in_flight(self) -> set[str]:
        """Groups the policy leaves alone: a move under way that is not held yet."""
        return {g for g, r in self.runs.items() if r.machine.blocks_policy}

    def busy(self, group: str) -> bool:
        run = self.runs.get(group)
        return run is not None and not run.machine.done

    def timings(self, group: str) -> tk.Timings:
        starts = sum(r.start_timeout for r in self.host.config.group_resources(group))
        return tk.Timings(
            lease_ttl=self.t.lease_ttl, margin=self.t.margin,
            acquire_deadline=ACQUIRE_DEADLINE, read_every=self.t.heartbeat_interval,
            storage_bound=starts + 2 * self.t.probe_timeout + 2 * self.t.probe_interval + 1.0)

    # ---- starting a move -------------------------------------------------------------
    def job_of(self, a: Takeover | Assign | Resume, inputs: dict[str, Any],
               data: dict[str, Any] | None = None) -> Job:
        storage = bool(self.host.config.group_devices(a.group))
        if isinstance(a, Takeover):
            move = tk.Move(tk.Kind.TAKEOVER, a.group, a.new, a.old, a.epoch, a.revision,
                           storage)
            return Job(move, a.pair, a.status, inputs, a.rule, data or {},
                       family=policy.event_kind(a.rule))
        if isinstance(a, Assign):
            move = tk.Move(tk.Kind.ASSIGN, a.group, a.node, storage=storage)
            return Job(move, a.pair, a.status, inputs, a.rule, announce=True)
        move = tk.Move(tk.Kind.RESUME, a.group, a.node, epoch=a.epoch, revision=a.revision,
                       storage=storage)
        return Job(move, a.pair, a.status, inputs, a.rule, announce=True)

    def start(self, action: Takeover | Assign | Resume, inputs: dict[str, Any]) -> None:
        """Carry out a move the policy decided, in the background."""
        self.run(self.job_of(action, inputs))

    def run(self, job: Job) -> Run:
        now = time.monotonic()
        m = job.move
        machine = tk.Mover(m, self.timings(m.group), term=self.act.term,
                           last_renewal_seen=self.view.last_renewal.get(m.group),
                           old_alive=m.old is not None and self.view.is_alive(m.old, now))
        run = Run(self, job, machine, self.act.token())
        self.runs[m.group] = run
        self.host.spawn(run.run(), f"{m.kind.value}-{m.group}", critical=False)
        return run

    async def operator_takeover(self, a: Takeover, inputs: dict[str, Any],
                                who: dict[str, Any]) -> Claimed | None:
        """An operator's move: the same machine; this waits for the claim only (the reply
        says the epoch and the ``<kind>.started`` event) and it finishes in the
        background. None: the claim lost, or this arbiter stopped acting first."""
        run = self.run(self.job_of(a, inputs, who))
        if not await run.claimed:
            return None
        return Claimed(run.machine.epoch, run.job.family or "", run.started_id)

    def forget_started(self, group: str, epoch: int) -> None:
        """The group's started move (at ``epoch`` or older) has ended."""
        m = self.started.get(group)
        if m is not None and m.epoch <= epoch:
            del self.started[group]

    async def end_adopted(self, m: StartedMove) -> None:
        """A move another active arbiter started and did not end (``eventbook``): the
        reconciliation's move re-driving its group at its epoch ends it, once the
        hold-off is over; otherwise what the KV shows does (``eventstate.outcome``:
        held at its epoch: ``.completed``, after its storage is served; moved on or its
        new owner down: ``.failed``), or the bound passes (``.failed``)."""
        bound = 2 * (self.t.lease_ttl + self.t.margin) + 2 * ACQUIRE_DEADLINE
        deadline = time.monotonic() + bound
        got = None
        while got is None and time.monotonic() < deadline and not self.host.stopping:
            run = self.runs.get(m.group)
            if run is not None and not run.machine.done and run.machine.epoch == m.epoch:
                run.job.finishes.append((m.kind, m.id))
                return
            until = self.act.hold_off_until()
            if until is None or time.monotonic() > until + self.t.heartbeat_interval:
                rec = self.view.records.get(m.group)
                got = outcome(m, rec[0] if rec else None, self.view.is_gone(m.new))
            if got is None:
                await asyncio.sleep(0.01)
        if self.host.stopping:
            return
        result, why = got or ("failed", f"not held by {m.new} within {bound:.0f} s")
        if result == "completed":
            problem = await self._served(m.group, m.new, m.epoch)
            if problem is not None:
                result, why = "failed", f"{why} but does not serve its storage: {problem}"
        kind, fields = m.kind, {
            "pair": m.pair, "group": m.group, "old": m.old, "new": m.new,
            "term": self.act.term, "epoch": m.epoch,
            "data": {"started": m.id, "adopted": True, "started_term": m.term}}
        why = f"{why}; started under term {m.term}, ended by the arbiter on {self.host.node}"
        if result == "completed":
            self.host.emit_soon(f"{kind}.completed", why, **fields)
        else:
            self.host.emit_soon(f"{kind}.failed", why, **fields)
        self.forget_started(m.group, m.epoch)

    async def _served(self, group: str, owner: str, epoch: int) -> str | None:
        """None once ``owner`` serves ``group`` at ``epoch`` (or it has no storage)."""
        bound = self.timings(group).storage_bound
        if not self.host.config.group_devices(group):
            return None
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline and not self.host.stopping:
            said = self.view.storage_state(owner, group, epoch)
            if said is not None and said[0] in ("served", "failed"):
                return None if said[0] == "served" else (said[1] or "failed")
            await asyncio.sleep(0.01)
        return f"not reported served within {bound:.1f} s"

    def finished(self, run: Run, end: tk.Done | tk.Failed | tk.GivenUp) -> None:
        if self.runs.get(run.job.move.group) is run:
            del self.runs[run.job.move.group]
        if run.job.move.kind is not tk.Kind.TAKEOVER:
            return
        if isinstance(end, tk.Done):
            self.takeover_seconds.observe(end.took)
            self.takeovers.labels("completed").inc()
        else:
            self.takeovers.labels(end.result).inc()
        if isinstance(end, tk.GivenUp) and end.result == "not_active":
            self.host.log.info(end.reason, extra={"group": run.job.move.group})

    async def record_failure(self, pair: str, node: str) -> None:
        if self.pairs is not None:
            await self.pairs.record_failure(pair, node, time.time())

    # ---- commands ----------------------------------------------------------
    async def send(self, node: str, svc: str, action: str, group: str, epoch: int,
                   deadline: float, give_up_if_absent: bool = False,
                   wait: float | None = None) -> Ack | None:
        """Send one command, retried until acked or ``deadline`` (monotonic). With
        ``give_up_if_absent`` a missing executor (no responders) ends it at once."""
        host = self.host
        subject = host.subjects.cmd(node, svc)
        cmd = self.act.command(action, group, epoch, wait)
        while True:
            try:
                return await bus.send_command(host.nc, subject, cmd, self.t.command_timeout)
            except nats.errors.NoRespondersError:
                if give_up_if_absent:
                    return None
            except (nats.errors.TimeoutError, TimeoutError):
                pass
            except InvalidMessage as exc:
                host.invalid_messages.labels("ack").inc()
                host.log.warning("invalid ack", extra={"error": str(exc)})
            if time.monotonic() >= deadline or host.stopping or self.view.is_gone(node):
                return None  # (a node declared down will not answer: stop, decide anew)
            await asyncio.sleep(min(0.05, self.t.command_timeout))

    def executors_of(self, group: str) -> tuple[str, ...]:
        """Who carries a group out: the ip-manager, and the storage-monitor for a data
        group with devices."""
        return EXECUTORS if self.host.config.group_devices(group) else ("ip-manager",)

    async def release_all(self, node: str, group: str, epoch: int) -> bool:
        """True when every executor of ``node`` acknowledged the release."""
        deadline = time.monotonic() + self.t.command_timeout
        acks = await asyncio.gather(*(self.send(node, s, "release", group, epoch, deadline,
                                                give_up_if_absent=True)
                                      for s in self.executors_of(group)))
        for a in acks:
            if a is not None and not a.ok:
                self.host.log.warning("release not finished", extra={
                    "group": group, "by": a.node, "service": a.service, "reason": a.reason})
        return all(a is not None and a.ok for a in acks)

    async def acquire_all(self, node: str, group: str, epoch: int, wait: float | None,
                          only: str | None = None) -> bool:
        """Tell the new owner's executors to hold the group (they do once its lease
        holder's notice for this epoch arrives) and its lease holder when it may start
        (``wait``; None leaves its own gate, the full lease, in place)."""
        deadline = time.monotonic() + ACQUIRE_DEADLINE
        services = (only,) if only else (*self.executors_of(group), "heartbeat")
        acks = await asyncio.gather(*(self.send(node, s, "acquire", group, epoch, deadline,
                                                wait=wait) for s in services))
        for a in acks:
            if a is not None and not a.ok:
                self.host.log.warning("acquire refused", extra={"group": group, "by": a.node,
                                                                "reason": a.reason})
        return all(a is not None and a.ok for a in acks)


Feed = Callable[[float], list[tk.Output]]


class Run:
    """One move carried out: its machine's outputs done by tasks whose results come back
    through a queue; the view polled every ``POLL`` seconds."""

    def __init__(self, mover: Mover, job: Job, machine: tk.Mover,
                 token: tuple[int, float | None]) -> None:
        self.mover = mover
        self.host = mover.host
        self.job = job
        self.machine = machine
        self.token = token  # the activation this move belongs to
        self.queue: asyncio.Queue[Feed] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()
        self.claimed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.started_id: str | None = None  # the id of this move's <kind>.started
        self.fed_revision = 0

    async def run(self) -> None:
        m = self.machine
        try:
            self._do(m.start(time.monotonic()))
            while not m.done:
                feed: Feed | None = None
                with contextlib.suppress(TimeoutError):
                    feed = await asyncio.wait_for(self.queue.get(), POLL)
                now = time.monotonic()
                self._do(feed(now) if feed is not None else [])
                if not m.done:
                    self._do(self._poll(now))
        finally:
            for t in self.tasks:
                t.cancel()
            if not self.claimed.done():
                self.claimed.set_result(False)

    def _poll(self, now: float) -> list[tk.Output]:
        m, g = self.machine, self.job.move.group
        if not self.mover.act.is_acting_as(self.token):
            return m.on_not_acting(now)
        out: list[tk.Output] = []
        rec = self.mover.view.records.get(g)
        if rec is not None and rec[1] > self.fed_revision:
            self.fed_revision = rec[1]
            out += m.on_record(rec[0], rec[1], now)
        if self.mover.view.is_gone(self.job.move.new):
            out += m.on_node_down(self.job.move.new, now)
        said = self.mover.view.storage_state(self.job.move.new, g, m.epoch)
        if said is not None:
            out += m.on_storage(said[0], said[1], now)
        return out + m.tick(now)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _do(self, outputs: list[tk.Output]) -> None:
        for o in outputs:
            if isinstance(o, tk.Claim):
                self._spawn(self._claim(o))
            elif isinstance(o, tk.Read):
                self._spawn(self._read(o.group))
            elif isinstance(o, tk.Release):
                self._spawn(self._release(o))
            elif isinstance(o, tk.Acquire):
                self._spawn(self._acquire(o))
            elif isinstance(o, tk.Emit):
                self._emit(o)
            else:
                if not self.claimed.done():
                    self.claimed.set_result(isinstance(o, tk.Done | tk.Failed)
                                            or self.machine.phase is tk.Phase.SERVING)
                self.mover.finished(self, o)

    # ---- the outputs' I/O ---------------------------------------------------------------
    async def _claim(self, c: tk.Claim) -> None:
        """An arbiter claims only while this activation is still acting."""
        if not self.mover.act.is_acting_as(self.token):
            self.queue.put_nowait(self.machine.on_not_acting)
            return
        rec = GroupRecord(owner=c.owner, term=self.machine.term, epoch=c.epoch,
                          state="acquiring", renewed_by=self.host.node)
        result: tk.ClaimResult
        try:
            rev = await asyncio.wait_for(self.mover.records.cas(c.group, rec, c.last),
                                         self.host.config.timings.command_timeout)
            result = tk.Lost() if rev is None else tk.Won(rev)
        except Exception as exc:  # timeout, no responders, no quorum: it may have committed
            self.host.log.info("claim without an answer", extra={"group": c.group,
                                                                 "error": repr(exc)})
            result = tk.Unknown()
        self.queue.put_nowait(lambda now: self.machine.on_claim(result, now))

    async def _read(self, group: str) -> None:
        await self.mover.records.read(group)
        rec = self.mover.view.records.get(group)  # the newest seen (monotonic)

        def feed(now: float) -> list[tk.Output]:
            if rec is None:
                return self.machine.on_record(None, 0, now)
            self.fed_revision = max(self.fed_revision, rec[1])
            return self.machine.on_record(rec[0], rec[1], now)

        self.queue.put_nowait(feed)

    async def _release(self, r: tk.Release) -> None:
        ok = await self.mover.release_all(r.node, r.group, r.epoch)
        self.queue.put_nowait(lambda now: self.machine.on_released(ok, now))

    async def _acquire(self, a: tk.Acquire) -> None:
        ok = await self.mover.acquire_all(a.node, a.group, a.epoch, a.wait, only=a.only)
        if a.only is None:
            self.queue.put_nowait(lambda now: self.machine.on_acquired(ok, now))

    # ---- events -------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        m = self.job.move
        return {"pair": self.job.pair, "group": m.group, "old": m.old, "new": m.new,
                "term": self.machine.term, "epoch": self.machine.epoch}

    def _emit(self, e: tk.Emit) -> None:
        job, host = self.job, self.host
        rule = {"rule": job.rule.value} if job.rule is not None else {}
        if e.what == "started":
            if not self.claimed.done():
                self.claimed.set_result(True)
            if job.family is None:
                return
            if job.rule in policy.FAULT_RULES and job.move.old is not None:
                host.spawn(self.mover.record_failure(job.pair, job.move.old),
                           f"failure-{job.move.group}", critical=False)
            m, kind = job.move, job.family
            self.started_id = host.emit_soon(
                f"{kind}.started", job.status, inputs=job.inputs,
                data={**rule, **job.data}, **self._common())
            if self.started_id is not None and m.old is not None:
                self.mover.started[m.group] = StartedMove(
                    id=self.started_id, kind=kind, group=m.group, pair=job.pair,
                    old=m.old, new=m.new, epoch=self.machine.epoch, term=self.machine.term)
        elif e.what == "notify":
            m = job.move
            host.emit_soon("failover.notify", f"{m.new} tells {m.old} that it is assuming "
                           f"primary responsibility for {m.group} (epoch {self.machine.epoch}):"
                           f" {m.old}'s executors are asked to release it",
                           data={**rule, "executors": list(self.mover.executors_of(m.group))},
                           **self._common())
        else:
            self._emit_end(e, rule)

    def _emit_end(self, e: tk.Emit, rule: dict[str, Any]) -> None:
        job, host = self.job, self.host
        ends = list(job.finishes)
        if job.family is not None:
            ends.append((job.family, self.started_id))
        for kind, started in ends:
            data = {**rule, "started": started, **e.data}
            if e.what == "completed":
                host.emit_soon(f"{kind}.completed", e.reason, data=data, **self._common())
            else:
                host.emit_soon(f"{kind}.failed", e.reason, data=data, **self._common())
        if ends:
            self.mover.forget_started(job.move.group, self.machine.epoch)
        if e.what == "completed" and job.announce:
            kind = "group.assigned" if job.move.kind is tk.Kind.ASSIGN else "group.resumed"
            host.emit_soon(kind, job.status, inputs=job.inputs, **self._common())
        elif e.what == "failed" and e.data.get("result") == "not_served" \
                and job.family is None:
            host.emit_soon("group.not_served", e.reason, data={"storage": e.reason},
                           **self._common())
