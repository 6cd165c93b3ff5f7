"""The notifier service: for every target of ``notifications.targets`` in the cluster
file, a durable consumer of the event stream (``consumer.TargetConsumer``) that calls
the target for each event whose kind it wants (``deliver.Deliverer``).

It is no part of the failover path: it only reads the event stream, which every service
writes through its outbox without waiting (docs/events.md), so a hung script or a dead
webhook, or the notifier itself being down, never delays a decision, a claim, a lease or
a fence. It runs on the hosts of ``notifications.hosts`` (default: the witness)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from vtlha.errors import FatalError
from vtlha.service import Service, service_command
from vtlha_notifier.consumer import TargetConsumer
from vtlha_notifier.deliver import Deliverer


class NotifierService(Service):
    name = "notifier"
    http_port_key = "notifier"
    raises_priority = False  # not on the failover path; its scripts inherit its priority

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # refused before anything connects
        if not self.config.notifications.targets:
            raise FatalError("no notification targets in the cluster file "
                             "(notifications.targets): nothing to do")
        hosts = self.config.notifier_hosts
        if self.node not in hosts:
            raise FatalError(f"{self.node} is not one of notifications.hosts "
                             f"({', '.join(hosts)}): no notifier runs here")
        self.deliverer = Deliverer(self.registry, self.log)
        self.consumers = [TargetConsumer(self, t, self.deliverer)
                          for t in self.config.notifications.targets]

    async def start(self) -> None:
        for c in self.consumers:
            self.spawn(c.run(), f"notify-{c.target.name}")

    def make_app(self) -> web.Application:
        """The base's app, and the webhooks' HTTP session closed after every consumer
        has ended (cleanup contexts exit in reverse order)."""
        app = super().make_app()
        app.cleanup_ctx.insert(1, self._session_ctx)
        return app

    async def _session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        yield
        await self.deliverer.close()

    async def wait_stopping(self, timeout: float) -> None:
        """Sleep ``timeout`` seconds, or less when the service stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout)

    def is_ready(self) -> bool:
        return all(c.bound for c in self.consumers)

    def status(self) -> dict[str, Any]:
        return {"targets": [c.status() for c in self.consumers],
                "hosts": self.config.notifier_hosts}


main = service_command(NotifierService)
