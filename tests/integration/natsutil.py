"""Small synchronous helpers over nats-py for tests (each opens its own connection)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import nats

from vtlha import eventlog
from vtlha.messages import Event, GroupRecord
from vtlha.ownership import read_groups
from vtlha.subjects import Subjects

DEFAULT_GROUPS = ("node-a-data", "node-a-mgmt", "node-b-data", "node-b-mgmt")


def kv_groups(url: str, cluster: str,
              groups: Iterable[str] = DEFAULT_GROUPS) -> dict[str, tuple[GroupRecord, int]]:
    """group -> (record, revision) for each group that has a KV record."""

    async def _go() -> dict[str, tuple[GroupRecord, int]]:
        nc = await nats.connect(url)
        try:
            return await read_groups(nc.jetstream(), Subjects(cluster), groups)
        finally:
            await nc.close()

    return asyncio.run(_go())


def events(url: str, cluster: str) -> list[tuple[int, Event]]:
    async def _go() -> list[tuple[int, Event]]:
        nc = await nats.connect(url)
        try:
            return await eventlog.read(nc.jetstream(), Subjects(cluster))
        finally:
            await nc.close()

    return asyncio.run(_go())


def publish_raw(url: str, subject: str, payloads: list[bytes]) -> None:
    async def _go() -> None:
        nc = await nats.connect(url)
        try:
            for p in payloads:
                await nc.publish(subject, p)
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(_go())


def request(url: str, subject: str, payload: bytes, timeout: float = 1.0) -> bytes:
    async def _go() -> bytes:
        nc = await nats.connect(url)
        try:
            msg = await nc.request(subject, payload, timeout=timeout)
            return bytes(msg.data)
        finally:
            await nc.close()

    return asyncio.run(_go())


def metric(text: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def kinds(evs: list[tuple[int, Any]]) -> list[str]:
    return [e.kind for _, e in evs]
