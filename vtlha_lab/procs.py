"""Child processes of the demo, the lab and the tests: started in their own session,
logged to files, killed by node or all together, and never left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """The process runs (a zombie nobody has reaped yet is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Child:
    name: str
    host: str
    service: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)


class ProcessGroup:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def spawn(self, host: str, service: str, argv: list[str],
              env: dict[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{host}-{service}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})
        log.close()
        child = Child(f"{host}/{service}", host, service, argv, log_path, proc)
        self.children.append(child)
        return child

    def find(self, host: str, service: str) -> Child:
        for c in reversed(self.children):
            if c.host == host and c.service == service:
                return c
        raise KeyError(f"{host}/{service}")

    def of_host(self, host: str) -> list[Child]:
        return [c for c in self.children if c.host == host and c.alive]

    def kill_host(self, host: str, sig: int = signal.SIGKILL) -> list[Child]:
        killed = self.of_host(host)
        for c in killed:
            c.signal(sig)
        if sig == signal.SIGKILL:
            for c in killed:
                c.proc.wait(5)
        return killed

    def stop_all(self, timeout: float = 5.0) -> None:
        live = [c for c in self.children if c.alive]
        for c in live:
            c.signal(signal.SIGCONT)
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in live:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.signal(signal.SIGKILL)
                c.proc.wait(5)
