"""A service's durable event outbox: events are never lost, and never in the way.

``put`` writes an event to a file of its own under the service's state directory
(``<state>/<node>/outbox-<service>/``) and returns at once: a write to a temporary
file and a rename, no network and no fsync on the caller's path, so it survives the
process being killed the moment ``put`` returns. The drain loop (``run``) then, in
order, fsyncs what it is about to publish (so it survives a power loss as well),
publishes it with its id as the JetStream message id (``Nats-Msg-Id``: the stream drops
a second copy within its duplicate window) and retries with backoff (tenacity) until the
stream stores it; only then is the file removed. At start the files left by a killed
process are loaded and drained first, in their order.

Bounded (``max_events``, ``max_bytes``): when the outbox is full a new event is
**refused, never silently**: it is logged at error level with its kind and reason,
counted in ``vtlha_events_dropped_total``, and remembered (durably, ``dropped.json``);
once there is room again an ``events.dropped`` event says how many of which kinds were
lost and when. The oldest pending events are kept: they explain how the outage began.

A publish the stream refuses for good (a bad request, code 400) is retried a few times,
then moved to ``rejected/`` and counted, so one bad event cannot block the others behind
it. Every other answer (no responders, a timeout, 503, or any other API error, such as
a server cut off from the stream's quorum gives) means "unavailable": retried for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError
from prometheus_client import CollectorRegistry, Counter, Gauge
from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_exponential

from vtlha import bus
from vtlha.errors import InvalidMessage
from vtlha.messages import Event, decode, encode
from vtlha.subjects import Subjects

#: a pending event as the drain loop publishes it; returns True when the stream said
#: the message id was a duplicate (it was stored before)
Publish = Callable[[Event], Awaitable[bool]]

PUBLISH_TIMEOUT = 1.0  # seconds one publish attempt may take
#: what a publish raises while the stream cannot store (BadRequestError, a 400, is
#: caught before: it is a refusal for good)
UNAVAILABLE: tuple[type[BaseException], ...] = (*bus.JS_UNAVAILABLE, APIError)
DEFAULT_MAX_EVENTS = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DROPPED_KIND = "events.dropped"
REJECT_AFTER = 5  # attempts before an event the stream refuses for good is set aside
RETRY_MAX_WAIT = 2.0  # seconds, the longest backoff between publish attempts


class Unavailable(Exception):
    """Raised by a ``Publish`` when the stream could not be reached or did not answer
    (retried for ever); anything else it raises counts towards ``REJECT_AFTER``."""


def stream_publisher(js: Callable[[], JetStreamContext], subjects: Subjects,
                     timeout: float = PUBLISH_TIMEOUT) -> Publish:
    """The ``Publish`` of a service: one attempt to store an event in the event stream
    with its id as the message id; "cannot reach it" is ``Unavailable``."""

    async def _publish(event: Event) -> bool:
        try:
            _, duplicate = await bus.publish_event(js(), subjects, event, timeout=timeout)
        except NoStreamResponseError as exc:
            raise Unavailable("no event stream (not created yet?)") from exc
        except BadRequestError:
            raise  # refused for good: the outbox tries a few times, then sets it aside
        except UNAVAILABLE as exc:
            # any other answer (no quorum on this side of a partition, no leader, a server
            # starting) is the stream being unavailable: retried for ever
            raise Unavailable(str(exc) or repr(exc)) from exc
        return duplicate

    return _publish


@dataclass
class _Entry:
    path: Path
    event: Event
    size: int
    synced: bool = False


class Outbox:
    def __init__(self, directory: Path, registry: CollectorRegistry,
                 log: logging.Logger | None = None, max_events: int = DEFAULT_MAX_EVENTS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.dir = directory
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.log = log or logging.getLogger("vtlha.outbox")
        self._pending: deque[_Entry] = deque()
        self._bytes = 0
        self._next = 0
        self._wake = asyncio.Event()
        self._dropped: dict[str, Any] = {}
        self._loaded = False
        self.published = Counter("vtlha_events_published_total",
                                 "Events the stream stored (or already had: duplicate)",
                                 ["result"], registry=registry)
        self.retries = Counter("vtlha_events_publish_retries_total",
                               "Publish attempts that failed and were retried",
                               registry=registry)
        self.dropped = Counter("vtlha_events_dropped_total",
                               "Events not recorded: the outbox was full, or the stream "
                               "refused them for good", ["reason"], registry=registry)
        Gauge("vtlha_outbox_pending", "Events in the outbox, not yet stored by the stream",
              registry=registry).set_function(lambda: float(len(self._pending)))

    # ---- the caller's side ---------------------------------------------------
    def load(self) -> int:
        """Read what a previous process left (in order); returns how many events."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # killed mid-write: never acknowledged to anyone
        for path in sorted(self.dir.glob("[0-9]*-*.json")):
            try:
                event = decode(Event, path.read_bytes(), max_bytes=self.max_bytes)
            except (InvalidMessage, OSError) as exc:
                self._set_aside(path, f"unreadable: {exc}")
                continue
            self._next = max(self._next, _number(path) + 1)
            self._append(_Entry(path, event, path.stat().st_size, synced=False))
        with contextlib.suppress(OSError, orjson.JSONDecodeError):
            self._dropped = orjson.loads((self.dir / "dropped.json").read_bytes())
        self._loaded = True
        if self._pending:
            self.log.info("outbox has events from before the restart",
                          extra={"pending": len(self._pending)})
            self._wake.set()
        return len(self._pending)

    def put(self, event: Event) -> bool:
        """Record ``event`` durably for publishing; False when the outbox is full (the
        event is then dropped, logged and counted, and an ``events.dropped`` follows)."""
        if not self._loaded:
            self.load()
        body = encode(event)
        if len(self._pending) >= self.max_events or self._bytes + len(body) > self.max_bytes:
            self._note_dropped(event, "outbox full")
            return False
        path = self.dir / f"{self._next:020d}-{event.id}.json"
        self._next += 1
        try:
            _write_new(path, body)
        except OSError as exc:  # disk full, read-only: say so, never raise to the caller
            self._note_dropped(event, f"cannot write {path}: {exc}")
            return False
        self._append(_Entry(path, event, len(body)))
        self._wake.set()
        return True

    def pending(self) -> list[Event]:
        return [e.event for e in self._pending]

    def status(self) -> dict[str, Any]:
        return {"pending": len(self._pending), "bytes": self._bytes,
                "max_events": self.max_events, "max_bytes": self.max_bytes,
                "dropped_unreported": self._dropped.get("count", 0)}

    # ---- the drain loop ------------------------------------------------------
    async def run(self, publish: Publish, stopping: asyncio.Event) -> None:
        """Publish every pending event in order, each retried until stored; until
        ``stopping``, after which each remaining event gets one more attempt and what
        is left stays on disk for the next start."""
        if not self._loaded:
            self.load()
        while True:
            if not self._pending:
                if stopping.is_set():
                    return
                self._wake.clear()
                waiters = {asyncio.ensure_future(stopping.wait()),
                           asyncio.ensure_future(self._wake.wait())}
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
                continue
            if not await self._publish_head(publish, stopping):
                return  # stopping and the stream is not answering: keep the rest
            self._report_dropped()

    async def _publish_head(self, publish: Publish, stopping: asyncio.Event) -> bool:
        await self._sync()
        entry = self._pending[0]
        failures = 0
        async for attempt in AsyncRetrying(
            stop=stop_never, wait=wait_exponential(multiplier=0.02, max=RETRY_MAX_WAIT),
            retry=retry_if_exception_type(Exception), reraise=True,
        ):
            with attempt:
                try:
                    duplicate = await publish(entry.event)
                except Unavailable:
                    self.retries.inc()
                    if stopping.is_set():
                        return False
                    raise
                except Exception as exc:
                    failures += 1
                    self.retries.inc()
                    if failures < REJECT_AFTER:
                        self.log.warning("event refused by the stream, retrying", extra={
                            "kind": entry.event.kind, "id": entry.event.id,
                            "error": str(exc) or repr(exc)})
                        raise
                    self._pending.popleft()
                    self._bytes -= entry.size
                    self._set_aside(entry.path, str(exc) or repr(exc))
                    self.dropped.labels("refused").inc()
                    return True
        self.published.labels("duplicate" if duplicate else "stored").inc()
        self._pending.popleft()
        self._bytes -= entry.size
        entry.path.unlink(missing_ok=True)
        return True

    async def _sync(self) -> None:
        """fsync every pending file not yet synced, and the directory, in a thread."""
        todo = [e for e in self._pending if not e.synced]
        if not todo:
            return
        await asyncio.to_thread(_fsync_all, [e.path for e in todo], self.dir)
        for e in todo:
            e.synced = True

    # ---- bookkeeping -------------------------------------------------------------
    def _append(self, entry: _Entry) -> None:
        self._pending.append(entry)
        self._bytes += entry.size

    def _note_dropped(self, event: Event, why: str) -> None:
        self.dropped.labels("full" if why == "outbox full" else "unwritable").inc()
        self.log.error("event DROPPED: not recorded in the outbox", extra={
            "kind": event.kind, "id": event.id, "reason": event.reason, "why": why,
            "pending": len(self._pending), "bytes": self._bytes})
        d = self._dropped
        d["count"] = d.get("count", 0) + 1
        kinds = d.setdefault("kinds", {})
        kinds[event.kind] = kinds.get(event.kind, 0) + 1
        d.setdefault("first_at", event.sent_at)
        d["last_at"] = event.sent_at
        d.setdefault("template", {"cluster": event.cluster, "node": event.node,
                                  "pair": event.pair})
        self._write_dropped()

    def _report_dropped(self) -> None:
        """Once there is room: one ``events.dropped`` event for what was refused."""
        d = self._dropped
        if not d.get("count") or len(self._pending) >= self.max_events // 2:
            return
        tpl = d.get("template", {})
        event = Event(cluster=tpl.get("cluster", ""), node=tpl.get("node", ""),
                      pair=tpl.get("pair"), kind=DROPPED_KIND,
                      reason=f"{d['count']} event(s) were not recorded: the outbox of "
                             f"{self.dir.name} on {tpl.get('node')} was full",
                      data={"count": d["count"], "kinds": d.get("kinds", {}),
                            "first_at": d.get("first_at"), "last_at": d.get("last_at")})
        self._dropped = {}
        if self.put(event):
            self._write_dropped()
        else:
            self._dropped = d

    def _write_dropped(self) -> None:
        path = self.dir / "dropped.json"
        if not self._dropped:
            path.unlink(missing_ok=True)
            return
        with contextlib.suppress(OSError):
            _write_new(path.with_suffix(".new"), orjson.dumps(self._dropped), replace=path)

    def _set_aside(self, path: Path, why: str) -> None:
        aside = self.dir / "rejected"
        aside.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            os.rename(path, aside / path.name)
        self.log.error("event set aside, not published", extra={"file": str(aside / path.name),
                                                                "why": why})


def _write_new(path: Path, body: bytes, replace: Path | None = None) -> None:
    """Write ``body`` to a temporary file and rename it to ``path`` (or ``replace``):
    a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.rename(tmp, replace or path)


def _number(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[0])
    except ValueError:
        return 0


def _fsync_all(paths: list[Path], directory: Path) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
