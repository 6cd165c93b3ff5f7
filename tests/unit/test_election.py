"""The active-arbiter election (``vtlha.protocol.election``): a table per rule, then a
property over random interleavings of several arbiters sharing a simulated CAS store."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtlha.protocol.election import (
    Absent,
    Action,
    Conflict,
    Election,
    Held,
    KeyView,
    Ok,
    Op,
    ReadResult,
    Role,
    Unavailable,
    WriteResult,
)

TTL, DELAY = 3.0, 1.0  # leader_ttl, leader_standby_delay: renew every 1.0, poll every 0.5
ME = "me"


def machine(preferred: bool = True, node: str = "witness", incarnation: str = ME,
            ttl: float = TTL, delay: float = DELAY) -> Election:
    return Election(node, incarnation, preferred=preferred, leader_ttl=ttl, standby_delay=delay)


def do(m: Election, t: float, op: Op, result: ReadResult | WriteResult,
       last: int | None = None, arrives: float | None = None) -> Action:
    """Assert the machine wants ``op`` (against ``last``) at ``t``, and give it ``result``
    arriving at ``arrives`` (default: at once)."""
    action = m.next_action(t)
    assert action is not None and action.op is op, f"at {t}: wanted {op}, got {action}"
    if last is not None:
        assert action.last == last, f"at {t}: {op} against {action.last}, not {last}"
    m.on_result(t if arrives is None else arrives, action, t, result)
    return action


def claim(m: Election, t: float) -> Action | None:
    """The create or take-over the machine would attempt at ``t`` (None: none)."""
    a = m.next_action(t)
    return a if a is not None and a.op in (Op.CREATE, Op.TAKE_OVER) else None


def won(m: Election, t: float = 0.0, rev: int = 1) -> Election:
    """Read the key absent and create it at ``t`` (a preferred machine)."""
    do(m, t, Op.READ, Absent())
    do(m, t, Op.CREATE, Ok(rev))
    assert m.is_active(t) and m.term == rev
    return m


# ---- tables: one per rule ---------------------------------------------------------

# (case, preferred, what is seen at which time, no claim at, claim at, its op, its last)
CLAIMS = [
    ("witness creates an absent key at once", True, [(0.0, Absent())], None, 0.0, Op.CREATE,
     None),
    ("a node waits the standby delay from when it saw the key absent", False,
     [(0.0, Absent()), (0.5, Absent())], 0.99, 1.0, Op.CREATE, None),
    ("witness takes over leader_ttl after it saw the revision", True,
     [(0.0, Held("node-a", 5))], 2.99, 3.0, Op.TAKE_OVER, 5),
    ("a node takes over leader_ttl + delay after it saw the revision", False,
     [(0.0, Held("witness", 5))], 3.99, 4.0, Op.TAKE_OVER, 5),
    ("the lapse counts from when this standby saw the revision", True,
     [(10.0, Held("node-a", 5))], 12.99, 13.0, Op.TAKE_OVER, 5),
    ("a new revision restarts the count", True,
     [(0.0, Held("node-a", 5)), (2.0, Held("node-a", 6))], 4.99, 5.0, Op.TAKE_OVER, 6),
    ("the same revision read again does not", True,
     [(0.0, Held("node-a", 5)), (2.0, Held("node-a", 5))], 2.99, 3.0, Op.TAKE_OVER, 5),
    ("a stale read (older revision) is ignored", True,
     [(0.0, Held("node-a", 6)), (1.0, Held("node-a", 5))], 2.99, 3.0, Op.TAKE_OVER, 6),
    ("a failed read changes nothing: the lapse still counts from the revision seen", True,
     [(0.0, Held("node-a", 5)), (1.0, Unavailable()), (2.0, Unavailable())], 2.99, 3.0,
     Op.TAKE_OVER, 5),
    ("an absent key after a held one counts as a change", False,
     [(0.0, Held("node-a", 5)), (2.0, Absent())], 2.99, 3.0, Op.CREATE, None),
    ("a restarted arbiter on the same node is someone else (new incarnation)", True,
     [(0.0, Held("witness", 5, incarnation="old"))], 2.99, 3.0, Op.TAKE_OVER, 5),
]


@pytest.mark.parametrize(("case", "preferred", "seen", "quiet", "due", "op", "last"), CLAIMS,
                         ids=[c[0] for c in CLAIMS])
def test_when_a_standby_claims_the_key(case: str, preferred: bool,
                                       seen: list[tuple[float, ReadResult]],
                                       quiet: float | None, due: float, op: Op,
                                       last: int | None) -> None:
    m = machine(preferred=preferred, node="witness" if preferred else "node-b")
    for t, key in seen:
        action = m.next_action(t)
        assert action is not None and action.op is Op.READ
        m.on_result(t, action, t, key)
    if quiet is not None:
        assert claim(m, quiet) is None
        assert not m.is_active(quiet)
    action = claim(m, due)
    assert action is not None and action.op is op and action.last == last
    assert m.wake_at(seen[-1][0]) <= due


def test_standby_polls_every_leader_ttl_over_6() -> None:
    m = machine(preferred=False, node="node-b")
    do(m, 0.0, Op.READ, Held("witness", 5))
    assert m.next_action(0.49) is None
    assert m.wake_at(0.1) == pytest.approx(0.5)
    do(m, 0.5, Op.READ, Held("witness", 6))
    do(m, 1.0, Op.READ, Unavailable())
    assert m.next_action(1.1) is None  # a failed read is retried after leader_ttl/6
    do(m, 1.5, Op.READ, Held("witness", 7))


# (case, renewal results with their send and arrival times, then (t, is_active) checks)
RENEWALS: list[tuple[str, list[tuple[float, float, WriteResult]], list[tuple[float, bool]]]] = [
    ("renewed every leader_ttl/3 stays active",
     [(1.0, 1.0, Ok(2)), (2.0, 2.0, Ok(3)), (3.0, 3.0, Ok(4))], [(5.99, True), (6.0, False)]),
    ("paused (no renewal): not active leader_ttl after the last one was sent",
     [], [(2.99, True), (3.0, False), (100.0, False)]),
    ("a renewal counts from when it was sent, not when its answer came",
     [(1.0, 3.5, Ok(2))], [(3.99, True), (4.0, False)]),
    ("unavailable renewals: active until leader_ttl after the last success",
     [(1.0, 1.1, Unavailable()), (1.6, 1.7, Unavailable()), (2.2, 2.3, Unavailable())],
     [(2.99, True), (3.0, False)]),
    ("lapsed, then a renewal succeeds (nobody took over): active again",
     [(5.0, 5.0, Ok(2))], [(5.0, True), (7.99, True), (8.0, False)]),
    ("a conflict on a renewal: standby at once",
     [(1.0, 1.0, Conflict())], [(1.0, False), (2.0, False)]),
]


@pytest.mark.parametrize(("case", "results", "checks"), RENEWALS, ids=[r[0] for r in RENEWALS])
def test_renewals_and_validity(case: str, results: list[tuple[float, float, WriteResult]],
                               checks: list[tuple[float, bool]]) -> None:
    m = won(machine())
    for sent, arrives, result in results:
        action = m.next_action(sent)
        assert action is not None and action.op is Op.RENEW and action.last == m.revision
        m.on_result(arrives, action, sent, result)
    for t, active in checks:
        assert m.is_active(t) is active, f"is_active({t})"
    assert m.term == 1  # renewals never change the term


def test_renew_cadence_and_revision() -> None:
    m = won(machine())
    assert m.next_action(0.99) is None
    assert m.wake_at(0.5) == pytest.approx(1.0)
    do(m, 1.0, Op.RENEW, Ok(2), last=1)
    assert m.next_action(1.99) is None
    do(m, 2.0, Op.RENEW, Ok(3), last=2)
    assert m.revision == 3 and m.term == 1 and m.active_since == 0.0


def test_conflict_on_renewal_means_leadership_lost() -> None:
    m = won(machine())
    do(m, 1.0, Op.RENEW, Conflict(), last=1)
    assert not m.is_active(1.0) and m.role is Role.STANDBY and m.active_since is None
    assert m.term == 1  # the term it held, for the record
    do(m, 1.0, Op.READ, Held("node-a", 2))  # learns who at once
    assert m.leader == "node-a"
    assert claim(m, 3.99) is None  # and waits out the new holder like any standby
    action = claim(m, 4.0)
    assert action is not None and action.op is Op.TAKE_OVER and action.last == 2


def test_lapsed_active_regains_with_a_new_active_since() -> None:
    m = won(machine())
    assert m.active_since == 0.0 and not m.is_active(3.2)
    do(m, 3.2, Op.RENEW, Ok(2), last=1)
    assert m.is_active(3.2) and m.active_since == 3.2 and m.term == 1


def test_lapsed_active_that_was_taken_over_cannot_come_back() -> None:
    m = won(machine())
    do(m, 7.0, Op.RENEW, Conflict(), last=1)  # resumed after a pause: someone took over
    assert not m.is_active(7.0) and m.role is Role.STANDBY


# ---- hand-back: a non-preferred active arbiter resigns -----------------------------

def test_resign_stops_being_active_at_once_and_gives_the_revision_to_delete() -> None:
    m = machine(preferred=False, node="node-a")
    do(m, 0.0, Op.READ, Absent())
    do(m, 1.0, Op.CREATE, Ok(7))
    do(m, 2.0, Op.RENEW, Ok(8), last=7)
    assert m.is_active(2.5)
    assert m.resign(2.5, "handed back") == 8
    assert not m.is_active(2.5) and m.role is Role.STANDBY and m.revision is None
    assert m.resign(2.6, "again") is None  # nothing left to give up
    # It reads next; the key deleted: it waits the standby delay, like any node.
    do(m, 2.6, Op.READ, Absent())
    assert claim(m, 3.59) is None and claim(m, 3.6) is not None


def test_a_resigned_arbiter_does_not_take_its_own_undeleted_key_back_early() -> None:
    """The delete got no answer: the key still shows our incarnation at our revision;
    it is not adopted (not newer than our own writes) and lapses as after a crash."""
    m = machine(preferred=False, node="node-a")
    do(m, 0.0, Op.READ, Absent())
    do(m, 1.0, Op.CREATE, Ok(7))
    assert m.resign(1.5, "handed back") == 7
    do(m, 1.5, Op.READ, Held("node-a", 7, incarnation=ME))
    assert not m.is_active(1.5)
    assert claim(m, 1.5 + TTL + DELAY - 0.01) is None
    assert claim(m, 1.5 + TTL + DELAY) is not None


def test_read_soon_makes_a_standby_read_at_once() -> None:
    m = machine()
    do(m, 0.0, Op.READ, Held("node-a", 5))
    assert m.next_action(0.1) is None
    m.read_soon(0.1)
    do(m, 0.1, Op.READ, Absent())
    assert claim(m, 0.1) is not None and claim(m, 0.1).op is Op.CREATE  # type: ignore[union-attr]


# ---- a renewal that timed out but committed ----------------------------------------

def _timed_out_then_conflict() -> Election:
    m = won(machine())
    do(m, 1.0, Op.RENEW, Unavailable(), last=1)  # committed as revision 2, all the same
    do(m, 1.5, Op.RENEW, Conflict(), last=1)  # ... so this one conflicts with our own
    assert not m.is_active(1.5)  # not acting while it checks
    return m


def test_timed_out_renewal_that_committed_is_adopted_without_extension() -> None:
    m = _timed_out_then_conflict()
    do(m, 1.5, Op.READ, Held("witness", 2, incarnation=ME, term=1))
    assert m.role is Role.ACTIVE and m.revision == 2 and m.term == 1
    assert m.is_active(2.99) and not m.is_active(3.0)  # validity still from the win at 0
    assert m.active_since == 0.0
    do(m, 1.5, Op.RENEW, Ok(3), last=2)  # renews at once, against the adopted revision
    assert m.is_active(4.49) and not m.is_active(4.5)


def test_conflict_after_timeout_with_someone_else_on_the_key_is_a_loss() -> None:
    m = _timed_out_then_conflict()
    do(m, 1.5, Op.READ, Held("node-a", 2))
    assert m.role is Role.STANDBY and not m.is_active(1.5) and m.leader == "node-a"


def test_conflict_after_timeout_and_the_read_fails_stays_not_active() -> None:
    m = _timed_out_then_conflict()
    do(m, 1.5, Op.READ, Unavailable())
    assert not m.is_active(1.6) and m.next_action(1.6) is None  # read again at 2.0
    do(m, 2.0, Op.READ, Held("witness", 2, incarnation=ME))
    assert m.is_active(2.0)


def test_own_node_but_old_incarnation_is_not_adopted() -> None:
    m = _timed_out_then_conflict()
    do(m, 1.5, Op.READ, Held("witness", 2, incarnation="a-restarted-witness-arbiter"))
    assert m.role is Role.STANDBY


def test_timed_out_create_that_committed_is_a_win_valid_only_after_a_renewal() -> None:
    m = machine()
    do(m, 0.0, Op.READ, Absent())
    do(m, 0.0, Op.CREATE, Unavailable(), arrives=0.5)
    do(m, 0.5, Op.READ, Held("witness", 7, incarnation=ME))
    assert m.role is Role.ACTIVE and m.term == 7 and not m.is_active(0.5)
    do(m, 0.5, Op.RENEW, Ok(8), last=7)
    assert m.is_active(0.5) and m.term == 7 and m.active_since == 0.5


def test_lost_race_reads_the_winner() -> None:
    m = machine(preferred=False, node="node-b")
    do(m, 0.0, Op.READ, Held("witness", 5))
    do(m, 4.0, Op.TAKE_OVER, Conflict(), last=5)  # node-a was quicker
    do(m, 4.0, Op.READ, Held("node-a", 6))
    assert not m.is_active(4.0) and claim(m, 7.99) is None and claim(m, 8.0) is not None


# ---- terms ----------------------------------------------------------------------------

def test_term_is_the_winning_revision_and_grows_across_leaders() -> None:
    w = machine(preferred=True, node="witness", incarnation="w")
    a = machine(preferred=False, node="node-a", incarnation="a")
    won(w, 0.0, rev=1)
    do(w, 1.0, Op.RENEW, Ok(2))
    do(a, 1.0, Op.READ, Held("witness", 2, "w", 1))
    # the witness's arbiter freezes; node-a's takes over at 1 + ttl + delay
    assert claim(a, 4.99) is None
    do(a, 5.0, Op.TAKE_OVER, Ok(3), last=2)
    assert a.is_active(5.0) and a.term == 3 > w.term == 1 and a.previous_leader == "witness"
    assert not w.is_active(5.0)  # it stopped at 1 + ttl = 4.0 on its own
    do(w, 9.0, Op.RENEW, Conflict(), last=2)  # it resumes: its renewal conflicts
    assert w.role is Role.STANDBY and w.term == 1
    do(w, 9.0, Op.READ, Held("node-a", 5, "a", 3))
    do(w, 12.0, Op.TAKE_OVER, Ok(6), last=5)  # node-a froze in turn
    assert w.term == 6 > a.term


def test_status_names_role_term_and_leader() -> None:
    m = machine(preferred=False, node="node-b")
    do(m, 0.0, Op.READ, Held("witness", 5, "w", 3))
    st = m.status(0.2)
    assert st["role"] == "standby" and st["leader"] == "witness" and st["term"] == 0
    assert st["seen"] == {"node": "witness", "revision": 5, "term": 3, "age_s": 0.2}
    w = won(machine())
    assert w.status(1.0)["role"] == "active" and w.status(1.0)["valid_for_s"] == 2.0
    assert w.status(3.5)["state"] == "lapsed" and w.status(3.5)["role"] == "standby"


def test_bad_timings_are_refused() -> None:
    with pytest.raises(ValueError, match="leader_ttl"):
        machine(ttl=0)
    with pytest.raises(ValueError, match="standby_delay"):
        machine(delay=-1)


# ---- the property: random interleavings over a shared CAS store -----------------------

SIM_TTL = 1.0
SIM_DELAY = 0.3
TIMEOUT = SIM_TTL / 6  # the runner's per-call timeout
HORIZON = 25 * SIM_TTL
MIN_LATENCY = 1e-3  # every attempt takes some time (so nothing loops at one instant)
MAX_EVENTS = 200_000


@dataclass
class Store:
    """One KV key with a revision counter: compare-and-set, history for stale reads."""

    rev: int = 0
    key: Held | None = None
    history: list[tuple[float, KeyView]] = field(default_factory=lambda: [(0.0, Absent())])
    max_won: int = 0  # the revision of the latest winning write (create / take-over)

    def write(self, t: float, node: str, incarnation: str, action: Action,
              term: int) -> WriteResult:
        if action.op is Op.CREATE:
            ok = self.key is None
        else:
            ok = self.key is not None and self.key.revision == action.last
        if not ok:
            return Conflict()
        self.rev += 1
        self.key = Held(node, self.rev, incarnation, term if action.op is Op.RENEW else 0)
        self.history.append((t, self.key))
        if action.op is not Op.RENEW:
            self.max_won = self.rev
        return Ok(self.rev)

    def read(self, t: float) -> KeyView:
        view: KeyView = Absent()
        for at, v in self.history:
            if at <= t:
                view = v
        return view


@dataclass
class Proc:
    node: str
    preferred: bool
    machine: Election
    paused_until: float = 0.0
    token: int = 0  # the attempt in flight (0: none)
    dead: bool = False


@dataclass(frozen=True)
class Fate:
    """What happens to one attempt: served after ``serve`` (never when None), answered
    ``answer`` later; a read is answered as of ``lag`` earlier (a follower behind)."""

    serve: float | None
    answer: float
    lag: float


fates = st.builds(
    Fate,
    serve=st.one_of(st.floats(0, 0.02), st.floats(0, 2 * SIM_TTL), st.none()),
    answer=st.one_of(st.floats(0, 0.02), st.floats(0, 0.4)),
    lag=st.one_of(st.just(0.0), st.floats(0, SIM_TTL)),
)


class Sim:
    def __init__(self, n: int, fate_list: list[Fate], pauses: list[tuple[float, int, float]],
                 restarts: list[tuple[float, int, float | None]]) -> None:
        self.store = Store()
        self.procs = [Proc(node, i == 0, self._machine(node, i == 0, 0))
                      for i, node in enumerate(["witness", "node-a", "node-b", "node-c"][:n])]
        self.events = 0
        self.fates = itertools.cycle(fate_list)
        self.queue: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self.seq = itertools.count()
        self.tokens = itertools.count(1)
        self.wins: list[tuple[float, str, int]] = []  # (when, who, term) at each activation
        self.was_active: dict[int, tuple[bool, int]] = {}
        for i in range(n):
            self.at(0.0, "wake", i)
        for t, i, d in pauses:
            self.at(t, "pause", i % n, d)
        for t, i, frozen in restarts:
            self.at(t, "restart", i % n, frozen)

    @staticmethod
    def _machine(node: str, preferred: bool, incarnation: int) -> Election:
        return Election(node, f"{node}#{incarnation}", preferred=preferred,
                        leader_ttl=SIM_TTL, standby_delay=SIM_DELAY)

    def at(self, t: float, kind: str, *args: Any) -> None:
        heapq.heappush(self.queue, (t, next(self.seq), kind, args))

    def run(self) -> None:
        while self.queue:
            t, _, kind, args = heapq.heappop(self.queue)
            self.events += 1
            if t > HORIZON or self.events > MAX_EVENTS:
                break
            getattr(self, f"_{kind}")(t, *args)
            self.check(t)

    # ---- events ------------------------------------------------------------------
    def _pause(self, t: float, i: int, d: float) -> None:
        p = self.procs[i]
        p.paused_until = max(p.paused_until, t + d)

    def _restart(self, t: float, i: int, frozen: float | None) -> None:
        """A new arbiter process on proc i's node. The old one dies (what it had in
        flight may still commit), or (``frozen``) stays, frozen for that long: a
        supervisor that gave up on it too early."""
        old = self.procs[i]
        if frozen is None:
            old.dead = True
        else:
            old.paused_until = max(old.paused_until, t + frozen)
        k = len(self.procs)
        self.procs.append(Proc(old.node, old.preferred, self._machine(old.node, old.preferred, k)))
        self.at(t, "wake", k)

    def _wake(self, t: float, i: int) -> None:
        p = self.procs[i]
        if p.dead or p.token:
            return  # an attempt in flight: its answer wakes it
        if t < p.paused_until:
            self.at(p.paused_until, "wake", i)
            return
        action = p.machine.next_action(t)
        if action is None:
            nxt = min(p.machine.wake_at(t), t + p.machine.poll_every)
            self.at(max(nxt, t + 1e-3), "wake", i)
            return
        p.token = next(self.tokens)
        fate = next(self.fates)
        box: dict[str, Any] = {}
        if fate.serve is not None:
            self.at(t + fate.serve, "serve", i, action, box, fate, p.machine.incarnation,
                    p.machine.term)
        answered = None if fate.serve is None else t + fate.serve + fate.answer + MIN_LATENCY
        if answered is None or answered > t + TIMEOUT:
            self.at(t + TIMEOUT, "answer", i, p.token, action, t, None)
        else:
            self.at(answered, "answer", i, p.token, action, t, box)

    def _serve(self, t: float, i: int, action: Action, box: dict[str, Any],
               fate: Fate, incarnation: str, term: int) -> None:
        if action.op is Op.READ:
            box["result"] = self.store.read(t - fate.lag)
        else:
            box["result"] = self.store.write(t, self.procs[i].node, incarnation, action, term)

    def _answer(self, t: float, i: int, token: int, action: Action, sent_at: float,
                box: dict[str, Any] | None) -> None:
        p = self.procs[i]
        if p.dead:
            return
        if t < p.paused_until:  # the answer (or the timeout) waits for the process
            self.at(p.paused_until, "answer", i, token, action, sent_at, box)
            return
        p.token = 0
        result = Unavailable() if box is None else box["result"]
        p.machine.on_result(t, action, sent_at, result)
        self.at(t, "wake", i)

    # ---- the invariants ------------------------------------------------------------
    def check(self, t: float) -> None:
        active = [(i, p) for i, p in enumerate(self.procs)
                  if not p.dead and p.machine.is_active(t)]
        assert len(active) <= 1, (
            f"at {t:.3f} two arbiters are active: "
            f"{[(p.node, p.machine.term, p.machine.valid_until) for _, p in active]}")
        for i, p in active:
            # never acting with a term lower than one already won (the store's latest)
            assert p.machine.term == self.store.max_won, (
                f"at {t:.3f} {p.node} acts with term {p.machine.term}, "
                f"but term {self.store.max_won} was won")
            if self.was_active.get(i) != (True, p.machine.term):
                if self.wins:
                    assert p.machine.term >= self.wins[-1][2]
                if not self.wins or p.machine.term > self.wins[-1][2]:
                    self.wins.append((t, p.node, p.machine.term))
        for i, p in enumerate(self.procs):
            self.was_active[i] = (p.machine.is_active(t), p.machine.term)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 4),
       fate_list=st.lists(fates, min_size=1, max_size=40),
       pauses=st.lists(st.tuples(st.floats(0, HORIZON), st.integers(0, 3),
                                 st.floats(0, 3 * SIM_TTL)), max_size=8),
       restarts=st.lists(st.tuples(st.floats(0, HORIZON), st.integers(0, 3),
                                   st.one_of(st.none(), st.floats(0, 3 * SIM_TTL))),
                         max_size=2))
def test_property_one_active_arbiter_and_terms_only_grow(
        n: int, fate_list: list[Fate], pauses: list[tuple[float, int, float]],
        restarts: list[tuple[float, int, float | None]]) -> None:
    """At no instant are two arbiters active (validity never overlaps), and an active
    arbiter's term is always the latest won: terms strictly increase across leaders.
    Attempts are lost, delayed past their timeout and committed late, answered late;
    reads come from followers behind the leader; arbiters freeze; a node's arbiter is
    restarted while the old process dies or stays frozen."""
    sim = Sim(n, fate_list, pauses, restarts)
    sim.run()
    terms = [term for _, _, term in sim.wins]
    assert terms == sorted(set(terms)), sim.wins


def test_simulation_without_faults_elects_the_witness_and_keeps_it() -> None:
    sim = Sim(3, [Fate(0.001, 0.001, 0.0)], [], [])
    sim.run()
    assert [who for _, who, _ in sim.wins] == ["witness"]
    assert sim.procs[0].machine.is_active(HORIZON)


def test_simulation_freezing_the_witness_elects_a_node() -> None:
    sim = Sim(3, [Fate(0.001, 0.001, 0.0)], [(5.0, 0, 4 * SIM_TTL)], [])
    sim.run()
    who = [w for _, w, _ in sim.wins]
    assert who[0] == "witness" and who[1] in ("node-a", "node-b")
    took = sim.wins[1][0] - 5.0  # a node took over no later than ttl + delay + a poll
    assert took <= SIM_TTL + SIM_DELAY + SIM_TTL / 6 + 0.01
