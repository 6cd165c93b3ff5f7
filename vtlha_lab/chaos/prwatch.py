"""The chaos suite's watch of a real iSCSI target's reservations (``san.kind: iscsi``).

A process of its own beside the observer, in the lab's client namespace:

    ip netns exec CLIENT_NS python -m vtlha_lab.chaos.prwatch --config CLUSTER_FILE \\
        --out FILE [--interval 0.25]

Every ``--interval`` it reads each device's reservation with PR IN READ RESERVATION
through a session per device that registers nothing (the first portal that answers;
opened again after an error) and appends a ``reservation`` record (``device``,
``holder``: the node the key names, ``epoch``: the key's) to FILE whenever it changes —
the records the observer writes from the reference target's persisted reservations.
A device with no reservation, or unreadable in a round, gives no record.

It is apart from the observer because it uses ``vtlha.iscsi`` (libiscsi through ctypes,
and the key layout of ``vtlha.iscsi.scsi``), the services' own code; the observer shares
none. What it reads is the target's answer, not a service's report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from typing import Any, TextIO

from vtlha.config import ClusterConfig, load_config
from vtlha.iscsi.scsi import IscsiError, key_epoch, key_tag, node_tag
from vtlha.iscsi.session import Session, Target, initiator_name


class Reservations:
    def __init__(self, cfg: ClusterConfig, timeout: float = 1.0) -> None:
        self.cfg = cfg
        self.names = {node_tag(cfg.cluster, n.name): n.name for n in cfg.nodes}
        self.who = initiator_name(cfg.cluster, "observer", "prwatch")
        self.timeout = timeout
        self.sessions: dict[str, Session] = {}

    async def read(self) -> dict[str, tuple[str, int]]:
        """device -> (holder, epoch) of every device reserved with a vtl-ha key now."""
        out: dict[str, tuple[str, int]] = {}
        for dev in sorted(self.cfg.devices):
            try:
                res = await (await self._session(dev)).read_reservation()
            except (IscsiError, OSError):
                await self._drop(dev)
                continue
            epoch = key_epoch(res.key) if res.key is not None else None
            if res.key is not None and epoch is not None:
                tag = key_tag(res.key)
                out[dev] = (self.names.get(tag if tag is not None else -1,
                                           f"key {res.key:#x}"), epoch)
        return out

    async def _session(self, dev: str) -> Session:
        s = self.sessions.get(dev)
        if s is not None:
            return s
        lun, iqn = self.cfg.devices[dev].lun, self.cfg.san.iqn
        assert lun is not None and iqn is not None
        errors = []
        for portal in self.cfg.san.portals:
            try:
                s = await Session.open(Target(portal, iqn, lun), self.who, self.timeout)
            except IscsiError as exc:
                errors.append(str(exc))
                continue
            self.sessions[dev] = s
            return s
        raise IscsiError("; ".join(errors) or "no portal")

    async def _drop(self, dev: str) -> None:
        s = self.sessions.pop(dev, None)
        if s is not None:
            with contextlib.suppress(Exception):
                await s.close()

    async def close(self) -> None:
        for dev in list(self.sessions):
            await self._drop(dev)


async def watch(cfg: ClusterConfig, out: TextIO, interval: float,
                stop: asyncio.Event) -> None:
    r = Reservations(cfg)
    last: dict[str, Any] = {}
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            res, t_read = await r.read(), time.time()
            for dev, (holder, epoch) in res.items():
                if last.get(dev) != (holder, epoch):
                    last[dev] = (holder, epoch)
                    out.write(json.dumps({"type": "reservation", "t": t_read, "device": dev,
                                          "holder": holder, "epoch": epoch}) + "\n")
                    out.flush()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, interval - (time.monotonic() - t0))):
                    await stop.wait()
    finally:
        await r.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m vtlha_lab.chaos.prwatch")
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=0.25)
    a = ap.parse_args()

    async def run(out: TextIO) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await watch(load_config(a.config), out, a.interval, stop)

    with open(a.out, "a") as f:
        asyncio.run(run(f))


if __name__ == "__main__":
    main()
