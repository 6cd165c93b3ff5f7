"""Event-loop lag: how late the loop wakes a task that sleeps a fixed interval.

A service runs everything on one asyncio loop: a long decision tick, a burst of
messages or a slow handler delays every other callback (a heartbeat's arrival, a
renewal, a command's ack) by as much. Every service measures it (``Service`` spawns
``watch_loop_lag``) and exports it as the histogram ``vtlha_event_loop_lag_seconds``:
the overshoot of an ``asyncio.sleep(LAG_INTERVAL)``, one sample per interval. It costs
one wake-up per interval."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LAG_INTERVAL = 0.05  # seconds between samples
#: seconds; the decision tick is heartbeat_interval/2 (50 ms in the example)
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
               5.0, 10.0)


async def watch_loop_lag(observe: Callable[[float], None], stopping: asyncio.Event,
                         interval: float = LAG_INTERVAL) -> None:
    """Until ``stopping`` is set: sleep ``interval`` on the loop's monotonic clock and
    ``observe`` how much later than that the loop ran this task again (>= 0)."""
    loop = asyncio.get_running_loop()
    while not stopping.is_set():
        t0 = loop.time()
        await asyncio.sleep(interval)
        observe(max(0.0, loop.time() - t0 - interval))
