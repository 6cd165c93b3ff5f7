"""The tape data service of one data group (see :mod:`vtlha.tape`).

Configured by the resource agent's environment (``vtlha.agents``): the group, its
epoch, devices, portal and SAN target. Client protocol: the SAN protocol's frames
(``vtlha.san.protocol``), one request at a time per connection::

    write  {block}  + payload (at most one device block)  -> {ok}
    read   {block}                                        -> {ok} + the block
    status {}                                             -> {ok, group, node, epoch, ...}

Block ``n`` lives on device ``devices[n % k]`` at lba ``n // k``. A write is
acknowledged only after the SAN target accepted it and wrote it with FUA. A write the
target refuses for the reservation (another node preempted with a higher epoch) means
this service no longer owns the group: it answers the client with the refusal, stops
listening and exits with status 3 — it never tries again at another epoch.

Listening: the portal address need not be configured yet when the service starts (the
ip-manager adds it when the lease allows): the socket is bound with IP_FREEBIND.
Ready: once listening and connected to the target, it writes ``ready`` (its pid) in
its run directory. SIGTERM: stop accepting, finish the request in flight (bounded),
exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from vtlha.config import ClusterConfig, load_config
from vtlha.log import setup_logging
from vtlha.san.client import SanClient, SanError, SanRefused
from vtlha.san.multipath import Multipath
from vtlha.san.protocol import ProtocolError, decode_header, encode_frame, read_frame

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
LOST_RESERVATION = 3  # exit status: the target refused us for the reservation
SAN_TIMEOUT = 1.0  # per path: a stuck path fails over to the next one
DRAIN_TIMEOUT = 1.0  # on SIGTERM: requests in flight may finish (the target fences the rest)

log = logging.getLogger("vtlha.tape")


def parse_portal(portal: str) -> tuple[str, int]:
    host, _, port = portal.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"portal must be host:port, got {portal!r}")
    return host, int(port)


def listen_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    sock.bind((host, port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


class TapeService:
    def __init__(self, cfg: ClusterConfig, node: str, group: str, epoch: int,
                 devices: list[str], portal: str, san_host: str, san_port: int,
                 run_dir: Path) -> None:
        self.cfg = cfg
        self.node = node
        self.group = group
        self.epoch = epoch
        self.devices = devices
        self.host, self.port = parse_portal(portal)
        self.run_dir = run_dir
        self.block_size = max(cfg.devices[d].block_size for d in devices)
        self.mp = Multipath(cfg, node, san_host, devices, SAN_TIMEOUT, port_base=san_port)
        self.server: asyncio.Server | None = None
        self.lost: str | None = None  # why the reservation is lost
        self.done = asyncio.Event()
        self.busy = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.writes = 0
        self.reads = 0

    def where(self, block: int) -> tuple[str, int]:
        k = len(self.devices)
        return self.devices[block % k], block // k

    async def start(self) -> None:
        await self.mp.call(lambda c: c.status())  # the target answers on some path
        self.server = await asyncio.start_server(self._serve, sock=listen_socket(self.host,
                                                                                 self.port))
        (self.run_dir / "ready").write_text(str(os.getpid()))
        log.info("tape service ready", extra={"group": self.group, "epoch": self.epoch,
                                              "portal": f"{self.host}:{self.port}",
                                              "devices": self.devices})

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), DRAIN_TIMEOUT)
        self.done.set()  # the target's connections go with the process

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            log.error("reservation lost: stop serving", extra={"group": self.group,
                                                               "epoch": self.epoch,
                                                               "reason": reason})
            asyncio.get_running_loop().create_task(self.stop())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while self.lost is None and not self.done.is_set():
                try:
                    head, payload = await read_frame(reader)
                    req = decode_header(head)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except ProtocolError as exc:
                    writer.write(encode_frame({"ok": False, "reason": str(exc)}))
                    return
                self.busy += 1
                self.idle.clear()
                try:
                    reply, data = await self.handle(req, payload)
                finally:
                    self.busy -= 1
                    if not self.busy:
                        self.idle.set()
                writer.write(encode_frame(reply, data))
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()

    async def handle(self, req: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        op = req.get("op")
        rid = req.get("id")
        base: dict[str, Any] = {"id": rid, "node": self.node, "epoch": self.epoch}
        if op == "status":
            return {**base, "ok": True, "reason": "", "group": self.group,
                    "devices": self.devices, "block_size": self.block_size,
                    "path": self.mp.path, "path_failovers": self.mp.failovers,
                    "writes": self.writes, "reads": self.reads}, b""
        block = req.get("block")
        if op not in ("read", "write") or not isinstance(block, int) or block < 0:
            return {**base, "ok": False, "reason": "EINVAL expected {op: read|write, "
                    "block: int >= 0} or {op: status}"}, b""
        if self.lost is not None:
            return {**base, "ok": False, "reason": f"not serving: {self.lost}"}, b""
        device, lba = self.where(block)
        try:
            if op == "write":
                if len(payload) > self.block_size:
                    return {**base, "ok": False, "reason": f"EINVAL a block is at most "
                            f"{self.block_size} B"}, b""
                data = payload.ljust(self.block_size, b"\0")

                async def _w(c: SanClient) -> Any:
                    return await c.write(device, lba, self.epoch, data, fua=True)

                await self.mp.call(_w)
                self.writes += 1
                return {**base, "ok": True, "reason": "", "block": block}, b""

            async def _r(c: SanClient) -> bytes:
                return await c.read(device, lba)

            out = await self.mp.call(_r)
            self.reads += 1
            return {**base, "ok": True, "reason": "", "block": block}, out
        except SanRefused as exc:
            if "reservation" in exc.reason:
                self._lose(exc.reason)
            return {**base, "ok": False, "reason": exc.reason}, b""
        except SanError as exc:
            return {**base, "ok": False, "reason": str(exc)}, b""


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"vtlha tape service: ${name} is not set (run by the tape agent)")
    return value


async def _main() -> int:
    cfg = load_config(_env("VTLHA_CONFIG"))
    svc = TapeService(
        cfg, node=_env("VTLHA_NODE"), group=_env("VTLHA_GROUP"),
        epoch=int(_env("VTLHA_EPOCH")), devices=_env("VTLHA_DEVICES").split(","),
        portal=_env("VTLHA_PORTAL"), san_host=_env("VTLHA_SAN_HOST"),
        san_port=int(_env("VTLHA_SAN_PORT")), run_dir=Path(_env("VTLHA_RUN_DIR")))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: loop.create_task(svc.stop()))
    try:
        await svc.start()
    except (OSError, SanError) as exc:
        log.error("tape service cannot start", extra={"error": str(exc)})
        return 1
    await svc.done.wait()
    with contextlib.suppress(FileNotFoundError):
        (svc.run_dir / "ready").unlink()
    return LOST_RESERVATION if svc.lost else 0


def main() -> None:
    setup_logging("tape", os.environ.get("VTLHA_NODE", "?"), "INFO")
    sys.exit(asyncio.run(_main()))


if __name__ == "__main__":
    main()
