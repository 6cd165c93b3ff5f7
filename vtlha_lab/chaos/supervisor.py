"""Restarts killed services as a container runtime would: after a delay, or never.

The delay of each restart is drawn from the run's seeded random generator by the
runner (``policy``); ``None`` means never (the baseline restore brings it back)."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vtlha_lab.lab import Lab

#: (delay in seconds or None = never, weight)
DEFAULT_POLICY: tuple[tuple[float | None, int], ...] = (
    (0.0, 3), (0.5, 2), (2.0, 2), (None, 1))


@dataclass
class Restart:
    host: str
    service: str        # a node service, or "nats-server"
    delay: float | None
    due: float | None   # monotonic time, None = never
    done: bool = False


class Supervisor:
    def __init__(self, lab: Lab, rng: random.Random, record: Callable[[dict[str, object]], None],
                 policy: tuple[tuple[float | None, int], ...] = DEFAULT_POLICY) -> None:
        self.lab = lab
        self.rng = rng
        self.record = record
        self.policy = policy
        self.pending: list[Restart] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self.thread.start()

    def draw_delay(self) -> float | None:
        delays = [d for d, _ in self.policy]
        weights = [w for _, w in self.policy]
        return self.rng.choices(delays, weights)[0]

    def killed(self, host: str, service: str) -> Restart:
        """A service was killed: schedule its restart after a drawn delay."""
        d = self.draw_delay()
        r = Restart(host, service, d, None if d is None else time.monotonic() + d)
        with self.lock:
            self.pending.append(r)
        self.record({"type": "supervisor", "host": host, "service": service,
                     "action": "scheduled", "delay": d})
        return r

    def _start(self, r: Restart) -> None:
        try:
            if r.service == "nats-server":
                self.lab.servers[r.host].start()
            else:
                self.lab.start_service(r.host, r.service)
            self.record({"type": "supervisor", "host": r.host, "service": r.service,
                         "action": "restarted", "delay": r.delay})
        except Exception as exc:  # recorded; the baseline restore tries again
            self.record({"type": "supervisor", "host": r.host, "service": r.service,
                         "action": "restart-failed", "error": repr(exc)})

    def _loop(self) -> None:
        while not self.stop.wait(0.02):
            now = time.monotonic()
            with self.lock:
                due = [r for r in self.pending if not r.done and r.due is not None
                       and r.due <= now]
                for r in due:
                    r.done = True
            for r in due:
                self._start(r)

    def restart_all_now(self) -> list[str]:
        """The baseline: every service or server that is not running is started now
        (pending restarts included). Returns what was started."""
        with self.lock:
            for r in self.pending:
                r.done = True
            self.pending.clear()
        started = []
        for host, srv in self.lab.servers.items():
            if srv.proc is None or srv.proc.poll() is not None:
                with contextlib.suppress(Exception):
                    srv.start()
                    started.append(f"{host}/nats-server")
        latest: dict[tuple[str, str], bool] = {}
        for c in self.lab.procs.children:
            if c.host in self.lab.cfg.hosts:
                latest[(c.host, c.service)] = c.alive
        for (host, service), alive in sorted(latest.items()):
            if not alive:
                self.lab.start_service(host, service)
                started.append(f"{host}/{service}")
        return started

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
