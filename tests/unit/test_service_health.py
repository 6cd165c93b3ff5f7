"""/healthz answers 503 only for a task that failed, never for one that just finished
(its done-callback removes it a moment later: a health probe in between saw a healthy
heartbeat as dead in a CI run, under the HTTP fuzzing)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from tests.conftest import EXAMPLE
from vtlha.config import load_config
from vtlha.service import Service


class Probe(Service):
    name = "probe"
    http_port_key = "heartbeat"


async def test_a_task_that_returned_is_not_dead_a_failed_one_is(tmp_path: Path) -> None:
    svc = Probe(load_config(EXAMPLE), "node-a", ["nats://127.0.0.1:1"], tmp_path, {})

    async def quick() -> None:
        return None

    # the moment between a spawned task's end and its done-callback: done, still listed
    task = asyncio.ensure_future(quick())
    await task
    svc._tasks.append(task)
    resp = await svc._healthz(None)  # type: ignore[arg-type]
    assert resp.status == 200, resp.body

    async def boom() -> None:
        raise RuntimeError("loop died")

    crit = svc.spawn(boom(), "loop", critical=True)
    await asyncio.wait({crit})
    await asyncio.sleep(0)  # the done-callback: the service's fatal error
    resp = await svc._healthz(None)  # type: ignore[arg-type]
    assert resp.status == 503
    assert orjson.loads(resp.body)["dead_tasks"] == ["loop"]  # type: ignore[arg-type]
