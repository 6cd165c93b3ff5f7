"""Lease notices are applied in the order nats-py delivers them — one callback at a
time — and no group's slow enforcement holds back another group's notices (chaos
iteration 77: a notice callback awaiting a group's lock behind a slow release queued
every later notice; leases lapsed with their renewals waiting in line)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import EXAMPLE
from vtlha.config import load_config
from vtlha.executor import ENFORCE_INTERVAL, HoldingExecutor
from vtlha.messages import LeaseNotice, encode

FAST, SLOW = "node-a-data", "node-a-mgmt"
TTL = 0.3


class Recorder(HoldingExecutor):
    name = "test-executor"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.holding: set[str] = set()
        self.stops: list[tuple[str, float]] = []
        self.slow_release = asyncio.Event()  # SLOW's release waits for this

    def holds(self, group: str) -> bool:
        return group in self.holding

    def held(self, group: str) -> list[str]:
        return sorted(self.holding & {group})

    async def start_holding(self, group: str, epoch: int, until: float) -> None:
        self.holding.add(group)

    async def keep_holding(self, group: str, until: float) -> None:
        pass

    async def stop_holding(self, group: str) -> None:
        if group == SLOW:
            await self.slow_release.wait()
        self.stops.append((group, time.monotonic()))
        self.holding.discard(group)


@pytest.fixture
def ex(tmp_path: Path) -> Recorder:
    e = Recorder(load_config(EXAMPLE), "node-a", ["nats://127.0.0.1:1"], tmp_path)
    e.emit_soon = lambda *a, **k: None  # type: ignore[method-assign]  # no bus here
    return e


def notice(e: Recorder, group: str, valid_for: float = TTL) -> SimpleNamespace:
    now = time.monotonic()
    n = LeaseNotice(cluster=e.config.cluster, node="node-a", group=group, epoch=3,
                    valid_until=now + valid_for, since=now)
    return SimpleNamespace(data=encode(n))


async def test_a_slow_release_does_not_hold_back_other_groups_notices(ex: Recorder) -> None:
    queue: asyncio.Queue[SimpleNamespace] = asyncio.Queue()

    async def deliver() -> None:  # as nats-py: one subscription, one callback at a time
        while True:
            await ex._on_notice(await queue.get())  # type: ignore[arg-type]

    async def renew_fast() -> None:  # FAST's lease holder renews every 0.1 s
        while True:
            queue.put_nowait(notice(ex, FAST))
            await asyncio.sleep(0.1)

    async def check(group: str) -> None:  # the group's enforcement loop
        while True:
            await ex.enforce(group)
            await asyncio.sleep(ENFORCE_INTERVAL)

    await ex._on_notice(notice(ex, SLOW))  # type: ignore[arg-type]
    tasks = [asyncio.create_task(c) for c in (deliver(), renew_fast(), check(FAST),
                                              check(SLOW))]
    try:
        # SLOW's lease lapses (no more notices for it): its release starts and hangs
        deadline = time.monotonic() + 2
        while not (ex._group_locks[SLOW].locked() and ex.holds(FAST)):
            assert time.monotonic() < deadline, "SLOW's release never started"
            await asyncio.sleep(0.01)
        queue.put_nowait(notice(ex, SLOW))  # a notice of SLOW: waits on SLOW's lock...
        await asyncio.sleep(3 * TTL)  # ... while FAST's notices keep coming
        assert ex.stops == [], "FAST was released although its notices kept coming"
        assert ex.holds(FAST) and queue.qsize() <= 1
        ex.slow_release.set()
        await asyncio.sleep(0.05)
        assert [g for g, _ in ex.stops] == [SLOW]  # the lapsed lease, and only it
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def test_notices_arriving_while_one_runs_end_with_the_newest(ex: Recorder) -> None:
    """A kick while the group's enforcement runs makes it run once more: what the last
    notice says is what is held (here a revoke arriving while holding starts)."""
    started = asyncio.Event()
    go_on = asyncio.Event()
    plain_start = ex.start_holding

    async def slow_start(group: str, epoch: int, until: float) -> None:
        started.set()
        await go_on.wait()
        await plain_start(group, epoch, until)

    ex.start_holding = slow_start  # type: ignore[method-assign]
    await ex._on_notice(notice(ex, FAST))  # type: ignore[arg-type]
    await asyncio.wait_for(started.wait(), 1)
    now = time.monotonic()
    revoke = LeaseNotice(cluster=ex.config.cluster, node="node-a", group=FAST, epoch=3,
                         valid_until=now, revoked=True, since=now)
    await ex._on_notice(SimpleNamespace(data=encode(revoke)))  # type: ignore[arg-type]
    go_on.set()
    await asyncio.wait_for(ex._kicked[FAST], 1)
    assert not ex.holds(FAST) and [g for g, _ in ex.stops] == [FAST]
