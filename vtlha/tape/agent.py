"""The tape data service's resource agent (``builtin:tape``; see ``vtlha.agents``).

``start``: start ``vtlha.tape.service`` for the group (its pid in ``$VTLHA_RUN_DIR/pid``,
its log in ``tape.log``) and wait until it says ready; a service of this group that
runs already at this epoch is success, one at another epoch is stopped first.
``stop``: SIGTERM, then SIGKILL after ``STOP_GRACE`` s; success once the process is
gone (its I/O has stopped). ``monitor``: 0 while it runs, 7 when it does not.

The storage-monitor runs ``start`` and ``stop`` in its own process
(``vtlha.agents``) and keeps a *standby* service per group it may serve
(``prepare_standby``): an interpreter that has imported the service and waits on its
stdin for the environment of its start — it holds nothing (no SAN session, no socket)
until then, and leaves when its stdin closes (the storage-monitor gone). A start hands
the standby its environment instead of starting an interpreter (~0.25 s of imports).

Standard library only: it starts fast."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

OCF_NOT_RUNNING = 7
STOP_GRACE = 5.0
START_WAIT = 60.0  # the runner's start_timeout is the real bound

#: standby services by run directory, and every service this process started (reaped
#: here: they are this process's children)
_standby: dict[Path, subprocess.Popen[bytes]] = {}
_children: list[subprocess.Popen[bytes]] = []
_lock = threading.Lock()  # starts run in threads, prepares on the event loop


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped (its parent, this agent's earlier
    run, has exited: whoever inherited it may reap it late)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _running(run: Path) -> tuple[int, str] | None:
    """(pid, epoch) of the service started here, if it still runs."""
    text = _read(run / "pid")
    if not text:
        return None
    pid_s, _, epoch = text.partition(" ")
    try:
        pid = int(pid_s)
    except ValueError:
        return None
    return (pid, epoch) if pid > 0 and _alive(pid) else None


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def stop(run: Path) -> int:
    print(stop_service(run))
    return 0


def stop_service(run: Path) -> str:
    """``stop``'s work, what it says on success (it never fails: a service that will
    not go is killed). The storage-monitor calls this in its own process for the
    built-in agent (``vtlha.agents.run_agent``): a release waits on it, and starting an
    interpreter for it cost more than the stop itself."""
    cur = _running(run)
    if cur is None:
        return "tape service not running"
    pid = cur[0]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.005)
        said = f"tape service {pid} killed after {STOP_GRACE} s"
    else:
        said = f"tape service {pid} stopped"
    _reap()
    for name in ("pid", "ready"):
        with contextlib.suppress(FileNotFoundError):
            (run / name).unlink()
    return said


def service_argv(standby: bool = False) -> list[str]:
    return [sys.executable, "-m", "vtlha.tape.service", *(["--standby"] if standby else [])]


def _reap() -> None:
    with _lock:
        for p in _children:
            if p.poll() is not None:
                _close_stdin(p)
        _children[:] = [p for p in _children if p.returncode is None]


def _started(p: subprocess.Popen[bytes]) -> None:
    with _lock:
        _children.append(p)


def _close_stdin(p: subprocess.Popen[bytes]) -> None:
    if p.stdin is not None:
        with contextlib.suppress(OSError):
            p.stdin.close()


def prepare_standby(run: Path, env: Mapping[str, str] | None = None) -> int:
    """A standby service for the next start in ``run`` (started unless one waits); its
    pid. Its output goes to ``run``'s ``tape.log``, as the service's."""
    _reap()
    sb = _standby.get(run)
    if sb is not None and sb.poll() is None:
        return sb.pid
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "tape.log", "ab") as log:
        sb = subprocess.Popen(service_argv(standby=True), stdin=subprocess.PIPE,
                              stdout=log, stderr=log, env=None if env is None else dict(env))
    _standby[run] = sb
    _started(sb)
    return sb.pid


def drop_standbys() -> None:
    """Let every standby go (its stdin closed, it exits)."""
    for sb in _standby.values():
        _close_stdin(sb)
    _standby.clear()
    _reap()


def _spawn(run: Path, env: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], bool]:
    """The service for this start: the standby given ``env``, or a new interpreter
    (none waits, or it is gone); (process, whether it was the standby)."""
    sb = _standby.pop(run, None)
    if sb is not None and sb.poll() is None and sb.stdin is not None:
        try:
            sb.stdin.write(json.dumps(dict(env)).encode() + b"\n")
            sb.stdin.close()
            return sb, True
        except OSError:  # it died meanwhile: start one
            pass
    if sb is not None:
        _close_stdin(sb)
    with open(run / "tape.log", "ab") as log:
        proc = subprocess.Popen(service_argv(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, env=dict(env))
    _started(proc)
    return proc, False


def start_service(run: Path, env: Mapping[str, str], wait: float = START_WAIT
                  ) -> tuple[int, str]:
    """``start``'s work: (exit status, what it says). ``wait`` bounds the wait for the
    service to say it is ready; one not ready by then is left to the caller's stop."""
    epoch = env.get("VTLHA_EPOCH", "")
    _reap()
    cur = _running(run)
    if cur is not None and cur[1] == epoch and (run / "ready").exists():
        return 0, f"tape service {cur[0]} runs already at epoch {epoch}"
    if cur is not None:
        stop_service(run)
    with contextlib.suppress(FileNotFoundError):
        (run / "ready").unlink()
    proc, warm = _spawn(run, env)
    (run / "pid").write_text(f"{proc.pid} {epoch}")
    how = " (standby)" if warm else ""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if _read(run / "ready") == str(proc.pid):
            return 0, (f"tape service {proc.pid}{how} ready at epoch {epoch} on "
                       f"{env.get('VTLHA_PORTAL')}")
        code = proc.poll()
        if code is not None:
            return 1, (f"tape service{how} exited {code} before it was ready: "
                       f"{_tail(run / 'tape.log')}")
        time.sleep(0.005)
    return 1, "tape service not ready in time"


def start(run: Path) -> int:
    code, said = start_service(run, os.environ)
    print(said)
    return code


def monitor(run: Path) -> int:
    cur = _running(run)
    if cur is None:
        print("tape service not running")
        return OCF_NOT_RUNNING
    print(f"tape service {cur[0]} runs at epoch {cur[1]}")
    return 0


def main() -> int:
    action = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("VTLHA_ACTION", "")
    run = Path(os.environ.get("VTLHA_RUN_DIR", "."))
    run.mkdir(parents=True, exist_ok=True)
    actions = {"start": start, "stop": stop, "monitor": monitor}
    if action not in actions:
        print(f"usage: {sys.argv[0]} start|stop|monitor (got {action!r})")
        return 2
    return actions[action](run)


if __name__ == "__main__":
    sys.exit(main())
