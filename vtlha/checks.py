"""Process-health checks the heartbeat service runs: a pid file's process alive, a TCP
port accepting, a command's exit status. Each has a timeout; none raises."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from vtlha.config import Check
from vtlha.messages import CheckResult


def _pid_alive(path: str) -> tuple[bool, str]:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        return False, f"cannot read pid file {path}: {exc.strerror}"
    try:
        pid = int(text.split()[0])
    except (ValueError, IndexError):
        return False, f"pid file {path} holds no pid"
    if pid <= 0:  # kill(0) and kill(-1) would signal process groups, not one process
        return False, f"pid file {path} holds an invalid pid {pid}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, f"process {pid} from {path} is not running"
    except PermissionError:
        return True, f"process {pid} runs (other user)"
    return True, f"process {pid} runs"


async def _tcp(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        return False, f"{host}:{port} refused or timed out: {exc!r}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, f"{host}:{port} accepts"


async def _command(argv: list[str], timeout: float) -> tuple[bool, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
    except OSError as exc:
        return False, f"cannot run {argv[0]}: {exc.strerror}"
    try:
        rc = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"{argv[0]} timed out after {timeout} s"
    return rc == 0, f"{argv[0]} exited {rc}"


async def run_check(check: Check) -> CheckResult:
    if check.kind == "pidfile":
        assert check.path is not None
        ok, detail = _pid_alive(check.path)
    elif check.kind == "tcp":
        assert check.port is not None
        ok, detail = await _tcp(check.host, check.port, check.timeout)
    else:
        assert check.command is not None
        ok, detail = await _command(check.command, check.timeout)
    return CheckResult(name=check.name, ok=ok, fatal=check.fatal, detail=detail)
