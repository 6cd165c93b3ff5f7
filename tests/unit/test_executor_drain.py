"""A held group whose lease looks expired is released only after the lease notices the
executor has already received were applied (a stall can leave the newest ones waiting
behind the check); with no newer notice it is released as before."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE
from vtlha.config import load_config
from vtlha.executor import HoldingExecutor

GROUP = "node-a-data"


class Recorder(HoldingExecutor):
    name = "test-executor"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.holding: set[str] = set()
        self.stops: list[str] = []

    def holds(self, group: str) -> bool:
        return group in self.holding

    def held(self, group: str) -> list[str]:
        return sorted(self.holding & {group})

    async def start_holding(self, group: str, epoch: int, until: float) -> None:
        self.holding.add(group)

    async def keep_holding(self, group: str, until: float) -> None:
        pass

    async def stop_holding(self, group: str) -> None:
        self.stops.append(group)
        self.holding.discard(group)


@pytest.fixture
def ex(tmp_path: Path) -> Recorder:
    e = Recorder(load_config(EXAMPLE), "node-a", ["nats://127.0.0.1:1"], tmp_path)
    e.emit_soon = lambda *a, **k: None  # type: ignore[method-assign]  # no bus here
    now = time.monotonic()
    e.gate.on_notice(GROUP, 3, now - 0.01, False, now - 0.31)  # its lease ran out
    e.holding.add(GROUP)
    return e


def _drained(e: Recorder, result: str) -> float:
    return e.notices_drained.labels(result)._value.get()  # type: ignore[no-any-return]


async def test_a_notice_already_received_keeps_the_group(ex: Recorder) -> None:
    """The newer notice is applied two loop turns later (as the socket read, then the
    subscription's callback): the group stays held, nothing is stopped."""
    loop = asyncio.get_running_loop()
    now = time.monotonic()
    loop.call_soon(loop.call_soon, ex.gate.on_notice, GROUP, 3, now + 0.3, False, now)
    await ex.enforce(GROUP)
    assert ex.stops == [] and ex.holds(GROUP)
    assert _drained(ex, "held") == 1 and _drained(ex, "expired") == 0


async def test_without_a_newer_notice_the_group_is_released(ex: Recorder) -> None:
    await ex.enforce(GROUP)
    assert ex.stops == [GROUP] and not ex.holds(GROUP)
    assert _drained(ex, "expired") == 1 and _drained(ex, "held") == 0
