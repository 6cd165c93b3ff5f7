"""The simulated clock, the event queue, processes and the trace.

Time is one global float (``now``); each host's CLOCK_MONOTONIC is ``now + offset`` with
its own offset (rates are equal: drift is not simulated). Events at the same instant run
in the order they were scheduled. A process is up, paused (what it is sent waits in its
queue until it resumes; its timers fire late) or down (what it is sent is lost; a restart
makes a new incarnation whose old timers never fire)."""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TRACE_LEN = 80


@dataclass
class Proc:
    name: str  # "<host>/<service>"
    host: str
    inc: int = 0
    down: bool = False
    paused: bool = False
    pending: list[Callable[[], None]] = field(default_factory=list)


class World:
    def __init__(self, seed: int, offsets: dict[str, float]) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.offset = offsets
        self._q: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.trace: deque[tuple[float, str, str, tuple[Any, ...]]] = deque(maxlen=TRACE_LEN)
        self.procs: dict[str, Proc] = {}
        self.events = 0

    # ---- time ---------------------------------------------------------------
    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._q, (max(t, self.now), next(self._seq), fn))

    def after(self, d: float, fn: Callable[[], None]) -> None:
        self.at(self.now + d, fn)

    def local(self, host: str) -> float:
        return self.now + self.offset[host]

    def run_until(self, end: float) -> None:
        q = self._q
        while q and q[0][0] <= end:
            t, _, fn = heapq.heappop(q)
            self.now = t
            self.events += 1
            fn()
        self.now = max(self.now, end)

    # ---- trace -----------------------------------------------------------------
    def log(self, who: str, fmt: str, *args: Any) -> None:
        self.trace.append((self.now, who, fmt, args))

    def story(self, last: int = TRACE_LEN) -> str:
        lines = [f"{t:8.4f} {who:16} {fmt % args if args else fmt}"
                 for t, who, fmt, args in list(self.trace)[-last:]]
        return "\n".join(lines)

    # ---- processes ---------------------------------------------------------------
    def proc(self, name: str) -> Proc:
        p = self.procs.get(name)
        if p is None:
            p = self.procs[name] = Proc(name, name.split("/", 1)[0])
        return p

    def run_in(self, name: str, fn: Callable[[], None], inc: int | None = None) -> None:
        """Run ``fn`` in process ``name`` now: later if it is paused, never if it is down
        (or restarted since ``inc``)."""
        p = self.procs[name]
        if p.down or (inc is not None and inc != p.inc):
            return
        if p.paused:
            p.pending.append(fn)
            return
        fn()

    def timer(self, name: str, d: float, fn: Callable[[], None]) -> None:
        """A timer of the process's current incarnation: fires after ``d``, or when the
        process resumes if it is paused then."""
        inc = self.procs[name].inc
        self.after(d, lambda: self.run_in(name, fn, inc))

    def pause(self, name: str) -> None:
        p = self.procs[name]
        if not p.down and not p.paused:
            p.paused = True
            self.log(name, "paused")

    def resume(self, name: str) -> None:
        p = self.procs[name]
        if not p.paused:
            return
        p.paused = False
        self.log(name, "resumed")
        pending, p.pending = p.pending, []
        for fn in pending:
            self.run_in(name, fn)

    def crash(self, name: str) -> bool:
        p = self.procs[name]
        if p.down:
            return False
        p.down, p.paused, p.pending = True, False, []
        p.inc += 1
        self.log(name, "crashed")
        return True

    def revive(self, name: str) -> bool:
        p = self.procs[name]
        if not p.down:
            return False
        p.down = False
        p.inc += 1
        self.log(name, "restarted")
        return True
