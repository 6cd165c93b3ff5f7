"""Reading the event stream: a finite range by sequence (``read``) or following new
events as they arrive (``follow``, an ordered consumer from a start sequence); the first
sequence stored at or after a time (``seq_since``), so that reading from a time is
reading from a sequence (an ordered consumer started by time does not survive its
server's death: PLATFORM.md).

Both drop a second copy of an event (same ``Event.id``): the stream drops one within its
duplicate window, but an outbox drained after a longer outage may store one again.
What a reader sees is therefore each event once, at its first copy's number."""

from __future__ import annotations

import asyncio
import datetime
from collections import OrderedDict
from collections.abc import AsyncGenerator

import orjson
from nats.aio.client import Client as NATS
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

    def has(self, event_id: str) -> bool:
        """True when an event with this id was seen (among the last ``memory``)."""
        return event_id in self._seen

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


#: JetStream's "no message found" (a time after the last message)
NO_MESSAGE = 10037


async def seq_since(nc: NATS, subjects: Subjects, wall: float, timeout: float = 2.0) -> int:
    """The sequence of the first event the stream stored at or after wall-clock time
    ``wall`` (the server's ``STREAM.MSG.GET`` by ``start_time``); the stream's last
    sequence + 1 when it stored none since; 1 when the stream does not exist yet."""
    at = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    req = orjson.dumps({"start_time": at.isoformat().replace("+00:00", "Z")})
    reply = await nc.request(Subjects.js_api("STREAM", "MSG", "GET", subjects.events_stream),
                             req, timeout=timeout)
    body = orjson.loads(reply.data)
    if not isinstance(body, dict):
        raise InvalidMessage(f"STREAM.MSG.GET answered {body!r}")
    err = body.get("error")
    if isinstance(err, dict):
        if err.get("err_code") == NO_MESSAGE:
            try:
                info = await asyncio.wait_for(nc.jetstream().stream_info(
                    subjects.events_stream), timeout)
            except NotFoundError:
                return 1
            return int(info.state.last_seq) + 1
        if err.get("code") == 404 and "stream not found" in str(err.get("description")):
            return 1
        raise InvalidMessage(f"STREAM.MSG.GET by time refused: {err.get('description')}")
    seq = body.get("message", {}).get("seq") if isinstance(body.get("message"), dict) else None
    if not isinstance(seq, int) or seq < 1:
        raise InvalidMessage(f"STREAM.MSG.GET by time answered no sequence: {body!r:.200}")
    return seq


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
