"""The dashboard's Server-Sent Events: the wire encoding, read back with the WHATWG
standard's parsing rules, and the fan-out that drops a browser that falls behind."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vtlha_dashboard import sse


def parse(stream: bytes) -> list[dict[str, str]]:
    """The browser's side ("Server-sent events", interpreting an event stream): lines
    end at CRLF, LF or CR; ``data`` fields are joined with LF; an empty line dispatches;
    a line starting with a colon is a comment; one space after the colon is dropped."""
    events: list[dict[str, str]] = []
    data: list[str] = []
    fields: dict[str, str] = {}
    text = stream.decode()
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line == "":
            if data or fields:
                events.append({**fields, "data": "\n".join(data)})
            data, fields = [], {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value
    return events


def test_one_event_with_its_name_id_and_retry() -> None:
    frame = sse.encode('{"a": 1}', event="status", event_id="42", retry_ms=1000)
    assert frame == b'event: status\nid: 42\nretry: 1000\ndata: {"a": 1}\n\n'
    assert parse(frame) == [{"event": "status", "id": "42", "retry": "1000",
                             "data": '{"a": 1}'}]


@pytest.mark.parametrize(("data", "lines"), [
    ("a\nb", ["a", "b"]), ("a\r\nb", ["a", "b"]), ("a\rb", ["a", "b"]),
    ("", [""]), ("x\n", ["x", ""]), (": not a comment", [": not a comment"]),
])
def test_each_line_of_the_data_is_its_own_field(data: str, lines: list[str]) -> None:
    frame = sse.encode(data)
    assert frame == ("".join(f"data: {x}\n" for x in lines) + "\n").encode()


@given(st.text())
def test_any_text_reads_back_as_sent_with_newlines_made_lf(data: str) -> None:
    got = parse(sse.encode(data, event="e"))
    want = data.replace("\r\n", "\n").replace("\r", "\n")
    assert got == [{"event": "e", "data": want}]


@given(st.lists(st.text(max_size=50), min_size=1, max_size=5))
def test_events_back_to_back_stay_apart(items: list[str]) -> None:
    stream = b"".join(sse.encode(x, event="m") + sse.comment("keepalive") for x in items)
    assert [e["data"] for e in parse(stream)] == \
        [x.replace("\r\n", "\n").replace("\r", "\n") for x in items]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b"])
def test_a_name_or_id_that_would_break_the_frame_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="newline or NUL"):
        sse.encode("x", event=bad)
    with pytest.raises(ValueError, match="newline or NUL"):
        sse.encode("x", event_id=bad)
    with pytest.raises(ValueError, match="retry"):
        sse.encode("x", retry_ms=-1)


def test_a_comment_is_ignored_and_stays_one_line() -> None:
    assert sse.comment("a\nb") == b": a b\n\n"
    assert parse(sse.comment("x") + sse.encode("y")) == [{"data": "y"}]


async def test_a_browser_that_falls_behind_is_dropped_the_others_keep_up() -> None:
    hub = sse.Hub()
    slow, fast = hub.join(), hub.join()
    for i in range(sse.QUEUE_MAX + 1):
        hub.publish(b"%d" % i)
        if i % 2 == 0:  # the fast one keeps draining
            while not fast.queue.empty():
                fast.queue.get_nowait()
    assert slow.dropped and slow not in hub.clients and hub.dropped == 1
    assert slow.queue.qsize() == 1 and slow.queue.get_nowait() is None  # its stream ends
    assert not fast.dropped and fast in hub.clients
    hub.publish(b"next")
    assert await asyncio.wait_for(fast.queue.get(), 1) == b"next"


async def test_close_ends_every_stream_even_a_full_one() -> None:
    hub = sse.Hub()
    a, b = hub.join(), hub.join()
    for _ in range(sse.QUEUE_MAX):
        a.queue.put_nowait(b"x")
    hub.close()
    assert not hub.clients
    assert a.queue.get_nowait() is None and b.queue.get_nowait() is None


def test_a_browser_that_joins_a_closed_hub_ends_at_once() -> None:
    hub = sse.Hub()
    hub.close()
    late = hub.join()
    assert late.queue.get_nowait() is None and late not in hub.clients
    hub.publish(b"x")  # nobody left to send to
    assert late.queue.empty()
