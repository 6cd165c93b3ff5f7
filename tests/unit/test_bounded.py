"""``bounded``: a time limit on a bus call that runs the call in the caller's own task
(so an error, or a cancellation, reaches the caller and is never left unretrieved)."""

from __future__ import annotations

import asyncio

import pytest

from vtlha.bounded import bounded


async def test_a_call_that_outlasts_its_bound_times_out_and_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        await bounded(hangs(), 0.01)
    assert cancelled.is_set()


async def test_the_call_runs_in_the_callers_task_and_its_error_reaches_the_caller() -> None:
    caller = asyncio.current_task()

    async def fails() -> None:
        assert asyncio.current_task() is caller  # wait_for would run it in a task of its own
        raise KeyError("gone")

    with pytest.raises(KeyError, match="gone"):
        await bounded(fails(), 1.0)
    assert await bounded(asyncio.sleep(0, result=7), 1.0) == 7
