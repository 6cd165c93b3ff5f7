"""The lab's tape client (``vtlha_lab.tapeclient``): its connect timeout, on a real
socket whose SYNs the kernel drops (a listener with a full accept queue), as the SYNs
sent to a fenced node are dropped."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from vtlha_lab.tapeclient import TapeConnection, TapeError


@pytest.fixture
def silent_portal() -> Iterator[str]:
    """A portal that drops every new SYN: listening with a backlog of 0, its one queued
    connection never accepted."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    first = socket.create_connection(("127.0.0.1", port), timeout=5)  # fills the queue
    try:
        yield f"127.0.0.1:{port}"
    finally:
        first.close()
        srv.close()


def test_a_connect_nobody_answers_is_given_up_after_the_connect_timeout(
        silent_portal: str) -> None:
    conn = TapeConnection(silent_portal, timeout=60.0, connect_timeout=0.2)

    async def once() -> str:
        # the request timeout (60 s) would outlast this bound: only the connect
        # timeout can end the request in time
        with pytest.raises(TapeError) as err:
            await asyncio.wait_for(conn.request({"op": "status"}), 20)
        return str(err.value)

    assert "TimeoutError" in asyncio.run(once())
    assert conn.writer is None and conn.opened > 0 and conn.connected == 0.0


def test_without_a_connect_timeout_the_connect_waits_the_request_timeout() -> None:
    conn = TapeConnection("127.0.0.1:1", timeout=3.0)
    assert conn.connect_timeout == 3.0
