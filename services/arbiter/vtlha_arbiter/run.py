"""One move carried out: a ``vtlha.protocol.takeover.Mover`` whose outputs are done by
tasks (claim, read, release, acquire) whose results come back through a queue, its
events published without waiting, and the cluster view polled every ``POLL`` seconds
for the time, the group's record, the new owner's storage word, node down and whether
this activation still acts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vtlha import policy
from vtlha.bounded import bounded
from vtlha.eventstate import StartedMove, end_id
from vtlha.messages import GroupRecord, MoveNote, new_event_id
from vtlha.protocol import takeover as tk

if TYPE_CHECKING:
    from vtlha_arbiter.mover import Job, Mover

POLL = 0.005  # seconds between looks at the view while a move waits
#: seconds a claim's compare-and-set may take before its answer counts as unknown (then
#: the key is read: a claim that committed late is still ours)
CLAIM_TIMEOUT = 1.0

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
        # While re-reading after a lost claim, only the read's answer counts (the view may
        # be the very stale one the claim was decided on).
        if rec is not None and rec[1] > self.fed_revision \
                and m.phase is not tk.Phase.REREADING:
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
        job = self.job
        note = None
        if job.family is not None and job.move.old is not None:
            self.started_id = self.started_id or new_event_id()
            note = MoveNote(kind=job.family, old=job.move.old, started=self.started_id,
                            term=self.machine.term, reason=job.status)
        rec = GroupRecord(owner=c.owner, term=self.machine.term, epoch=c.epoch,
                          state="acquiring", renewed_by=self.host.node, move=note,
                          wait=c.wait)
        result: tk.ClaimResult
        try:
            rev = await bounded(self.mover.records.cas(c.group, rec, c.last), CLAIM_TIMEOUT)
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
            self.started_id = self.started_id or new_event_id()  # (as the claim noted)
            host.emit_soon(f"{kind}.started", job.status, inputs=job.inputs,
                           data={**rule, **job.data}, id=self.started_id, **self._common())
            self.mover.announced[m.group] = max(self.machine.epoch,
                                                self.mover.announced.get(m.group, 0))
            if m.old is not None:
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
            ids = {"id": end_id(started)} if started else {}
            if e.what == "completed":
                host.emit_soon(f"{kind}.completed", e.reason, data=data, **ids,
                               **self._common())
            else:
                host.emit_soon(f"{kind}.failed", e.reason, data=data, **ids,
                               **self._common())
        if ends:
            self.mover.forget_started(job.move.group, self.machine.epoch)
        if e.what == "completed" and job.announce:
            kind = "group.assigned" if job.move.kind is tk.Kind.ASSIGN else "group.resumed"
            host.emit_soon(kind, job.status, inputs=job.inputs, **self._common())
        elif e.what == "failed" and e.data.get("result") == "not_served" \
                and job.family is None:
            host.emit_soon("group.not_served", e.reason, data={"storage": e.reason},
                           **self._common())
