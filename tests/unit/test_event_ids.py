"""Every event has a unique id; readers keep the first copy of each id."""

from __future__ import annotations

import orjson
import pytest

from vtlha.errors import InvalidMessage
from vtlha.eventlog import Dedupe
from vtlha.messages import Event, decode, encode


def _event(**kw: object) -> Event:
    return Event(cluster="c", node="n", kind="node.down", reason="r", **kw)  # type: ignore[arg-type]


def test_each_event_gets_its_own_id_and_keeps_it_on_the_wire() -> None:
    a, b = _event(), _event()
    assert a.id != b.id and len(a.id) == 32
    assert decode(Event, encode(a)).id == a.id


def test_an_event_from_an_older_sender_without_an_id_is_still_read() -> None:
    old = {"v": 1, "cluster": "c", "node": "n", "kind": "node.down", "reason": "r"}
    e = decode(Event, orjson.dumps(old))
    assert e.id  # a fresh one: such events were published once, without retries


@pytest.mark.parametrize("bad", ["", "has space", "x" * 65, "a*b"])
def test_an_id_that_cannot_be_a_message_id_is_refused(bad: str) -> None:
    body = orjson.loads(encode(_event()))
    body["id"] = bad
    with pytest.raises(InvalidMessage):
        decode(Event, orjson.dumps(body))
    body["id"] = "ok-id.1_A"
    assert decode(Event, orjson.dumps(body)).id == "ok-id.1_A"


def test_dedupe_keeps_the_first_copy_and_forgets_beyond_its_memory() -> None:
    d = Dedupe(memory=2)
    a, b, c = _event(), _event(), _event()
    assert d.first(a) and not d.first(a) and d.dropped == 1
    assert d.first(b) and d.first(c)
    assert d.first(a)  # forgotten: only the most recent ``memory`` ids are kept
