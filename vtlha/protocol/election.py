"""The active-arbiter election, sans-I/O (DESIGN.md "Safety": the active arbiter).

Every node and the witness run an arbiter; exactly one is **active**. It is decided by
the KV key ``arbiter.leader`` (``LeaderRecord {node, incarnation, since, term}``); an
arbiter's **term** is the KV revision at which it won the key. ``Election`` takes what
happens (what the key is, the results of its own attempts, the current monotonic time)
and says what to do next (read the key, create it, renew it, take it over). It never
reads a clock and does no I/O; ``vtlha_arbiter.election.ElectionRunner`` carries it out.

Rules, each load-bearing:

- **Create** the key when it is absent. The witness's arbiter (``preferred``) does so at
  once; every other arbiter only ``standby_delay`` after it first saw the key absent.
- **Renew** by compare-and-set (``last`` = our latest revision) every ``leader_ttl``/3. A
  successful write makes the arbiter valid until ``sent_at + leader_ttl``, counted from
  when the write was *sent*, never from when the answer arrived.
- **Valid only while renewed**: an active arbiter whose last successful write was sent
  ``leader_ttl`` ago or more (it was paused, the KV is unreachable) is not active, and
  stays so until a renewal succeeds again, which it can only if nobody took over (CAS).
- **Take over** by compare-and-set against the *last revision this standby saw*, once it
  has seen no change of the key for ``leader_ttl``, counted on its own monotonic clock
  from when it first saw that revision (plus ``standby_delay`` unless preferred). Why
  this is safe: the holder's validity ends at ``sent + leader_ttl``; its write was sent
  before it committed, which was before any standby saw it; so the takeover is sent no
  sooner than the holder stopped being valid. A lagging or stale read only makes the
  standby later, or its compare-and-set fail.
- A renewal that fails on a **CAS conflict** means leadership was lost: standby at once.
  Except when one of our renewals timed out since the last success (it may have
  committed, and the conflict be with our own write): then read the key; if it still
  shows this arbiter (node *and* incarnation) at a newer revision, adopt that revision
  and go on, extending nothing (validity comes only from a write that succeeded).
- The key showing this arbiter's incarnation while it stands by means a write of ours
  timed out but committed: it holds the key (term = that revision for a create or
  takeover, the record's term for a renewal) but is not valid until a renewal succeeds.
- **Hand back** (``resign``): an active arbiter that is not the preferred one gives the
  key up when the preferred arbiter asks (``vtlha_arbiter.handback``): it stops being
  active first, then deletes the key by compare-and-set against its own revision, so
  the preferred arbiter creates it at once. Safe for the same reason as a takeover: no
  write of the next holder can precede the resigner's last act as active.
- Reads older than a revision already seen are ignored; a restarted arbiter on the same
  node has a new incarnation and counts as someone else.

Terms only grow: each is the revision of a winning compare-and-set, later than every
revision before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    STANDBY = "standby"
    ACTIVE = "active"


class Op(StrEnum):
    READ = "read"
    CREATE = "create"
    RENEW = "renew"
    TAKE_OVER = "take_over"


# ---- what the key is, what an attempt gave --------------------------------------


@dataclass(frozen=True)
class Held:
    """The key exists: who wrote it last, and its revision."""

    node: str
    revision: int
    incarnation: str = ""
    term: int = 0  # the holder's term as its record says (0: the winning write itself)


@dataclass(frozen=True)
class Absent:
    """The key does not exist (never created, or deleted)."""


KeyView = Held | Absent


@dataclass(frozen=True)
class Ok:
    revision: int


@dataclass(frozen=True)
class Conflict:
    """The compare-and-set lost: the key is not at the revision we wrote against."""


@dataclass(frozen=True)
class Unavailable:
    """No answer in time (timeout, no responders, no quorum): it may have committed."""


WriteResult = Ok | Conflict | Unavailable
ReadResult = Held | Absent | Unavailable


@dataclass(frozen=True)
class Action:
    """What to do now. ``last`` is the revision a renew or take-over writes against."""

    op: Op
    last: int | None = None
    reason: str = ""


# ---- the state machine ------------------------------------------------------------


class Election:
    def __init__(self, node: str, incarnation: str, *, preferred: bool, leader_ttl: float,
                 standby_delay: float) -> None:
        if leader_ttl <= 0 or standby_delay < 0:
            raise ValueError("leader_ttl must be > 0 and standby_delay >= 0")
        self.node = node
        self.incarnation = incarnation
        self.preferred = preferred
        self.leader_ttl = leader_ttl
        self.standby_delay = standby_delay
        self.renew_every = leader_ttl / 3
        self.poll_every = leader_ttl / 6
        self.retry_after = leader_ttl / 6
        self.role = Role.STANDBY
        #: the term this arbiter holds, or last held (0: never)
        self.term = 0
        #: when the current unbroken active period began (None: not active)
        self.active_since: float | None = None
        #: who held the key before this arbiter won it (None: nobody, or unknown); the
        #: last holder seen, even when the key was deleted since (a hand-back)
        self.previous_leader: str | None = None
        self._last_holder: str | None = None
        #: a sentence: the last change and why (for logs and events)
        self.reason = "starting: the leader key has not been read yet"
        self._rev: int | None = None  # our latest revision of the key while we hold it
        self._own_high = 0  # the highest revision of a write of ours that we know of
        self._valid_until: float | None = None
        self._verifying = False  # a renewal conflicted after one timed out: read first
        self._unconfirmed = False  # a write of ours timed out since the last known state
        self._seen: KeyView | None = None
        self._seen_at = 0.0
        self._max_revision = 0
        self._need_read = True
        self._next_read_at = 0.0
        self._next_renew_at = 0.0
        self._next_claim_at = 0.0  # back-off of create/take-over after no answer

    # ---- predicates --------------------------------------------------------
    def is_active(self, now: float) -> bool:
        """Active: holds the key and its last successful write was sent less than
        leader_ttl ago (and no conflict is being checked)."""
        return self._is_valid(now) and not self._verifying

    def _is_valid(self, now: float) -> bool:
        return (self.role is Role.ACTIVE and self._valid_until is not None
                and now < self._valid_until)

    def _is_mine(self, key: KeyView) -> bool:
        return (isinstance(key, Held) and key.node == self.node
                and key.incarnation == self.incarnation)

    @property
    def leader(self) -> str | None:
        """The node this arbiter believes holds the key (itself while it holds it)."""
        if self.role is Role.ACTIVE:
            return self.node
        return self._seen.node if isinstance(self._seen, Held) else None

    @property
    def revision(self) -> int | None:
        """The revision a renewal writes against (None when not holding the key)."""
        return self._rev

    @property
    def valid_until(self) -> float | None:
        return self._valid_until

    # ---- what to do ----------------------------------------------------------
    def next_action(self, now: float) -> Action | None:
        """What to do at ``now``; None: nothing before ``wake_at(now)``."""
        if self.role is Role.ACTIVE:
            if self._verifying:
                return (Action(Op.READ, reason="a renewal conflicted after one of ours timed "
                               "out: is the key still ours?")
                        if now >= self._next_read_at else None)
            if now >= self._next_renew_at:
                return Action(Op.RENEW, self._rev, reason=f"renew term {self.term}")
            return None
        if self._need_read or self._seen is None:
            return Action(Op.READ, reason="learn the key") if now >= self._next_read_at else None
        claim = self._claim_at()
        if now >= claim:
            if isinstance(self._seen, Absent):
                return Action(Op.CREATE, reason="the leader key is absent")
            return Action(Op.TAKE_OVER, self._seen.revision,
                          reason=f"no change of the leader key ({self._seen.node}) for "
                          f"{now - self._seen_at:.2f} s")
        if now >= self._next_read_at:
            return Action(Op.READ, reason="poll the key")
        return None

    def _claim_at(self) -> float:
        """When a standby may create or take over the key, as it stands seen."""
        extra = 0.0 if self.preferred else self.standby_delay
        wait = extra if isinstance(self._seen, Absent) else self.leader_ttl + extra
        return max(self._seen_at + wait, self._next_claim_at)

    def wake_at(self, now: float) -> float:
        """When ``next_action`` may next return something, or being active may end."""
        if self.role is Role.ACTIVE:
            due = self._next_read_at if self._verifying else self._next_renew_at
            if self._valid_until is not None and self._valid_until > now:
                due = min(due, self._valid_until)
            return due
        if self._need_read or self._seen is None:
            return self._next_read_at
        return min(self._claim_at(), self._next_read_at)

    # ---- what happened ---------------------------------------------------------
    def on_result(self, now: float, action: Action, sent_at: float,
                  result: ReadResult | WriteResult) -> None:
        """The outcome of ``action``, sent at ``sent_at``, arriving at ``now``."""
        if action.op is Op.READ:
            self._on_read(now, sent_at, result)
        elif isinstance(result, Ok):
            self._on_ok(now, action, sent_at, result.revision)
        elif isinstance(result, Conflict):
            self._on_conflict(now, action)
        elif isinstance(result, Unavailable):
            self._on_unavailable(now, action)
        else:
            raise TypeError(f"{action.op} cannot give {result!r}")

    def _on_read(self, now: float, sent_at: float, result: ReadResult | WriteResult) -> None:
        if isinstance(result, Unavailable):
            self._next_read_at = now + self.retry_after
            return
        if not isinstance(result, Held | Absent):
            raise TypeError(f"a read cannot give {result!r}")
        self._next_read_at = sent_at + self.poll_every
        self._need_read = False
        if self._verifying:
            self._verify(now, result)
        else:
            self.observe(now, result)

    def _on_ok(self, now: float, action: Action, sent_at: float, revision: int) -> None:
        was_valid = self._is_valid(now)
        if action.op is not Op.RENEW:
            self.previous_leader = self._last_holder
            self.role, self.term = Role.ACTIVE, revision
            self.reason = (f"{self.node} won the leader key at revision {revision} "
                           f"({action.reason})")
        self._rev = revision
        self._own_high = max(self._own_high, revision)
        self._valid_until = sent_at + self.leader_ttl
        self._next_renew_at = sent_at + self.renew_every
        self._unconfirmed = self._verifying = False
        self._see(Held(self.node, revision, self.incarnation, self.term), now)
        if not was_valid and self._is_valid(now):
            self.active_since = now
            if action.op is Op.RENEW:
                self.reason = f"{self.node} renewed the leader key (term {self.term}) in time"

    def _on_conflict(self, now: float, action: Action) -> None:
        if action.op is Op.RENEW:
            if self._unconfirmed:
                self._verifying = True
                self._next_read_at = now
                self.reason = "a renewal conflicted after one of ours timed out: checking"
            else:
                self._lose(now, f"a renewal against revision {self._rev} conflicted: "
                           "someone else took the leader key")
            return
        # Lost a race to create or take over: learn who won. The back-off keeps a stale
        # read (a follower behind the leader) from looping read -> claim -> conflict.
        self._need_read = True
        self._next_read_at = now
        self._next_claim_at = now + self.retry_after

    def _on_unavailable(self, now: float, action: Action) -> None:
        self._unconfirmed = True  # it may have committed all the same
        if action.op is Op.RENEW:
            self._next_renew_at = now + self.retry_after
            return
        self._next_claim_at = now + self.retry_after
        self._need_read = True
        self._next_read_at = now

    def _verify(self, now: float, key: KeyView) -> None:
        if self._is_mine(key) and isinstance(key, Held):
            if key.revision > (self._rev or 0):
                self._verifying = False
                self._adopt(now, key)
            else:  # a follower behind: no answer yet either way; still not acting
                self._next_read_at = now + self.retry_after
            return
        self._verifying = False
        self._lose(now, "a renewal conflicted and the key is not ours any more")
        self.observe(now, key)

    def _adopt(self, now: float, key: Held) -> None:
        """Our own timed-out write committed: take its revision, extend nothing."""
        self._rev = key.revision
        self._own_high = max(self._own_high, key.revision)
        self._unconfirmed = False
        self._next_renew_at = now  # validity comes only from a renewal that succeeds
        self._see(key, now)
        self.reason = (f"adopted revision {key.revision}: a timed-out write of ours "
                       "committed")

    def resign(self, now: float, why: str) -> int | None:
        """Give the key up on purpose (a hand-back to the preferred arbiter): stop being
        active now, before anything is sent; returns the revision the runner deletes the
        key against (None: not active, nothing to give up). The delete is a
        compare-and-set: if someone else wrote the key meanwhile it fails harmlessly; if
        it gets no answer, the key stays with this incarnation, which no longer counts
        it as its own (a takeover follows after ``leader_ttl``, as after a crash)."""
        if self.role is not Role.ACTIVE or self._rev is None:
            return None
        rev = self._rev
        self._lose(now, why)
        return rev

    def read_soon(self, now: float) -> None:
        """Read the key now (told that it changed, e.g. handed back to us)."""
        self._need_read = True
        self._next_read_at = min(self._next_read_at, now)

    def _lose(self, now: float, why: str) -> None:
        self.role = Role.STANDBY
        self.active_since = None
        self._valid_until = None
        self._rev = None
        self._verifying = self._unconfirmed = False
        self._need_read = True
        self._next_read_at = now
        self.reason = why

    def _see(self, key: KeyView, now: float) -> None:
        if key != self._seen:
            self._seen, self._seen_at = key, now
        if isinstance(key, Held):
            self._max_revision = max(self._max_revision, key.revision)
            if not self._is_mine(key):
                self._last_holder = key.node

    def observe(self, now: float, key: KeyView) -> None:
        """What the key is, as read (or watched) at ``now``."""
        if isinstance(key, Held) and key.revision < self._max_revision:
            return  # older than what we know: a stale read
        mine = self._is_mine(key) and isinstance(key, Held) and key.revision > self._own_high
        if self.role is Role.ACTIVE:
            if isinstance(key, Held) and key.revision > (self._rev or 0):
                if mine:
                    self._adopt(now, key)
                    return
                self._see(key, now)
                self._lose(now, f"{key.node} holds the leader key at revision {key.revision}")
                self._need_read = False
            return
        if mine and isinstance(key, Held):
            # A write of ours timed out and committed: a create or take-over (we won
            # then), or a renewal of a term we held (its record says which).
            self.previous_leader = self._last_holder
            self.role, self.term = Role.ACTIVE, key.term or key.revision
            self._valid_until = None
            self._adopt(now, key)
            self.reason = (f"{self.node} holds the leader key (term {self.term}, revision "
                           f"{key.revision}): a timed-out write of ours committed")
            return
        self._see(key, now)

    # ---- looking in ------------------------------------------------------------
    def status(self, now: float) -> dict[str, Any]:
        seen = self._seen
        state = ("active" if self.is_active(now) else "verifying" if self._verifying
                 else "lapsed" if self.role is Role.ACTIVE else "standby")
        return {
            "role": (Role.ACTIVE if self.is_active(now) else Role.STANDBY).value,
            "state": state,
            "term": self.term,
            "leader": self.leader,
            "preferred": self.preferred,
            "revision": self._rev,
            "valid_for_s": None if self._valid_until is None or self.role is Role.STANDBY
            else round(self._valid_until - now, 3),
            "seen": None if seen is None else (
                {"node": seen.node, "revision": seen.revision, "term": seen.term or
                 seen.revision, "age_s": round(now - self._seen_at, 3)}
                if isinstance(seen, Held) else {"absent": True,
                                                "age_s": round(now - self._seen_at, 3)}),
            "reason": self.reason,
        }
