"""The KV bucket: keys with values and revisions, compare-and-set, watches.

One revision counter for the whole bucket (the stream sequence). The bucket's raft
leader sits on one host (the witness, as placement wants it). A request reaches the KV
when its client's host has a link to the leader's host, the leader has a majority, and
no raft election is under way (``down``: one is forced by a fault; one also runs when the
leader's host goes down or loses its majority, for ``election`` seconds, then a host with
a majority leads — the witness when it can; the leader steps back to the witness when it
returns); otherwise it is never answered and the client times out. The
answer can be lost or late: a write that committed then looks unavailable to its client.
A read may be answered by a follower that is behind (``stale``): an older value of the
key. A watch delivers every change in order, late by up to its lag; a stalled watch
delivers nothing until the stall ends (then everything it held back); a replayed watch
delivers an older value again. A recreated bucket starts its revisions above the old
one's (as an arbiter creates it; from 1 again when ``restart_revisions``), and the old
bucket's watches deliver nothing more."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .network import Network
from .timings import NODES, WITNESS, Timings
from .world import World

Value = Any
#: how far above the old bucket's last revision a recreated one starts (an arbiter's)
FIRST_REVISION_GAP = 1000


@dataclass(frozen=True)
class Ok:
    revision: int


@dataclass(frozen=True)
class Conflict:
    value: Value  # the key as read after the conflict (maybe stale; None: absent)
    revision: int


@dataclass(frozen=True)
class Entry:
    value: Value  # None: absent
    revision: int


Answer = Ok | Conflict | Entry


@dataclass
class Watcher:
    proc: str
    prefix: str
    deliver: Callable[[str, Value, int], None]
    lag: float
    last_t: float = 0.0
    stalled: bool = False
    held: list[tuple[str, Value, int]] = field(default_factory=list)


class KV:
    def __init__(self, world: World, net: Network, t: Timings) -> None:
        self.w, self.net, self.t = world, net, t
        self.rev = 0
        self.bucket = 1
        self.keys: dict[str, tuple[Value, int]] = {}
        self.history: dict[str, list[tuple[Value, int]]] = {}
        self.down = False  # a raft election forced by a fault: nobody gets an answer
        self.leader: str | None = WITNESS  # None: an election is under way
        self.election = 0.5  # how long an election takes here (4-8 s measured; scaled)
        net.on_change.append(self.on_topology)
        self.stale = 0.0  # probability that a read is answered by a lagging follower
        #: a recreated bucket's revisions start from 1 again (not created by an arbiter)
        self.restart_revisions = False
        self.watchers: list[Watcher] = []
        #: every committed write: (revision, key, value, who, client's send time)
        self.on_commit: list[Callable[[str, Value, int, str], None]] = []

    def available(self, host: str) -> bool:
        leader = self.leader
        return (not self.down and leader is not None and self.net.link_up(host, leader)
                and self.net.majority(leader))

    def on_topology(self) -> None:
        """A host or link changed: the leader lost (an election), or the witness back."""
        net, w = self.net, self.w
        if self.leader is not None and not net.majority(self.leader):
            w.log("kv", "the leader on %s lost its majority: election", self.leader)
            self.leader = None
            w.after(self.election, self.elect)
        elif self.leader not in (None, WITNESS) and net.majority(WITNESS):
            w.log("kv", "leader steps down towards the witness")
            self.leader = None
            w.after(0.02, self.elect)

    def elect(self) -> None:
        if self.leader is not None:
            return
        candidates = [h for h in (WITNESS, *NODES) if self.net.majority(h)]
        if not candidates:
            self.w.after(self.election, self.elect)
            return
        self.leader = candidates[0]
        self.w.log("kv", "leader elected on %s", self.leader)

    # ---- the server side ------------------------------------------------------------
    def _commit(self, key: str, value: Value, who: str) -> int:
        self.rev += 1
        self.keys[key] = (value, self.rev)
        self.history.setdefault(key, []).append((value, self.rev))
        for fn in self.on_commit:
            fn(key, value, self.rev, who)
        for wt in self.watchers:
            if key.startswith(wt.prefix):
                self._watch_send(wt, key, value, self.rev)
        return self.rev

    def read_now(self, key: str, stale_ok: bool = True) -> Entry:
        hist = self.history.get(key, [])
        if stale_ok and self.net.faulty and self.stale and hist \
                and self.w.rng.random() < self.stale:
            k = self.w.rng.randint(1, min(3, len(hist)))
            if k < len(hist) or key not in self.keys:
                value, rev = hist[-1 - k] if k < len(hist) else (None, 0)
                return Entry(value, rev)
        value, rev = self.keys.get(key, (None, 0))
        return Entry(value, rev)

    def update_now(self, key: str, value: Value, last: int | None, who: str) -> Answer:
        """Compare-and-set (``last`` None: create only if absent)."""
        cur = self.keys.get(key)
        if (last is None and cur is not None) or (last is not None
                                                  and (cur is None or cur[1] != last)):
            after = self.read_now(key)
            return Conflict(after.value, after.revision)
        return Ok(self._commit(key, value, who))

    def recreate(self) -> None:
        """The bucket lost and created again, empty: by an arbiter, its revisions start
        above every revision of the old one (``bus.kv_first_revision``: the clock in
        microseconds; here the old bucket's last revision + ``FIRST_REVISION_GAP``);
        created otherwise (``restart_revisions``) they start from 1 again. Every watch
        of the old bucket goes silent (its consumer went with the stream: nothing, not
        even a deletion, is delivered); a process learns of the new bucket only by
        reading its identity (``bucket``), and watches again."""
        self.bucket += 1
        rev = 0 if self.restart_revisions else self.rev + FIRST_REVISION_GAP
        self.w.log("kv", "bucket recreated: empty, revisions from %d", rev + 1)
        self.keys, self.history, self.rev = {}, {}, rev
        self.watchers = []

    # ---- the client side ---------------------------------------------------------------
    def call(self, proc: str, op: Callable[[], Answer], done: Callable[[Answer | None], None],
             timeout: float | None = None) -> None:
        """A request from process ``proc``: ``op`` runs at the KV; ``done`` gets its answer
        in ``proc``, or None after the timeout (the op may still have run)."""
        w = self.w
        host, inc = w.procs[proc].host, w.procs[proc].inc
        answered = [False]

        def finish(ans: Answer | None) -> None:
            if not answered[0]:
                answered[0] = True
                done(ans)

        w.after(timeout if timeout is not None else self.t.kv_timeout,
                lambda: w.run_in(proc, lambda: finish(None), inc))

        def at_server() -> None:
            if not self.available(host):
                return
            ans = op()
            wx = self.net.weather
            if self.net.faulty and wx.loss and w.rng.random() < wx.loss:
                return  # the answer is lost: the client times out

            def land() -> None:
                if self.available(host):
                    w.run_in(proc, lambda: finish(ans), inc)
            w.after(self.net.delay(), land)
        w.after(self.net.delay(), at_server)

    # ---- watches -------------------------------------------------------------------------
    def watch(self, proc: str, prefix: str, deliver: Callable[[str, Value, int], None],
              lag: float) -> Watcher:
        """Subscribe ``proc`` (its current incarnation) to ``prefix``: it gets the current
        value of every key, then every change. A restarted process subscribes again."""
        self.watchers = [wt for wt in self.watchers if wt.proc != proc]
        wt = Watcher(proc, prefix, deliver, lag)
        self.watchers.append(wt)
        for key, (value, rev) in sorted(self.keys.items(), key=lambda kv: kv[1][1]):
            if key.startswith(prefix):
                self._watch_send(wt, key, value, rev)
        return wt

    def _watch_send(self, wt: Watcher, key: str, value: Value, rev: int) -> None:
        w = self.w
        t = max(wt.last_t, w.now + w.rng.uniform(0.0, wt.lag))
        wt.last_t = t
        inc = w.procs[wt.proc].inc
        w.at(t, lambda: self._watch_land(wt, key, value, rev, inc))

    def _watch_land(self, wt: Watcher, key: str, value: Value, rev: int, inc: int) -> None:
        w = self.w
        if w.procs[wt.proc].inc != inc or wt not in self.watchers:
            return  # the process restarted, or this watch was stopped and replaced
        host = w.procs[wt.proc].host
        if wt.stalled or not self.available(host):
            if wt.stalled:
                wt.held.append((key, value, rev))
            else:  # the consumer catches up once its host is back
                w.after(0.05, lambda: self._watch_land(wt, key, value, rev, inc))
            return
        w.run_in(wt.proc, lambda: wt.deliver(key, value, rev), inc)

    def stall(self, proc: str) -> None:
        for wt in self.watchers:
            if wt.proc == proc:
                wt.stalled = True
                self.w.log(proc, "watch stalled")

    def unstall(self, proc: str) -> None:
        for wt in self.watchers:
            if wt.proc == proc and wt.stalled:
                wt.stalled = False
                self.w.log(proc, "watch resumed: %d held back", len(wt.held))
                held, wt.held = wt.held, []
                for key, value, rev in held:
                    self.w.run_in(wt.proc, partial(wt.deliver, key, value, rev))

    def replay(self, proc: str, key: str, back: int) -> None:
        """Deliver to ``proc``'s watch an older value of ``key``: ``back`` versions ago,
        or (``back`` 0) the last value of an older epoch than the current one."""
        hist = self.history.get(key, [])
        if back == 0:
            epoch = getattr(hist[-1][0], "epoch", 0) if hist else 0
            older = [h for h in hist if getattr(h[0], "epoch", 0) < epoch]
            if not older:
                return
            value, rev = older[-1]
        elif len(hist) <= back:
            return
        else:
            value, rev = hist[-1 - back]
        for wt in self.watchers:
            if wt.proc == proc and key.startswith(wt.prefix):
                self.w.log(proc, "watch replays %s at rev %d", key, rev)
                self._watch_send(wt, key, value, rev)
