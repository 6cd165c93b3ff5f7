"""The event timeline: the last events of the stream, followed as ``vtlha events
--follow`` does (an ordered consumer from a start *sequence*, which survives a
server's death). Only the dashboard waits on the stream; nothing on a failover path
does."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from vtlha import eventlog
from vtlha.messages import Event
from vtlha.subjects import Subjects

#: seconds to wait before following again after an error (the stream not there yet, a
#: server gone)
RETRY_S = 1.0
STREAM_INFO_TIMEOUT = 3.0

log = logging.getLogger("vtlha.dashboard.timeline")


def event_json(seq: int, e: Event) -> dict[str, Any]:
    """What the page shows of an event (not its policy inputs: ``vtlha explain``)."""
    return {"seq": seq, "id": e.id, "kind": e.kind, "reason": e.reason, "pair": e.pair,
            "group": e.group, "old": e.old, "new": e.new, "epoch": e.epoch, "term": e.term,
            "node": e.node, "sent_at": e.sent_at,
            "operator": e.data.get("operator") if isinstance(e.data, dict) else None}


class Timeline:
    def __init__(self, js: Callable[[], JetStreamContext], subjects: Subjects,
                 keep: int, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.js, self.subjects, self.on_event = js, subjects, on_event
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.next_seq: int | None = None
        self.error: str | None = None

    async def _start_seq(self) -> int:
        info = await asyncio.wait_for(self.js().stream_info(self.subjects.events_stream),
                                      STREAM_INFO_TIMEOUT)
        return max(1, int(info.state.last_seq) - (self.recent.maxlen or 1) + 1)

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                if self.next_seq is None:
                    self.next_seq = await self._start_seq()
                async with contextlib.aclosing(
                        eventlog.follow(self.js(), self.subjects, self.next_seq)) as stream:
                    self.error = None
                    async for seq, e in stream:
                        self.next_seq = seq + 1
                        item = event_json(seq, e)
                        self.recent.append(item)
                        self.on_event(item)
            except NotFoundError:
                self.error = f"no event stream {self.subjects.events_stream} yet"
            except Exception as exc:  # a server gone, a timeout: follow again
                self.error = f"cannot follow the events: {str(exc) or type(exc).__name__}"
                log.warning("timeline interrupted", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), RETRY_S)
