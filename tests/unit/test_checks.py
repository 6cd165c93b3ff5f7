"""Unit tests of the process-health checks, run for real: live and dead processes, a
listening and a closed TCP port, commands that pass, fail and hang. No mocks."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtlha.checks import run_check
from vtlha.config import Check
from vtlha.messages import CheckResult


def check(**fields: object) -> Check:
    return Check.model_validate({"name": "probe", **fields})


def run(c: Check) -> CheckResult:
    return asyncio.run(run_check(c))


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ---- pidfile -------------------------------------------------------------------

def test_pidfile_of_live_process_is_ok(tmp_path: Path,
                                       sleeper: subprocess.Popen[bytes]) -> None:
    pidfile = tmp_path / "daemon.pid"
    pidfile.write_text(f"{sleeper.pid}\n")
    r = run(check(kind="pidfile", path=str(pidfile), fatal=True))
    assert r.ok is True
    assert r.fatal is True
    assert r.name == "probe"
    assert str(sleeper.pid) in r.detail


def test_pidfile_of_killed_process_is_not_ok(tmp_path: Path,
                                             sleeper: subprocess.Popen[bytes]) -> None:
    pidfile = tmp_path / "daemon.pid"
    pidfile.write_text(f"{sleeper.pid}\n")
    assert run(check(kind="pidfile", path=str(pidfile))).ok is True
    sleeper.kill()
    sleeper.wait(5)  # reaped: a zombie would still answer kill(pid, 0)
    r = run(check(kind="pidfile", path=str(pidfile)))
    assert r.ok is False
    assert str(sleeper.pid) in r.detail
    assert "not running" in r.detail


def test_missing_pidfile_is_not_ok(tmp_path: Path) -> None:
    pidfile = tmp_path / "absent.pid"
    r = run(check(kind="pidfile", path=str(pidfile)))
    assert r.ok is False
    assert str(pidfile) in r.detail
    assert "cannot read" in r.detail


@pytest.mark.parametrize("content", ["", "   \n", "not-a-pid\n", "12abc"])
def test_garbage_pidfile_is_not_ok(tmp_path: Path, content: str) -> None:
    pidfile = tmp_path / "daemon.pid"
    pidfile.write_text(content)
    r = run(check(kind="pidfile", path=str(pidfile)))
    assert r.ok is False
    assert "holds no pid" in r.detail


# ---- tcp -----------------------------------------------------------------------

def test_tcp_listening_port_is_ok() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        r = run(check(kind="tcp", host="127.0.0.1", port=port, timeout=1.0))
    assert r.ok is True, r.detail
    assert f"127.0.0.1:{port}" in r.detail


def test_tcp_closed_port_is_not_ok() -> None:
    port = _closed_port()
    r = run(check(kind="tcp", host="127.0.0.1", port=port, timeout=1.0))
    assert r.ok is False
    assert f"127.0.0.1:{port}" in r.detail


# ---- command -------------------------------------------------------------------

def test_command_true_is_ok() -> None:
    r = run(check(kind="command", command=["true"]))
    assert r.ok is True
    assert "exited 0" in r.detail


def test_command_false_is_not_ok() -> None:
    r = run(check(kind="command", command=["false"]))
    assert r.ok is False
    assert "exited 1" in r.detail


def test_command_missing_binary_is_not_ok(tmp_path: Path) -> None:
    r = run(check(kind="command", command=[str(tmp_path / "no-such-binary")]))
    assert r.ok is False
    assert "cannot run" in r.detail


def test_command_that_hangs_times_out() -> None:
    t0 = time.monotonic()
    r = run(check(kind="command", command=["sleep", "5"], timeout=0.2))
    took = time.monotonic() - t0
    assert r.ok is False
    assert "timed out" in r.detail
    assert took < 3.0, f"a 0.2 s timeout took {took:.2f} s"


@pytest.mark.parametrize("content", ["0", "-1"])
def test_non_positive_pid_is_not_ok(tmp_path: Path, content: str) -> None:
    pidfile = tmp_path / "daemon.pid"
    pidfile.write_text(content)
    r = run(check(kind="pidfile", path=str(pidfile)))
    assert r.ok is False
