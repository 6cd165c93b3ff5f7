"""The NATS connection and the JetStream objects every service shares.

Connect with reconnect and backoff (the initial connect is retried with tenacity;
later reconnects are nats-py's own, to every server of the list, own node's first).
Every request has a timeout; nothing here waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from vtlha.messages import Ack, Command, Event, decode, encode
from vtlha.natsauth import NONE, ClientAuth
from vtlha.subjects import Subjects

log = logging.getLogger("vtlha.bus")

KV_HISTORY = 16


T = TypeVar("T")

#: what a JetStream call raises while the cluster has no leader or quorum yet
JS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError,
    ServiceUnavailableError, NoStreamResponseError, nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
)


async def retry_js(what: str, fn: Callable[[], Awaitable[T]], deadline: float = 60.0,
                   not_found_too: bool = False) -> T:
    """Run a JetStream set-up call, retried with backoff while the cluster is not ready
    (no meta leader yet, a restart under way) for up to ``deadline`` seconds. With
    ``not_found_too`` a "not found" is retried as well (a server that just started may
    not know a stream another server created a moment ago)."""
    retryable = JS_UNAVAILABLE + ((NotFoundError,) if not_found_too else ())
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(deadline),
        wait=wait_exponential(multiplier=0.1, max=2.0),
        retry=retry_if_exception_type(retryable),
        before_sleep=lambda rs: log.info("jetstream not ready, retrying",
                                         extra={"what": what, "attempt": rs.attempt_number}),
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")


def server_url(nc: NATS) -> str | None:
    """The URL of the server ``nc`` is connected to, or None."""
    return nc.connected_url.geturl() if nc.is_connected and nc.connected_url else None


async def connect(
    servers: Sequence[str],
    name: str,
    connect_deadline: float = 30.0,
    auth: ClientAuth = NONE,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connect to the first reachable server of ``servers`` (own node's first), retrying
    with exponential backoff for up to ``connect_deadline`` seconds, as ``auth`` says
    (credential, TLS; none by default). ``on_reconnect`` runs after every reconnect
    (the replies to requests sent on the old connection will not come)."""

    async def _disconnected() -> None:
        log.warning("nats disconnected")

    async def _reconnected() -> None:
        log.info("nats reconnected", extra={"server": server_url(nc)})
        if on_reconnect is not None:
            try:
                await on_reconnect()
            except Exception as exc:  # a hook's failure must not break the client
                log.error("reconnect hook failed", extra={"error": repr(exc)})

    async def _error(exc: Exception) -> None:
        log.warning("nats error", extra={"error": repr(exc)})

    nc = NATS()
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(connect_deadline),
        wait=wait_exponential(multiplier=0.05, max=2.0),
        retry=retry_if_exception_type((OSError, nats.errors.Error, asyncio.TimeoutError)),
        reraise=True,
    ):
        with attempt:
            await nc.connect(
                servers=list(servers),
                name=name,
                dont_randomize=True,
                connect_timeout=1,
                reconnect_time_wait=0.05,  # type: ignore[arg-type]
                max_reconnect_attempts=-1,
                ping_interval=2,
                max_outstanding_pings=2,
                allow_reconnect=True,
                disconnected_cb=_disconnected,
                reconnected_cb=_reconnected,
                error_cb=_error,
                **auth.connect_options(),
            )
    return nc


#: a bucket's first revision counts microseconds of the wall clock when it is created
FIRST_REVISION_PER_SECOND = 1_000_000


def kv_first_revision(now: float, floor: int = 0) -> int:
    """The first revision of a KV bucket created at wall-clock ``now``: its time in
    microseconds, and above ``floor`` (the highest revision its creator knows of a
    bucket it replaces). Revisions are the stream's sequence numbers; a bucket lost and
    created again would otherwise start them at 1 again, and a compare-and-set made
    against a revision of the old bucket (a lease holder or an arbiter that has not
    noticed the new one yet) would succeed whenever the new bucket's key stood at that
    very revision (found by the simulator: two holders). Counted from the clock, a new
    bucket starts above every revision of an older one unless that one took more than a
    million writes a second of its life, or the creators' clocks differ by more than
    the older bucket's age; terms (revisions too) then never go down either."""
    return max(int(now * FIRST_REVISION_PER_SECOND), floor + 1)


def kv_stream_config(subjects: Subjects, replicas: int, first_seq: int) -> StreamConfig:
    """The KV bucket's stream, as nats-py's ``create_key_value`` makes it (history
    ``KV_HISTORY``, file storage), with its first revision set (``kv_first_revision``)."""
    return StreamConfig(
        name=subjects.kv_stream,
        subjects=[subjects.kv_subject()],
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=DiscardPolicy.NEW,
        duplicate_window=120.0,
        max_consumers=-1,
        max_msgs=-1,
        max_msgs_per_subject=KV_HISTORY,
        num_replicas=replicas,
        storage=StorageType.FILE,
        first_seq=first_seq,
    )


async def ensure_kv(js: JetStreamContext, subjects: Subjects, replicas: int,
                    floor: int = 0) -> KeyValue:
    """The KV bucket, created when absent (only the arbiter, or an operator's admin
    command, does that) with its first revision above every revision of an older
    bucket (``kv_first_revision``; ``floor``: the highest its caller knows)."""
    try:
        return await js.key_value(subjects.kv_bucket)
    except NotFoundError:
        pass
    with contextlib.suppress(BadRequestError):  # (created by someone else in between)
        await js.add_stream(kv_stream_config(subjects, replicas,
                                             kv_first_revision(time.time(), floor)))
    return await js.key_value(subjects.kv_bucket)


async def kv_identity(nc: NATS, subjects: Subjects, timeout: float = 1.0) -> str:
    """The identity of the KV bucket as it exists now: its stream's creation time as the
    server reports it (RFC 3339, nanoseconds; the same on every replica, and new when
    the bucket is deleted and created again). Raises NotFoundError when the bucket does
    not exist, and what a request raises (timeout, no responders) otherwise."""
    reply = await nc.request(f"$JS.API.STREAM.INFO.{kv_stream(subjects)}", b"",
                             timeout=timeout)
    data = orjson.loads(reply.data)
    err = data.get("error")
    if err:
        if err.get("code") == 404:
            raise NotFoundError(code=404, description=str(err.get("description", "")))
        raise ServiceUnavailableError(code=err.get("code"),
                                      description=str(err.get("description", "")))
    created = data.get("created")
    if not isinstance(created, str) or not created:
        raise ServiceUnavailableError(description="stream info without a creation time")
    return created


async def wait_for_kv(js: JetStreamContext, subjects: Subjects, what: str) -> KeyValue:
    """The KV bucket, once it exists: only the arbiter (or an operator's admin command)
    creates it, never a node's services at start. Retried with backoff, forever, with a
    log line per try (a missing bucket is worth seeing: no arbiter has run yet, or the
    bucket was lost)."""
    attempt = 0
    retryable: tuple[type[BaseException], ...] = (NotFoundError, *JS_UNAVAILABLE)
    while True:
        try:
            return await js.key_value(subjects.kv_bucket)
        except retryable as exc:
            attempt += 1
            delay = min(2.0, 0.05 * 2 ** min(attempt, 6))
            log.info("waiting for the KV bucket", extra={
                "what": what, "bucket": subjects.kv_bucket, "attempt": attempt,
                "error": type(exc).__name__})
            await asyncio.sleep(delay)


#: seconds within which the event stream drops a second message with the same id
EVENTS_DUPLICATE_WINDOW = 120.0


def events_stream_config(subjects: Subjects, replicas: int, max_bytes: int, max_age: float,
                         duplicate_window: float = EVENTS_DUPLICATE_WINDOW,
                         max_msgs: int = -1) -> StreamConfig:
    """The event stream: limits retention (``max_age``, ``max_bytes``, ``max_msgs``; -1:
    no count limit), the oldest events dropped first."""
    return StreamConfig(
        name=subjects.events_stream,
        subjects=[subjects.events_all],
        retention=RetentionPolicy.LIMITS,
        max_age=max_age,
        max_bytes=max_bytes,
        max_msgs=max_msgs,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window,
    )


async def ensure_events_stream(js: JetStreamContext, subjects: Subjects, replicas: int,
                               max_bytes: int, max_age: float,
                               duplicate_window: float = EVENTS_DUPLICATE_WINDOW,
                               max_msgs: int = -1) -> None:
    """Create the event stream, or bring an existing one's limits (age, bytes, count)
    and duplicate window to these (a stream created before the window was set has the
    server's default; an operator may change the retention in the cluster file)."""
    cfg = events_stream_config(subjects, replicas, max_bytes, max_age, duplicate_window,
                               max_msgs)
    try:
        info = await js.stream_info(subjects.events_stream)
    except NotFoundError:
        try:
            await js.add_stream(cfg)
            return
        except BadRequestError:
            info = await js.stream_info(subjects.events_stream)
    have = info.config
    if (abs((have.duplicate_window or 0) - duplicate_window) > 1e-3
            or have.max_bytes != max_bytes or abs((have.max_age or 0) - max_age) > 1e-3
            or (have.max_msgs if have.max_msgs is not None else -1) != max_msgs):
        log.info("updating the event stream's limits", extra={
            "duplicate_window": duplicate_window, "max_age": max_age, "max_bytes": max_bytes,
            "max_msgs": max_msgs, "was": {"duplicate_window": have.duplicate_window,
                                          "max_age": have.max_age,
                                          "max_bytes": have.max_bytes,
                                          "max_msgs": have.max_msgs}})
        await js.update_stream(cfg.evolve(num_replicas=have.num_replicas or replicas))


def kv_stream(subjects: Subjects) -> str:
    return subjects.kv_stream


async def stream_leader(js: JetStreamContext, stream: str) -> str | None:
    info = await js.stream_info(stream)
    return info.cluster.leader if info.cluster is not None else None


async def prefer_leader(nc: NATS, js: JetStreamContext, stream: str, preferred: str,
                        timeout: float = 2.0) -> str | None:
    """Ask the stream's leader to step down towards ``preferred`` (a server name) when
    the leadership is elsewhere. Returns the leader seen before asking (None when the
    stream has no cluster info, i.e. one server)."""
    leader = await stream_leader(js, stream)
    if leader is None or leader == preferred:
        return leader
    body = orjson.dumps({"placement": {"preferred": preferred}})
    await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", body, timeout=timeout)
    return leader


#: the JetStream header that names a message for the stream's duplicate detection
MSG_ID_HEADER = "Nats-Msg-Id"


async def publish_event(js: JetStreamContext, subjects: Subjects, event: Event,
                        timeout: float = 2.0) -> tuple[int, bool]:
    """Publish an event to the stream with its id as the message id; returns its stream
    sequence (its number) and whether the stream already had it (a duplicate within the
    window: an earlier attempt that timed out at the client had been stored)."""
    ack = await js.publish(subjects.event(event.kind), encode(event), timeout=timeout,
                           headers={MSG_ID_HEADER: event.id})
    return int(ack.seq), bool(ack.duplicate)


async def send_command(nc: NATS, subject: str, cmd: Command, timeout: float) -> Ack:
    """One request/reply attempt; raises TimeoutError/NoRespondersError/InvalidMessage."""
    reply = await nc.request(subject, encode(cmd), timeout=timeout)
    return decode(Ack, reply.data)
