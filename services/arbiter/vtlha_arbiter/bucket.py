"""The KV bucket's identity, and the arbiter starting afresh when it changes (issue 14).

Terms, epochs and revisions count within one KV bucket: a bucket lost and created again
starts them over, below what every arbiter remembers of the old one. Executors and lease
holders already keep their tokens per bucket identity (``vtlha.fencing``,
``LeaseHolder.on_new_bucket``); an arbiter that kept its view of the old bucket would
strand groups: its election ignores every read of the new leader key (a revision below
the highest it saw), its view ignores every new group record (monotonic reads), and its
cache still shows groups held that the new bucket does not have.

So every ``BUCKET_CHECK`` seconds each arbiter reads the identity (``bus.kv_identity``,
the KV stream's creation time) and, when it is another one than the view was built on,
calls ``on_new(old, new)`` (``main.Arbiter._new_bucket``): the election starts again on
the new bucket (standby at once), the group records, the monotonic high-water marks,
the pairs' state and the event state's revisions are dropped and read afresh, the moves
of the old bucket end; the next activation announces its term with the new identity and
reconciles every group. A new activation also reads the identity before it announces
(``read``), so it never acts on a view of an older bucket than the one it won in.

Only arbiters (and an operator's admin command) create the bucket and the event stream:
an arbiter finding either missing creates it here, as at its start; the nodes' services
wait for the bucket (``bus.wait_for_kv``). A bucket the arbiter creates starts its
revisions above every revision of the one it replaces (``bus.kv_first_revision``: the
clock in microseconds, and above the highest revision the arbiter's view holds), so no
compare-and-set against an old revision can succeed in it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter

from vtlha import bus
from vtlha_arbiter.host import Host

BUCKET_CHECK = 1.0  # seconds between reads of the KV bucket's identity (as executors)
IDENTITY_TIMEOUT = 0.5  # seconds for one read of it
CREATE_TIMEOUT = 5.0  # seconds for creating a missing bucket or stream

NewBucket = Callable[[str, str], Awaitable[None]]


class BucketWatch:
    def __init__(self, host: Host, js: Callable[[], JetStreamContext],
                 on_new: NewBucket, floor: Callable[[], int] = lambda: 0) -> None:
        self.host = host
        self.js = js
        self.on_new = on_new
        self.floor = floor  # the highest revision of the old bucket this arbiter knows
        self.identity = ""  # the bucket this arbiter's view belongs to ("" not read yet)
        self.generation = 0  # how many times it changed while this arbiter ran
        self.changes = Counter("vtlha_arbiter_new_buckets_total",
                               "KV buckets found recreated (the arbiter started afresh)",
                               registry=host.registry)

    async def read(self) -> str | None:
        """The KV bucket's identity now, creating the bucket (and the event stream) when
        it is missing; None when it could not be read."""
        host = self.host
        try:
            return await bus.kv_identity(host.nc, host.subjects, IDENTITY_TIMEOUT)
        except NotFoundError:
            pass
        except Exception as exc:
            host.log.info("kv identity not read", extra={"error": repr(exc)})
            return None
        host.log.warning("the KV bucket is missing: creating it", extra={
            "bucket": host.subjects.kv_bucket})
        try:
            await asyncio.wait_for(self.ensure(), CREATE_TIMEOUT)
            return await bus.kv_identity(host.nc, host.subjects, IDENTITY_TIMEOUT)
        except Exception as exc:
            host.log.warning("the KV bucket not created yet", extra={"error": repr(exc)})
            return None

    async def ensure(self) -> None:
        """Create the KV bucket and the event stream when absent (the arbiter's job)."""
        n = self.host.config.nats
        await bus.ensure_kv(self.js(), self.host.subjects, n.stream_replicas,
                            floor=self.floor())
        await bus.ensure_events_stream(self.js(), self.host.subjects, n.stream_replicas,
                                       n.events_max_bytes, n.events_max_age,
                                       n.events_duplicate_window, n.stream_max_msgs)

    async def check(self) -> None:
        """Every ``BUCKET_CHECK``: a new bucket starts the arbiter afresh on it; a
        missing event stream is created."""
        new = await self.read()
        if new is not None and self.identity and new != self.identity:
            await self.adopt(new)
        try:
            await asyncio.wait_for(self.js().stream_info(self.host.subjects.events_stream),
                                   IDENTITY_TIMEOUT)
        except NotFoundError:
            self.host.log.warning("the event stream is missing: creating it")
            await asyncio.wait_for(self.ensure(), CREATE_TIMEOUT)
        except Exception as exc:
            self.host.log.info("event stream not checked", extra={"error": repr(exc)})

    async def adopt(self, new: str) -> None:
        old, self.identity = self.identity, new
        self.generation += 1
        self.changes.inc()
        await self.on_new(old, new)
