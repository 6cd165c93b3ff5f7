"""The heartbeat service's gate timer (``LeaseRunner._arm_gate``): an acquiring group's
first renewal and its first notice happen when they are due, with no regular tick at all
— and never before they are due."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from vtlha_heartbeat.lease import LeaseRunner

from tests.unit.test_lease import G, acquiring
from vtlha.protocol.lease import Effect, KvResult, Notice, Renew


class _Svc:
    """What the timer needs of the service: ``spawn``."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def spawn(self, coro: Any, name: str, critical: bool = True) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.append(task)
        return task


def _runner(seen_at: float) -> tuple[LeaseRunner, list[tuple[float, Effect]], asyncio.Event]:
    """A LeaseRunner whose lease holder has just seen a claim, and whose effects are
    recorded (with the time they came) instead of carried out. Its regular tick never
    runs: only the gate timer can move the group."""
    runner = LeaseRunner.__new__(LeaseRunner)
    runner.svc = _Svc()  # type: ignore[assignment]
    runner.lh = acquiring(seen_at)
    runner._gate_timer, runner._gate_due = None, None
    seen: list[tuple[float, Effect]] = []
    changed = asyncio.Event()

    async def record(effects: list[Effect]) -> None:
        runner._arm_gate()  # as LeaseRunner._run does first
        now = time.monotonic()
        seen.extend((now, e) for e in effects)
        if effects:
            changed.set()

    runner._run = record  # type: ignore[method-assign]
    return runner, seen, changed


async def _next(changed: asyncio.Event) -> None:
    await asyncio.wait_for(changed.wait(), 5.0)
    changed.clear()


async def test_the_first_renewal_and_the_gate_come_from_the_timer_alone() -> None:
    seen_at = time.monotonic()
    runner, seen, changed = _runner(seen_at)
    lh = runner.lh
    gate = lh.gate(lh.groups[G])
    runner._arm_gate()
    assert runner._gate_due == gate - lh.lead()
    await _next(changed)
    [(_, renew)] = seen
    assert isinstance(renew, Renew) and renew.sent_at >= gate - lh.lead()
    # The write commits at once, before the gate: nothing is served yet; the timer is
    # armed for the gate itself.
    out = lh.on_renew_result(G, renew.sent_at, KvResult.OK, revision=21,
                             now=time.monotonic())
    await runner._run(out)
    assert [e for _, e in seen if isinstance(e, Notice)] == []
    assert runner._gate_due == gate
    await _next(changed)
    [(served, notice)] = [(t, e) for t, e in seen if isinstance(e, Notice)]
    assert served >= gate and notice.valid_until == renew.sent_at + lh.lease_ttl
    assert runner._gate_timer is None and lh.next_due(served) is None


async def test_a_later_input_with_an_earlier_due_time_rearms_the_timer() -> None:
    """An acquire command whose wait is 0 (the old owner released) opens the gate now:
    the timer armed for the full lease is replaced by one due at once."""
    runner, seen, changed = _runner(time.monotonic())
    runner._arm_gate()
    far = runner._gate_due
    assert far is not None and far > time.monotonic() + 0.1
    now = time.monotonic()
    await runner._run(runner.lh.on_acquire_command(G, 2, 0.0, now))
    assert runner._gate_due is not None and runner._gate_due < far
    await _next(changed)
    assert [type(e) for _, e in seen] == [Renew]
