"""The state that decides whether an arbiter's event is due, kept in the KV so that it
survives a change of the active arbiter (issue 16).

Per pair, ``events.<pair>`` = ``EventState``: the nodes declared down, the check alarms
raised, the storage global-failure episodes open, and the moves whose ``<kind>.started``
was published and whose ``.completed``/``.failed`` was not yet. Only the active arbiter
writes it, by compare-and-set, from what it holds in memory (``EventStateSync``: its own
task, never on the decision path). A new active arbiter loads it before it decides
(``EventStateStore.load``), takes it as its own (so the policy does not emit
``node.down`` again for a node already declared down, nor an alarm already raised), and
finishes every move left unfinished (``unfinished``, ``outcome``) with its
``.completed`` or ``.failed``.

Residual window: an arbiter that dies after publishing such an event and before the
next sync wrote it (one sync interval plus one compare-and-set) lets its successor
emit it again. Losing the record instead would lose an event; a repeat is the safer
side, and readers still see distinct ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import Field

from vtlha import bus
from vtlha.bounded import bounded
from vtlha.errors import InvalidMessage
from vtlha.messages import GroupRecord, _Open, decode, encode
from vtlha.subjects import Subjects

KV_TIMEOUT = 1.0  # seconds per KV call
#: what a write may raise while the KV is unavailable (retried at the next sync)
WRITE_ERRORS: tuple[type[BaseException], ...] = (*bus.JS_UNAVAILABLE, NotFoundError)


class StartedMove(_Open):
    """A move whose ``<kind>.started`` event was published (``id``) and not yet ended."""

    id: str
    kind: str  # the family: failover, failback, switchover
    group: str
    pair: str | None = None
    old: str
    new: str
    epoch: int = Field(ge=1)
    term: int = Field(ge=0)


class EventState(_Open):
    """``events.<pair>``: what the active arbiter has announced and not yet ended."""

    down: list[str] = Field(default_factory=list)  # nodes declared down (node.down sent)
    alarms: dict[str, list[str]] = Field(default_factory=dict)  # node -> checks (check.alarm)
    storage_alarms: list[str] = Field(default_factory=list)  # groups (storage.global_failure)
    started: dict[str, StartedMove] = Field(default_factory=dict)  # group -> move
    #: group -> the newest epoch whose move's ``<kind>.started`` went out (a move noted
    #: in a group record at a newer epoch was never announced: ``GroupRecord.move``)
    announced: dict[str, int] = Field(default_factory=dict)


def end_id(started: str) -> str:
    """The id of the event that ends the move whose ``.started`` had id ``started``: the
    same whichever arbiter ends it, so a repeat is dropped as a duplicate."""
    return f"{started}.end"


def make_state(down: Iterable[str], alarms: Mapping[str, Iterable[str]],
               storage_alarms: Iterable[str],
               started: Iterable[StartedMove],
               announced: Mapping[str, int] | None = None) -> EventState:
    """A pair's state in its one canonical form (sorted, no empty entries), so that two
    states are equal exactly when they say the same."""
    return EventState(down=sorted(set(down)),
                      alarms={n: sorted(set(c)) for n, c in sorted(alarms.items()) if c},
                      storage_alarms=sorted(set(storage_alarms)),
                      started={m.group: m for m in sorted(started, key=lambda m: m.group)},
                      announced=dict(sorted((announced or {}).items())))


def unfinished(states: Mapping[str, EventState]) -> list[StartedMove]:
    """Every move started and not ended, over all pairs, by group."""
    return sorted((m for s in states.values() for m in s.started.values()),
                  key=lambda m: m.group)


Outcome = Literal["completed", "failed"]


def outcome(move: StartedMove, record: GroupRecord | None,
            new_owner_gone: bool) -> tuple[Outcome, str] | None:
    """How an adopted move ended, from the group's record as now seen: ``completed``
    when its new owner holds it at the move's epoch; ``failed`` when the group moved on
    (a higher epoch) or the new owner went down first; None while it may still finish."""
    if record is not None and record.epoch > move.epoch:
        return "failed", f"{move.group} moved again (epoch {record.epoch}) before it finished"
    if record is not None and (record.owner, record.epoch, record.state) == \
            (move.new, move.epoch, "held"):
        return "completed", f"{move.new} holds {move.group} (epoch {move.epoch})"
    if new_owner_gone:
        return "failed", f"{move.new} went down before it held {move.group}"
    return None


class EventStateStore:
    """``events.<pair>`` in the KV: loaded with its revision, written by compare-and-set
    against the revision last seen (on a conflict: read again, write again)."""

    def __init__(self, kv: KeyValue, subjects: Subjects, pairs: Iterable[str],
                 log: logging.Logger) -> None:
        self.kv = kv
        self.subjects = subjects
        self.pairs = list(pairs)
        self.log = log
        self.revisions: dict[str, int | None] = {}  # pair -> last revision (None: absent)
        self.written: dict[str, EventState] = {}  # pair -> what the KV holds, as we know

    async def load(self) -> dict[str, EventState]:
        out = {}
        for pair in self.pairs:
            out[pair] = await self._read(pair)
        return out

    async def load_changed(self) -> dict[str, EventState]:
        """Like ``load``, but only the pairs whose key changed since this store last
        wrote or read it (all of them the first time): for the others what the arbiter
        holds in memory is at least as new (its own writes may not have gone through)."""
        known = dict(self.revisions)
        states = await self.load()
        return {p: st for p, st in states.items()
                if p not in known or known[p] != self.revisions.get(p)}

    async def _read(self, pair: str) -> EventState:
        key = self.subjects.event_state_key(pair)
        try:
            entry = await bounded(self.kv.get(key), KV_TIMEOUT)
        except (KeyNotFoundError, NotFoundError):
            self.revisions[pair] = None
            self.written[pair] = EventState()
            return EventState()
        self.revisions[pair] = entry.revision
        try:
            state = decode(EventState, entry.value or b"")
        except InvalidMessage as exc:
            self.log.warning("invalid event state: starting from none", extra={
                "key": key, "error": str(exc)})
            state = EventState()
        self.written[pair] = state
        return state

    async def write(self, pair: str, state: EventState) -> bool:
        """Store ``state`` by compare-and-set against the revision last seen. A conflict
        (someone else wrote: another arbiter) reads the key again and returns False; the
        next sync writes again if this arbiter is still the acting one."""
        key = self.subjects.event_state_key(pair)
        last = self.revisions.get(pair)
        try:
            if last is None:
                rev = await bounded(self.kv.create(key, encode(state)), KV_TIMEOUT)
            else:
                rev = await bounded(self.kv.update(key, encode(state), last=last), KV_TIMEOUT)
        except KeyWrongLastSequenceError:
            await self._read(pair)
            return False
        self.revisions[pair] = int(rev)
        self.written[pair] = state
        return True


class EventStateSync:
    """Keeps ``events.<pair>`` equal to what the active arbiter holds (``current``),
    written only while ``acting``; its own loop, so a KV without a leader delays the
    record, never a decision."""

    def __init__(self, store: EventStateStore,
                 current: Callable[[], Mapping[str, EventState]],
                 acting: Callable[[], bool]) -> None:
        self.store = store
        self.current = current
        self.acting = acting
        self.failures = 0

    async def sync(self) -> None:
        if not self.acting():
            return
        for pair, state in self.current().items():
            if self.store.written.get(pair) == state:
                continue
            try:
                ok = await self.store.write(pair, state)
            except WRITE_ERRORS as exc:
                ok = False
                self.store.log.info("event state not written; will retry", extra={
                    "pair": pair, "error": repr(exc)})
            if not ok:
                self.failures += 1
