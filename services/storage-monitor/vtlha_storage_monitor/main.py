"""storage-monitor: probes every path to every device its node uses, through the SAN
target, and publishes ``ha.<cluster>.storage.<node>`` (per device, per path:
reachable, latency, error).

A path is one TCP connection to the SAN target (``--san HOST``, port ``san.port +
path``): one :class:`~vtlha.san.SanClient` per path index, registered for every device
the node has that path to. A probe reads one block with a timeout (``probe_timeout``);
a connection that drops or times out is opened again (and the devices registered
again) for the next device's probe; when that fails, the path's other devices fail with
it in this round. Each path index is probed by its own loop, so a path whose
reads hang or whose packets are dropped delays no other path; a report is published
after each path's round (and at least every ``probe_interval`` meanwhile). A path's
state changes only after ``fall`` failures or ``rise`` successes in a row; each change
is an event (``storage.path_down`` / ``storage.path_up``), and a device with no path
left is ``storage.device_lost``. Events are published in the background, never
waited for. Storage takeover/release (reservations at the SAN target) comes with the
storage issue."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from prometheus_client import Counter, Gauge

from vtlha.config import ClusterConfig
from vtlha.messages import PathHealth, StorageReport, encode
from vtlha.san import SanClient, SanError, SanRefused
from vtlha.service import Service, service_command

LOOPBACK = "127.0.0.1"


@dataclass
class PathState:
    device: str
    path: int
    reachable: bool | None = None  # None until the first result
    streak: int = 0  # results in a row that disagree with `reachable`
    latency: float | None = None
    error: str | None = None


def default_san_host(config: ClusterConfig) -> str:
    """The SAN target's address from the cluster file: the service IP of the host named
    by ``san.host`` (without prefix); loopback when it has none."""
    host = config.san.host
    ip: str | None = None
    if host == config.witness.host:
        ip = config.witness.service_ip
    elif config.has_node(host):
        ip = config.node(host).service_ip
    return ip.split("/")[0] if ip else LOOPBACK


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SanRefused):
        return exc.reason
    return str(exc)


class StorageMonitor(Service):
    name = "storage-monitor"
    http_port_key = "storage_monitor"
    cli_options = [click.Option(["--san"], default=None, metavar="HOST",
                                help="Address of the SAN target (default: the service IP "
                                "of the cluster file's san.host; 127.0.0.1 without one)")]

    def __init__(self, config: ClusterConfig, node: str, nats_urls: list[str],
                 state_root: Path, options: dict[str, Any] | None = None) -> None:
        super().__init__(config, node, nats_urls, state_root, options)
        t = self.config.timings
        self.san_host: str = self.options.get("san") or default_san_host(config)
        self.paths: list[PathState] = [
            PathState(dev, i)
            for dev, d in sorted(self.config.devices.items())
            for i in range(d.paths.get(self.node, 0))
        ]
        self.rise, self.fall, self.timeout = t.rise, t.fall, t.probe_timeout
        n_paths = max((s.path + 1 for s in self.paths), default=0)
        self.clients: dict[int, SanClient] = {
            i: SanClient(self.san_host, config.san.port + i, node, i, timeout=self.timeout)
            for i in range(n_paths)}
        self.seq = 0
        self.last_report = 0.0
        self.probes = Counter("vtlha_storage_probes_total", "Path probes, by result", ["result"],
                              registry=self.registry)
        self.path_up = Gauge("vtlha_storage_path_up", "1 if the path is reachable",
                             ["device", "path"], registry=self.registry)
        self.reconnects = Counter("vtlha_storage_reconnects_total",
                                  "Connections (re)opened to the SAN target, by path",
                                  ["path"], registry=self.registry)

    async def start(self) -> None:
        interval = self.config.timings.probe_interval
        self.log.info("probing through the SAN target",
                      extra={"san": self.san_host, "port_base": self.config.san.port,
                             "paths": len(self.paths)})
        for i in self.clients:
            self.every(interval, functools.partial(self._probe_path, i), f"probe{i}")
        self.every(interval, self._keep_fresh, "report")

    async def stop(self) -> None:
        # A call stuck on a connection ends at once (its reader sees the close).
        await asyncio.gather(*(c.close() for c in self.clients.values()))

    # ---- probing ---------------------------------------------------------------
    async def _connect(self, i: int, states: list[PathState]) -> None:
        client = self.clients[i]
        await client.connect()
        self.reconnects.labels(str(i)).inc()
        for st in states:
            try:
                await client.register(st.device)
            except SanRefused as exc:  # this device's reads will say why, the others go on
                self.log.warning("not registered", extra={"device": st.device, "path": i,
                                                          "error": exc.reason})

    async def _probe_path(self, i: int) -> None:
        states = [s for s in self.paths if s.path == i]
        client = self.clients[i]
        no_conn: str | None = None  # this round's connect failed: the path is down
        for st in states:
            if self.stopping:
                return
            t0 = time.monotonic()
            try:
                if no_conn is not None:
                    raise SanError(no_conn)
                if not client.connected:
                    try:
                        await self._connect(i, states)
                    except SanError as exc:
                        no_conn = _reason(exc)
                        raise
                block = self.config.devices[st.device].block_size
                data = await client.read(st.device, 0, 1, timeout=self.timeout)
                if len(data) < block:
                    raise SanError(f"short read ({len(data)} of {block} bytes)")
                ok, err = True, None
            except SanRefused as exc:
                ok, err = False, exc.reason
            except SanError as exc:  # the client closed the connection: open it anew
                ok, err = False, _reason(exc)  # (and register again) for the next device
            st.latency = time.monotonic() - t0 if ok else None
            st.error = err
            self.probes.labels("ok" if ok else "failed").inc()
            self._apply(st, ok)
        await self._publish()

    def _apply(self, st: PathState, ok: bool) -> None:
        changed = False
        if st.reachable is None:
            st.reachable = ok
            changed = not ok
        elif ok == st.reachable:
            st.streak = 0
        else:
            st.streak += 1
            if st.streak >= (self.rise if ok else self.fall):
                st.reachable, st.streak = ok, 0
                changed = True
        self.path_up.labels(st.device, str(st.path)).set(1 if st.reachable else 0)
        if not changed:
            return
        self.log.warning("path changed", extra={"device": st.device, "path": st.path,
                                                "reachable": ok, "error": st.error})
        data = {"device": st.device, "path": st.path, "error": st.error}
        if ok:
            self.emit_soon("storage.path_up", f"{st.device} path {st.path} is reachable "
                           f"again from {self.node}", data=data)
            return
        self.emit_soon("storage.path_down", f"{st.device} path {st.path} is unreachable "
                       f"from {self.node}: {st.error}", data=data)
        same = [s for s in self.paths if s.device == st.device]
        if all(s.reachable is False for s in same):
            self.emit_soon("storage.device_lost", f"{st.device}: no path left from "
                           f"{self.node}", data={"device": st.device,
                                                 "paths": [s.path for s in same]})

    # ---- reports ---------------------------------------------------------------
    async def _keep_fresh(self) -> None:
        if time.monotonic() - self.last_report >= self.config.timings.probe_interval:
            await self._publish()

    async def _publish(self) -> None:
        if any(s.reachable is None for s in self.paths):
            return  # not every path probed yet: no report that would guess
        report = StorageReport(cluster=self.config.cluster, node=self.node, seq=self.seq,
                               paths=[PathHealth(device=s.device, path=s.path,
                                                 reachable=bool(s.reachable), latency=s.latency,
                                                 error=s.error) for s in self.paths])
        self.seq += 1
        self.last_report = time.monotonic()
        await self.nc.publish(self.subjects.storage(self.node), encode(report))

    def status(self) -> dict[str, Any]:
        return {"san": self.san_host,
                "paths": [{"device": s.device, "path": s.path, "reachable": s.reachable,
                           "latency": s.latency, "error": s.error} for s in self.paths]}


main = service_command(StorageMonitor)
