"""Events are never lost and never doubled (issue 16), with a real nats-server: an
event emitted while the stream is unavailable is stored once when it comes back; a
service SIGKILLed with events in its outbox publishes them after a restart, once; a
publish that timed out but was stored appears once to a reader that dedupes by id."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from tests.conftest import EXAMPLE, ROOT, _free_port, cluster_name
from vtlha import bus, eventlog
from vtlha.messages import Event
from vtlha.outbox import Outbox, stream_publisher
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import prepare_config
from vtlha_lab.natsserver import NatsServer, NatsServerSpec


def _event(cluster: str, i: int) -> Event:
    return Event(cluster=cluster, node="node-a", kind="test.emitted", reason=f"event {i}",
                 data={"i": i})


async def _stream(js: JetStreamContext, subj: Subjects, window: float = 120.0) -> None:
    await bus.ensure_events_stream(js, subj, replicas=1, max_bytes=8 * 1024 * 1024,
                                   max_age=3600.0, duplicate_window=window)


async def _stored(js: JetStreamContext, subj: Subjects) -> int:
    """Messages in the stream (every copy: no dedupe)."""
    try:
        return int((await js.stream_info(subj.events_stream)).state.messages)
    except Exception:
        return 0


async def _until(what: str, cond: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


async def _drain(box: Outbox, js: JetStreamContext, subj: Subjects, want: int,
                 timeout: float = 30.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(box.run(stream_publisher(lambda: js, subj), stop))
    try:
        await _until(f"{want} events stored", lambda: not box.pending() and
                     _stored_ge(js, subj, want), timeout)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _stored_ge(js: JetStreamContext, subj: Subjects, want: int) -> bool:
    return await _stored(js, subj) >= want


def _ids(evs: list[tuple[int, Event]]) -> list[str]:
    return [e.id for _, e in evs]


# ---- the stream not there yet / its server stopped ---------------------------------

async def test_events_emitted_before_the_stream_exists_are_stored_once_it_does(
        nats_server: NatsServer, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    subj = Subjects(cluster_name(request))
    nc = await nats.connect(nats_server.spec.url)
    try:
        js = nc.jetstream(timeout=2.0)
        box = Outbox(tmp_path / "outbox", CollectorRegistry())
        sent = [_event(subj.cluster, i) for i in range(5)]
        for e in sent:
            assert box.put(e)
        stop = asyncio.Event()
        task = asyncio.create_task(box.run(stream_publisher(lambda: js, subj), stop))
        await _until("a few attempts against the missing stream",
                     lambda: box.retries._value.get() >= 3, 10)
        assert len(box.pending()) == 5
        await _stream(js, subj)
        await _until("the outbox drained", lambda: not box.pending(), 20)
        stop.set()
        await asyncio.wait_for(task, 10)
        got = await eventlog.read(js, subj)
        assert _ids(got) == [e.id for e in sent]
        assert await _stored(js, subj) == 5
    finally:
        await nc.close()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own, to stop and start again (same store)."""
    spec = NatsServerSpec(name="own", client_port=_free_port(), monitor_port=_free_port(),
                          store_dir=tmp_path / "js")
    srv = NatsServer(spec, tmp_path / "nats.log")
    srv.start()
    srv.wait_ready()
    try:
        yield srv
    finally:
        srv.stop()


async def test_events_emitted_while_the_server_is_down_are_stored_once_it_is_back(
        own_server: NatsServer, tmp_path: Path) -> None:
    subj = Subjects("down")
    nc = await bus.connect([own_server.spec.url], name="test")
    try:
        js = nc.jetstream(timeout=2.0)
        await _stream(js, subj)
        box = Outbox(tmp_path / "outbox", CollectorRegistry())
        stop = asyncio.Event()
        task = asyncio.create_task(box.run(stream_publisher(lambda: js, subj), stop))
        first = _event(subj.cluster, 0)
        box.put(first)
        await _until("the first event stored", lambda: not box.pending(), 10)
        own_server.kill()
        during = [_event(subj.cluster, i) for i in range(1, 6)]
        t0 = time.monotonic()
        for e in during:
            assert box.put(e)
        assert time.monotonic() - t0 < 0.5  # emitting never waits for the stream
        await _until("attempts while the server is down",
                     lambda: box.retries._value.get() >= 2, 10)
        assert len(box.pending()) == 5
        own_server.start()
        own_server.wait_ready()
        await _until("the outbox drained after the server came back",
                     lambda: not box.pending(), 30)
        stop.set()
        await asyncio.wait_for(task, 10)
        got = await eventlog.read(js, subj)
        assert _ids(got) == [e.id for e in [first, *during]]
        assert await _stored(js, subj) == 6
    finally:
        await nc.close()


# ---- a service SIGKILLed with events in its outbox ---------------------------------

def _emitter(cfg: Path, url: str, state: Path, count: int, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tests.integration.emitter", "--config", str(cfg),
            "--node", "node-a", "--nats", url, "--state-dir", str(state),
            "--http-port", str(_free_port())]
    with open(log, "ab") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "EMITTER_COUNT": str(count)},
                                start_new_session=True)


def _outbox_files(state: Path) -> int:
    return len(list((state / "node-a" / "outbox-emitter").glob("[0-9]*-*.json")))


@pytest.mark.parametrize("stream_first", [False, True], ids=["no-stream", "mid-drain"])
async def test_a_service_killed_with_events_in_its_outbox_publishes_them_once_after_restart(
        nats_server: NatsServer, tmp_path: Path, request: pytest.FixtureRequest,
        stream_first: bool) -> None:
    """no-stream: every event is still in the outbox at the kill; mid-drain: the kill
    lands while the outbox is being published (one may be stored and not yet removed)."""
    n = 300
    cfg = prepare_config(EXAMPLE, tmp_path, cluster=cluster_name(request), single_server=True)
    subj = Subjects(cluster_name(request))
    state = tmp_path / "svc-state"
    nc = await nats.connect(nats_server.spec.url)
    js = nc.jetstream(timeout=2.0)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if stream_first:
            await _stream(js, subj)
        procs.append(_emitter(cfg, nats_server.spec.url, state, n, tmp_path / "e1.log"))
        if stream_first:
            await _until("some events stored", lambda: _stored_ge(js, subj, 20), 30)
        else:
            await _until("every event in the outbox", lambda: _outbox_files(state) == n, 30)
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(10)
        left = _outbox_files(state)
        assert 0 < left <= n
        if not stream_first:
            assert left == n and await _stored(js, subj) == 0
            await _stream(js, subj)
        procs.append(_emitter(cfg, nats_server.spec.url, state, 0, tmp_path / "e2.log"))
        await _until("the outbox drained after the restart",
                     lambda: _outbox_files(state) == 0, 60)
        got = await eventlog.read(js, subj)
        assert sorted(e.data["i"] for _, e in got) == list(range(n))
        assert [e.data["i"] for _, e in got] == list(range(n))  # in emit order
        assert await _stored(js, subj) == n  # the duplicate window dropped any second copy
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        await nc.close()


# ---- duplicates ---------------------------------------------------------------

async def test_a_timed_out_publish_that_was_stored_appears_once(
        nats_server: NatsServer, request: pytest.FixtureRequest) -> None:
    """Within the window the stream drops the second copy; after it (a window of 1 s
    here) a second copy is stored, and readers that dedupe by id still show one."""
    subj = Subjects(cluster_name(request))
    nc = await nats.connect(nats_server.spec.url)
    try:
        js = nc.jetstream(timeout=2.0)
        await _stream(js, subj, window=1.0)
        e = _event(subj.cluster, 1)
        seq1, dup1 = await bus.publish_event(js, subj, e)  # the client "timed out" here
        seq2, dup2 = await bus.publish_event(js, subj, e)  # the outbox's retry
        assert (dup1, dup2) == (False, True) and seq2 == seq1
        # After the window (an outbox drained after a long outage): stored again.
        await _until("a copy stored after the window",
                     lambda: _republished(js, subj, e), 10)
        other = _event(subj.cluster, 2)
        await bus.publish_event(js, subj, other)
        assert await _stored(js, subj) == 3
        got = await eventlog.read(js, subj)
        assert _ids(got) == [e.id, other.id] and got[0][0] == seq1
        followed: list[str] = []
        async with asyncio.timeout(10):
            async for _, ev in eventlog.follow(js, subj):
                followed.append(ev.id)
                if ev.id == other.id:
                    break
        assert followed == [e.id, other.id]
    finally:
        await nc.close()


async def _republished(js: JetStreamContext, subj: Subjects, e: Event) -> bool:
    _, dup = await bus.publish_event(js, subj, e)
    return not dup


async def test_the_duplicate_window_is_applied_to_an_existing_stream(
        nats_server: NatsServer, request: pytest.FixtureRequest) -> None:
    subj = Subjects(cluster_name(request))
    nc = await nats.connect(nats_server.spec.url)
    try:
        js = nc.jetstream(timeout=2.0)
        await _stream(js, subj, window=300.0)
        await js.publish(subj.event("x.y"), b"{}")
        await _stream(js, subj, window=45.0)
        info = await js.stream_info(subj.events_stream)
        assert info.config.duplicate_window == pytest.approx(45.0)
        assert info.state.messages == 1  # updated in place, nothing lost
    finally:
        await nc.close()
