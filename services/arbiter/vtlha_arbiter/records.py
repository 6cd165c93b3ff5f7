"""The group records in the KV (``group.<group>``): loaded at start, followed by a
watch, read directly when the watch may lag, and changed only by compare-and-set. Every
record read, watched or written goes into the ``ClusterView``, which ignores a revision
older than one it applied."""

from __future__ import annotations

import asyncio
import time

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from vtlha.errors import InvalidMessage
from vtlha.messages import GroupRecord, decode, encode
from vtlha_arbiter.host import Host
from vtlha_arbiter.view import ClusterView


class GroupRecords:
    def __init__(self, host: Host, view: ClusterView) -> None:
        self.host = host
        self.view = view
        self.kv: KeyValue | None = None

    def _apply(self, group: str, rec: GroupRecord, revision: int) -> None:
        self.view.set_record(group, rec, revision, time.monotonic())

    async def load(self) -> None:
        assert self.kv is not None
        for group in self.host.config.groups():
            try:
                entry = await self.kv.get(self.host.subjects.group_key(group))
            except (KeyNotFoundError, NotFoundError):
                continue
            if entry.value and entry.revision is not None:
                self._apply(group, decode(GroupRecord, entry.value), entry.revision)

    async def read(self, group: str) -> tuple[GroupRecord, int] | None:
        """Read one key directly (the watch may lag) and apply it; returns what was read
        (None: absent, unreadable or invalid; the view stays as it is)."""
        assert self.kv is not None
        try:
            entry = await asyncio.wait_for(self.kv.get(self.host.subjects.group_key(group)),
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
        self._apply(group, rec, entry.revision)
        return rec, entry.revision

    async def watch(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None or not entry.value or entry.revision is None:
                continue
            group = entry.key.removeprefix("group.")
            if group not in self.host.config.groups():
                continue
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
        try:
            if last is None:
                rev = int(await self.kv.create(key, encode(rec)))
            else:
                rev = int(await self.kv.update(key, encode(rec), last=last))
        except KeyWrongLastSequenceError:
            self.host.log.info("compare-and-set lost: the group changed since the arbiter "
                               "saw it", extra={"group": group, "last": last})
            return None
        self._apply(group, rec, rev)
        return rev
