"""A deterministic discrete-event simulator of DESIGN.md "Safety: no split brain".

One group ``g``, two nodes: A (the initial owner) and B. What is simulated:

- a **KV store** with compare-and-set on the group's key (a revision counter and the
  group's record); a node cut from it (or everyone, during an outage) gets no answer
  and times out; a write can commit and still time out at the client;
- each node's **lease holder** (the real ``LeaseHolder``), ticked every few ms, fed the
  KV watch (with a lag), the answers to its renewals, probes and promise requests, and
  the arbiter's acquire command;
- each node's **executor** (the real ``HoldGate``), fed its lease holder's notices (with
  a delay, possibly out of order) and the arbiter's commands; it handles a message at its
  next check (every few ms) once it is not paused. A paused executor keeps its state;
  its lease still runs out on the clock (that is what the kernel fence enforces), so
  "holds" is ``HoldGate.should_hold`` at every instant, on the node's own clock;
- a simplified **arbiter** that, at a given moment, claims the group for B by
  compare-and-set against the revision it last saw (its watch lags), sends a release to
  A's executor (A acknowledges once its gate no longer holds) and an acquire command to
  B's executor and lease holder, the latter with ``wait = 0`` if the release was
  acknowledged, else ``max(0, lease_ttl + margin - (now - when it last saw A's
  renewal))``; an acknowledgement that comes later sends a second acquire with wait 0.

Each node's monotonic clock has its own constant offset; the arbiter works in
durations only. Faults: link cuts (a node from the KV and the witness, A from B), a KV
outage for everyone (a raft election), process pauses, lease holder restarts, lost and
delayed messages. Time is a priority queue of timed events; the same scenario always
gives the same history.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

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

GROUP = "g"
A, B = "node-a", "node-b"
ARBITER = "arbiter"
NODES = (A, B)

Window = tuple[float, float]  # [start, end) in simulated time


@dataclass(frozen=True)
class Timings:
    lease_ttl: float = 0.3
    margin: float = 0.03
    interval: float = 0.1  # renewal cadence
    tick: float = 0.01  # lease holder tick period
    check: float = 0.005  # executor check period
    claim_retry: float = 0.02


@dataclass(frozen=True)
class Scenario:
    claim_at: float  # when the arbiter decides to move the group to B
    duration: float = 2.5
    seed: int = 0  # message delays and losses
    offsets: tuple[float, float] = (0.0, 0.0)  # A's and B's monotonic clock offsets
    max_delay: float = 0.002  # one-way message delay, uniform in [0, max_delay]
    slow: float = 0.0  # probability that a message is slow: up to slow_delay more
    slow_delay: float = 0.0
    loss: float = 0.0  # probability that a message (not a notice) is lost
    watch_lag: float = 0.005  # the nodes' KV watch
    arbiter_lag: float = 0.01  # the arbiter's KV watch
    notice_delay: float = 0.002  # lease holder -> executor on the same node
    release_timeout: float = 0.05  # the arbiter sends the acquire this long after claiming
    kv_timeout: float = 0.05  # a KV write not answered in this long counts as unavailable
    promise_timeout: float = 0.05  # a promise request not answered in this long: none
    kv_cut: tuple[tuple[str, Window], ...] = ()  # a node cut from the KV and the witness
    kv_outage: tuple[Window, ...] = ()  # nobody reaches the KV (an election)
    pair_cut: tuple[Window, ...] = ()  # A and B cannot talk (promise requests)
    pauses: tuple[tuple[str, Window], ...] = ()  # ("node-a/lease" or "node-a/exec", ...)
    restarts: tuple[tuple[str, float], ...] = ()  # a node's lease holder restarts then


@dataclass
class Result:
    overlap: float | None  # first instant both executors held the group
    claimed_at: float | None
    a_held_at: float | None  # first instant A held
    b_held_at: float | None  # first instant B held
    a_holds_at_end: bool
    b_holds_at_end: bool
    history: list[str] = field(default_factory=list)

    def story(self, last: int = 80) -> str:
        return "\n".join(self.history[-last:])


def _covering(windows: tuple[Window, ...], t: float) -> Window | None:
    for w in windows:
        if w[0] <= t < w[1]:
            return w
    return None


class Sim:
    """One history. ``holder`` builds the lease holders (a subclass may drop a rule);
    ``claim_against_current`` makes the arbiter claim without the last-seen revision."""

    def __init__(self, sc: Scenario, timings: Timings | None = None,
                 holder: type[LeaseHolder] = LeaseHolder,
                 claim_against_current: bool = False) -> None:
        self.sc, self.t = sc, timings or Timings()
        self.holder_cls, self.claim_against_current = holder, claim_against_current
        self.rng = random.Random(sc.seed)
        self.now = 0.0
        self._q: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.history: list[str] = []
        self.offset = {A: sc.offsets[0], B: sc.offsets[1]}
        self.cuts = {n: tuple(w for who, w in sc.kv_cut if who == n) for n in NODES}
        self.pauses = {f"{n}/{p}": tuple(w for who, w in sc.pauses if who == f"{n}/{p}")
                       for n in NODES for p in ("lease", "exec")}
        # the KV: the stream sequence (every write) and the group key's revision and value
        self.kv_seq = self.rev = 1
        self.record = GroupRecord(owner=A, term=1, epoch=1, state="held", renewed_by=A,
                                  since=0.0)
        self.watch_at = {A: 0.0, B: 0.0, ARBITER: 0.0}  # watches deliver in order
        self.holders = {n: self._new_holder(n, -10.0) for n in NODES}
        self.incarnation = dict.fromkeys(NODES, 0)
        self.gates = {n: HoldGate(self.t.margin) for n in NODES}
        self.exec_phase = {n: self.rng.uniform(0, self.t.check) for n in NODES}
        # the arbiter's view: revision, record, when it last saw A's renewal
        self.view_rev, self.view_rec, self.last_a_seen = self.rev, self.record, 0.0
        self.claimed_at: float | None = None
        self.acked = self.acquire_sent = False
        self.overlap: float | None = None
        self.first_held: dict[str, float | None] = dict.fromkeys(NODES)

    # ---- plumbing ------------------------------------------------------------------
    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._q, (max(t, self.now), next(self._seq), fn))

    def log(self, who: str, what: str) -> None:
        self.history.append(f"{self.now:8.4f} {who:8} {what}")

    def local(self, node: str) -> float:
        return self.now + self.offset[node]

    def delay(self) -> float:
        d = self.rng.uniform(0.0, self.sc.max_delay)
        if self.sc.slow > 0 and self.rng.random() < self.sc.slow:
            d += self.rng.uniform(0.0, self.sc.slow_delay)
        return d

    def lost(self) -> bool:
        return self.sc.loss > 0 and self.rng.random() < self.sc.loss

    def kv_ok(self, who: str, t: float) -> bool:
        """``who`` (a node or the arbiter) reaches the KV (and the witness) at ``t``."""
        if _covering(self.sc.kv_outage, t):
            return False
        return who == ARBITER or _covering(self.cuts[who], t) is None

    def pair_ok(self, t: float) -> bool:
        return _covering(self.sc.pair_cut, t) is None

    def paused_until(self, proc: str, t: float) -> float | None:
        end = None
        while (w := _covering(self.pauses[proc], t)) is not None:
            end = t = w[1]
        return end

    def send(self, link: Callable[[float], bool], deliver: Callable[[], None],
             what: str) -> None:
        """A message over the network: lost when the link is down at either end, or at
        random; otherwise delivered after a random delay."""
        if not link(self.now) or self.lost():
            self.log("net", f"lost: {what}")
            return
        arrive = self.now + self.delay()

        def land() -> None:
            if link(self.now):
                deliver()
            else:
                self.log("net", f"lost: {what}")
        self.at(arrive, land)

    # ---- lease holders --------------------------------------------------------------
    def _new_holder(self, node: str, started: float) -> LeaseHolder:
        return self.holder_cls(node=node, companion=B if node == A else A,
                               lease_ttl=self.t.lease_ttl, margin=self.t.margin,
                               interval=self.t.interval, started_at=started + self.offset[node])

    def to_holder(self, node: str, fn: Callable[[LeaseHolder, float], list[Effect]],
                  inc: int | None = None) -> None:
        """Run ``fn`` in the node's lease holder now, or when its pause ends. ``inc``: the
        answer is for that incarnation only (a restarted process never gets it)."""
        end = self.paused_until(f"{node}/lease", self.now)
        if end is not None:
            self.at(end, lambda: self.to_holder(node, fn, inc))
            return
        if inc is not None and inc != self.incarnation[node]:
            return
        self.carry_out(node, fn(self.holders[node], self.local(node)))

    def tick(self, node: str) -> None:
        self.at(self.now + self.t.tick, lambda: self.tick(node))
        if self.paused_until(f"{node}/lease", self.now) is None:
            self.carry_out(node, self.holders[node].tick(self.local(node)))

    def carry_out(self, node: str, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Renew):
                self.renew(node, e)
            elif isinstance(e, Notice):
                self.notify(node, e)
            elif isinstance(e, AskPromise):
                self.ask_promise(node, e)
            elif isinstance(e, Probe):
                self.probe(node)
            elif isinstance(e, Note):
                self.log(node, f"{e.kind}: {e.message}")

    def restart(self, node: str) -> None:
        self.incarnation[node] += 1
        self.holders[node] = self._new_holder(node, self.now)
        self.log(node, "lease holder restarted (forgot everything)")
        self.read(node)

    def read(self, node: str) -> None:
        """A restarted lease holder reads the key (retrying while cut off)."""
        if not self.kv_ok(node, self.now):
            self.at(self.now + 0.05, lambda: self.read(node))
            return
        rec, rev = self.record, self.rev
        self.at(self.now + 2 * self.delay(),
                lambda: self.to_holder(node, lambda h, now: h.on_record(GROUP, rec, rev, now)))

    # ---- the KV ----------------------------------------------------------------------
    def commit(self, rec: GroupRecord, by: str) -> None:
        self.kv_seq += 1
        self.rev, self.record = self.kv_seq, rec
        self.log("kv", f"rev {self.rev}: {rec.owner} epoch {rec.epoch} {rec.state} (by {by})")
        for who in (A, B, ARBITER):
            self.watch(who, self.rev, rec)

    def watch(self, who: str, rev: int, rec: GroupRecord) -> None:
        lag = self.sc.arbiter_lag if who == ARBITER else self.sc.watch_lag
        t = max(self.watch_at[who], self.now + self.rng.uniform(0.0, lag))
        while who != ARBITER and (w := _covering(self.cuts[who], t)) is not None:
            t = w[1] + self.delay()  # a cut-off node's watch catches up on reconnecting
        self.watch_at[who] = t
        if who == ARBITER:
            self.at(t, lambda: self.arbiter_sees(rev, rec))
        else:
            self.at(t, lambda: self.to_holder(
                who, lambda h, now: h.on_record(GROUP, rec, rev, now)))

    def kv_request(self, who: str, op: Callable[[], Callable[[], None] | None],
                   on_timeout: Callable[[], None], what: str) -> None:
        """A KV write: ``op`` runs at the server and returns the answer to deliver (or
        None for none); no answer within kv_timeout means unavailable."""
        done = [False]

        def once(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                if not done[0]:
                    done[0] = True
                    fn()
            return run

        self.at(self.now + self.sc.kv_timeout, once(on_timeout))

        def at_server() -> None:
            answer = op()
            if answer is not None:
                self.send(lambda t: self.kv_ok(who, t), once(answer), f"answer to {what}")
        self.send(lambda t: self.kv_ok(who, t), at_server, what)

    def renew(self, node: str, r: Renew) -> None:
        inc = self.incarnation[node]

        def answer(res: KvResult, rev: int | None = None, cur: GroupRecord | None = None,
                   cur_rev: int | None = None) -> Callable[[], None]:
            def deliver() -> None:
                self.log(node, f"renewal sent at {r.sent_at - self.offset[node]:.4f}: "
                         f"{res.value}")
                self.to_holder(node, lambda h, now: h.on_renew_result(
                    r.group, r.sent_at, res, revision=rev, current=cur,
                    current_revision=cur_rev, now=now), inc)
            return deliver

        def op() -> Callable[[], None]:
            if self.rev != r.last:
                return answer(KvResult.CONFLICT, cur=self.record, cur_rev=self.rev)
            self.commit(r.record, f"{node}'s renewal sent at "
                        f"{r.sent_at - self.offset[node]:.4f}")
            return answer(KvResult.OK, rev=self.rev)

        self.log(node, f"renew epoch {r.record.epoch} against rev {r.last}")
        self.kv_request(node, op, answer(KvResult.UNAVAILABLE), f"{node}'s renewal")

    def probe(self, node: str) -> None:
        inc = self.incarnation[node]

        def answer(res: KvResult) -> Callable[[], None]:
            def apply(h: LeaseHolder, now: float) -> list[Effect]:
                h.on_probe_result(res)
                return []
            return lambda: self.to_holder(node, apply, inc)

        def op() -> Callable[[], None]:
            self.kv_seq += 1  # a write to the node's own probe key
            return answer(KvResult.OK)

        self.kv_request(node, op, answer(KvResult.UNAVAILABLE), f"{node}'s probe")

    # ---- notices and promises ---------------------------------------------------------
    def notify(self, node: str, n: Notice) -> None:
        off = self.offset[node]
        self.log(node, f"notice epoch {n.epoch} "
                 + ("revoked" if n.revoked else f"valid until {n.valid_until - off:.4f}")
                 + (f" ({n.reason})" if n.reason else ""))
        self.at(self.now + self.rng.uniform(0.0, self.sc.notice_delay),
                lambda: self.to_exec(node, lambda g, now: g.on_notice(
                    n.group, n.epoch, n.valid_until, n.revoked)))

    def ask_promise(self, node: str, ap: AskPromise) -> None:
        inc, comp, done = self.incarnation[node], ap.companion, [False]

        def answer(ans: PromiseAnswer | None) -> None:
            if done[0]:
                return
            done[0] = True
            self.log(node, "promise: " + ("no answer" if ans is None else
                                          f"granted={ans.granted} {ans.duration:.3f} s"))
            self.to_holder(node, lambda h, now: h.on_promise_reply(ap.sent_at, ans,
                                                                   ap.groups), inc)

        def at_companion(h: LeaseHolder, now: float) -> list[Effect]:
            ans = h.on_promise_request(node, list(ap.groups), ap.duration, now)
            self.log(comp, f"promise to {node}: {ans.granted} ({ans.reason})")
            self.send(self.pair_ok, lambda: answer(ans), "promise reply")
            return []

        self.log(node, f"asks {comp} for a promise of {ap.duration:.3f} s")
        self.at(self.now + self.sc.promise_timeout, lambda: answer(None))
        self.send(self.pair_ok, lambda: self.to_holder(comp, at_companion), "promise request")

    # ---- executors ---------------------------------------------------------------------
    def next_check(self, node: str, t: float) -> float:
        p = self.exec_phase[node]
        return max(t, p + math.ceil((t - p) / self.t.check) * self.t.check)

    def to_exec(self, node: str, fn: Callable[[HoldGate, float], None]) -> None:
        """The executor handles a message at its next check once it is not paused."""
        def run() -> None:
            end = self.paused_until(f"{node}/exec", self.now)
            if end is not None:
                self.at(self.next_check(node, end), run)
                return
            fn(self.gates[node], self.local(node))
        self.at(self.next_check(node, self.now), run)

    # ---- the arbiter --------------------------------------------------------------------
    def arbiter_sees(self, rev: int, rec: GroupRecord) -> None:
        if rev > self.view_rev:
            self.view_rev, self.view_rec = rev, rec
            if rec.owner == A:
                self.last_a_seen = self.now

    def claim(self) -> None:
        rec = GroupRecord(owner=B, term=1, epoch=self.view_rec.epoch + 1, state="acquiring",
                          since=0.0)
        last, seen = self.view_rev, self.last_a_seen
        self.log(ARBITER, f"claims for B against rev {last} (A last seen at {seen:.4f})")

        def at_kv() -> None:
            expected = self.rev if self.claim_against_current else last
            ok = self.kv_ok(ARBITER, self.now) and self.rev == expected
            if ok:
                self.commit(rec, "the arbiter's claim")
            self.at(self.now + self.delay(),
                    (lambda: self.claimed(rec.epoch, seen)) if ok else self.claim_failed)
        self.at(self.now + self.delay(), at_kv)

    def claim_failed(self) -> None:
        self.log(ARBITER, "claim failed; retrying with fresh information")
        self.at(self.now + self.t.claim_retry, self.claim)

    def claimed(self, epoch: int, a_seen: float) -> None:
        self.claimed_at = self.now
        self.log(ARBITER, f"claimed epoch {epoch}; release to A, acquire to B")

        def release(g: HoldGate, now: float) -> None:
            g.on_release(GROUP)
            if not g.should_hold(GROUP, now):
                self.send(lambda t: self.kv_ok(A, t), lambda: self.on_ack(epoch),
                          "A's release ack")
        self.send(lambda t: self.kv_ok(A, t), lambda: self.to_exec(A, release),
                  "release to A")
        self.at(self.now + self.rng.uniform(0.0, self.sc.release_timeout),
                lambda: self.send_acquire(epoch, a_seen))

    def on_ack(self, epoch: int) -> None:
        self.log(ARBITER, "A acknowledged the release")
        self.acked = True
        if self.acquire_sent:
            self.acquire_to_holder(epoch, 0.0)

    def send_acquire(self, epoch: int, a_seen: float) -> None:
        if self.acquire_sent:
            return
        self.acquire_sent = True
        tm = self.t
        wait = 0.0 if self.acked else max(0.0, tm.lease_ttl + tm.margin - (self.now - a_seen))
        self.send(lambda t: self.kv_ok(B, t),
                  lambda: self.to_exec(B, lambda g, now: g.on_acquire(GROUP, epoch)),
                  "acquire to B's executor")
        self.acquire_to_holder(epoch, wait)

    def acquire_to_holder(self, epoch: int, wait: float) -> None:
        self.log(ARBITER, f"acquire to B's lease holder, wait {wait:.4f}")
        self.send(lambda t: self.kv_ok(B, t), lambda: self.to_holder(
            B, lambda h, now: h.on_acquire_command(GROUP, epoch, wait, now)),
            "acquire to B's lease holder")

    # ---- running -------------------------------------------------------------------------
    def holds(self, node: str) -> bool:
        return self.gates[node].should_hold(GROUP, self.local(node))

    def check(self) -> None:
        held = {n: self.holds(n) for n in NODES}
        for n in NODES:
            if held[n] and self.first_held[n] is None:
                self.first_held[n] = self.now
                self.log(n, "executor holds g")
        if held[A] and held[B]:
            self.overlap = self.now
            self.log("OVERLAP", "both executors hold g")

    def start(self) -> None:
        self.gates[A].on_acquire(GROUP, 1)  # A's executor accepted acquire epoch 1 long ago
        rec, rev = self.record, self.rev
        for n in NODES:
            self.at(0.0, partial(self.to_holder, n,
                                 lambda h, now: h.on_record(GROUP, rec, rev, now)))
            self.at(self.rng.uniform(0.0, self.t.tick), partial(self.tick, n))
        for node, t in self.sc.restarts:
            self.at(t, partial(self.restart, node))
        self.at(self.sc.claim_at, self.claim)

    def run(self) -> Result:
        self.start()
        while self._q and self.overlap is None:
            t, _, fn = heapq.heappop(self._q)
            if t > self.sc.duration:
                break
            self.now = t
            fn()
            if not self._q or self._q[0][0] > t:  # every event of this instant is done
                self.check()
        return Result(self.overlap, self.claimed_at, self.first_held[A], self.first_held[B],
                      self.holds(A), self.holds(B), self.history)


def simulate(sc: Scenario, timings: Timings | None = None,
             holder: type[LeaseHolder] = LeaseHolder,
             claim_against_current: bool = False) -> Result:
    return Sim(sc, timings, holder, claim_against_current).run()


# ---- random scenarios ---------------------------------------------------------------------


class Chooser(Protocol):
    """Where a scenario's choices come from: hypothesis (which shrinks them) or a seeded
    ``random.Random``."""

    def uniform(self, lo: float, hi: float) -> float: ...

    def chance(self, p: float) -> bool: ...

    def integer(self, lo: int, hi: int) -> int: ...


@dataclass
class RandomChooser:
    rng: random.Random

    def uniform(self, lo: float, hi: float) -> float:
        return self.rng.uniform(lo, hi)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


TRIGGERS = ("switchover", "A cut from the KV", "A isolated", "A paused", "KV outage")


def draw_scenario(c: Chooser, duration: float = 2.5) -> Scenario:
    """A takeover at a random moment, usually for a reason (the trigger: a fault of A's
    or a KV outage that starts shortly before it), with more faults around it."""
    claim_at = c.uniform(0.2, 1.4)

    def window(lo: float, hi: float, longest: float) -> Window:
        start = c.uniform(max(0.0, lo), hi)
        return (start, start + c.uniform(0.005, longest))

    def windows(p: float) -> tuple[Window, ...]:
        return tuple(window(claim_at - 0.7, claim_at + 0.5, 0.8)
                     for _ in range(2) if c.chance(p))

    trigger = TRIGGERS[c.integer(0, len(TRIGGERS) - 1)]
    cause = window(claim_at - 0.5, claim_at, 1.5)
    kv_cut = tuple((n, w) for n in NODES for w in windows(0.2))
    pauses = tuple((f"{n}/{p}", w) for n in NODES for p in ("lease", "exec")
                   for w in windows(0.15))
    pair_cut, kv_outage = windows(0.2), windows(0.2)
    if trigger in ("A cut from the KV", "A isolated"):
        kv_cut += ((A, cause),)
    if trigger == "A isolated":
        pair_cut += (cause,)
    if trigger == "A paused":
        pauses += tuple((f"{A}/{p}", cause) for p in ("lease", "exec") if c.chance(0.7))
    if trigger == "KV outage":
        kv_outage += (cause,)
    restarts = tuple((n, c.uniform(max(0.0, claim_at - 0.5), claim_at + 0.5))
                     for n in NODES if c.chance(0.15))
    return Scenario(
        claim_at=claim_at, duration=duration, seed=c.integer(0, 2**31),
        offsets=(c.uniform(0.0, 1e4), c.uniform(0.0, 1e4)),
        max_delay=c.uniform(0.0005, 0.02),
        slow=c.uniform(0.0, 0.3) if c.chance(0.3) else 0.0, slow_delay=c.uniform(0.0, 0.25),
        kv_timeout=c.uniform(0.02, 0.25), promise_timeout=c.uniform(0.02, 0.25),
        loss=c.uniform(0.0, 0.3) if c.chance(0.3) else 0.0,
        watch_lag=c.uniform(0.0, 0.15 if c.chance(0.3) else 0.02),
        arbiter_lag=c.uniform(0.0, 0.3), notice_delay=c.uniform(0.0, 0.02),
        release_timeout=c.uniform(0.0, 0.2), kv_cut=kv_cut, kv_outage=kv_outage,
        pair_cut=pair_cut, pauses=pauses, restarts=restarts)
