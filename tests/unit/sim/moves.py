"""The arbiter's moves: the shipped ``vtlha.protocol.takeover.Mover`` carried out as
``vtlha_arbiter.mover.Run`` carries it out — its outputs (claim, read, release,
acquire, emit) done over the simulated KV and commands, their results fed back; every
``POLL`` it also gets the time, the group's record as the arbiter's view has it, whether
the new owner is gone and whether the activation is still acting.

Not simulated: storage served/failed reports (moves are made with ``storage=False``) and
the events themselves (an ``Emit`` is only logged)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from vtlha_arbiter.mover import ACQUIRE_DEADLINE

from vtlha.messages import GroupRecord
from vtlha.protocol import takeover as tk

from . import kv as skv
from .nodes import Cmd, group_key
from .timings import executors_of

if TYPE_CHECKING:
    from .arbiter import ArbiterProc
    from .runner import Sim

POLL = 0.02  # seconds between the run's looks at the view (0.005 in the service)


class Run:
    def __init__(self, sim: Sim, arb: ArbiterProc, move: tk.Move) -> None:
        self.sim, self.arb, self.move = sim, arb, move
        t = sim.t
        now = arb.now()
        timings = tk.Timings(lease_ttl=t.lease_ttl, margin=t.margin,
                             acquire_deadline=ACQUIRE_DEADLINE, read_every=t.interval)
        self.machine: tk.Mover = sim.variant.mover(
            move, timings, term=arb.el.term,
            last_renewal_seen=arb.last_renewal.get(move.group),
            old_alive=move.old is not None and arb.alive(move.old))
        self.token = arb.token()
        self.gen = arb.gen  # the bucket generation the move was decided in
        self.fed = 0
        self.do(self.machine.start(now))
        sim.w.timer(arb.name, POLL, self.poll)

    def feed(self, fn: Callable[[float], list[tk.Output]]) -> None:
        if not self.machine.done:
            self.do(fn(self.arb.now()))

    def poll(self) -> None:
        m, arb = self.machine, self.arb
        if m.done:
            return
        now = arb.now()
        if not (arb.is_acting() and arb.token() == self.token):
            self.do(m.on_not_acting(now))
            return
        out: list[tk.Output] = []
        rec, rev = arb.records.get(self.move.group, (None, 0))
        if rec is not None and rev > self.fed:
            self.fed = rev
            out += m.on_record(rec, rev, now)
        if not arb.alive(self.move.new):
            out += m.on_node_down(self.move.new, now)
        self.do(out + m.tick(now))
        if not m.done:
            self.sim.w.timer(arb.name, POLL, self.poll)

    def do(self, outputs: list[tk.Output]) -> None:
        for o in outputs:
            if isinstance(o, tk.Claim):
                self.claim(o)
            elif isinstance(o, tk.Read):
                self.read(o.group)
            elif isinstance(o, tk.Release):
                self.release(o)
            elif isinstance(o, tk.Acquire):
                self.acquire(o)
            elif isinstance(o, tk.Emit):
                if o.what != "started":
                    self.sim.w.log(self.arb.name, "%s %s: %s", self.move.group, o.what,
                                   o.reason)
            else:
                self.sim.w.log(self.arb.name, "%s: %s", type(o).__name__, o.reason)
                if self.arb.runs.get(self.move.group) is self:
                    del self.arb.runs[self.move.group]

    # ---- the outputs' I/O --------------------------------------------------------------
    def claim(self, c: tk.Claim) -> None:
        """Only while this activation is still acting (as ``Run._claim``)."""
        s, arb = self.sim, self.arb
        if not (arb.is_acting() and arb.token() == self.token):
            self.feed(self.machine.on_not_acting)
            return
        rec = GroupRecord(owner=c.owner, term=self.machine.term, epoch=c.epoch,
                          state="acquiring", renewed_by=arb.host, since=0.0, wait=c.wait)

        def at_kv() -> skv.Answer:
            last = c.last
            if s.variant.claim_current and last is not None:
                last = s.kv.keys.get(group_key(c.group), (None, last))[1]
            return s.kv.update_now(group_key(c.group), rec, last, arb.name)

        def done(ans: skv.Answer | None) -> None:
            if isinstance(ans, skv.Ok) and s.trapped(arb.name, "crash-after-claim"):
                s.w.crash(arb.name)  # between the claim and the commands
                return
            if isinstance(ans, skv.Ok) and s.trapped(arb.name, "lose-claim-answer"):
                s.w.log(arb.name, "the claim committed at rev %d; its answer is lost",
                        ans.revision)
                ans = None
            if s.trapped(arb.name, "pause-after-claim"):
                s.w.pause(arb.name)
                s.w.after(2 * s.t.leader_ttl, lambda: s.w.resume(arb.name))
            if isinstance(ans, skv.Ok):
                arb.on_group(group_key(c.group), rec, ans.revision, self.gen)
            result: tk.ClaimResult = (tk.Won(ans.revision) if isinstance(ans, skv.Ok) else
                                      tk.Unknown() if ans is None else tk.Lost())
            s.w.log(arb.name, "claim %s for %s epoch %d against rev %s: %s", c.group,
                    c.owner, c.epoch, c.last, result)
            self.feed(partial(self.machine.on_claim, result))
        s.kv.call(arb.name, at_kv, done, timeout=s.t.command_timeout)

    def read(self, group: str) -> None:
        s, arb = self.sim, self.arb

        def done(ans: skv.Answer | None) -> None:
            if isinstance(ans, skv.Entry):
                arb.on_group(group_key(group), ans.value, ans.revision, self.gen)
            rec, rev = arb.records.get(group, (None, 0))  # the newest seen (monotonic)
            self.fed = max(self.fed, rev)
            self.feed(partial(self.machine.on_record, rec, rev))
        s.kv.call(arb.name, partial(s.kv.read_now, group_key(group)), done)

    def release(self, r: tk.Release) -> None:
        arb, t = self.arb, self.sim.t
        arb.broadcast([(r.node, svc) for svc in executors_of(r.group)],
                      Cmd(self.machine.term, r.group, r.epoch, "release", bucket=arb.bucket),
                      t.command_timeout,
                      lambda acks: self.feed(partial(self.machine.on_released, all(acks))))

    def acquire(self, a: tk.Acquire) -> None:
        arb = self.arb
        services = ("lease",) if a.only else (*executors_of(a.group), "lease")

        def done(acks: list[bool | None]) -> None:
            if a.only is None:
                self.feed(partial(self.machine.on_acquired, all(acks)))
        arb.broadcast([(a.node, svc) for svc in services],
                      Cmd(self.machine.term, a.group, a.epoch, "acquire", a.wait, arb.bucket),
                      ACQUIRE_DEADLINE, done)
