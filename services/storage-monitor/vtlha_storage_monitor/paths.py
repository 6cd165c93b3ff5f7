"""Probing every path to every device this node uses, through the SAN backend.

Each path index is probed by its own loop, so a path whose reads hang or whose packets
are dropped delays no other path; a report is published after each path's round. A
path's state changes only after ``fall`` failures or ``rise`` successes in a row; each
change is an event (``storage.path_down`` / ``storage.path_up``), and a device with no
path left is ``storage.device_lost``. Events are published in the background, never
waited for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from vtlha.health import Hysteresis
from vtlha.messages import PathHealth

if TYPE_CHECKING:
    from vtlha_storage_monitor.main import StorageMonitor


@dataclass
class PathState:
    device: str
    path: int
    #: rise/fall over the path's probe results (``vtlha.health.Hysteresis``)
    health: Hysteresis = field(default_factory=lambda: Hysteresis(1, 1))
    reachable: bool | None = None  # the health's state: None until the first result
    latency: float | None = None
    error: str | None = None


class Paths:
    """The node's paths to its devices and their probe loops' results."""

    def __init__(self, mon: StorageMonitor) -> None:
        self.mon = mon
        t, cfg = mon.config.timings, mon.config
        self.states: list[PathState] = [
            PathState(dev, i, Hysteresis(t.rise, t.fall))
            for dev, d in sorted(cfg.devices.items())
            for i in range(d.paths.get(mon.node, 0))
        ]
        self.probes = Counter("vtlha_storage_probes_total", "Path probes, by result",
                              ["result"], registry=mon.registry)
        self.path_up = Gauge("vtlha_storage_path_up", "1 if the path is reachable",
                             ["device", "path"], registry=mon.registry)

    @property
    def all_probed(self) -> bool:
        return all(s.reachable is not None for s in self.states)

    def health(self) -> list[PathHealth]:
        return [PathHealth(device=s.device, path=s.path, reachable=bool(s.reachable),
                           latency=s.latency, error=s.error) for s in self.states]

    def status(self) -> list[dict[str, object]]:
        return [{"device": s.device, "path": s.path, "reachable": s.reachable,
                 "latency": s.latency, "error": s.error} for s in self.states]

    async def probe(self, i: int) -> None:
        """One round of path ``i`` over every device it leads to, then a report."""
        mon = self.mon
        states = [s for s in self.states if s.path == i]
        if mon.stopping:
            return
        results = await mon.san.probe_round(i, [st.device for st in states])
        for st, r in zip(states, results, strict=True):
            st.latency = r.latency if r.ok else None
            st.error = r.error
            self.probes.labels("ok" if r.ok else "failed").inc()
            self._apply(st, r.ok)
        await mon.publish()

    def _apply(self, st: PathState, ok: bool) -> None:
        mon = self.mon
        first = st.health.state is None
        st.reachable = st.health.update(ok)
        # the first result sets the state; only a failing one is worth a change event
        changed = (not ok) if first else st.health.changed
        self.path_up.labels(st.device, str(st.path)).set(1 if st.reachable else 0)
        if not changed:
            return
        mon.log.warning("path changed", extra={"device": st.device, "path": st.path,
                                               "reachable": ok, "error": st.error})
        group, epoch = mon.served_by_me(st.device)
        data = {"device": st.device, "path": st.path, "node": mon.node, "epoch": epoch,
                "error": st.error}
        if ok:
            mon.emit_soon("storage.path_up", f"{st.device} path {st.path} is reachable "
                          f"again from {mon.node}", group=group, epoch=epoch, data=data)
            return
        mon.emit_soon("storage.path_down", f"{st.device} path {st.path} is unreachable "
                      f"from {mon.node}: {st.error}", group=group, epoch=epoch, data=data)
        same = [s for s in self.states if s.device == st.device]
        if all(s.reachable is False for s in same):
            mon.emit_soon("storage.device_lost", f"{st.device}: no path left from "
                          f"{mon.node}", group=group, epoch=epoch,
                          data={"device": st.device, "paths": [s.path for s in same],
                                "node": mon.node, "epoch": epoch})
