"""The pairs' operator state in the KV: ``pair.<pair>`` = ``PairRecord`` (maintenance,
the nodes held down, the failback mode, each node's recent failures).

The arbiter keeps a copy (loaded at start, then the KV watch) and changes a record only
by compare-and-set against the revision it last saw; on a conflict it reads the key
again and applies its change to what is there (``update``). Until a pair has a record,
its state is the config's: failback as configured, no maintenance, nobody held down.
Failure times are wall-clock (``time.time()``), so that they survive a change of the
active arbiter; ``PairState.view`` turns them into the arbiter's monotonic clock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from vtlha import policy
from vtlha.bounded import bounded
from vtlha.config import ClusterConfig, Pair
from vtlha.errors import InvalidMessage
from vtlha.messages import PairRecord, decode, encode
from vtlha.policy import PairView
from vtlha.subjects import Subjects

CAS_TRIES = 5  # compare-and-set attempts of one change before giving up (logged)
KV_TIMEOUT = 1.0  # seconds per KV call
LOAD_CONCURRENCY = 32  # pair records read at once by ``load``


def to_monotonic(wall: float, now: float, wall_now: float) -> float:
    """A wall-clock time as the arbiter's monotonic clock (never in the future)."""
    return now - max(0.0, wall_now - wall)


class PairState:
    def __init__(self, kv: KeyValue, subjects: Subjects, config: ClusterConfig,
                 log: logging.Logger) -> None:
        self.kv = kv
        self.subjects = subjects
        self.config = config
        self.log = log
        self.records: dict[str, tuple[PairRecord, int]] = {}  # pair -> (record, revision)
        self.invalid = 0
        self.generation = 0  # bumped when the bucket is recreated (``forget``)
        self.loaded: set[str] = set()  # pairs ``load`` has read in this generation
        #: pair -> (the record it was made of, None: the config's defaults; its view)
        self._views: dict[str, tuple[PairRecord | None, PairView]] = {}

    def forget(self) -> None:
        """The KV bucket was recreated: the pairs' records and revisions were the old
        bucket's; until the new one has records, each pair's state is the config's."""
        self.generation += 1
        self.records.clear()
        self.loaded.clear()

    def _pair(self, name: str) -> Pair:
        return self.config.pair(name)

    def pair_of_key(self, key: str) -> str | None:
        name = key.removeprefix("pair.")
        return name if name in self.config.lookups.pair else None

    # ---- reading -------------------------------------------------------------------
    def record(self, pair: str) -> PairRecord:
        """The record as last seen, or the config's defaults when there is none."""
        got = self.records.get(pair)
        return got[0] if got else PairRecord(failback=self._pair(pair).failback)

    def view(self, p: Pair, now: float, wall_now: float) -> PairView:
        got = self.records.get(p.name)
        rec = got[0] if got else None
        cached = self._views.get(p.name)
        if cached is not None and cached[0] is rec:  # the same record, no failure times
            return cached[1]
        view = self._view(p, rec if rec is not None else self.record(p.name), now, wall_now)
        if not view.failures:  # nothing in it depends on the clock: made once a record
            self._views[p.name] = (rec, view)
        return view

    def _view(self, p: Pair, rec: PairRecord, now: float, wall_now: float) -> PairView:
        return PairView(
            p.name, (p.nodes[0].name, p.nodes[1].name), rec.failback, rec.maintenance,
            failback_hold_time=p.failback_hold_time, flap_max=p.flap_max,
            flap_window=p.flap_window, held_down=frozenset(rec.hold),
            standby=frozenset(rec.standby),
            failures={n: tuple(to_monotonic(t, now, wall_now) for t in ts)
                      for n, ts in sorted(rec.failures.items())})

    def seen(self, pair: str, rec: PairRecord | None, revision: int) -> None:
        """A record read or watched at ``revision`` (None: the key was deleted)."""
        cur = self.records.get(pair)
        if cur is not None and revision <= cur[1]:
            return
        if rec is None:
            self.records.pop(pair, None)
        else:
            self.records[pair] = (rec, revision)

    def decode_entry(self, value: bytes | None) -> PairRecord | None:
        if not value:
            return None
        try:
            return decode(PairRecord, value)
        except InvalidMessage as exc:
            self.invalid += 1
            self.log.warning("invalid pair record", extra={"error": str(exc)})
            raise

    async def load(self) -> None:
        """Read every pair's record, ``LOAD_CONCURRENCY`` at a time. A failed read ends
        the load; the next one (``bus.retry_js``) reads only the pairs not read yet: at
        1,000 pairs, one slow read in a thousand restarted the whole load from the
        first key and the arbiter never started (bench/scale.py)."""
        gate = asyncio.Semaphore(LOAD_CONCURRENCY)
        gen = self.generation

        async def one(name: str) -> None:
            async with gate:
                await self.read(name)
                if gen == self.generation:
                    self.loaded.add(name)

        try:
            async with asyncio.TaskGroup() as tg:
                for p in self.config.pairs:
                    if p.name not in self.loaded:
                        tg.create_task(one(p.name))
        except ExceptionGroup as eg:  # the first failure, as one read would raise it
            raise eg.exceptions[0] from None

    async def read(self, pair: str) -> None:
        gen = self.generation
        try:
            entry = await bounded(self.kv.get(self.subjects.pair_key(pair)), KV_TIMEOUT)
        except (KeyNotFoundError, NotFoundError):
            return
        if entry.revision is not None and gen == self.generation:
            try:
                self.seen(pair, self.decode_entry(entry.value), entry.revision)
            except InvalidMessage:
                return

    async def watch(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None or entry.revision is None:
                continue
            pair = self.pair_of_key(entry.key)
            if pair is None:
                continue
            try:
                self.seen(pair, self.decode_entry(entry.value), entry.revision)
            except InvalidMessage:
                continue

    # ---- changing --------------------------------------------------------------------
    async def update(self, pair: str,
                     change: Callable[[PairRecord], PairRecord]) -> PairRecord | None:
        """Apply ``change`` to the pair's record by compare-and-set (created when absent),
        retried against a fresh read on a conflict. Returns the record now in force, or
        None when the KV did not take it (logged; the caller decides again later)."""
        key = self.subjects.pair_key(pair)
        for _ in range(CAS_TRIES):
            got = self.records.get(pair)
            cur = self.record(pair)
            new = change(cur)
            if new == cur:
                return cur  # already so (the config's defaults count when absent)
            try:
                if got is None:
                    rev = await bounded(self.kv.create(key, encode(new)), KV_TIMEOUT)
                else:
                    rev = await bounded(self.kv.update(key, encode(new), last=got[1]), KV_TIMEOUT)
            except KeyWrongLastSequenceError:
                await self._read_quietly(pair)
                continue
            except Exception as exc:  # unavailable, a timeout (it may have committed)
                self.log.warning("pair record not written", extra={"pair": pair,
                                                                   "error": repr(exc)})
                await self._read_quietly(pair)
                return None
            self.seen(pair, new, int(rev))
            return new
        self.log.warning("pair record not written: it kept changing", extra={"pair": pair})
        return None

    async def _read_quietly(self, pair: str) -> None:
        try:
            await self.read(pair)
        except Exception as exc:
            self.log.info("pair record not read", extra={"pair": pair, "error": repr(exc)})

    async def record_failure(self, pair: str, node: str, at: float) -> PairRecord | None:
        """One more failure of ``node`` at wall-clock ``at`` (``policy.record_failure``:
        old ones beyond flap_window dropped, one within failback_hold_time merged)."""
        p = self._pair(pair)

        def change(r: PairRecord) -> PairRecord:
            times = policy.record_failure(r.failures.get(node, []), at, window=p.flap_window,
                                          merge_within=p.failback_hold_time)
            return r.model_copy(update={"failures": {**r.failures, node: list(times)}})

        return await self.update(pair, change)

    async def hold(self, pair: str, node: str) -> PairRecord | None:
        return await self.update(pair, lambda r: r if node in r.hold else r.model_copy(
            update={"hold": sorted({*r.hold, node})}))

    async def clear_hold(self, pair: str, node: str) -> PairRecord | None:
        """The node leaves the hold list and its failures are forgotten."""
        return await self.update(pair, lambda r: r.model_copy(update={
            "hold": [n for n in r.hold if n != node],
            "failures": {n: ts for n, ts in r.failures.items() if n != node}}))

    async def set_standby(self, pair: str, node: str, on: bool) -> PairRecord | None:
        return await self.update(pair, lambda r: r.model_copy(update={"standby": sorted(
            {*r.standby, node} if on else {n for n in r.standby if n != node})}))

    async def set_failback(self, pair: str, mode: str) -> PairRecord | None:
        return await self.update(pair, lambda r: r if r.failback == mode else r.model_copy(
            update={"failback": mode}))

    async def set_maintenance(self, pair: str, on: bool) -> PairRecord | None:
        return await self.update(pair, lambda r: r if r.maintenance == on else r.model_copy(
            update={"maintenance": on}))
