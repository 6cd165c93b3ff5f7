"""Multipath I/O to the reference SAN target: one :class:`SanClient` per path of a
node, used one at a time. A request that fails for want of a path (connection lost,
timeout) is tried again on the next path; a refusal by the target (``SanRefused``: a
reservation conflict, EIO) is an answer, not a path failure, and is raised as is. This
is the "path failover first" of the manual, for the writers: the storage-monitor's
reservation commands and the tape data service."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from vtlha.config import ClusterConfig
from vtlha.san.client import SanClient, SanError, SanRefused

T = TypeVar("T")


def node_paths(cfg: ClusterConfig, node: str, devices: list[str]) -> list[int]:
    """Path indices ``node`` has to every one of ``devices``."""
    if not devices:
        return []
    return list(range(min(cfg.devices[d].paths.get(node, 0) for d in devices)))


class Multipath:
    def __init__(self, cfg: ClusterConfig, node: str, host: str, devices: list[str],
                 timeout: float, port_base: int | None = None) -> None:
        self.node = node
        self.devices = list(devices)
        base = cfg.san.port if port_base is None else port_base
        self.clients = [SanClient(host, base + i, node, i, timeout=timeout)
                        for i in node_paths(cfg, node, self.devices)]
        self.current = 0
        self.failovers = 0  # times a request moved to another path

    @property
    def path(self) -> int:
        return self.current

    async def _ready(self, client: SanClient) -> None:
        if client.connected:
            return
        await client.connect()
        for d in self.devices:
            await client.register(d)

    async def call(self, fn: Callable[[SanClient], Awaitable[T]]) -> T:
        """``fn(client)`` on the current path, then on each other path in turn."""
        if not self.clients:
            raise SanError(f"{self.node} has no path to {', '.join(self.devices)}")
        errors: list[str] = []
        for k in range(len(self.clients)):
            i = (self.current + k) % len(self.clients)
            client = self.clients[i]
            try:
                await self._ready(client)
                out = await fn(client)
            except SanRefused:
                raise
            except SanError as exc:
                errors.append(f"path {i}: {exc}")
                await client.close()
                continue
            if i != self.current:
                self.failovers += 1
                self.current = i
            return out
        raise SanError(f"no path to the SAN target works ({'; '.join(errors)})")

    async def close(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                await c.close()
