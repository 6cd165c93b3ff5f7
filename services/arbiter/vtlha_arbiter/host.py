"""What the arbiter's parts need from the service they run in (``vtlha.service.Service``
provides all of it): the config, the connection, the metrics registry, events, tasks.
Each part gets this narrow interface, never the whole ``Arbiter``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter

from vtlha.config import ClusterConfig
from vtlha.subjects import Subjects


class Host(Protocol):
    config: ClusterConfig
    node: str
    subjects: Subjects
    log: logging.Logger
    registry: CollectorRegistry
    invalid_messages: Counter

    @property
    def nc(self) -> NATS: ...

    @property
    def stopping(self) -> bool: ...

    async def emit(self, kind: str, reason: str, **fields: Any) -> str | None: ...

    def emit_soon(self, kind: str, reason: str, **fields: Any) -> str | None: ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str,
              critical: bool = True) -> Any: ...

    def reject(self, kind: str, subject: str, error: str) -> None: ...

    def subscribe_handler(self, kind: str, handler: Callable[[Msg], Awaitable[None]]
                          ) -> Callable[[Msg], Awaitable[None]]: ...
