"""Server-Sent Events: the wire encoding (pure) and the fan-out to connected browsers.

One event is ``event:``, ``id:`` and one ``data:`` line per line of its data, ended by
an empty line (the WHATWG HTML standard, "Server-sent events"). A browser that falls
behind is dropped rather than buffered without end: its ``EventSource`` reconnects and
is sent the whole picture again."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

#: at most this many events wait for one browser; more and it is dropped
QUEUE_MAX = 256

_NEWLINES = re.compile(r"\r\n|\r|\n")


def encode(data: str, event: str | None = None, event_id: str | None = None,
           retry_ms: int | None = None) -> bytes:
    """One event on the wire. ``data`` may hold newlines (each line its own ``data:``
    field, joined by the browser with ``\\n``); ``event`` and ``event_id`` may not, nor
    may ``event_id`` hold NUL (the browser would ignore it)."""
    out: list[str] = []
    for name, value in (("event", event), ("id", event_id)):
        if value is None:
            continue
        if _NEWLINES.search(value) or "\0" in value:
            raise ValueError(f"an SSE {name} may not hold a newline or NUL: {value!r}")
        out.append(f"{name}: {value}")
    if retry_ms is not None:
        if retry_ms < 0:
            raise ValueError("retry must be >= 0 ms")
        out.append(f"retry: {retry_ms}")
    out += [f"data: {line}" for line in _NEWLINES.split(data)]
    return ("\n".join(out) + "\n\n").encode()


def comment(text: str = "") -> bytes:
    """A comment line: ignored by the browser, keeps idle connections open."""
    return f": {_NEWLINES.sub(' ', text)}\n\n".encode()


@dataclass(eq=False)
class Client:
    """One connected browser: what waits to be sent to it."""

    queue: asyncio.Queue[bytes | None] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_MAX))
    dropped: bool = False


class Hub:
    """Every connected browser; ``publish`` never waits."""

    def __init__(self) -> None:
        self.clients: set[Client] = set()
        self.dropped = 0
        self.closed = False

    def join(self) -> Client:
        """A new browser's queue (one that ends at once when the hub is closed)."""
        c = Client()
        if self.closed:
            c.queue.put_nowait(None)
        else:
            self.clients.add(c)
        return c

    def leave(self, c: Client) -> None:
        self.clients.discard(c)

    def publish(self, frame: bytes) -> None:
        for c in list(self.clients):
            try:
                c.queue.put_nowait(frame)
            except asyncio.QueueFull:
                self._drop(c)

    def _drop(self, c: Client) -> None:
        """Too far behind: end its stream (a sentinel in place of what is queued)."""
        self.clients.discard(c)
        self.dropped += 1
        c.dropped = True
        while not c.queue.empty():
            c.queue.get_nowait()
        c.queue.put_nowait(None)

    def close(self) -> None:
        """End every stream, and every one that joins later (shutdown)."""
        self.closed = True
        for c in list(self.clients):
            self.clients.discard(c)
            while not c.queue.empty():
                c.queue.get_nowait()
            c.queue.put_nowait(None)
