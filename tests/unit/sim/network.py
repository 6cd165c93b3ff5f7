"""Links between hosts and message delivery.

A message between two hosts is lost when their link is cut at sending or at arrival, or
at random (``loss``); otherwise it arrives after a random delay (so messages reorder),
sometimes much later (``slow``), sometimes twice (``dup``). Messages within one host
(lease notices) are never lost, only delayed. Loss, slowness and duplication apply while
the fault phase lasts (``faulty``); after it the network is healthy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .timings import HOSTS, Timings
from .world import World


@dataclass
class Weather:
    loss: float = 0.0
    dup: float = 0.0
    slow: float = 0.0
    slow_delay: float = 0.0


class Network:
    def __init__(self, world: World, t: Timings, weather: Weather) -> None:
        self.w, self.t, self.weather = world, t, weather
        self.cut: set[frozenset[str]] = set()
        self.hosts_down: set[str] = set()  # a host whose NATS server is down
        self.faulty = True
        self._majority: dict[str, bool] = dict.fromkeys(HOSTS, True)
        self.on_change: list[Callable[[], None]] = []

    def set_link(self, a: str, b: str, up: bool) -> None:
        (self.cut.discard if up else self.cut.add)(frozenset((a, b)))
        self._changed()

    def set_host(self, host: str, up: bool) -> None:
        (self.hosts_down.discard if up else self.hosts_down.add)(host)
        self._changed()

    def heal(self, down_for_good: str | None) -> None:
        self.faulty = False
        self.cut.clear()
        self.hosts_down = {down_for_good} if down_for_good else set()
        self._changed()

    def _changed(self) -> None:
        self._majority = {h: h not in self.hosts_down and sum(
            1 for o in HOSTS if self.link_up(h, o)) >= 2 for h in HOSTS}
        for fn in self.on_change:
            fn()

    def link_up(self, a: str, b: str) -> bool:
        if a == b:
            return a not in self.hosts_down
        return (a not in self.hosts_down and b not in self.hosts_down
                and frozenset((a, b)) not in self.cut)

    def delay(self) -> float:
        rng, wx = self.w.rng, self.weather
        d = rng.uniform(0.0, self.t.max_delay)
        if self.faulty and wx.slow and rng.random() < wx.slow:
            d += rng.uniform(0.0, wx.slow_delay)
        return d

    def send(self, src: str, dst: str, deliver: Callable[[], None]) -> None:
        """Send a message from host ``src`` to host ``dst``; ``deliver`` runs on arrival."""
        w, wx = self.w, self.weather
        if src == dst:
            w.after(w.rng.uniform(0.0, self.t.max_delay / 2), deliver)
            return
        if not self.link_up(src, dst):
            return
        copies = 1
        if self.faulty:
            if wx.loss and w.rng.random() < wx.loss:
                return
            if wx.dup and w.rng.random() < wx.dup:
                copies = 2
        for _ in range(copies):
            def land() -> None:
                if self.link_up(src, dst):
                    deliver()
            w.after(self.delay(), land)

    def majority(self, host: str) -> bool:
        """``host`` reaches a majority of the three NATS servers (itself included)."""
        return self._majority[host]
