"""The outbox on its own: durable before published, ordered, bounded (never silently),
drained after a restart. The stream is a recording test double here; the integration
tests (tests/integration/test_events.py) use a real nats-server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from vtlha.messages import Event, decode
from vtlha.outbox import DROPPED_KIND, REJECT_AFTER, Outbox, Unavailable


def _event(i: int, kind: str = "test.event") -> Event:
    return Event(cluster="c", node="node-a", kind=kind, reason=f"event {i}", data={"i": i})


class Stream:
    """Stores what it is given, unless told to be unavailable or to refuse."""

    def __init__(self) -> None:
        self.stored: list[Event] = []
        self.unavailable = 0  # attempts to fail with Unavailable
        self.refuse: set[str] = set()  # ids refused for good
        self.attempts = 0
        self.changed = asyncio.Event()

    async def publish(self, event: Event) -> bool:
        self.attempts += 1
        if self.unavailable > 0:
            self.unavailable -= 1
            raise Unavailable("down")
        if event.id in self.refuse:
            raise ValueError("bad request")
        dup = any(e.id == event.id for e in self.stored)
        if not dup:
            self.stored.append(event)
        self.changed.set()
        return dup


def _outbox(d: Path, **kw: int) -> Outbox:
    return Outbox(d, CollectorRegistry(), **kw)


async def _drain(box: Outbox, stream: Stream, want: int, timeout: float = 10.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(box.run(stream.publish, stop))
    try:
        async with asyncio.timeout(timeout):
            while len(stream.stored) < want or box.pending():
                stream.changed.clear()
                await stream.changed.wait()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


def _files(d: Path, pattern: str = "[0-9]*-*.json") -> list[Path]:
    return sorted(d.glob(pattern))


def test_put_writes_the_event_to_disk_before_anything_is_published(tmp_path: Path) -> None:
    box = _outbox(tmp_path)
    e = _event(1)
    assert box.put(e)
    [f] = _files(tmp_path)
    assert decode(Event, f.read_bytes()) == e
    assert e.id in f.name


async def test_a_restart_drains_what_was_left_in_order_and_removes_it(tmp_path: Path) -> None:
    box = _outbox(tmp_path)
    events = [_event(i) for i in range(20)]
    for e in events:
        box.put(e)
    # "restart": a new outbox over the same directory; a half-written file is ignored
    (tmp_path / "00000000000000000099-x.tmp").write_bytes(b'{"half')
    again = _outbox(tmp_path)
    assert again.load() == 20
    stream = Stream()
    await _drain(again, stream, 20)
    assert [e.id for e in stream.stored] == [e.id for e in events]
    assert _files(tmp_path) == [] and not _files(tmp_path, "*.tmp")
    # new events after a restart come after the old ones (numbering goes on)
    again.put(_event(99))
    assert _files(tmp_path)[0].name.startswith("00000000000000000020-")


async def test_an_unavailable_stream_is_retried_until_it_stores(tmp_path: Path) -> None:
    box = _outbox(tmp_path)
    stream = Stream()
    stream.unavailable = 4
    box.put(_event(1))
    box.put(_event(2))
    await _drain(box, stream, 2)
    assert [e.data["i"] for e in stream.stored] == [1, 2]
    assert stream.attempts == 6
    assert box.retries._value.get() == 4


async def test_an_event_the_stream_refuses_for_good_is_set_aside_not_blocking(
        tmp_path: Path) -> None:
    box = _outbox(tmp_path)
    bad, good = _event(1), _event(2)
    stream = Stream()
    stream.refuse.add(bad.id)
    box.put(bad)
    box.put(good)
    await _drain(box, stream, 1)
    assert [e.id for e in stream.stored] == [good.id]
    assert stream.attempts == REJECT_AFTER + 1
    [aside] = _files(tmp_path / "rejected")
    assert aside.name.endswith(f"{bad.id}.json")
    assert box.dropped.labels("refused")._value.get() == 1


async def test_a_full_outbox_refuses_loudly_and_says_so_in_the_stream(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = _outbox(tmp_path, max_events=10)
    kept = [_event(i) for i in range(10)]
    assert all(box.put(e) for e in kept)
    assert not box.put(_event(10, kind="node.down"))
    assert not box.put(_event(11, kind="node.down"))
    assert box.dropped.labels("full")._value.get() == 2
    assert "event DROPPED" in caplog.text
    # the count survives a restart, and the drained outbox reports it as an event
    again = _outbox(tmp_path, max_events=10)
    again.load()
    stream = Stream()
    await _drain(again, stream, 11)
    assert [e.id for e in stream.stored[:10]] == [e.id for e in kept]
    report = stream.stored[10]
    assert report.kind == DROPPED_KIND
    assert report.data["count"] == 2 and report.data["kinds"] == {"node.down": 2}
    assert not (tmp_path / "dropped.json").exists()


async def test_at_stop_one_more_attempt_and_the_rest_stays_for_the_next_start(
        tmp_path: Path) -> None:
    box = _outbox(tmp_path)
    stream = Stream()
    stream.unavailable = 10**6
    for i in range(3):
        box.put(_event(i))
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(box.run(stream.publish, stop), 5)
    assert len(_files(tmp_path)) == 3 and stream.stored == []


def test_an_unwritable_outbox_drops_loudly_and_never_raises(tmp_path: Path) -> None:
    d = tmp_path / "box"
    box = _outbox(d)
    box.load()
    d.rmdir()
    d.write_bytes(b"")  # not a directory any more: every write fails (even for root)
    assert not box.put(_event(1))
    assert box.dropped.labels("unwritable")._value.get() == 1
