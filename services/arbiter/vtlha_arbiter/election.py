"""Runs the active-arbiter election (``vtlha.protocol.election.Election``) against the KV.

The runner asks the state machine what to do, does it (a read, a create, a
compare-and-set), feeds back the result with the time the request was *sent*, and
sleeps until the machine's next due time. Every KV call has a timeout
(``leader_ttl``/6); whatever goes wrong with a call (timeout, no responders, no quorum,
a lost connection) is "unavailable" to the machine: it may have committed. Changes of
``is_active()`` (and of the term while active) go to ``on_change(active, term)``,
called one at a time, in order, from a task of its own, so that a slow callback (the
term announcement) never delays a renewal.

**Polling, not a watch.** A standby reads the key every ``leader_ttl``/6:

- a read either answers or fails within its timeout, so the runner always knows when it
  is blind. A KV watch is an ordered push consumer; one that stalls (after a server
  loss it must be re-created, which nats-py does not always manage: PLATFORM.md) looks
  exactly like a leader that stopped renewing, and only a failing compare-and-set would
  show it;
- the price is small and bounded: a change is noticed at most ``leader_ttl``/6 late, so
  a takeover comes between ``leader_ttl`` and ``7/6 leader_ttl`` after the leader's last
  renewal (plus the standby delay), and each standby makes one small read every
  ``leader_ttl``/6 (0.5 s by default);
- noticing late is safe (the lapse is counted from when the standby saw a revision,
  which is after it was written), and so is a stale read from a follower: the
  compare-and-set against the revision seen decides, nothing else.

The active arbiter does not read: its own writes tell it the revision, and a
compare-and-set conflict tells it that it lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from vtlha import bus
from vtlha.bounded import bounded
from vtlha.errors import InvalidMessage
from vtlha.messages import LeaderRecord, decode, encode
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

ChangeCallback = Callable[[bool, int], Awaitable[None]]

#: actions carried out back to back before the runner yields (a guard, not a cadence)
MAX_ACTIONS_PER_STEP = 8
INVALID_HOLDER = "(invalid leader record)"
#: what a KV call raises when it got no answer (it may have committed all the same)
UNAVAILABLE: tuple[type[BaseException], ...] = (*bus.JS_UNAVAILABLE, nats.errors.Error)


class ElectionRunner:
    def __init__(self, kv: KeyValue, key: str, node: str, *, preferred: bool,
                 leader_ttl: float, standby_delay: float, on_change: ChangeCallback,
                 incarnation: str | None = None, log: logging.Logger | None = None) -> None:
        self.kv = kv
        self.key = key
        self.node = node
        self.incarnation = incarnation or uuid.uuid4().hex[:16]
        self.machine = Election(node, self.incarnation, preferred=preferred,
                                leader_ttl=leader_ttl, standby_delay=standby_delay)
        self.timeout = leader_ttl / 6
        self.on_change = on_change
        self.log = log or logging.getLogger("vtlha.arbiter.election")
        self._since = time.time()  # wall clock of the win, written in every renewal
        self._reported: tuple[bool, int] = (False, 0)
        self._changes: asyncio.Queue[tuple[bool, int]] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # stop, or a read due at once
        self._kv_error: str | None = None
        self.attempts: dict[str, int] = {}

    # ---- looking in ----------------------------------------------------------
    def is_active(self) -> bool:
        return self.machine.is_active(time.monotonic())

    @property
    def term(self) -> int:
        return self.machine.term

    @property
    def active_since(self) -> float | None:
        """When the current active period began (this host's monotonic clock)."""
        return self.machine.active_since if self.is_active() else None

    @property
    def leader(self) -> str | None:
        return self.machine.leader

    @property
    def previous_leader(self) -> str | None:
        return self.machine.previous_leader

    @property
    def reason(self) -> str:
        return self.machine.reason

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        since = self.active_since
        return {**self.machine.status(now), "incarnation": self.incarnation,
                "active_since": since,
                "active_for_s": None if since is None else round(now - since, 3),
                "kv_error": self._kv_error, "attempts": dict(self.attempts)}

    # ---- running -------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def read_soon(self) -> None:
        """Read the key at once (the holder said it handed the key back)."""
        self.machine.read_soon(time.monotonic())
        self._wake.set()

    def restart(self, why: str) -> None:
        """The KV bucket was recreated (``bucket.BucketWatch``): the election starts
        again on the new bucket with a fresh machine — standby at once, no revision of
        the old bucket remembered (its reads of the new key would all look stale), the
        same incarnation. A change to standby is reported as usual."""
        old = self.machine
        self.machine = Election(self.node, self.incarnation, preferred=old.preferred,
                                leader_ttl=old.leader_ttl, standby_delay=old.standby_delay)
        self.machine.reason = why
        if self._reported[0]:
            self.log.info("entering standby state", extra={"term": old.term, "reason": why})
            self._changes.put_nowait((False, old.term))
        self._reported = (False, 0)
        self._wake.set()

    async def resign(self, why: str) -> bool:
        """Give the key up (``Election.resign``): standby at once, then delete the key
        against our revision. True when the delete committed."""
        rev = self.machine.resign(time.monotonic(), why)
        self._report()
        if rev is None:
            return False
        try:
            await bounded(self.kv.delete(self.key, last=rev), self.timeout)
        except Exception as exc:  # a conflict, no answer: the key lapses as after a crash
            self.log.info("leader key not deleted on resigning: it lapses", extra={
                "revision": rev, "error": repr(exc)})
            return False
        self._wake.set()
        return True

    async def run(self) -> None:
        deliver = asyncio.create_task(self._deliver(), name="election-changes")
        try:
            while not self._stop.is_set():
                delay = await self.step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                self._wake.clear()
        finally:
            deliver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deliver

    async def step(self) -> float:
        """Carry out what is due now, report a change; return the seconds to sleep."""
        for _ in range(MAX_ACTIONS_PER_STEP):
            machine = self.machine
            sent_at = time.monotonic()
            action = machine.next_action(sent_at)
            if action is None:
                break
            self.attempts[action.op.value] = self.attempts.get(action.op.value, 0) + 1
            result = await self._attempt(action)
            if machine is not self.machine:
                break  # restarted on a new bucket meanwhile: the answer is the old one's
            machine.on_result(time.monotonic(), action, sent_at, result)
        self._report()
        now = time.monotonic()
        return max(0.001, min(self.machine.wake_at(now) - now, self.machine.poll_every))

    def _report(self) -> None:
        state = (self.is_active(), self.machine.term)
        if state == self._reported:
            return
        was_active = self._reported[0]
        self._reported = state
        if not state[0] and not was_active:
            return  # the term changed while standing by: nothing to tell
        active, term = state
        extra = {"term": term, "leader": self.machine.leader, "reason": self.machine.reason}
        if active:
            self.log.info("entering active state", extra={
                **extra, "previous_leader": self.machine.previous_leader})
        else:
            self.log.info("entering standby state", extra=extra)
        self._changes.put_nowait(state)

    async def _deliver(self) -> None:
        while True:
            active, term = await self._changes.get()
            try:
                await self.on_change(active, term)
            except Exception as exc:
                self.log.exception("election change handler failed",
                                   extra={"active": active, "term": term, "error": repr(exc)})

    # ---- the KV ---------------------------------------------------------------
    async def _attempt(self, action: Action) -> ReadResult | WriteResult:
        result: ReadResult | WriteResult
        try:
            if action.op is Op.READ:
                result = await bounded(self._read(), self.timeout)
            else:
                result = Ok(await bounded(self._write(action), self.timeout))
        except KeyWrongLastSequenceError:
            result = Conflict()
        except UNAVAILABLE as exc:
            self._unreachable(action, exc)
            return Unavailable()
        except Exception as exc:  # anything else: treated as no answer, said loudly
            self.log.warning("leader key call failed", exc_info=exc,
                             extra={"op": action.op.value, "error": repr(exc)})
            self._unreachable(action, exc)
            return Unavailable()
        if self._kv_error is not None:
            self.log.info("leader key reachable again", extra={"op": action.op.value,
                                                              "was": self._kv_error})
            self._kv_error = None
        return result

    def _unreachable(self, action: Action, exc: BaseException) -> None:
        err = repr(exc) if str(exc) else type(exc).__name__
        if self._kv_error is None:
            self.log.warning("leader key unreachable", extra={
                "op": action.op.value, "error": err, "timeout_s": round(self.timeout, 3)})
        self._kv_error = err

    async def _read(self) -> Held | Absent:
        try:
            entry = await self.kv.get(self.key)
        except (KeyNotFoundError, NotFoundError):  # KeyDeletedError included
            return Absent()
        if entry.revision is None:
            return Absent()
        try:
            rec = decode(LeaderRecord, entry.value or b"")
        except InvalidMessage as exc:
            self.log.warning("invalid leader record: counts as held by someone else",
                             extra={"revision": entry.revision, "error": str(exc)})
            return Held(INVALID_HOLDER, int(entry.revision))
        return Held(rec.node, int(entry.revision), rec.incarnation, rec.term)

    async def _write(self, action: Action) -> int:
        if action.op is not Op.RENEW:
            self._since = time.time()
        term = self.machine.term if action.op is Op.RENEW else 0
        value = encode(LeaderRecord(node=self.node, incarnation=self.incarnation,
                                    since=self._since, term=term))
        if action.op is Op.CREATE:
            return int(await self.kv.create(self.key, value))
        return int(await self.kv.update(self.key, value, last=action.last))
