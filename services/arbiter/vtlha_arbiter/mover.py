"""The mover: the moves in flight, each one ``vtlha.protocol.takeover.Mover`` (the
sans-I/O state machine) carried out over the KV and the executors' commands.

The policy's moves (Takeover, Assign, Resume), the operator's moves (``admin.py``) and a
new active arbiter's reconciliation (``reconcile.py``) all run here, the same way: the
machine says what to do (claim, read, release, acquire, emit), a task does it and feeds
the result back (``run.Run``); every few milliseconds the machine also gets the time, the group's
record as the view has it, the new owner's storage word, whether the new owner was
declared down and whether this activation is still acting. Events go out without
waiting (``emit_soon``): nothing on the failover path waits for the event stream."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from prometheus_client import Counter, Histogram

from vtlha import bus, policy
from vtlha.errors import InvalidMessage
from vtlha.eventstate import StartedMove, end_id, outcome
from vtlha.messages import Ack, GroupRecord
from vtlha.policy import Assign, Resume, Takeover
from vtlha.protocol import takeover as tk
from vtlha_arbiter.host import Host
from vtlha_arbiter.pairstate import PairState
from vtlha_arbiter.records import GroupRecords
from vtlha_arbiter.run import Run
from vtlha_arbiter.term import EXECUTORS, Activation
from vtlha_arbiter.view import ClusterView

MOVE_FAMILIES = ("failover", "failback", "switchover")  # what a MoveNote's kind may be
ACQUIRE_DEADLINE = 10.0  # seconds an acquire is retried before the policy resumes it


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
        self.ending: set[str] = set()  # groups whose adopted move is being ended
        #: group -> the newest epoch whose ``<kind>.started`` went out (``eventbook``)
        self.announced: dict[str, int] = {}
        self.takeovers = Counter("vtlha_takeovers_total", "Takeovers, by result", ["result"],
                                 registry=host.registry)
        self.takeover_seconds = Histogram(
            "vtlha_takeover_duration_seconds", "From the decision to the acquire ack",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=host.registry)
        self.move_seconds = Histogram(
            "vtlha_failover_duration_seconds", "A completed move, from the decision to the "
            "group served by its new owner (the .completed event's duration_s), by kind "
            "(failover, switchover, failback) and the policy rule that made it",
            ["kind", "rule"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=host.registry)

    @property
    def in_flight(self) -> set[str]:
        """Groups the policy leaves alone: a move under way that is not held yet."""
        return {g for g, r in self.runs.items() if r.machine.blocks_policy}

    def busy(self, group: str) -> bool:
        run = self.runs.get(group)
        return run is not None and not run.machine.done

    def timings(self, group: str) -> tk.Timings:
        # each resource's start, and one local restart (stop, start) after a failed
        # start unless migration_threshold 1 gives the group up at once (vtlha.recovery)
        starts = sum(r.start_timeout + (r.stop_timeout + r.start_timeout
                                        if r.migration_threshold != 1 else 0)
                     for r in self.host.config.group_resources(group))
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

    def forget_bucket(self, why: str) -> None:
        """The KV bucket was recreated: each move started in the old one and not ended
        ends ``.failed`` (its epoch means nothing in the new bucket; the next active
        arbiter reconciles its group), and the epochs announced are forgotten. The runs
        themselves stop: this arbiter is not acting any more."""
        for m in sorted(self.started.values(), key=lambda m: m.group):
            self.host.emit_soon(
                f"{m.kind}.failed", f"{why}: the move of {m.group} to {m.new} (epoch "
                f"{m.epoch}) ends with the old bucket", id=end_id(m.id), pair=m.pair,
                group=m.group, old=m.old, new=m.new, term=m.term, epoch=m.epoch,
                data={"started": m.id, "new_bucket": True})
        self.started.clear()
        self.announced.clear()

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
        new owner down: ``.failed``), or the bound passes (``.failed``). One task per
        group; it ends the move only while this arbiter acts."""
        if m.group in self.ending:
            return
        self.ending.add(m.group)
        try:
            await self._end_adopted(m)
        finally:
            self.ending.discard(m.group)

    async def _end_adopted(self, m: StartedMove) -> None:
        bound = 2 * (self.t.lease_ttl + self.t.margin) + 2 * ACQUIRE_DEADLINE
        deadline = time.monotonic() + bound
        got = None
        while got is None and time.monotonic() < deadline and not self.host.stopping:
            run = self.runs.get(m.group)
            if run is not None and not run.machine.done and run.machine.epoch == m.epoch:
                if m.id != run.started_id and (m.kind, m.id) not in run.job.finishes:
                    run.job.finishes.append((m.kind, m.id))  # (its own run ends its own)
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
        if not self.act.is_acting() or self.started.get(m.group) != m:
            return  # lapsed (the next active arbiter ends it), or ended meanwhile
        kind, fields = m.kind, {
            "pair": m.pair, "group": m.group, "old": m.old, "new": m.new,
            "term": self.act.term, "epoch": m.epoch,
            "data": {"started": m.id, "adopted": True, "started_term": m.term}}
        why = f"{why}; started under term {m.term}, ended by the arbiter on {self.host.node}"
        if result == "completed":
            self.host.emit_soon(f"{kind}.completed", why, id=end_id(m.id), **fields)
        else:
            self.host.emit_soon(f"{kind}.failed", why, id=end_id(m.id), **fields)
        self.forget_started(m.group, m.epoch)

    def announce_unannounced(self, group: str, rec: GroupRecord) -> StartedMove | None:
        """A takeover noted in ``group``'s record (``GroupRecord.move``) whose
        ``<kind>.started`` never went out — its arbiter stopped between the claim and the
        event — is announced now, with the id the claim noted (a copy that did go out is
        dropped as a duplicate), and becomes a started move this arbiter ends."""
        note = rec.move
        if note is None or rec.epoch <= self.announced.get(group, 0) \
                or group in self.started or note.kind not in MOVE_FAMILIES:
            return None
        home = self.host.config.groups()[group][0]
        pair = self.host.config.pair_of(home).name
        m = StartedMove(id=note.started, kind=note.kind, group=group, pair=pair,
                        old=note.old, new=rec.owner, epoch=rec.epoch, term=note.term)
        self.host.emit_soon(
            f"{m.kind}.started", f"{note.reason or note.kind} (claimed under term "
            f"{note.term}; announced by the arbiter on {self.host.node}, which found it "
            "unannounced)", id=note.started, pair=pair, group=group, old=note.old,
            new=rec.owner, term=note.term, epoch=rec.epoch,
            data={"adopted": True, "claimed_term": note.term})
        self.started[group] = m
        self.announced[group] = rec.epoch
        return m

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
            job = run.job
            if job.rule is not None:
                self.move_seconds.labels(job.family or policy.event_kind(job.rule),
                                         job.rule.value).observe(end.took)
            self.takeovers.labels("completed").inc()
        else:
            self.takeovers.labels(end.result).inc()
        if isinstance(end, tk.GivenUp) and end.result in ("not_active", "owner_renewed"):
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
