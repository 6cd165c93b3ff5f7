"""The event-loop lag every service exports (``vtlha.looplag``): a loop blocked for a
while is seen as a late wake-up of that size. Only lower bounds are asserted: a loaded
machine makes every wake-up later, never earlier."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from tests.conftest import EXAMPLE
from vtlha.config import load_config
from vtlha.looplag import watch_loop_lag
from vtlha.service import Service

BLOCK = 0.2  # seconds the loop is held by a blocking call


class Probe(Service):
    name = "probe"
    http_port_key = "heartbeat"


async def test_a_blocked_loop_is_seen_as_lag() -> None:
    seen: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(watch_loop_lag(seen.append, stop, interval=0.01))
    await asyncio.sleep(0.03)
    time.sleep(BLOCK)  # noqa: ASYNC251 - the point: nothing else runs meanwhile
    await asyncio.sleep(0.03)
    stop.set()
    await asyncio.wait_for(task, 5.0)
    assert seen and min(seen) >= 0.0
    # the sample in flight slept at most 0.01 s before the block began
    assert max(seen) >= BLOCK - 0.01


async def test_every_service_exports_its_loop_lag(tmp_path: Path) -> None:
    """The service base runs the watch from its start to its stop (no NATS needed for
    that part) and exports it as the histogram vtlha_event_loop_lag_seconds."""
    svc = Probe(load_config(EXAMPLE), "node-a", ["nats://127.0.0.1:1"], tmp_path, {})
    ctx = svc._service_ctx(None)  # type: ignore[arg-type]
    await ctx.__anext__()  # started
    await asyncio.sleep(0.12)
    time.sleep(BLOCK)  # noqa: ASYNC251
    await asyncio.sleep(0.12)
    with contextlib.suppress(StopAsyncIteration):
        await ctx.__anext__()  # stopped
    reg = svc.registry
    count = reg.get_sample_value("vtlha_event_loop_lag_seconds_count")
    fast = reg.get_sample_value("vtlha_event_loop_lag_seconds_bucket", {"le": "0.1"})
    assert count is not None and count >= 2
    assert fast is not None and fast < count  # the blocked wake-up is above 0.1 s
    assert not [t for t in svc._tasks if not t.done()]  # the watch ended with the service
