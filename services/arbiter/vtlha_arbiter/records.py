"""The group records in the KV (``group.<group>``): loaded at start, followed by a
watch, read directly when the watch may lag, and changed only by compare-and-set. Every
record read, watched or written goes into the ``ClusterView``, which ignores a revision
older than one it applied."""

from __future__ import annotations

import contextlib
import time

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import Counter

from vtlha.bounded import bounded
from vtlha.errors import InvalidMessage
from vtlha.messages import GroupRecord, decode, encode
from vtlha_arbiter.host import Host
from vtlha_arbiter.view import ClusterView

STALL_INTERVALS = 5  # heartbeat intervals without a watch delivery before a check reads


class GroupRecords:
    def __init__(self, host: Host, view: ClusterView) -> None:
        self.host = host
        self.view = view
        self.kv: KeyValue | None = None
        self.watcher: KeyValue.KeyWatcher | None = None
        self.watched: dict[str, int] = {}  # group -> newest revision the watch delivered
        self.last_delivery = time.monotonic()
        #: bumped when the bucket is recreated: an answer to a request sent before is the
        #: old bucket's and never applied
        self.generation = 0
        self.restarts = Counter("vtlha_arbiter_watch_restarts_total",
                                "Group watches restarted because they stalled",
                                registry=host.registry)

    def _apply(self, group: str, rec: GroupRecord, revision: int,
               generation: int | None = None) -> None:
        if generation is not None and generation != self.generation:
            return  # sent to the bucket before it was recreated
        self.view.set_record(group, rec, revision, time.monotonic())

    def forget(self) -> None:
        """The KV bucket was recreated: forget every record and high-water mark of the
        old one (its revisions are above the new bucket's); an answer to a request sent
        before counts for nothing. ``rewatch`` then follows the new one."""
        self.generation += 1
        self.view.forget_records()
        self.watched.clear()

    async def rewatch(self) -> None:
        """Watch and load the new bucket (after ``forget``)."""
        await self.stop_watch()
        await self.start_watch()
        await self.load()

    # ---- the watch, and its stall check ------------------------------------------------
    async def start_watch(self) -> None:
        assert self.kv is not None
        self.watcher = await self.kv.watch("group.>")
        self.last_delivery = time.monotonic()
        self.host.spawn(self.watch(self.watcher), "kv-watch", critical=False)

    async def stop_watch(self) -> None:
        w, self.watcher = self.watcher, None
        if w is not None:
            with contextlib.suppress(Exception):
                await w.stop()  # type: ignore[no-untyped-call]

    def is_stalled(self, read: dict[str, int], now: float) -> bool:
        """The watch stalled: nothing delivered for ``STALL_INTERVALS`` heartbeat
        intervals while a direct read shows a revision it never delivered. Pure."""
        interval = self.host.config.timings.heartbeat_interval
        quiet = now - self.last_delivery > STALL_INTERVALS * interval
        return quiet and any(rev > self.watched.get(g, 0) for g, rev in read.items())

    async def check(self) -> None:
        """Every few heartbeat intervals: read every group key directly (a backstop for a
        lagging watch; the view keeps the newest revision) and restart a stalled watch."""
        if self.kv is None:
            return
        read: dict[str, int] = {}
        for group in self.host.config.groups():
            got = await self.read(group)
            if got is not None:
                read[group] = got[1]
        if self.watcher is not None and self.is_stalled(read, time.monotonic()):
            self.restarts.inc()
            self.host.log.warning("group watch stalled: restarting it", extra={
                "read": read, "watched": dict(self.watched)})
            await self.stop_watch()
            await self.start_watch()

    async def load(self) -> None:
        assert self.kv is not None
        gen = self.generation
        for group in self.host.config.groups():
            try:
                entry = await self.kv.get(self.host.subjects.group_key(group))
            except (KeyNotFoundError, NotFoundError):
                continue
            if entry.value and entry.revision is not None:
                self._apply(group, decode(GroupRecord, entry.value), entry.revision, gen)

    async def read(self, group: str) -> tuple[GroupRecord, int] | None:
        """Read one key directly (the watch may lag) and apply it; returns what was read
        (None: absent, unreadable or invalid; the view stays as it is)."""
        assert self.kv is not None
        gen = self.generation
        try:
            entry = await bounded(self.kv.get(self.host.subjects.group_key(group)),
                                  self.host.config.timings.command_timeout)
        except Exception:
            return None
        if not entry.value or entry.revision is None:
            return None
        try:
            rec = decode(GroupRecord, entry.value)
        except InvalidMessage:
            self.host.invalid_messages.labels("group-record").inc()
            return None
        if gen != self.generation:
            return None  # the old bucket's answer
        self._apply(group, rec, entry.revision)
        return rec, entry.revision

    async def watch(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if watcher is not self.watcher:
                return  # replaced
            self.last_delivery = time.monotonic()
            if entry is None or not entry.value or entry.revision is None:
                continue
            group = entry.key.removeprefix("group.")
            if group not in self.host.config.groups():
                continue
            self.watched[group] = max(self.watched.get(group, 0), entry.revision)
            try:
                self._apply(group, decode(GroupRecord, entry.value), entry.revision)
            except InvalidMessage as exc:
                self.host.invalid_messages.labels("group-record").inc()
                self.host.log.warning("invalid group record", extra={"key": entry.key,
                                                                     "error": str(exc)})

    async def cas(self, group: str, rec: GroupRecord, last: int | None) -> int | None:
        """Create (last None) or compare-and-set the group key; None when it lost."""
        assert self.kv is not None
        key = self.host.subjects.group_key(group)
        gen = self.generation
        try:
            if last is None:
                rev = int(await self.kv.create(key, encode(rec)))
            else:
                rev = int(await self.kv.update(key, encode(rec), last=last))
        except KeyWrongLastSequenceError:
            self.host.log.info("compare-and-set lost: the group changed since the arbiter "
                               "saw it", extra={"group": group, "last": last})
            return None
        self._apply(group, rec, rev, gen)
        return rev
