"""One target's share of the event stream: a durable JetStream pull consumer
(``notify-<target>``) on ``HA_EVENTS_<cluster>``.

Each target has a consumer of its own, so targets never wait for each other: a hung
script holds only its own target's slots (``max_concurrent``), and only until its
timeout. The consumer remembers what was acknowledged, so a restarted notifier goes on
after the last event it finished (nothing is skipped, nothing finished is sent again),
and several notifiers (on several hosts) bound to the same consumer each get different
events. An event is acknowledged once its delivery has an outcome (sent, or given up
after its attempts); while it is being delivered the notifier reports progress every
``ack_wait / 3``, so JetStream hands it to another notifier only when this one has
stopped (killed, cut off) for ``ack_wait``.

Created with ``DeliverPolicy.NEW``: events stored before a target's consumer first
existed are not sent (a new target does not page for last month's failovers)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from vtlha import bus
from vtlha.errors import InvalidMessage
from vtlha.eventlog import Dedupe
from vtlha.messages import Event, decode
from vtlha.notifyconfig import ExecTarget, WebhookTarget
from vtlha_notifier.deliver import Deliverer, Delivery

if TYPE_CHECKING:
    from vtlha_notifier.main import NotifierService

FETCH_TIMEOUT = 2.0  # seconds a pull waits for the next event (then pulls again)
EVENT_MAX_BYTES = 1024 * 1024  # the largest event read (NATS's default message limit)
ACK_TIMEOUT = 2.0  # seconds for the server to confirm an acknowledgement
ACK_TRIES = 3
BACKOFF_MAX = 5.0  # seconds between attempts to bind or pull while JetStream is unavailable
#: what binding or pulling raises while the stream or its consumer cannot be used
UNAVAILABLE: tuple[type[BaseException], ...] = (NotFoundError, APIError, *bus.JS_UNAVAILABLE)


def consumer_name(target: str) -> str:
    return f"notify-{target}"


class TargetConsumer:
    def __init__(self, svc: NotifierService, target: ExecTarget | WebhookTarget,
                 deliverer: Deliverer) -> None:
        self.svc = svc
        self.target = target
        self.deliverer = deliverer
        self.name = consumer_name(target.name)
        self.bound = False
        self._slots = asyncio.Semaphore(target.max_concurrent)
        #: ids of events delivered (sent or given up on) by this process
        self._done = Dedupe()
        #: ids of events being delivered now
        self._running: set[str] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.failed = 0
        self.last_error: str | None = None

    def config(self) -> ConsumerConfig:
        n = self.svc.config.notifications
        hosts = max(1, len(self.svc.config.notifier_hosts))
        return ConsumerConfig(
            name=self.name, durable_name=self.name,
            description=f"vtl-ha notifications to {self.target.name}",
            deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=n.ack_wait, max_deliver=-1,
            max_ack_pending=self.target.max_concurrent * hosts,
            filter_subject=self.svc.subjects.events_all)

    def status(self) -> dict[str, object]:
        return {"name": self.target.name, "type": self.target.type,
                "events": list(self.target.events), "consumer": self.name,
                "bound": self.bound, "running": len(self._running), "sent": self.sent,
                "failed": self.failed, "last_error": self.last_error}

    # ---- the pull loop ------------------------------------------------------
    async def run(self) -> None:
        """Bind (creating the consumer when absent), then pull events one slot at a
        time until the service stops; a lost consumer or stream is bound again."""
        failures = 0
        try:
            while not self.svc.stopping:
                try:
                    sub = await self._bind()
                    failures = 0
                    await self._pull(sub)
                except UNAVAILABLE as exc:
                    self.bound = False
                    failures += 1
                    self.svc.log.warning("notification consumer unavailable, retrying",
                                         extra={"target": self.target.name,
                                                "consumer": self.name, "error": repr(exc),
                                                "attempt": failures})
                    await self.svc.wait_stopping(min(BACKOFF_MAX,
                                                     0.1 * 2 ** min(failures, 6)))
        finally:
            await self._finish()

    async def _bind(self) -> JetStreamContext.PullSubscription:
        js = self.svc.js
        stream = self.svc.subjects.events_stream
        try:
            await js.add_consumer(stream, self.config())
        except APIError as exc:
            if isinstance(exc, NotFoundError) or exc.code in (503, None):
                raise  # no stream yet (the arbiter creates it), or no quorum
            # an existing consumer whose config cannot change this way: use it as it is
            self.svc.log.warning("notification consumer kept as it is", extra={
                "consumer": self.name, "error": repr(exc)})
        sub = await js.pull_subscribe_bind(durable=self.name, stream=stream)
        self.bound = True
        self.svc.log.info("notification consumer bound", extra={
            "target": self.target.name, "consumer": self.name})
        return sub

    async def _pull(self, sub: JetStreamContext.PullSubscription) -> None:
        try:
            while not self.svc.stopping:
                await self._slots.acquire()
                try:
                    msgs = await sub.fetch(1, timeout=FETCH_TIMEOUT)
                except TimeoutError:
                    self._slots.release()
                    continue
                except BaseException:
                    self._slots.release()
                    raise
                task = asyncio.create_task(self._handle(msgs[0]),
                                           name=f"notify-{self.target.name}")
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _finish(self) -> None:
        """At shutdown: what is still being delivered is cancelled (its script killed)
        and not acknowledged, so it is delivered again after a restart."""
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    # ---- one event ----------------------------------------------------------------
    async def _handle(self, msg: Msg) -> None:
        try:
            await self._process(msg)
        except Exception as exc:
            self.svc.loop_errors.labels("notify").inc()
            self.svc.log.exception("notification handler failed", extra={
                "target": self.target.name, "error": repr(exc)})
        finally:
            self._slots.release()

    async def _process(self, msg: Msg) -> None:
        meta = msg.metadata
        try:
            self.svc.check_envelope(msg.data)
            event = decode(Event, msg.data, max_bytes=EVENT_MAX_BYTES)
        except InvalidMessage as exc:
            self.svc.invalid_messages.labels("event").inc()
            self.svc.reject("event", msg.subject, str(exc))
            await self._ack(msg)
            return
        if event.id in self._running:
            return  # handed out again while still being delivered here: that one acks
        if not self.target.wants(event.kind) or self._done.has(event.id):
            await self._ack(msg)  # not for this target, or a second copy of an event
            return
        self._running.add(event.id)
        keep = asyncio.create_task(self._in_progress(msg))
        try:
            outcome = await self.deliverer.deliver(self.target, Delivery(
                event, meta.sequence.stream, meta.num_delivered))
        finally:
            keep.cancel()
            await asyncio.gather(keep, return_exceptions=True)
            self._running.discard(event.id)
        self._done.first(event)
        if outcome.ok:
            self.sent += 1
        else:
            self.failed += 1
            self.last_error = outcome.error
        await self._ack(msg)

    async def _in_progress(self, msg: Msg) -> None:
        """Tell JetStream every ``ack_wait / 3`` that the event is still being worked on."""
        interval = self.svc.config.notifications.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _ack(self, msg: Msg) -> None:
        """Acknowledge, confirmed by the server (retried): an acknowledgement lost on the
        way would hand the event out again after ``ack_wait``."""
        for attempt in range(1, ACK_TRIES + 1):
            try:
                await msg.ack_sync(timeout=ACK_TIMEOUT)
                return
            except Exception as exc:
                if attempt == ACK_TRIES:
                    self.svc.log.warning("acknowledgement not confirmed: the event may be "
                                         "delivered again", extra={
                                             "target": self.target.name,
                                             "seq": msg.metadata.sequence.stream,
                                             "error": repr(exc)})
