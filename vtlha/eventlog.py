"""Reading the event stream: a finite range by sequence (``read``) or following new
events as they arrive (``follow``, an ordered consumer from a start sequence).

Both drop a second copy of an event (same ``Event.id``): the stream drops one within its
duplicate window, but an outbox drained after a longer outage may store one again.
What a reader sees is therefore each event once, at its first copy's number."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncGenerator

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from vtlha.errors import InvalidMessage
from vtlha.messages import Event, decode
from vtlha.subjects import Subjects

#: how many ids ``follow`` remembers (a duplicate arrives within an outbox drain)
FOLLOW_MEMORY = 100_000


class Dedupe:
    """Remembers the ids seen (the most recent ``memory`` of them): ``first(event)`` is
    True for the first copy of an event, False for any later one."""

    def __init__(self, memory: int = FOLLOW_MEMORY) -> None:
        self.memory = memory
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.dropped = 0

    def first(self, event: Event) -> bool:
        if event.id in self._seen:
            self.dropped += 1
            return False
        self._seen[event.id] = None
        if len(self._seen) > self.memory:
            self._seen.popitem(last=False)
        return True


async def read(js: JetStreamContext, subjects: Subjects, since: int = 1,
               timeout: float = 2.0) -> list[tuple[int, Event]]:
    """Every event from sequence ``since`` to the stream's current end, each once."""
    try:
        info = await js.stream_info(subjects.events_stream)
    except NotFoundError:
        return []
    last = info.state.last_seq
    first = max(since, info.state.first_seq)
    out: list[tuple[int, Event]] = []
    seen = Dedupe(memory=max(1, last - first + 1))
    for seq in range(first, last + 1):
        try:
            raw = await asyncio.wait_for(js.get_msg(subjects.events_stream, seq), timeout)
        except NotFoundError:
            continue
        try:
            event = decode(Event, raw.data or b"")
        except InvalidMessage:
            continue
        if seen.first(event):
            out.append((seq, event))
    return out


async def follow(js: JetStreamContext, subjects: Subjects,
                 since: int = 1) -> AsyncGenerator[tuple[int, Event], None]:
    # Ordered consumers from a start *sequence* survive a server's death (PLATFORM.md);
    # from a start time they do not.
    cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                         opt_start_seq=max(1, since))
    sub = await js.subscribe(subjects.events_all, ordered_consumer=True, config=cfg)
    seen = Dedupe()
    try:
        async for msg in sub.messages:
            try:
                event = decode(Event, msg.data)
            except InvalidMessage:
                continue
            if seen.first(event):
                yield msg.metadata.sequence.stream, event
    finally:
        await sub.unsubscribe()


def format_event(seq: int, e: Event) -> str:
    parts = [f"#{seq:<4} {e.kind:<20}"]
    if e.group:
        parts.append(f"{e.group:<12}")
    if e.group and (e.old or e.new):
        parts.append(f"{e.old or '-'} -> {e.new or '-'}")
    elif not e.group:
        parts.append(f"{e.old or e.new or e.node:<12}")
    if e.epoch is not None:
        parts.append(f"epoch {e.epoch}")
    parts.append(f"| {e.reason}")
    return " ".join(parts)
