"""One event to one target, against real parts: real scripts run as processes and a
real aiohttp server as the webhook. What the script and the webhook receive, retries
with their results counted, the timeout killing a hung script's whole process group,
and failures that no retry helps."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from vtlha_notifier.deliver import Deliverer, Delivery

from vtlha.log import JsonFormatter
from vtlha.messages import Event
from vtlha.notifyconfig import ExecTarget, WebhookTarget
from vtlha_lab.procs import pid_alive

EVENT = Event(cluster="demo", node="witness", kind="failover.started", pair="pair-1",
              group="node-a-data", old="node-a", new="node-b", term=7, epoch=3,
              reason="node-a is down: node-b takes node-a-data",
              inputs={"snapshot": {"x": 1}, "now": 12.5}, data={"rule": "node_dead"})


def script_target(path: Path, **over: Any) -> ExecTarget:
    return ExecTarget.model_validate({
        "type": "exec", "name": "page", "command": [str(path), "{kind}", "{group}", "{seq}"],
        "events": ["*"], "timeout": 5, "attempts": 1, "backoff": 0, **over})


def hook_target(url: str, **over: Any) -> WebhookTarget:
    return WebhookTarget.model_validate({
        "type": "webhook", "name": "chat", "url": url, "events": ["*"], "timeout": 5,
        "attempts": 1, "backoff": 0, "headers": {"Authorization": "Bearer t0k"}, **over})


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0



async def exited(pid: int, timeout: float) -> None:
    """Wait for a process (not necessarily our child) to exit: its pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def deliverer(reg: CollectorRegistry) -> AsyncIterator[Deliverer]:
    d = Deliverer(reg, logging.getLogger("test.notify"))
    yield d
    await d.close()


# ---- scripts ---------------------------------------------------------------------
async def test_script_gets_the_event_on_stdin_argv_and_env(
        tmp_path: Path, deliverer: Deliverer, reg: CollectorRegistry,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTLHA_NATS_CREDS", "/secret/seed")  # the service's, not the script's
    out = tmp_path / "out"
    out.mkdir()
    s = write_script(tmp_path / "notify.sh",
                     f'cat > {out}/stdin.json\nprintf "%s\\n" "$@" > {out}/argv\n'
                     f'env > {out}/env\n')
    target = script_target(s, env={"SITE": "dc1"})
    outcome = await deliverer.deliver(target, Delivery(EVENT, seq=42, delivered=2))
    assert outcome.ok and outcome.attempts == 1
    assert orjson.loads((out / "stdin.json").read_bytes()) == EVENT.model_dump(mode="json")
    assert (out / "argv").read_text().split("\n")[:3] == ["failover.started", "node-a-data",
                                                          "42"]
    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines()
               if "=" in line)
    assert {k: env[k] for k in ("VTLHA_KIND", "VTLHA_ID", "VTLHA_SEQ", "VTLHA_GROUP",
                                "VTLHA_OLD", "VTLHA_NEW", "VTLHA_EPOCH", "VTLHA_TERM",
                                "VTLHA_PAIR", "VTLHA_CLUSTER", "VTLHA_TARGET",
                                "VTLHA_ATTEMPT", "VTLHA_DELIVERY", "SITE")} == {
        "VTLHA_KIND": "failover.started", "VTLHA_ID": EVENT.id, "VTLHA_SEQ": "42",
        "VTLHA_GROUP": "node-a-data", "VTLHA_OLD": "node-a", "VTLHA_NEW": "node-b",
        "VTLHA_EPOCH": "3", "VTLHA_TERM": "7", "VTLHA_PAIR": "pair-1",
        "VTLHA_CLUSTER": "demo", "VTLHA_TARGET": "page", "VTLHA_ATTEMPT": "1",
        "VTLHA_DELIVERY": "2", "SITE": "dc1"}
    assert "VTLHA_NATS_CREDS" not in env
    assert sample(reg, "vtlha_notifications_total", target="page", result="ok") == 1


async def test_a_failing_script_is_retried_until_it_succeeds(
        tmp_path: Path, deliverer: Deliverer, reg: CollectorRegistry) -> None:
    count = tmp_path / "count"
    s = write_script(tmp_path / "flaky.sh",
                     f'echo x >> {count}\n[ "$(wc -l < {count})" -ge 3 ] || '
                     '{ echo "not yet" >&2; exit 3; }\n')
    outcome = await deliverer.deliver(script_target(s, attempts=5, backoff=0.01),
                                      Delivery(EVENT, seq=1))
    assert outcome.ok and outcome.attempts == 3
    assert len(count.read_text().splitlines()) == 3
    assert sample(reg, "vtlha_notification_attempts_total", target="page", result="exit") == 2
    assert sample(reg, "vtlha_notification_attempts_total", target="page", result="ok") == 1


async def test_a_script_failing_every_attempt_is_given_up_logged_and_counted(
        tmp_path: Path, deliverer: Deliverer, reg: CollectorRegistry,
        caplog: pytest.LogCaptureFixture) -> None:
    s = write_script(tmp_path / "bad.sh", 'echo "no route to pager" >&2\nexit 2\n')
    outcome = await deliverer.deliver(script_target(s, attempts=3, backoff=0.01),
                                      Delivery(EVENT, seq=5))
    assert not outcome.ok and outcome.attempts == 3
    assert outcome.error is not None and "exited 2: no route to pager" in outcome.error
    assert sample(reg, "vtlha_notifications_total", target="page", result="failed") == 1
    assert sample(reg, "vtlha_notification_attempts_total", target="page", result="exit") == 3
    failed = [r for r in caplog.records if r.getMessage() == "notification FAILED"]
    assert len(failed) == 1
    line = orjson.loads(JsonFormatter("notifier", "witness").format(failed[0]))
    assert (line["level"], line["target"], line["event_kind"], line["seq"],
            line["attempts"]) == ("error", "page", "failover.started", 5, 3)
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2


async def test_a_hung_script_is_killed_with_its_children_at_the_timeout(
        tmp_path: Path, deliverer: Deliverer, reg: CollectorRegistry) -> None:
    pids = tmp_path / "pids"
    s = write_script(tmp_path / "hang.sh",
                     f"sleep 1000 &\necho $$ $! > {pids}.tmp\nmv {pids}.tmp {pids}\nwait\n")
    start = time.monotonic()
    outcome = await deliverer.deliver(script_target(s, timeout=1.0), Delivery(EVENT, seq=1))
    took = time.monotonic() - start
    assert not outcome.ok and outcome.error is not None and "killed" in outcome.error
    assert 1.0 <= took < 2.5, took
    shell, child = (int(p) for p in pids.read_text().split())
    assert not pid_alive(shell)  # reaped by the notifier
    # the child got its SIGKILL with the group: it exits as soon as the kernel tears it down
    await exited(child, 2.0)
    assert not pid_alive(child)
    assert sample(reg, "vtlha_notification_attempts_total", target="page",
                  result="timeout") == 1


async def test_a_missing_executable_is_a_failure_not_a_crash(
        tmp_path: Path, deliverer: Deliverer, reg: CollectorRegistry) -> None:
    outcome = await deliverer.deliver(script_target(tmp_path / "absent.sh", attempts=2,
                                                    backoff=0.01), Delivery(EVENT, seq=1))
    assert not outcome.ok and outcome.attempts == 2
    assert sample(reg, "vtlha_notification_attempts_total", target="page", result="spawn") == 2


async def test_a_script_that_ignores_stdin_still_succeeds(
        tmp_path: Path, deliverer: Deliverer) -> None:
    big = EVENT.model_copy(update={"inputs": {"blob": "x" * 300_000}})  # > a pipe's buffer
    s = write_script(tmp_path / "quiet.sh", "exit 0\n")
    assert (await deliverer.deliver(script_target(s), Delivery(big, seq=1))).ok


# ---- webhooks ----------------------------------------------------------------------
class Hook:
    """A real HTTP server: answers each POST with the next status of ``statuses`` (the
    last one repeats); ``hang`` makes it never answer."""

    def __init__(self, statuses: list[int], hang: bool = False) -> None:
        self.statuses = statuses
        self.hang = hang
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        if self.hang:
            await self.release.wait()
        status = self.statuses[min(len(self.requests), len(self.statuses)) - 1]
        return web.Response(status=status, text="busy" if status >= 500 else "ok")


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []
    hooks: list[Hook] = []

    async def _serve(hook: Hook) -> str:
        app = web.Application()
        app.router.add_post("/hook", hook.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        hooks.append(hook)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}/hook"

    yield _serve
    for h in hooks:
        h.release.set()
    for r in runners:
        await r.cleanup()


async def test_webhook_gets_the_event_and_is_retried_on_5xx(
        deliverer: Deliverer, reg: CollectorRegistry, serve: Any) -> None:
    hook = Hook([503, 500, 204])
    url = await serve(hook)
    outcome = await deliverer.deliver(hook_target(url, attempts=4, backoff=0.01),
                                      Delivery(EVENT, seq=9))
    assert outcome.ok and outcome.attempts == 3
    assert len(hook.requests) == 3
    headers, body = hook.requests[-1]
    assert orjson.loads(body) == EVENT.model_dump(mode="json")
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Bearer t0k"
    assert (headers["X-Vtlha-Event-Id"], headers["X-Vtlha-Event-Kind"],
            headers["X-Vtlha-Event-Seq"], headers["X-Vtlha-Attempt"]) == (
        EVENT.id, "failover.started", "9", "3")
    assert sample(reg, "vtlha_notification_attempts_total", target="chat", result="http") == 2


async def test_webhook_4xx_is_not_retried(deliverer: Deliverer, reg: CollectorRegistry,
                                          serve: Any) -> None:
    hook = Hook([404])
    outcome = await deliverer.deliver(hook_target(await serve(hook), attempts=5,
                                                  backoff=0.01), Delivery(EVENT, seq=1))
    assert not outcome.ok and outcome.attempts == 1 and len(hook.requests) == 1
    assert outcome.error is not None and "answered 404" in outcome.error
    assert sample(reg, "vtlha_notifications_total", target="chat", result="failed") == 1


@pytest.mark.parametrize("status", [408, 429])
async def test_webhook_asking_to_come_back_later_is_retried(
        deliverer: Deliverer, serve: Any, status: int) -> None:
    hook = Hook([status, 200])
    outcome = await deliverer.deliver(hook_target(await serve(hook), attempts=3,
                                                  backoff=0.01), Delivery(EVENT, seq=1))
    assert outcome.ok and outcome.attempts == 2


async def test_a_hung_webhook_times_out_each_attempt(
        deliverer: Deliverer, reg: CollectorRegistry, serve: Any) -> None:
    hook = Hook([200], hang=True)
    start = time.monotonic()
    outcome = await deliverer.deliver(hook_target(await serve(hook), timeout=0.5, attempts=2,
                                                  backoff=0.01), Delivery(EVENT, seq=1))
    took = time.monotonic() - start
    assert not outcome.ok and outcome.attempts == 2 and 1.0 <= took < 2.5, took
    assert sample(reg, "vtlha_notification_attempts_total", target="chat",
                  result="timeout") == 2


async def test_an_unreachable_webhook_is_retried(
        deliverer: Deliverer, reg: CollectorRegistry) -> None:
    from vtlha_lab.ports import free_port

    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    outcome = await deliverer.deliver(hook_target(url, attempts=3, backoff=0.01),
                                      Delivery(EVENT, seq=1))
    assert not outcome.ok and outcome.attempts == 3
    assert sample(reg, "vtlha_notification_attempts_total", target="chat",
                  result="connect") == 3
