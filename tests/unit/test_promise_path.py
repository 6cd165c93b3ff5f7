"""The heartbeat's direct promise path finds the companion's own NATS server among the
service's URLs (``vtlha_heartbeat.lease.companion_url``)."""

from __future__ import annotations

import asyncio

import pytest
from vtlha_heartbeat.lease import TryGivenUp, bounded_try, companion_url

SERVERS = ["node-a", "node-b", "witness"]


def test_the_lab_order_own_server_first_then_the_others_as_configured() -> None:
    urls = ["nats://127.0.0.1:4222", "nats://198.51.100.2:4222", "nats://198.51.100.9:4222"]
    assert companion_url(SERVERS, urls, "node-a", "node-b") == "nats://198.51.100.2:4222"
    b_urls = ["nats://127.0.0.1:4222", "nats://198.51.100.1:4222", "nats://198.51.100.9:4222"]
    assert companion_url(SERVERS, b_urls, "node-b", "node-a") == "nats://198.51.100.1:4222"


def test_unknown_when_the_lists_do_not_match_or_the_companion_runs_no_server() -> None:
    assert companion_url(SERVERS, ["nats://127.0.0.1:4222"], "node-a", "node-b") is None
    assert companion_url(["node-a", "witness"], ["nats://a:1", "nats://w:1"], "node-a",
                         "node-b") is None


# ---- the direct path's connect tries (bounded_try) -------------------------------------

async def _hangs(cancelled: list[bool]) -> None:
    try:
        await asyncio.Event().wait()  # a SYN lost in a cut: never answered
    except asyncio.CancelledError:
        cancelled.append(True)
        raise


async def test_a_hanging_try_is_given_up_when_a_promise_is_needed() -> None:
    """After the first step, a kick (a promise asked while the path is down) gives the
    try up at once, long before its limit: a fresh try then reaches the healed link."""
    kick, cancelled = asyncio.Event(), []

    async def ask_soon() -> None:
        await asyncio.sleep(0.05)
        kick.set()
    asker = asyncio.create_task(ask_soon())
    with pytest.raises(TryGivenUp):
        await asyncio.wait_for(bounded_try(_hangs(cancelled), kick, 0.01, 600.0), 30)
    await asker
    assert cancelled == [True]


async def test_a_try_runs_out_at_its_limit_and_a_quick_one_succeeds() -> None:
    cancelled: list[bool] = []
    with pytest.raises(TryGivenUp):
        await bounded_try(_hangs(cancelled), asyncio.Event(), 0.01, 0.05)
    assert cancelled == [True]

    async def quick() -> None:
        await asyncio.sleep(0)
    await bounded_try(quick(), asyncio.Event(), 0.01, 0.05)  # no exception
