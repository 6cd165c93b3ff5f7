"""The tape data service of one data group (see :mod:`vtlha.tape`).

Configured by the resource agent's environment (``vtlha.agents``): the group, its
epoch, devices, portal, the SAN (``san.kind`` of the cluster file) and, on iSCSI, the
storage-monitor's permit file. Client protocol: the SAN protocol's frames
(``vtlha.san.protocol``), one request at a time per connection::

    write  {block}  + payload (at most a device block less the record header) -> {ok, seq}
    read   {block}  -> {ok, writer, epoch, seq} + the payload
    status {}       -> {ok, group, node, epoch, ...}

Block ``n`` lives on device ``devices[n % k]`` at lba ``n // k``, as a record
(:mod:`vtlha.tape.record`): writer node, epoch, the writer's sequence number, then the
payload; a read answers who wrote the block. A write is acknowledged only after the
target wrote it with FUA **and**, on iSCSI, only while the storage-monitor's permit
(the node's lease, :mod:`vtlha.iscsi.permitfile`) is still valid after the write
returned: a write that finished after the lease (stalled in the target across a
takeover, or this process paused) is never acknowledged, and nothing is sent without
a valid permit. A write the target refuses for the reservation (another node
preempted) means this service no longer owns the group: it answers the client with
the refusal, stops listening and exits with status 3 — it never tries again at
another epoch.

Listening: the portal address need not be configured yet when the service starts (the
ip-manager adds it when the lease allows): the socket is bound with IP_FREEBIND.
Ready: once listening and holding the target (iSCSI: every device's reservation moved
to this process's sessions), it writes ``ready`` (its pid) in its run directory.
SIGTERM: stop accepting, finish the request in flight (bounded), on iSCSI release the
reservations (the storage-monitor's release then finds nothing of ours), exit 0.

``--standby``: import everything, then wait for one line on stdin, a JSON object of the
environment to start with (the agent's, ``vtlha.tape.agent.prepare_standby``), and go
on as above; leave quietly (status 0) when stdin closes first."""

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

import orjson

from vtlha.config import ClusterConfig, load_config
from vtlha.log import setup_logging
from vtlha.san.protocol import ProtocolError, decode_header, encode_frame, read_frame
from vtlha.tape import record
from vtlha.tape.stores import Fenced, IscsiStore, ReferenceStore, Store, StoreError

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
                 devices: list[str], portal: str, store: Store, run_dir: Path) -> None:
        self.cfg = cfg
        self.node = node
        self.group = group
        self.epoch = epoch
        self.devices = devices
        self.host, self.port = parse_portal(portal)
        self.run_dir = run_dir
        self.store = store
        self.block_size = store.block_size
        self.server: asyncio.Server | None = None
        self.lost: str | None = None  # why the reservation is lost
        self.done = asyncio.Event()
        self.busy = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.writes = 0
        self.reads = 0
        self.seq = 0  # the sequence number of this process's last write
        self.unacknowledged = 0  # writes done that finished without a valid permit

    def where(self, block: int) -> tuple[str, int]:
        k = len(self.devices)
        return self.devices[block % k], block // k

    async def start(self) -> None:
        await self.store.start()
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
        await self.store.close(release=self.lost is None)
        self.done.set()

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
                    "payload_max": record.capacity(self.block_size), **self.store.status(),
                    "writes": self.writes, "reads": self.reads,
                    "unacknowledged": self.unacknowledged}, b""
        block = req.get("block")
        if op not in ("read", "write") or not isinstance(block, int) or block < 0:
            return {**base, "ok": False, "reason": "EINVAL expected {op: read|write, "
                    "block: int >= 0} or {op: status}"}, b""
        if self.lost is not None:
            return {**base, "ok": False, "reason": f"not serving: {self.lost}"}, b""
        try:
            if op == "write":
                return await self._write(base, block, payload), b""
            return await self._read(base, block)
        except Fenced as exc:
            self._lose(str(exc))
            return {**base, "ok": False, "reason": f"reservation: {exc}"}, b""
        except StoreError as exc:
            return {**base, "ok": False, "reason": str(exc)}, b""

    async def _write(self, base: dict[str, Any], block: int, payload: bytes
                     ) -> dict[str, Any]:
        if len(payload) > record.capacity(self.block_size):
            return {**base, "ok": False, "reason": f"EINVAL a block is at most "
                    f"{record.capacity(self.block_size)} B"}
        why = self.store.permit_valid()
        if why is not None:  # not holding now: nothing is sent
            return {**base, "ok": False, "reason": f"not writing: {why}"}
        self.seq += 1
        device, lba = self.where(block)
        data = record.encode(self.block_size, record.Record(
            self.node, self.epoch, self.seq, block, os.getpid(), payload))
        await self.store.write(device, lba, data)
        self.writes += 1
        why = self.store.permit_valid()
        if why is not None:
            # It finished after this node's lease: it may have landed after a new
            # owner's write (docs/storage.md, "Writes in flight"); never acknowledged.
            self.unacknowledged += 1
            log.warning("write finished without a valid permit: not acknowledged",
                        extra={"group": self.group, "epoch": self.epoch, "block": block,
                               "seq": self.seq, "why": why})
            return {**base, "ok": False, "reason": f"not acknowledged: {why}"}
        return {**base, "ok": True, "reason": "", "block": block, "seq": self.seq}

    async def _read(self, base: dict[str, Any], block: int) -> tuple[dict[str, Any], bytes]:
        device, lba = self.where(block)
        raw = await self.store.read(device, lba)
        self.reads += 1
        try:
            rec = record.decode(raw)
        except record.RecordError as exc:
            return {**base, "ok": False, "reason": f"block {block}: {exc}"}, b""
        if rec is None:
            return {**base, "ok": True, "reason": "", "block": block, "writer": None,
                    "written_epoch": None, "seq": None}, b""
        return {**base, "ok": True, "reason": "", "block": block, "writer": rec.writer,
                "written_epoch": rec.epoch, "seq": rec.seq,
                "written_block": rec.block}, rec.payload


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"vtlha tape service: ${name} is not set (run by the tape agent)")
    return value


def make_store(cfg: ClusterConfig, node: str, group: str, epoch: int,
               devices: list[str]) -> Store:
    if cfg.san.kind == "iscsi":
        return IscsiStore(cfg, node, group, epoch, devices,
                          Path(_env("VTLHA_PERMIT_FILE")), SAN_TIMEOUT)
    return ReferenceStore(cfg, node, epoch, devices, _env("VTLHA_SAN_HOST"),
                          int(_env("VTLHA_SAN_PORT")), SAN_TIMEOUT)


async def _main() -> int:
    cfg = load_config(_env("VTLHA_CONFIG"))
    node, group, epoch = _env("VTLHA_NODE"), _env("VTLHA_GROUP"), int(_env("VTLHA_EPOCH"))
    devices = _env("VTLHA_DEVICES").split(",")
    svc = TapeService(cfg, node=node, group=group, epoch=epoch, devices=devices,
                      portal=_env("VTLHA_PORTAL"),
                      store=make_store(cfg, node, group, epoch, devices),
                      run_dir=Path(_env("VTLHA_RUN_DIR")))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: loop.create_task(svc.stop()))
    try:
        await svc.start()
    except (OSError, StoreError) as exc:
        log.error("tape service cannot start", extra={"error": str(exc)})
        await svc.store.close(release=False)
        return LOST_RESERVATION if isinstance(exc, Fenced) else 1
    await svc.done.wait()
    with contextlib.suppress(FileNotFoundError):
        (svc.run_dir / "ready").unlink()
    return LOST_RESERVATION if svc.lost else 0


def standby_environment(line: bytes) -> dict[str, str]:
    """The environment a standby was given (one JSON object of strings); ValueError."""
    try:
        env = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"standby: the environment line is not JSON: {exc}") from None
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise ValueError("standby: the environment line must be an object of strings")
    return env


def main() -> None:
    if "--standby" in sys.argv[1:]:
        line = sys.stdin.buffer.readline()
        if not line.strip():
            os._exit(0)  # let go before its start: nothing to close
        try:
            os.environ.update(standby_environment(line))
        except ValueError as exc:
            print(f"vtlha tape service: {exc}", file=sys.stderr, flush=True)
            os._exit(2)
    setup_logging("tape", os.environ.get("VTLHA_NODE", "?"), "INFO")
    code = asyncio.run(_main())
    # Everything is closed (the store, the listener, ``ready``): leave without the
    # interpreter's finalization, which took longer than the stop itself (40 to 90 ms) —
    # and a release, and so a failover's fast path, waits for this process to be gone.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
