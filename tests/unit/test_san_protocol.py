"""Framing and validation of the reference SAN target's protocol: round trips,
malformed headers, oversized frames, unknown ops, wrong types, payload rules."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import orjson
import pytest

from vtlha.san import protocol as p


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


async def test_round_trip_with_payload() -> None:
    frame = p.encode_frame({"op": "write", "device": "d0", "lba": 3, "epoch": 2}, b"x" * 4096)
    head, payload = await p.read_frame(_reader(frame))
    assert p.decode_header(head) == {"op": "write", "device": "d0", "lba": 3, "epoch": 2}
    assert payload == b"x" * 4096
    req = p.parse_request(p.decode_header(head), payload)
    assert isinstance(req, p.Write) and req.lba == 3 and req.epoch == 2 and not req.fua


async def test_two_frames_back_to_back() -> None:
    r = _reader(p.encode_frame({"op": "status"}) + p.encode_frame({"op": "status", "id": 7}))
    assert p.decode_header((await p.read_frame(r))[0]) == {"op": "status"}
    assert p.decode_header((await p.read_frame(r))[0]) == {"op": "status", "id": 7}
    with pytest.raises(asyncio.IncompleteReadError) as ei:
        await p.read_frame(r)
    assert ei.value.partial == b""  # clean end of stream


@pytest.mark.parametrize("header", [
    {"op": "hello", "node": "node-a", "path": 1},
    {"op": "register", "device": "vtl-a0"},
    {"op": "reserve", "device": "vtl-a0", "epoch": 0},
    {"op": "preempt", "device": "vtl-a0", "epoch": 5, "id": 1},
    {"op": "release", "device": "vtl-a0", "epoch": 5},
    {"op": "read", "device": "vtl-a0", "lba": 0, "count": 1},
    {"op": "status"},
])
def test_valid_requests(header: dict[str, Any]) -> None:
    req = p.parse_request(header)
    assert req.op == header["op"]
    assert p.request_header(req) == header


async def test_oversized_header_is_refused_before_reading_it() -> None:
    prefix = struct.pack(">II", p.MAX_HEADER + 1, 0)
    with pytest.raises(p.FrameTooLarge, match="header"):
        await p.read_frame(_reader(prefix))  # the body is never awaited


async def test_oversized_payload_is_refused() -> None:
    with pytest.raises(p.FrameTooLarge, match="payload"):
        await p.read_frame(_reader(struct.pack(">II", 2, p.MAX_PAYLOAD + 1) + b"{}"))
    with pytest.raises(p.FrameTooLarge):
        p.check_prefix(struct.pack(">II", 10, 100), max_header=100, max_payload=99)


def test_encode_refuses_oversize() -> None:
    with pytest.raises(p.FrameTooLarge):
        p.encode_frame({"op": "write"}, b"\0" * (p.MAX_PAYLOAD + 1))


async def test_truncated_frame_is_an_incomplete_read() -> None:
    frame = p.encode_frame({"op": "status"})
    with pytest.raises(asyncio.IncompleteReadError) as ei:
        await p.read_frame(_reader(frame[:-2]))
    assert ei.value.partial != b""


@pytest.mark.parametrize("raw, match", [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"op"', "JSON object"),
    (b"", "not valid JSON"),
])
def test_malformed_headers(raw: bytes, match: str) -> None:
    with pytest.raises(p.InvalidFrame, match=match):
        p.decode_header(raw)


@pytest.mark.parametrize("header, match", [
    ({}, "no string 'op'"),
    ({"op": 3}, "no string 'op'"),
    ({"op": "format"}, "unknown op 'format'"),
    ({"op": "x" * 1000}, "unknown op"),
    ({"op": "read", "device": "d0", "lba": "0", "count": 1}, "lba"),
    ({"op": "read", "device": "d0", "lba": 1.5, "count": 1}, "lba"),
    ({"op": "read", "device": "d0", "lba": -1, "count": 1}, "lba"),
    ({"op": "read", "device": "d0", "lba": 0, "count": 0}, "count"),
    ({"op": "read", "device": "d0", "lba": 0, "count": 100000}, "count"),
    ({"op": "read", "device": "d0", "lba": 0}, "count"),
    ({"op": "read", "device": "D 0!", "lba": 0, "count": 1}, "device"),
    ({"op": "reserve", "device": "d0", "epoch": True}, "epoch"),
    ({"op": "reserve", "device": "d0", "epoch": 2**70}, "epoch"),
    ({"op": "preempt", "device": "d0"}, "epoch"),
    ({"op": "hello", "node": "node-a", "path": -1}, "path"),
    ({"op": "hello", "node": None, "path": 0}, "node"),
    ({"op": "status", "extra": 1}, "extra"),
    ({"op": "status", "id": "one"}, "id"),
])
def test_invalid_requests(header: dict[str, Any], match: str) -> None:
    with pytest.raises(p.InvalidFrame, match=match):
        p.parse_request(header)


def test_payload_rules() -> None:
    with pytest.raises(p.InvalidFrame, match="without data"):
        p.parse_request({"op": "write", "device": "d0", "lba": 0, "epoch": 1})
    with pytest.raises(p.InvalidFrame, match="must not carry a payload"):
        p.parse_request({"op": "read", "device": "d0", "lba": 0, "count": 1}, b"x")


def test_reason_is_short_for_many_errors() -> None:
    with pytest.raises(p.InvalidFrame) as ei:
        p.parse_request({"op": "write", "device": 1, "lba": "a", "epoch": "b", "fua": "c",
                         "x": 1}, b"d")
    assert "more)" in str(ei.value) and len(str(ei.value)) < 500


def test_header_is_orjson() -> None:
    frame = p.encode_frame({"ok": True, "reason": ""})
    hlen, plen = p.PREFIX.unpack(frame[:8])
    assert plen == 0 and orjson.loads(frame[8:8 + hlen]) == {"ok": True, "reason": ""}
