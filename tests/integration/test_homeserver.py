"""A service's NATS connection goes back to its own node's server (``vtlha.homeserver``),
with three real nats-servers on loopback: nats-py alone stays on the server its last
reconnect took it to, which after a rolling restart is the companion's (issue 14)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest

from tests.conftest import _free_port
from vtlha import bus
from vtlha.homeserver import HomeServer, netloc
from vtlha.subjects import Subjects
from vtlha_lab.natsserver import NatsServer, NatsServerSpec

NAMES = ("own", "other", "witness")
INTERVAL = 0.2


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, NatsServer]]:
    ports = {n: (_free_port(), _free_port(), _free_port()) for n in NAMES}
    routes = [f"127.0.0.1:{p[1]}" for p in ports.values()]
    out = {}
    for n, (client, cluster, monitor) in ports.items():
        spec = NatsServerSpec(name=n, client_port=client, monitor_port=monitor,
                              store_dir=tmp_path / n / "jetstream", cluster_port=cluster,
                              routes=routes)
        out[n] = NatsServer(spec, tmp_path / f"{n}.log")
        out[n].start()
    try:
        for s in out.values():
            s.wait_ready(timeout=30, jetstream=False)
        yield out
    finally:
        for s in out.values():
            s.stop()


async def _wait(pred: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_connection_returns_to_its_own_server_after_it_restarts(
        servers: dict[str, NatsServer]) -> None:
    urls = [servers[n].spec.url for n in NAMES]
    subjects = Subjects("homeserver")
    nc = await bus.connect(urls, name="test@own")
    admin = await nats.connect(urls[1:])
    home = HomeServer(nc, urls, subjects, "test@own", interval=INTERVAL)
    stop = asyncio.Event()
    try:
        await bus.retry_js("kv", lambda: bus.ensure_kv(admin.jetstream(timeout=2), subjects, 3))
        task = asyncio.create_task(home.run(stop))
        assert home.current() == urls[0]

        await _wait(lambda: home.states[urls[0]].state is True, 10, "the own server good")
        n = len(home.changes)
        servers["own"].kill()
        await _wait(lambda: home.current() == urls[1], 10, "nats-py's reconnect elsewhere")
        servers["own"].start()  # the same store: a restart
        took = await _wait(lambda: home.current() == urls[0], 30, "back on its own server")
        print(f"\nback on its own server {took:.2f} s after it was started again (rise "
              f"{home.states[urls[0]].rise} x interval {INTERVAL} s + catching up)")
        assert home.moves == 1
        # it went back only after the own server had been found bad (when the connection
        # left it) and had answered `rise` times again: a server down for less than
        # `fall` probes is not taken back the moment it restarts
        since = [ok for u, ok in list(home.changes)[n:] if u == urls[0]]
        assert since == [False, True], home.changes
        assert nc.connected_url is not None and nc.connected_url.netloc == netloc(urls[0])
        # still a working connection: a request through it is answered
        kv = await nc.jetstream(timeout=2).key_value(subjects.kv_bucket)
        await kv.put("probe.test", b"x")
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        await admin.close()
        await nc.close()


async def test_a_move_home_waits_until_the_service_is_ready(
        servers: dict[str, NatsServer]) -> None:
    """A move loses the replies of requests in flight (chaos iteration 131: a lease
    renewal's, and node-b's leases lapsed): a move home from a server that still works
    happens only when the service says it is ready (the heartbeat: right after a
    renewal, nothing in flight)."""
    urls = [servers[n].spec.url for n in NAMES]
    subjects = Subjects("homeserver-ready")
    nc = await bus.connect(urls[1:2], name="test@own")  # on the companion's server
    admin = await nats.connect(urls[1:])
    ready = False
    asked = 0

    async def is_ready() -> bool:
        nonlocal asked
        asked += 1
        return ready

    home = HomeServer(nc, urls, subjects, "test@own", interval=INTERVAL, ready=is_ready)
    try:
        await bus.retry_js("kv", lambda: bus.ensure_kv(admin.jetstream(timeout=2), subjects, 3))
        assert home.current() == urls[1]
        for _ in range(home.rise + 3):
            await home.step()
        assert home.states[urls[0]].state is True and home.states[urls[1]].state is True
        assert asked >= 3 and home.deferred == asked and home.moves == 0
        assert home.current() == urls[1], "moved although the service was not ready"
        ready = True
        assert await home.step() == urls[0]
        await _wait(lambda: home.current() == urls[0], 5, "the move home")
        assert home.moves == 1
        # what the chaos baseline waits for: the connection on its own server
        st = home.status()
        assert st["server"] == st["home"] == urls[0] and st["deferred"] == home.deferred
    finally:
        await home.close()
        await admin.close()
        await nc.close()


async def test_a_failing_step_does_not_end_the_watch(servers: dict[str, NatsServer]) -> None:
    """An error in one step (here the service's readiness check raising) is logged and
    the next step runs: a watch that died would leave the connection wherever nats-py's
    last reconnect took it, for good."""
    urls = [servers[n].spec.url for n in NAMES]
    subjects = Subjects("homeserver-fails")
    nc = await bus.connect(urls[1:2], name="test@own")  # on the companion's server
    admin = await nats.connect(urls[1:])
    calls = 0

    async def flaky() -> bool:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("readiness check broke")
        return True

    home = HomeServer(nc, urls, subjects, "test@own", interval=INTERVAL, ready=flaky)
    stop = asyncio.Event()
    try:
        await bus.retry_js("kv", lambda: bus.ensure_kv(admin.jetstream(timeout=2), subjects, 3))
        task = asyncio.create_task(home.run(stop))
        await _wait(lambda: home.current() == urls[0], 30, "the move home after two failures")
        assert calls >= 3 and home.moves == 1 and not task.done()
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        await admin.close()
        await nc.close()
