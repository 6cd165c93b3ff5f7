"""The arbiters: the shipped ``Election`` (driven as ``ElectionRunner`` drives it), the term
announcement, the hold-off, a stand-in for the failover policy, and the mover.

The mover carries out claim -> release -> acquire with the shipped takeover rules
(``vtlha.protocol.takeover``: ``claim_epoch``, ``acquire_wait``); the sequence itself is
the arbiter service's (``vtlha_arbiter.main``: ``claim``, ``finish_takeover``,
``_resume``), which has no sans-I/O form yet: see ``docs/safety.md`` "The simulator"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vtlha.messages import GroupRecord
from vtlha.protocol.election import (
    Absent,
    Action,
    Conflict,
    Election,
    Held,
    Ok,
    Op,
    ReadResult,
    Unavailable,
    WriteResult,
)
from vtlha.protocol.takeover import claim_epoch

from . import kv as skv
from .nodes import Cmd, group_key
from .timings import GROUPS, NODES, WITNESS, companion, executors_of, home

if TYPE_CHECKING:
    from .runner import Sim

LEADER_KEY = "arbiter.leader"


@dataclass(frozen=True)
class LeaderValue:
    node: str
    incarnation: str
    term: int


@dataclass
class Move:
    group: str
    new: str
    epoch: int
    deadline: float


class ArbiterProc:
    def __init__(self, sim: Sim, host: str) -> None:
        self.sim, self.host = sim, host
        self.name = f"{host}/arbiter"

    def now(self) -> float:
        return self.sim.w.local(self.host)

    def start(self) -> None:
        s, t = self.sim, self.sim.t
        inc = s.w.procs[self.name].inc
        self.el = Election(self.host, f"{self.host}#{inc}", preferred=self.host == WITNESS,
                           leader_ttl=t.leader_ttl, standby_delay=t.standby_delay)
        self.started = self.now()
        self.records: dict[str, tuple[GroupRecord | None, int]] = {}
        self.last_renewal: dict[str, float] = {}
        self.last_hb: dict[str, float] = {}
        #: the activation (term, active_since) announced to every executor
        self.announced: tuple[int, float | None] = (0, None)
        self.announcing: tuple[int, float | None] = (0, None)
        self.ready_at: float | None = None
        self.in_flight: dict[str, Move] = {}
        self.requests: dict[str, str] = {}  # operator switchovers: group -> new owner
        self.busy = False
        self.bucket = ""
        s.kv.watch(self.name, "group.", self.on_group, s.plan.arbiter_lag)
        s.w.timer(self.name, 0.0, self.step)
        s.w.timer(self.name, s.w.rng.uniform(0.0, t.interval), self.decide_tick)

    # ---- the election, as ElectionRunner carries it out ---------------------------
    def step(self) -> None:
        s = self.sim
        if self.busy:
            return
        act = self.el.next_action(self.now())
        if act is None:
            self.after_election()
            wake = self.el.wake_at(self.now())
            s.w.timer(self.name, max(0.001, min(wake - self.now(), self.el.poll_every)),
                      self.step)
            return
        self.busy = True
        sent_at = self.now()

        def done(ans: skv.Answer | None) -> None:
            self.busy = False
            self.el.on_result(self.now(), act, sent_at, self._result(act, ans))
            self.step()
        s.kv.call(self.name, lambda: self._leader_op(act), done)

    def _leader_op(self, act: Action) -> skv.Answer:
        kv = self.sim.kv
        if act.op is Op.READ:
            return kv.read_now(LEADER_KEY)
        term = self.el.term if act.op is Op.RENEW else 0
        value = LeaderValue(self.host, self.el.incarnation, term)
        return kv.update_now(LEADER_KEY, value, None if act.op is Op.CREATE else act.last,
                             self.name)

    @staticmethod
    def _result(act: Action, ans: skv.Answer | None) -> ReadResult | WriteResult:
        if ans is None:
            return Unavailable()
        if isinstance(ans, skv.Entry):
            v = ans.value
            return Absent() if not isinstance(v, LeaderValue) else Held(
                v.node, ans.revision, v.incarnation, v.term)
        return Ok(ans.revision) if isinstance(ans, skv.Ok) else Conflict()

    def after_election(self) -> None:
        """Each activation (as ``_on_election_change``): announce the term to every
        executor (acked, retried for up to lease_ttl), and act only then, and no sooner
        than lease_ttl after becoming active (the hold-off)."""
        now = self.now()
        since = self.el.active_since
        if not self.el.is_active(now) or since is None:
            return
        term = self.el.term
        if self.announcing == (term, since):
            return
        self.announcing = (term, since)
        self.sim.w.log(self.name, "active, term %d: announcing it", term)

        def announced() -> None:
            if self.el.is_active(self.now()) and (self.el.term, self.el.active_since) \
                    == (term, since):
                self.announced = (term, since)
                self.ready_at = since + self.sim.t.lease_ttl
        targets = [(n, svc) for n in NODES for svc in ("ip", "sm")]
        self.bucket = f"bucket-{self.sim.kv.bucket}"  # the arbiter reads it as it acts
        self.broadcast(targets, Cmd(term, "", 0, "term", bucket=self.bucket),
                       self.sim.t.lease_ttl,
                       lambda _acks: announced())

    def is_acting(self) -> bool:
        now = self.now()
        return (self.el.is_active(now) and self.announced == (self.el.term,
                                                              self.el.active_since)
                and self.ready_at is not None and now >= self.ready_at)

    # ---- inputs ---------------------------------------------------------------------
    def on_heartbeat(self, node: str) -> None:
        self.sim.w.run_in(self.name, lambda: self.last_hb.__setitem__(node, self.now()))

    def on_group(self, key: str, value: GroupRecord | None, rev: int) -> None:
        group = key.removeprefix("group.")
        self.records[group] = (value, rev)
        if value is not None and value.state == "held" and value.renewed_by == value.owner:
            self.last_renewal[group] = self.now()

    def on_request(self, group: str) -> None:
        """An operator's switchover, carried out only by an arbiter active now."""
        if self.el.is_active(self.now()):
            rec = self.records.get(group, (None, 0))[0]
            if rec is not None:
                self.requests[group] = companion(rec.owner)
                self.sim.w.log(self.name, "operator: switch %s over to %s", group,
                               self.requests[group])

    def alive(self, node: str) -> bool:
        hb = self.last_hb.get(node)
        return hb is not None and self.now() - hb <= self.sim.t.dead_after

    # ---- deciding (a stand-in for vtlha.policy) ---------------------------------------
    def decide_tick(self) -> None:
        self.sim.w.timer(self.name, self.sim.t.interval, self.decide_tick)
        if self.is_acting():
            for g in GROUPS:
                self.decide(g)

    def decide(self, g: str) -> None:
        move = self.in_flight.get(g)
        if move is not None:
            rec = self.records.get(g, (None, 0))[0]
            done = rec is not None and (rec.epoch > move.epoch or (
                rec.epoch == move.epoch and rec.state == "held"))
            gone = not self.alive(move.new)  # as _wait_held: the new owner went down
            if not done and not gone and self.now() < move.deadline:
                return
            del self.in_flight[g]
        rec, rev = self.records.get(g, (None, 0))
        if rec is None:
            node = home(g) if self.alive(home(g)) else companion(home(g))
            if self.alive(node):
                self.sim.mover.assign(self, g, node)
            return
        other = companion(rec.owner)
        if not self.alive(rec.owner) and self.alive(other):
            self.sim.mover.takeover(self, g, rec, rev, other, "owner down")
        elif g in self.requests:
            new = self.requests.pop(g)
            if new != rec.owner:
                self.sim.mover.takeover(self, g, rec, rev, new, "operator switchover")
        elif rec.state == "acquiring" and self.alive(rec.owner):
            self.sim.mover.resume(self, g, rec)

    # ---- commands ---------------------------------------------------------------------
    def command(self, node: str, svc: str, cmd: Cmd, deadline: float,
                done: Callable[[bool | None], None]) -> None:
        """Send ``cmd`` to ``node``'s ``svc``, retried until acknowledged or ``deadline``
        (this host's clock): ``done`` gets the ack (None: none in time)."""
        s = self.sim
        target = f"{node}/{svc}"
        inc, finished = s.w.procs[self.name].inc, [False]

        def ack(ok: bool) -> None:
            if not finished[0]:
                finished[0] = True
                done(ok)

        def attempt() -> None:
            if finished[0]:
                return
            if self.now() >= deadline:
                finished[0] = True
                done(None)
                return

            def at_target() -> None:
                def reply(ok: bool) -> None:
                    s.net.send(node, self.host,
                               lambda: s.w.run_in(self.name, lambda: ack(ok), inc))
                proc = s.leases[node] if svc == "lease" else s.execs[target]
                s.w.run_in(target, lambda: proc.on_command(cmd, reply))
            s.net.send(self.host, node, at_target)
            s.w.timer(self.name, min(0.05, s.t.command_timeout), attempt)
        attempt()

    def broadcast(self, targets: list[tuple[str, str]], cmd: Cmd, within: float,
                  done: Callable[[list[bool | None]], None]) -> None:
        acks: list[bool | None] = []
        deadline = self.now() + within

        def one(ok: bool | None) -> None:
            acks.append(ok)
            if len(acks) == len(targets):
                done(acks)
        for node, svc in targets:
            self.command(node, svc, cmd, deadline, one)


class Mover:
    """Claim -> release -> acquire, as ``vtlha_arbiter.main`` carries it out, with the
    shipped rules; ``acquire_wait`` and ``claim_current`` are where mutants go."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    def record(self, arb: ArbiterProc, owner: str, epoch: int) -> GroupRecord:
        return GroupRecord(owner=owner, term=arb.el.term, epoch=epoch, state="acquiring",
                           renewed_by=arb.host, since=0.0)

    def assign(self, arb: ArbiterProc, g: str, node: str) -> None:
        s = self.sim
        arb.in_flight[g] = Move(g, node, 1, arb.now() + s.t.acquire_deadline)

        def done(ans: skv.Answer | None) -> None:
            if isinstance(ans, skv.Ok):
                arb.on_group(group_key(g), self.record(arb, node, 1), ans.revision)
                self.acquire(arb, g, node, 1, 0.0)
        s.kv.call(arb.name, lambda: s.kv.update_now(group_key(g), self.record(arb, node, 1),
                                                    None, arb.name), done)

    def takeover(self, arb: ArbiterProc, g: str, rec: GroupRecord, rev: int, new: str,
                 why: str) -> None:
        s = self.sim
        epoch = claim_epoch(rec.epoch)
        claim = self.record(arb, new, epoch)
        arb.in_flight[g] = Move(g, new, epoch, arb.now() + s.t.acquire_deadline)
        s.w.log(arb.name, "claims %s for %s at epoch %d against rev %d (%s)", g, new, epoch,
                rev, why)

        def at_kv() -> skv.Answer:
            last = s.kv.keys.get(group_key(g), (None, rev))[1] if s.variant.claim_current \
                else rev
            return s.kv.update_now(group_key(g), claim, last, arb.name)

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
            if not isinstance(ans, skv.Ok):
                arb.in_flight.pop(g, None)
                s.w.log(arb.name, "claim of %s lost: %s", g, ans)
                self.reread(arb, g)
                return
            arb.on_group(group_key(g), claim, ans.revision)
            self.finish(arb, g, rec.owner, new, epoch)
        s.kv.call(arb.name, at_kv, done)

    def reread(self, arb: ArbiterProc, g: str) -> None:
        """A lost compare-and-set: read the key again, the next decision uses it."""
        s = self.sim
        if not s.variant.reread_after_lost_claim:
            return

        def done(ans: skv.Answer | None) -> None:
            if isinstance(ans, skv.Entry) and ans.revision > arb.records.get(g, (None, 0))[1]:
                arb.on_group(group_key(g), ans.value, ans.revision)
        s.kv.call(arb.name, lambda: s.kv.read_now(group_key(g)), done)

    def finish(self, arb: ArbiterProc, g: str, old: str, new: str, epoch: int) -> None:
        """Release to the old owner's executors and acquire to the new owner's, with the
        safe wait; every release acknowledged: a second acquire with wait 0."""
        s = self.sim
        if not arb.is_acting():
            arb.in_flight.pop(g, None)
            return
        wait = s.variant.acquire_wait(released_all=False,
                                      last_renewal_seen=arb.last_renewal.get(g),
                                      now=arb.now(), lease_ttl=s.t.lease_ttl,
                                      margin=s.t.margin)
        term = arb.el.term

        def released(acks: list[bool | None]) -> None:
            if all(acks) and wait > 0:
                arb.command(new, "lease", Cmd(term, g, epoch, "acquire", 0.0, arb.bucket),
                            arb.now() + s.t.acquire_deadline, lambda _ok: None)
        arb.broadcast([(old, svc) for svc in executors_of(g)],
                      Cmd(term, g, epoch, "release", bucket=arb.bucket), s.t.command_timeout,
                      released)
        self.acquire(arb, g, new, epoch, wait)

    def acquire(self, arb: ArbiterProc, g: str, node: str, epoch: int,
                wait: float | None) -> None:
        s = self.sim
        targets = [(node, svc) for svc in (*executors_of(g), "lease")]
        arb.broadcast(targets, Cmd(arb.el.term, g, epoch, "acquire", wait, arb.bucket),
                      s.t.acquire_deadline, lambda _acks: None)

    def resume(self, arb: ArbiterProc, g: str, rec: GroupRecord) -> None:
        """Finish an acquisition left half done (the lease holder keeps its own gate)."""
        s = self.sim
        arb.in_flight[g] = Move(g, rec.owner, rec.epoch, arb.now() + s.t.acquire_deadline)
        s.w.log(arb.name, "resumes %s for %s at epoch %d", g, rec.owner, rec.epoch)
        self.acquire(arb, g, rec.owner, rec.epoch, None)
