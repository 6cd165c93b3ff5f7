"""storage-monitor: probes every path to every device its node uses and publishes
``ha.<cluster>.storage.<node>`` (per device, per path: reachable, latency, error).

A probe is a real read of one block, opened anew each time, off the event loop with
a timeout; a path's state changes only after ``fall`` failures or ``rise`` successes
in a row. Storage takeover/release (reservations at the SAN target) comes with the
storage issue."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from vtlha.messages import PathHealth, StorageReport, encode
from vtlha.service import Service, service_command


@dataclass
class PathState:
    device: str
    path: int
    reachable: bool | None = None  # None until the first result
    streak: int = 0  # results in a row that disagree with `reachable`
    latency: float | None = None
    error: str | None = None


def read_block(path: Path, block_size: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, block_size, 0)
    finally:
        os.close(fd)
    if len(data) < block_size:
        raise OSError(5, f"short read ({len(data)} of {block_size} bytes)")


class StorageMonitor(Service):
    name = "storage-monitor"
    http_port_key = "storage_monitor"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        t = self.config.timings
        self.paths: list[PathState] = [
            PathState(dev, i)
            for dev, d in sorted(self.config.devices.items())
            for i in range(d.paths.get(self.node, 0))
        ]
        self.pool = ThreadPoolExecutor(max_workers=max(2, len(self.paths)),
                                       thread_name_prefix="probe")
        self.rise, self.fall, self.timeout = t.rise, t.fall, t.probe_timeout
        self.seq = 0
        self.probes = Counter("vtlha_storage_probes_total", "Path probes, by result", ["result"],
                              registry=self.registry)
        self.path_up = Gauge("vtlha_storage_path_up", "1 if the path is reachable",
                             ["device", "path"], registry=self.registry)

    def backing(self, device: str) -> Path:
        p = Path(self.config.devices[device].backing)
        return p if p.is_absolute() else self.state_root / p

    async def start(self) -> None:
        self.every(self.config.timings.probe_interval, self._probe_all, "probe")

    async def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _probe(self, st: PathState) -> None:
        loop = asyncio.get_running_loop()
        block = self.config.devices[st.device].block_size
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(
                loop.run_in_executor(self.pool, read_block, self.backing(st.device), block),
                self.timeout)
            ok, err = True, None
        except TimeoutError:
            ok, err = False, f"probe timed out after {self.timeout} s"
        except OSError as exc:
            ok, err = False, f"{exc.strerror or exc}"
        st.latency = time.monotonic() - t0 if ok else None
        st.error = err
        self.probes.labels("ok" if ok else "failed").inc()
        self._apply(st, ok)

    def _apply(self, st: PathState, ok: bool) -> None:
        if st.reachable is None:
            st.reachable = ok
        elif ok == st.reachable:
            st.streak = 0
        else:
            st.streak += 1
            if st.streak >= (self.rise if ok else self.fall):
                st.reachable, st.streak = ok, 0
                self.log.warning("path changed", extra={"device": st.device, "path": st.path,
                                                        "reachable": ok, "error": st.error})
        self.path_up.labels(st.device, str(st.path)).set(1 if st.reachable else 0)

    async def _probe_all(self) -> None:
        await asyncio.gather(*(self._probe(st) for st in self.paths))
        report = StorageReport(cluster=self.config.cluster, node=self.node, seq=self.seq,
                               paths=[PathHealth(device=s.device, path=s.path,
                                                 reachable=bool(s.reachable), latency=s.latency,
                                                 error=s.error) for s in self.paths])
        self.seq += 1
        await self.nc.publish(self.subjects.storage(self.node), encode(report))

    def status(self) -> dict[str, Any]:
        return {"paths": [{"device": s.device, "path": s.path, "reachable": s.reachable,
                           "latency": s.latency, "error": s.error} for s in self.paths]}


main = service_command(StorageMonitor)
