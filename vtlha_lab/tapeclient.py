"""A client of the tape data service: writes numbered blocks and reads them back.

``write`` sends blocks 0, 1, 2, ... to the portal, one at a time; a block counts as
acknowledged only when the service answered ``ok`` (the SAN target wrote it with FUA).
On any failure — connection refused or lost, timeout, a refusal — it connects again and
sends the *same* block until it is acknowledged, so a failover shows up as a gap in
time, never as a hole in the numbers. Every acknowledgement is appended to a JSON-lines
log (block, node and epoch that served it, time, and when the connection it came on was
opened and established). A connect waits ``connect_timeout`` (default: the request
timeout, 2 s): a SYN that nobody answered is sent again by the kernel only after TCP's
initial retransmission timeout (1 s on Linux), so a client that gives a connect up
sooner and sends a new SYN reaches a new owner sooner. ``verify`` reads every acknowledged
block back and compares it with what was written."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from vtlha.san.protocol import ProtocolError, decode_header, encode_frame, read_frame
from vtlha.tape.service import parse_portal

REQUEST_TIMEOUT = 2.0
RETRY_PAUSE = 0.02


def payload(block: int, size: int = 64) -> bytes:
    """What block ``block`` holds: its number, repeated (distinct per block)."""
    unit = f"vtlha tape block {block:08d};".encode()
    return (unit * (size // len(unit) + 1))[:size]


class TapeError(Exception):
    pass


class TapeConnection:
    def __init__(self, portal: str, timeout: float = REQUEST_TIMEOUT,
                 connect_timeout: float | None = None) -> None:
        self.host, self.port = parse_portal(portal)
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.opened = self.connected = 0.0  # wall times of the current connection's connect
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ids = 0

    async def close(self) -> None:
        w, self.writer, self.reader = self.writer, None, None
        if w is not None:
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 1.0)

    async def request(self, header: dict[str, Any], data: bytes = b""
                      ) -> tuple[dict[str, Any], bytes]:
        """One request; TapeError (and a closed connection) on any failure."""
        try:
            if self.writer is None:
                self.opened = time.time()
                self.reader, self.writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.connect_timeout)
                self.connected = time.time()
            assert self.reader is not None and self.writer is not None
            self.ids += 1
            self.writer.write(encode_frame({**header, "id": self.ids}, data))
            await self.writer.drain()
            head, body = await asyncio.wait_for(read_frame(self.reader), self.timeout)
            reply = decode_header(head)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError) as exc:
            await self.close()
            raise TapeError(f"{header.get('op')}: {exc!r}") from None
        if not reply.get("ok"):
            await self.close()
            raise TapeError(f"{header.get('op')} refused by {reply.get('node')}: "
                            f"{reply.get('reason')}")
        return reply, body


async def write_blocks(portal: str, log_path: Path, count: int | None = None,
                       interval: float = 0.0, stop: asyncio.Event | None = None,
                       on_ack: Callable[[dict[str, Any]], None] | None = None,
                       connect_timeout: float | None = None) -> int:
    """Write blocks until ``count`` are acknowledged or ``stop`` is set; returns how
    many were acknowledged. Resumes after the last block in ``log_path``."""
    acked = read_acks(log_path)
    block = max(acked, default=-1) + 1
    conn = TapeConnection(portal, connect_timeout=connect_timeout)
    stop = stop or asyncio.Event()
    with open(log_path, "ab") as log:  # noqa: ASYNC230 - small appends, flushed per line
        while not stop.is_set() and (count is None or block < count):
            t0 = time.time()
            try:
                reply, _ = await conn.request({"op": "write", "block": block}, payload(block))
            except TapeError as exc:
                log.write(orjson.dumps({"retry": block, "error": str(exc), "t": t0}) + b"\n")
                log.flush()
                await asyncio.sleep(RETRY_PAUSE)
                continue
            entry = {"block": block, "node": reply.get("node"), "epoch": reply.get("epoch"),
                     "seq": reply.get("seq"), "t": time.time(), "sent": t0,
                     "opened": conn.opened, "connected": conn.connected}
            log.write(orjson.dumps(entry) + b"\n")
            log.flush()
            if on_ack is not None:
                on_ack(entry)
            block += 1
            if interval:
                await asyncio.sleep(interval)
    await conn.close()
    return block


def read_acks(log_path: Path) -> dict[int, dict[str, Any]]:
    """Acknowledged blocks in a writer's log: block -> its acknowledgement."""
    out: dict[int, dict[str, Any]] = {}
    if not log_path.exists():
        return out
    for line in log_path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if isinstance(entry, dict) and "block" in entry:
                out[int(entry["block"])] = entry
    return out


async def verify_blocks(portal: str, blocks: list[int] | dict[int, dict[str, Any]],
                        deadline: float = 30.0) -> dict[str, Any]:
    """Read each block back (retrying while the portal is unreachable, up to
    ``deadline`` s in all); returns {checked, bad: [...], fenced: [...], nodes: {...},
    writers: {...}}. ``blocks`` with their acknowledgements (:func:`read_acks`) also
    checks who wrote each one: ``fenced`` lists blocks that read back as written by
    another writer or at another epoch than the one that acknowledged them (they are
    in ``bad`` too)."""
    acks = blocks if isinstance(blocks, dict) else {}
    conn = TapeConnection(portal)
    bad: list[dict[str, Any]] = []
    fenced: list[dict[str, Any]] = []
    nodes: dict[str, int] = {}
    writers: dict[str, int] = {}
    end = time.monotonic() + deadline
    for b in sorted(blocks):
        while True:
            try:
                reply, body = await conn.request({"op": "read", "block": b})
                break
            except TapeError as exc:
                if time.monotonic() > end:
                    await conn.close()
                    raise TapeError(f"block {b}: {exc}") from None
                await asyncio.sleep(RETRY_PAUSE)
        want = payload(b)
        if body[:len(want)] != want or body[len(want):].strip(b"\0"):
            bad.append({"block": b, "got": body[:48].decode(errors="replace")})
        written = (reply.get("writer"), reply.get("written_epoch"))
        ack = acks.get(b)
        if ack is not None and written != (ack.get("node"), ack.get("epoch")):
            entry = {"block": b, "acknowledged_by": [ack.get("node"), ack.get("epoch")],
                     "written_by": list(written), "seq": reply.get("seq")}
            fenced.append(entry)
            bad.append({**entry, "got": "a block of another writer or epoch"})
        node = str(reply.get("node"))
        nodes[node] = nodes.get(node, 0) + 1
        who = f"{written[0]}@{written[1]}"
        writers[who] = writers.get(who, 0) + 1
    await conn.close()
    return {"checked": len(blocks), "bad": bad, "fenced": fenced, "nodes": nodes,
            "writers": writers}


async def status(portal: str) -> dict[str, Any]:
    conn = TapeConnection(portal)
    try:
        reply, _ = await conn.request({"op": "status"})
    finally:
        await conn.close()
    return reply
