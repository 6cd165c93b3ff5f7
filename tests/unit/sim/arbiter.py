"""The arbiters: the shipped ``Election`` (driven as ``ElectionRunner`` drives it), the term
announcement and the hold-off (as ``vtlha_arbiter.term``), the reconciliation of a new
activation (as ``vtlha_arbiter.reconcile.Reconciler.tick``), the KV bucket's identity
read every ``BUCKET_CHECK`` and when an activation begins (as
``vtlha_arbiter.bucket.BucketWatch``: a recreated bucket starts the election and the view
afresh), and a stand-in for the failover policy (``vtlha.policy`` is not driven: see
``docs/safety.md``). Moves are the shipped takeover machine, carried out by ``moves``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from vtlha.messages import GroupRecord
from vtlha.protocol import takeover as tk
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

from . import kv as skv
from .moves import Run
from .nodes import BUCKET_CHECK, Cmd
from .timings import GROUPS, HOSTS, NODES, WITNESS, companion, home

if TYPE_CHECKING:
    from .runner import Sim

LEADER_KEY = "arbiter.leader"


@dataclass(frozen=True)
class LeaderValue:
    node: str
    incarnation: str
    term: int


class ArbiterProc:
    def __init__(self, sim: Sim, host: str) -> None:
        self.sim, self.host = sim, host
        self.name = f"{host}/arbiter"

    def now(self) -> float:
        return self.sim.w.local(self.host)

    def start(self) -> None:
        s, t = self.sim, self.sim.t
        self.incarnation = f"{self.host}#{s.w.procs[self.name].inc}"
        self.started = self.now()
        self.last_hb: dict[str, float] = {}
        self.busy = False
        self.bucket = ""  # the identity the current activation's commands carry
        #: the bucket the view belongs to (read at start, as ``BucketWatch.identity``)
        self.kv_bucket = s.kv.bucket
        self.gen = 0  # bumped on a new bucket: older answers are the old bucket's
        self.afresh()
        s.w.timer(self.name, 0.0, self.step)
        s.w.timer(self.name, s.w.rng.uniform(0.0, t.interval), self.decide_tick)
        # (a phase of its own that draws nothing from the world's random numbers, so
        # that a history without a recreated bucket is the same as before the check)
        phase = (s.w.seed + 3 * HOSTS.index(self.host) + s.w.procs[self.name].inc) % 10
        s.w.timer(self.name, BUCKET_CHECK * phase / 10, self.bucket_tick)

    def afresh(self) -> None:
        """The election and the view of the current bucket, from nothing (a start, or
        ``new_bucket``)."""
        s, t = self.sim, self.sim.t
        self.el = Election(self.host, self.incarnation, preferred=self.host == WITNESS,
                           leader_ttl=t.leader_ttl, standby_delay=t.standby_delay)
        self.records: dict[str, tuple[GroupRecord | None, int]] = {}
        self.last_renewal: dict[str, float] = {}
        #: the activation (term, active_since) announced to every executor
        self.announced: tuple[int, float | None] = (0, None)
        self.announcing: tuple[int, float | None] = (0, None)
        self.ready_at: float | None = None
        self.runs: dict[str, Run] = {}
        self.reconciled: tuple[int, float | None] | None = None
        self.requests: dict[str, str] = {}  # operator switchovers: group -> new owner
        s.kv.watch(self.name, "group.", partial(self.on_group, gen=self.gen),
                   s.plan.arbiter_lag)

    # ---- the KV bucket's identity, as ``vtlha_arbiter.bucket.BucketWatch`` ----------
    def bucket_tick(self) -> None:
        self.check_bucket()
        self.sim.w.timer(self.name, BUCKET_CHECK, self.bucket_tick)

    def check_bucket(self) -> bool:
        """Read the identity (when the KV answers); a new bucket starts this arbiter
        afresh on it (``main.Arbiter._new_bucket``). True when it did."""
        s = self.sim
        if not s.variant.arbiter_bucket or not s.kv.available(self.host) \
                or s.kv.bucket == self.kv_bucket:
            return False
        self.kv_bucket = s.kv.bucket
        self.gen += 1
        s.w.log(self.name, "new KV bucket: the election and the view start afresh")
        self.afresh()  # (the runs give up: this arbiter is not acting any more)
        return True

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
        el = self.el

        def done(ans: skv.Answer | None) -> None:
            self.busy = False
            if el is self.el:  # (not restarted on a new bucket meanwhile)
                el.on_result(self.now(), act, sent_at, self._result(act, ans))
            self.step()
        s.kv.call(self.name, lambda: self._leader_op(el, act), done)

    def _leader_op(self, el: Election, act: Action) -> skv.Answer:
        kv = self.sim.kv
        if act.op is Op.READ:
            return kv.read_now(LEADER_KEY)
        term = el.term if act.op is Op.RENEW else 0
        value = LeaderValue(self.host, el.incarnation, term)
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
        if self.check_bucket():  # the view must be of the bucket it won in
            return
        self.announcing = (term, since)
        self.sim.w.log(self.name, "active, term %d: announcing it", term)

        def announced() -> None:
            if self.el.is_active(self.now()) and (self.el.term, self.el.active_since) \
                    == (term, since):
                self.announced = (term, since)
                self.ready_at = since + self.sim.t.lease_ttl
        targets = [(n, svc) for n in NODES for svc in ("ip", "sm")]
        self.bucket = f"bucket-{self.kv_bucket}"  # the identity its view belongs to
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

    def on_group(self, key: str, value: GroupRecord | None, rev: int,
                 gen: int | None = None) -> None:
        """As ``ClusterView.set_record``: monotonic; a renewal by the owner seen now. An
        answer to a request of an older bucket generation is ignored (as
        ``GroupRecords``)."""
        if gen is not None and gen != self.gen:
            return
        group = key.removeprefix("group.")
        cur = self.records.get(group)
        if cur is not None and rev <= cur[1]:
            return
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

    def declared_down(self, node: str) -> bool:
        """As ``ClusterView.is_gone`` (roughly): no heartbeat for ``dead_after``, once
        this arbiter has run that long."""
        return not self.alive(node) and self.now() - self.started > self.sim.t.dead_after

    def alive(self, node: str) -> bool:
        hb = self.last_hb.get(node)
        return hb is not None and self.now() - hb <= self.sim.t.dead_after

    # ---- deciding (a stand-in for vtlha.policy) ---------------------------------------
    def token(self) -> tuple[int, float | None]:
        return (self.el.term, self.el.active_since)

    def decide_tick(self) -> None:
        self.sim.w.timer(self.name, self.sim.t.interval, self.decide_tick)
        if not self.is_acting():
            return
        if self.reconciled != self.token() and self.sim.variant.reconcile:
            self.reconcile()
        for g in GROUPS:
            run = self.runs.get(g)
            if run is None or not run.machine.blocks_policy:
                self.decide(g)

    def reconcile(self) -> None:
        """As ``Reconciler.tick``, once per activation after its hold-off: re-drive every
        group whose owner is alive (a resume: acquire commands, the lease holder's own
        gate); a group whose owner is not alive is the policy's."""
        self.reconciled = self.token()
        for g, (rec, _rev) in sorted(self.records.items()):
            run = self.runs.get(g)
            if rec is None or (run is not None and not run.machine.done) \
                    or not self.alive(rec.owner):
                continue
            self.start_move(tk.Move(tk.Kind.RESUME, g, rec.owner, epoch=rec.epoch))

    def decide(self, g: str) -> None:
        """A stand-in for the policy: a dead owner's group to its live companion, an
        operator's switchover, an absent key assigned, an acquisition left half done
        resumed."""
        rec, rev = self.records.get(g, (None, 0))
        if rec is None:
            node = home(g) if self.alive(home(g)) else companion(home(g))
            if self.alive(node):
                self.start_move(tk.Move(tk.Kind.ASSIGN, g, node))
            return
        other = companion(rec.owner)
        if not self.alive(rec.owner) and self.alive(other):
            renewed = self.last_renewal.get(g)
            if renewed is None or self.now() - renewed >= self.sim.t.dead_after:
                # (as policy.renews: an owner still renewing is not taken over)
                self.start_move(tk.Move(tk.Kind.TAKEOVER, g, other, rec.owner, rec.epoch,
                                        rev))
        elif g in self.requests:
            new = self.requests.pop(g)
            if new != rec.owner:
                self.start_move(tk.Move(tk.Kind.TAKEOVER, g, new, rec.owner, rec.epoch, rev))
        elif rec.state == "acquiring" and self.alive(rec.owner) and g not in self.runs:
            self.start_move(tk.Move(tk.Kind.RESUME, g, rec.owner, epoch=rec.epoch,
                                    revision=rev))

    def start_move(self, move: tk.Move) -> None:
        self.sim.w.log(self.name, "%s %s to %s (epoch seen %d, rev %s)", move.kind.value,
                       move.group, move.new, move.epoch, move.revision)
        self.runs[move.group] = Run(self.sim, self, move)

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
            if self.now() >= deadline or (svc != "term" and node in NODES
                                          and self.declared_down(node)):
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
