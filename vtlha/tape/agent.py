"""The tape data service's resource agent (``builtin:tape``; see ``vtlha.agents``).

``start``: start ``vtlha.tape.service`` for the group (its pid in ``$VTLHA_RUN_DIR/pid``,
its log in ``tape.log``) and wait until it says ready; a service of this group that
runs already at this epoch is success, one at another epoch is stopped first.
``stop``: SIGTERM, then SIGKILL after ``STOP_GRACE`` s; success once the process is
gone (its I/O has stopped). ``monitor``: 0 while it runs, 7 when it does not.

Standard library only: it starts fast."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

OCF_NOT_RUNNING = 7
STOP_GRACE = 5.0
START_WAIT = 60.0  # the runner's start_timeout is the real bound


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
    for name in ("pid", "ready"):
        with contextlib.suppress(FileNotFoundError):
            (run / name).unlink()
    return said


def start(run: Path) -> int:
    epoch = os.environ.get("VTLHA_EPOCH", "")
    cur = _running(run)
    if cur is not None and cur[1] == epoch and (run / "ready").exists():
        print(f"tape service {cur[0]} runs already at epoch {epoch}")
        return 0
    if cur is not None:
        stop(run)
    with contextlib.suppress(FileNotFoundError):
        (run / "ready").unlink()
    log_path = run / "tape.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vtlha.tape.service"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    (run / "pid").write_text(f"{proc.pid} {epoch}")
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if _read(run / "ready") == str(proc.pid):
            print(f"tape service {proc.pid} ready at epoch {epoch} on "
                  f"{os.environ.get('VTLHA_PORTAL')}")
            return 0
        code = proc.poll()
        if code is not None:
            print(f"tape service exited {code} before it was ready: {_tail(log_path)}")
            return 1
        time.sleep(0.01)
    print("tape service not ready in time")
    return 1


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
