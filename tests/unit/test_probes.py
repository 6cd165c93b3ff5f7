"""The lab's TCP probe (vtlha_lab.probes) on loopback: the overlapping probe does not let
an attempt that hangs hold the next ones back, as the sequential one does."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtlha_lab.probes import probe, probe_overlapping, read_timeline


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listening socket that never accepts: a connect completes (the kernel's backlog),
    nothing is ever sent, so every attempt waits for its timeout (like a dropped SYN)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(256)
    yield srv.getsockname()[1]
    srv.close()


@pytest.fixture
def named_port() -> Iterator[int]:
    """A listening socket whose connections are answered with the name "node-b"."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(256)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"node-b\n")

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    yield srv.getsockname()[1]
    stop.set()
    th.join()
    srv.close()


def test_overlapping_attempts_are_not_held_back_by_one_that_hangs(tmp_path: Path,
                                                                   silent_port: int) -> None:
    seq, ovl = tmp_path / "seq.jsonl", tmp_path / "ovl.jsonl"
    probe(f"127.0.0.1:{silent_port}", str(seq), interval=0.01, duration=0.4, timeout=0.2)
    probe_overlapping(f"127.0.0.1:{silent_port}", str(ovl), interval=0.01, duration=0.4,
                      timeout=0.2)
    s, o = read_timeline(str(seq)), read_timeline(str(ovl))
    assert all(not e["ok"] and e["error"] == "TimeoutError" for e in s + o)
    # The sequential probe waits out each attempt (2 or 3 in 0.4 s); the overlapping one
    # starts one every 10 ms (about 40), each still given its whole timeout.
    assert len(s) <= 3
    assert len(o) >= 10 * len(s)
    starts = [float(e["t"]) for e in o]
    assert starts == sorted(starts)  # read back in start order, though written as they end


def test_overlapping_attempts_record_who_answered(tmp_path: Path, named_port: int) -> None:
    out = tmp_path / "ovl.jsonl"
    probe_overlapping(f"127.0.0.1:{named_port}", str(out), interval=0.01, duration=0.2,
                      timeout=0.5)
    tl = read_timeline(str(out))
    assert tl and all(e["ok"] and e["who"] == "node-b" and e["error"] is None for e in tl)


def test_a_refused_connect_is_an_error_at_once(tmp_path: Path) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there: every connect is refused (a reset, not a timeout)
    out = tmp_path / "ovl.jsonl"
    probe_overlapping(f"127.0.0.1:{port}", str(out), interval=0.01, duration=0.1,
                      timeout=5.0)
    tl = read_timeline(str(out))
    assert tl and all(not e["ok"] and e["error"] == "ECONNREFUSED" for e in tl)
