"""The reference SAN target: test and demo infrastructure standing in for a real SAN.

A small asyncio TCP service, run outside the nodes (``vtlha-lab san serve``), that serves
the cluster file's devices (files or block devices on the host; a relative ``backing``
is under the state root) and enforces SCSI-3-style persistent reservations in the
"Write Exclusive, registrants only" manner:

- a node **registers** for a device; registered nodes may **read** it (so every node's
  storage-monitor can probe every path, the holder's or not);
- one node at a time **holds** a device's reservation, at an **epoch**. ``reserve``
  takes a free device (at an epoch not below the device's last one); ``preempt`` moves
  the reservation to the caller when its epoch is above the current one; ``release``
  gives it up (only the holder, at its epoch; like a preempt, it waits for the
  holder's writes in flight). The device's epoch never goes down, also
  across a release, so a stale command from before a release is refused too;
- a **write** is accepted only from the holder *and* at the reservation's epoch;
  anything else is refused with a reason naming holder and epoch. A preempt waits
  (bounded) for the writes already accepted from the old holder, so that none of them
  lands after its reply. So a node that was paused and resumes with an old belief
  cannot write: the target, not the writer, is the fence.

Deviations from SCSI-3, on purpose: registrations are per node (not per I_T nexus)
and a preempt does not remove the preempted node's registration (its monitor keeps
probing). Not SCSI, not for production data.

Each path index ``i`` has its own listening port, ``port_base + i``, so that a test can
cut one path of a node with an nftables drop on that port; a connection says
``hello {node, path}`` first and ``path`` must be its port's index.

The target is the single writer of the reservations: ``<state_dir>/reservations.json``
(atomic replace + fsync, reloaded at start; a corrupt file stops the start rather than
forgetting reservations). Every write accepted or refused, and every reservation
request, is appended to ``<state_dir>/san-log.jsonl`` (see :func:`read_audit_log`).

Device I/O runs in a thread pool per device (a hung device holds only its own
threads) with a timeout (``ETIMEDOUT``); a read past the end of a truncated backing
file is reported as ``EIO``. :meth:`SanTarget.hang_reads` is a test hook that makes one
device's reads block until :meth:`SanTarget.unhang` (or stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vtlha.config import ClusterConfig, Device
from vtlha.errors import FatalError
from vtlha.san.protocol import (
    MAX_HEADER,
    MAX_PAYLOAD,
    FrameTooLarge,
    Hello,
    InvalidFrame,
    Preempt,
    Read,
    Register,
    Release,
    Request,
    Reserve,
    Status,
    Write,
    decode_header,
    encode_frame,
    parse_request,
    read_frame,
)

log = logging.getLogger("vtlha.san")

T = TypeVar("T")
Reply = tuple[dict[str, Any], bytes]

DEFAULT_IO_TIMEOUT = 5.0
DEFAULT_CREATE_SIZE = 16 * 1024 * 1024
HANG_LIMIT = 120.0  # a hung-read test hook never holds a thread longer than this
IO_THREADS_PER_DEVICE = 4
RESERVATIONS_FILE = "reservations.json"
AUDIT_FILE = "san-log.jsonl"


class _Refused(Exception):
    """A request the target turns down; ``reason`` goes to the reply."""

    def __init__(self, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.extra = extra


class DeviceIOError(Exception):
    """A device read/write failed; the message starts with an errno name."""


# ---- persisted reservations ------------------------------------------------------

class _PersistedDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    holder: str | None = None
    epoch: int = Field(0, ge=0)
    registrants: list[str] = Field(default_factory=list)


class _PersistedState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: int = 1
    devices: dict[str, _PersistedDevice] = Field(default_factory=dict)


@dataclass
class _Reservation:
    holder: str | None = None
    epoch: int = 0
    registrants: set[str] = field(default_factory=set)

    def describe(self) -> str:
        if self.holder is None:
            return f"not reserved (last epoch {self.epoch})"
        return f"held by {self.holder} at epoch {self.epoch}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_audit_log(path: Path) -> list[dict[str, Any]]:
    """Every entry of a target's audit log (``san-log.jsonl``), in order. Entries have
    ``ts``, ``event`` (write, register, reserve, preempt, release, write-failed),
    ``decision`` (accepted/refused), ``node``, ``device``, ``epoch`` and ``reason``;
    writes also ``lba`` and ``count``."""
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


# ---- devices ---------------------------------------------------------------------

class _Backing:
    """One device's backing file or block device, used from its own threads."""

    def __init__(self, name: str, dev: Device, path: Path, create_size: int) -> None:
        self.name = name
        self.dev = dev
        self.path = path
        self.block_size = dev.block_size
        self.create_size = create_size
        self.fd: int | None = None
        self.size = 0  # bytes, at open: the device's addressable size
        self.gate: threading.Event | None = None  # test hook: reads wait on it
        self.write_gate: threading.Event | None = None  # test hook: writes wait on it
        self._lock = threading.Lock()
        self.executor = self.new_executor()

    def new_executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(IO_THREADS_PER_DEVICE, f"san-{self.name}")

    def open(self) -> int:
        with self._lock:
            if self.fd is not None:
                return self.fd
            if not self.path.exists() and self.create_size > 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "wb") as f:
                    f.truncate(self.create_size)
                log.info("backing file created", extra={"device": self.name,
                                                        "path": str(self.path),
                                                        "bytes": self.create_size})
            fd = os.open(self.path, os.O_RDWR)
            size = os.lseek(fd, 0, os.SEEK_END)
            self.size = size - size % self.block_size
            self.fd = fd
            return fd

    def close(self) -> None:
        with self._lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def _span(self, lba: int, nbytes: int) -> int:
        off = lba * self.block_size
        if off + nbytes > self.size:
            raise DeviceIOError(f"EINVAL lba {lba} + {nbytes // self.block_size} block(s) "
                                f"is beyond the end of device {self.name} "
                                f"({self.size // self.block_size} blocks)")
        return off

    def read(self, lba: int, count: int) -> bytes:
        gate = self.gate
        if gate is not None:
            gate.wait(HANG_LIMIT)
        try:
            fd = self.open()
            n = count * self.block_size
            off = self._span(lba, n)
            data = os.pread(fd, n, off)
        except OSError as exc:
            raise DeviceIOError(_os_reason(exc, f"read {self.name}")) from None
        if len(data) < n:
            raise DeviceIOError(f"EIO read of {self.name} at lba {lba}: past the end of "
                                f"its backing ({off + len(data)} B readable, truncated?)")
        return data

    def write(self, lba: int, data: bytes, fua: bool) -> None:
        gate = self.write_gate
        if gate is not None:
            gate.wait(HANG_LIMIT)
        try:
            fd = self.open()
            off = self._span(lba, len(data))
            end_now = os.lseek(fd, 0, os.SEEK_END)
            if off + len(data) > end_now:
                raise DeviceIOError(f"EIO write of {self.name} at lba {lba}: past the end "
                                    f"of its backing ({end_now} B, truncated?)")
            done = os.pwrite(fd, data, off)
            if done != len(data):
                raise DeviceIOError(f"EIO short write of {self.name}: {done} of {len(data)} B")
            if fua:
                os.fdatasync(fd)
        except OSError as exc:
            raise DeviceIOError(_os_reason(exc, f"write {self.name}")) from None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a thread's exception as seen (its awaiter may have timed out)."""
    if not fut.cancelled():
        fut.exception()


def _os_reason(exc: OSError, what: str) -> str:
    name = errno.errorcode.get(exc.errno or 0, "EIO")
    return f"{name} {what}: {exc.strerror or exc}"


@dataclass
class _Conn:
    path: int
    peer: str
    node: str | None = None


# ---- the target ------------------------------------------------------------------

class SanTarget:
    """The reference SAN target (test/demo infrastructure; see the module docstring).

    ``state_root`` is where relative ``backing`` paths live; the target's own files
    (reservations, audit log) are in ``state_dir`` (default ``state_root/san``).
    ``create_size`` > 0 creates missing backing files (sparse) of that size."""

    def __init__(self, config: ClusterConfig, state_root: Path, host: str = "0.0.0.0",
                 port_base: int | None = None, state_dir: Path | None = None,
                 io_timeout: float = DEFAULT_IO_TIMEOUT,
                 create_size: int = DEFAULT_CREATE_SIZE,
                 max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD) -> None:
        self.config = config
        self.state_root = Path(state_root)
        self.state_dir = Path(state_dir) if state_dir else self.state_root / "san"
        self.host = host
        self.port_base = config.san.port if port_base is None else port_base
        self.io_timeout = io_timeout
        self.max_header = max_header
        self.max_payload = max_payload
        self.reservations_path = self.state_dir / RESERVATIONS_FILE
        self.audit_path = self.state_dir / AUDIT_FILE
        self.devices: dict[str, _Backing] = {}
        for name, dev in config.devices.items():
            p = Path(dev.backing)
            self.devices[name] = _Backing(name, dev, p if p.is_absolute()
                                          else self.state_root / p, create_size)
        self.n_paths = max([n for d in config.devices.values() for n in d.paths.values()]
                           or [1])
        self.res: dict[str, _Reservation] = {n: _Reservation() for n in self.devices}
        self.counters: dict[str, int] = dict.fromkeys(
            ("connections", "requests", "invalid_frames", "oversize_frames", "reads",
             "writes_accepted", "writes_refused", "io_errors", "io_timeouts",
             "internal_errors"), 0)
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._inflight: dict[str, set[asyncio.Future[Any]]] = {n: set() for n in self.devices}
        self._persist_lock = asyncio.Lock()
        self._state_executor = ThreadPoolExecutor(1, "san-state")
        self._audit: Any = None
        self._stopped = False
        self._handlers: dict[type[Any], Callable[[_Conn, Any, bytes], Awaitable[Reply]]] = {
            Hello: self._hello, Register: self._register, Reserve: self._reserve,
            Preempt: self._preempt, Release: self._release, Read: self._read,
            Write: self._write, Status: self._status,
        }

    # ---- lifecycle -------------------------------------------------------------
    @property
    def ports(self) -> list[int]:
        return [self.port_base + i for i in range(self.n_paths)]

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._stopped:  # started again after a stop: fresh thread pools
            self._state_executor = ThreadPoolExecutor(1, "san-state")
            for b in self.devices.values():
                b.executor = b.new_executor()
            self._stopped = False
        self._load_reservations()
        self._open_audit()
        loop = asyncio.get_running_loop()
        for b in self.devices.values():
            try:
                await asyncio.wait_for(loop.run_in_executor(b.executor, b.open),
                                       self.io_timeout)
            except (OSError, TimeoutError) as exc:  # served as errors until it opens
                log.error("device not opened", extra={"device": b.name,
                                                      "path": str(b.path), "error": repr(exc)})
        try:
            for i in range(self.n_paths):
                srv = await asyncio.start_server(
                    functools.partial(self._serve_conn, path=i), self.host,
                    self.port_base + i, reuse_address=True, limit=2**16)
                self._servers.append(srv)
        except OSError:
            await self.stop()
            raise
        log.info("san target listening", extra={
            "host": self.host, "ports": self.ports, "devices": sorted(self.devices),
            "state_dir": str(self.state_dir)})

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        for w in list(self._writers):
            w.transport.abort()
            w.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2.0)
        self._servers.clear()
        for b in self.devices.values():
            self.unhang(b.name)
            b.executor.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(OSError):
                b.close()
        self._state_executor.shutdown(wait=True)
        self._stopped = True
        if self._audit is not None:
            self._audit.close()
            self._audit = None
        log.info("san target stopped", extra={"counters": self.counters})

    async def __aenter__(self) -> SanTarget:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- test hooks ------------------------------------------------------------
    def hang_reads(self, device: str) -> None:
        """Test hook: reads of ``device`` block (in their threads) until :meth:`unhang`
        or stop (at most ``HANG_LIMIT`` s), like a hung device."""
        self.devices[device].gate = threading.Event()

    def hang_writes(self, device: str) -> None:
        """Test hook: writes of ``device`` block until :meth:`unhang` (a slow device
        with writes in flight, e.g. to show that a preempt waits for them)."""
        self.devices[device].write_gate = threading.Event()

    def unhang(self, device: str) -> None:
        b = self.devices[device]
        gates, b.gate, b.write_gate = (b.gate, b.write_gate), None, None
        for gate in gates:
            if gate is not None:
                gate.set()

    # ---- persistence and audit -------------------------------------------------
    def _open_audit(self) -> None:
        # unbuffered appends: a line is in the file once the request is answered
        self._audit = open(self.audit_path, "ab", buffering=0)  # noqa: SIM115

    def _load_reservations(self) -> None:
        if not self.reservations_path.exists():
            return
        try:
            st = _PersistedState.model_validate_json(self.reservations_path.read_bytes())
        except (ValidationError, OSError) as exc:
            raise FatalError(f"{self.reservations_path}: cannot load reservations "
                             f"(refusing to start without them): {exc}") from None
        for name, d in st.devices.items():
            if name not in self.res:
                log.warning("reservation for a device not in the config ignored",
                            extra={"device": name})
                continue
            self.res[name] = _Reservation(d.holder, d.epoch, set(d.registrants))
        log.info("reservations loaded", extra={
            "reservations": {n: r.describe() for n, r in self.res.items()}})

    def _snapshot(self) -> bytes:
        st = _PersistedState(devices={
            n: _PersistedDevice(holder=r.holder, epoch=r.epoch,
                                registrants=sorted(r.registrants))
            for n, r in self.res.items()})
        return st.model_dump_json(indent=1).encode()

    async def _persist(self) -> None:
        """Write the reservations (the latest state) before a change is acknowledged."""
        loop = asyncio.get_running_loop()
        async with self._persist_lock:
            data = self._snapshot()
            try:
                await asyncio.wait_for(loop.run_in_executor(
                    self._state_executor, _write_atomic, self.reservations_path, data),
                    self.io_timeout)
            except (OSError, TimeoutError) as exc:
                log.error("reservations not persisted", extra={"error": repr(exc)})
                raise _Refused(f"EIO reservations could not be persisted: {exc!r} "
                               "(the change holds in memory)") from None

    def _audit_entry(self, event: str, decision: str, conn: _Conn, device: str,
                     epoch: int | None, reason: str = "", **more: Any) -> None:
        entry = {"ts": round(time.time(), 6), "event": event, "decision": decision,
                 "node": conn.node, "path": conn.path, "device": device, "epoch": epoch,
                 "reason": reason, **more}
        if self._audit is not None:
            self._audit.write(orjson.dumps(entry) + b"\n")
        level = logging.WARNING if decision == "refused" and event == "write" else logging.INFO
        if event != "write" or decision != "accepted":
            log.log(level, f"{event} {decision}", extra={k: v for k, v in entry.items()
                                                         if k not in ("ts", "event")})

    # ---- connections -----------------------------------------------------------
    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          path: int) -> None:
        peer = writer.get_extra_info("peername")
        conn = _Conn(path=path, peer=f"{peer[0]}:{peer[1]}" if peer else "?")
        self._writers.add(writer)
        self.counters["connections"] += 1
        try:
            await self._conn_loop(conn, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception as exc:  # nothing a peer sends may crash the target
            self.counters["internal_errors"] += 1
            log.exception("connection failed", extra={"peer": conn.peer, "error": repr(exc)})
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            writer.close()

    async def _conn_loop(self, conn: _Conn, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, payload = await read_frame(reader, self.max_header, self.max_payload)
            except FrameTooLarge as exc:
                self.counters["oversize_frames"] += 1
                log.warning("oversized frame: connection closed",
                            extra={"peer": conn.peer, "node": conn.node, "error": str(exc)})
                writer.write(encode_frame({"ok": False, "reason": f"E2BIG {exc}; "
                                           "connection closed"}))
                await asyncio.wait_for(writer.drain(), 1.0)
                return
            reply, data = await self.handle_frame(conn, head, payload)
            writer.write(encode_frame(reply, data))
            await asyncio.wait_for(writer.drain(), self.io_timeout)

    async def handle_frame(self, conn: _Conn, head: bytes, payload: bytes) -> Reply:
        """One frame's reply; never raises."""
        self.counters["requests"] += 1
        rid: Any = None
        try:
            header = decode_header(head)
            rid = header.get("id") if isinstance(header.get("id"), int) else None
            req = parse_request(header, payload)
        except InvalidFrame as exc:
            self.counters["invalid_frames"] += 1
            log.warning("invalid frame", extra={"peer": conn.peer, "node": conn.node,
                                                "error": str(exc)})
            return self._with_id({"ok": False, "reason": f"EINVAL {exc}"}, rid), b""
        try:
            reply, data = await self._dispatch(conn, req, payload)
        except _Refused as r:
            reply, data = {"ok": False, "reason": r.reason, **r.extra}, b""
        except Exception as exc:
            self.counters["internal_errors"] += 1
            log.exception("request failed", extra={"op": req.op, "error": repr(exc)})
            reply, data = {"ok": False, "reason": f"EIO internal error: {exc!r}"}, b""
        return self._with_id(reply, rid), data

    @staticmethod
    def _with_id(reply: dict[str, Any], rid: Any) -> dict[str, Any]:
        if rid is not None:
            reply["id"] = rid
        return reply

    async def _dispatch(self, conn: _Conn, req: Request, payload: bytes) -> Reply:
        if conn.node is None and not isinstance(req, Hello | Status):
            raise _Refused("EACCES say hello {node, path} first")
        return await self._handlers[type(req)](conn, req, payload)

    # ---- checks ----------------------------------------------------------------
    def _device(self, conn: _Conn, name: str) -> _Backing:
        b = self.devices.get(name)
        if b is None:
            raise _Refused(f"ENODEV unknown device {name!r}")
        n = b.dev.paths.get(conn.node or "", 0)
        if conn.path >= n:
            raise _Refused(f"EACCES node {conn.node} has {n} path(s) to device {name}; "
                           f"this connection is path {conn.path}")
        return b

    def _registered(self, conn: _Conn, name: str) -> _Reservation:
        r = self.res[name]
        if conn.node not in r.registrants:
            raise _Refused(f"EACCES node {conn.node} is not registered for device {name} "
                           f"({r.describe()})", holder=r.holder, epoch=r.epoch)
        return r

    @staticmethod
    def _res_reply(r: _Reservation, **more: Any) -> Reply:
        return {"ok": True, "reason": "", "holder": r.holder, "epoch": r.epoch, **more}, b""

    async def _io(self, b: _Backing, fn: Callable[..., T], *args: Any,
                  track: set[asyncio.Future[Any]] | None = None) -> T:
        """Run ``fn`` in the device's threads with the I/O timeout. The thread's future is
        shielded, so that ``track`` (a device's in-flight writes) holds it until the
        thread has really finished, also after a timeout."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(b.executor, fn, *args)
        fut.add_done_callback(_retrieve)
        if track is not None:
            track.add(fut)
            fut.add_done_callback(track.discard)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.io_timeout)
        except TimeoutError:
            self.counters["io_timeouts"] += 1
            raise _Refused(f"ETIMEDOUT device {b.name}: no answer within "
                           f"{self.io_timeout} s (hung device?)") from None
        except DeviceIOError as exc:
            self.counters["io_errors"] += 1
            raise _Refused(str(exc)) from None

    # ---- requests --------------------------------------------------------------
    async def _hello(self, conn: _Conn, req: Hello, _: bytes) -> Reply:
        if not self.config.has_node(req.node):
            raise _Refused(f"EACCES {req.node!r} is not a node of cluster "
                           f"{self.config.cluster}")
        if req.path != conn.path:
            raise _Refused(f"EINVAL this port ({self.port_base + conn.path}) serves path "
                           f"{conn.path}, not path {req.path}")
        if conn.node is not None and conn.node != req.node:
            raise _Refused(f"EINVAL this connection is already node {conn.node}'s")
        conn.node = req.node
        log.info("hello", extra={"peer": conn.peer, "node": req.node, "path": req.path})
        return {"ok": True, "reason": "", "path": conn.path}, b""

    async def _register(self, conn: _Conn, req: Register, _: bytes) -> Reply:
        self._device(conn, req.device)
        r = self.res[req.device]
        if conn.node not in r.registrants:
            assert conn.node is not None
            r.registrants.add(conn.node)
            self._audit_entry("register", "accepted", conn, req.device, None)
            await self._persist()
        return self._res_reply(r)

    async def _reserve(self, conn: _Conn, req: Reserve, _: bytes) -> Reply:
        self._device(conn, req.device)
        r = self._registered(conn, req.device)
        reason = ""
        if r.holder not in (None, conn.node):
            reason = f"reservation conflict: device {req.device} is {r.describe()}"
        elif req.epoch < r.epoch:
            reason = (f"epoch {req.epoch} is below device {req.device}'s epoch {r.epoch} "
                      f"({r.describe()})")
        if reason:
            self._audit_entry("reserve", "refused", conn, req.device, req.epoch, reason)
            raise _Refused(reason, holder=r.holder, epoch=r.epoch)
        if (r.holder, r.epoch) != (conn.node, req.epoch):
            r.holder, r.epoch = conn.node, req.epoch
            self._audit_entry("reserve", "accepted", conn, req.device, req.epoch)
            await self._persist()
        return self._res_reply(r)

    async def _preempt(self, conn: _Conn, req: Preempt, _: bytes) -> Reply:
        self._device(conn, req.device)
        r = self._registered(conn, req.device)
        if req.epoch <= r.epoch:
            reason = (f"preempt refused: epoch {req.epoch} is not above device "
                      f"{req.device}'s epoch {r.epoch} ({r.describe()})")
            self._audit_entry("preempt", "refused", conn, req.device, req.epoch, reason)
            raise _Refused(reason, holder=r.holder, epoch=r.epoch)
        old = (r.holder, r.epoch)
        r.holder, r.epoch = conn.node, req.epoch
        self._audit_entry("preempt", "accepted", conn, req.device, req.epoch,
                          old_holder=old[0], old_epoch=old[1])
        drained = await self._drain_writes(req.device)
        await self._persist()
        return self._res_reply(r, old_holder=old[0], old_epoch=old[1], drained=drained)

    async def _drain_writes(self, device: str) -> bool:
        """Wait (bounded) for writes accepted before a preempt to finish."""
        pending = {f for f in self._inflight[device] if not f.done()}
        if not pending:
            return True
        _, still = await asyncio.wait(pending, timeout=self.io_timeout)
        if still:
            log.error("preempt: writes accepted before it are still in flight",
                      extra={"device": device, "writes": len(still)})
        return not still

    async def _release(self, conn: _Conn, req: Release, _: bytes) -> Reply:
        self._device(conn, req.device)
        r = self._registered(conn, req.device)
        if r.holder != conn.node or req.epoch != r.epoch:
            reason = (f"release refused: device {req.device} is {r.describe()}, not held "
                      f"by {conn.node} at epoch {req.epoch}")
            self._audit_entry("release", "refused", conn, req.device, req.epoch, reason)
            raise _Refused(reason, holder=r.holder, epoch=r.epoch)
        r.holder = None
        self._audit_entry("release", "accepted", conn, req.device, req.epoch)
        drained = await self._drain_writes(req.device)  # none of its writes lands later
        await self._persist()
        return self._res_reply(r, drained=drained)

    async def _read(self, conn: _Conn, req: Read, _: bytes) -> Reply:
        b = self._device(conn, req.device)
        self._registered(conn, req.device)
        self.counters["reads"] += 1
        data = await self._io(b, b.read, req.lba, req.count)
        return {"ok": True, "reason": "", "lba": req.lba, "count": req.count}, data

    async def _write(self, conn: _Conn, req: Write, payload: bytes) -> Reply:
        b = self._device(conn, req.device)
        r = self.res[req.device]
        more: dict[str, Any] = {"lba": req.lba, "count": len(payload) // b.block_size}
        reason = ""
        if r.holder != conn.node or req.epoch != r.epoch:
            reason = (f"reservation conflict: device {req.device} is {r.describe()}; "
                      f"write from {conn.node} at epoch {req.epoch} refused")
        elif len(payload) % b.block_size:
            reason = (f"EINVAL write of {len(payload)} B is not a whole number of "
                      f"{b.block_size} B blocks")
        if reason:
            self.counters["writes_refused"] += 1
            self._audit_entry("write", "refused", conn, req.device, req.epoch, reason, **more)
            raise _Refused(reason, holder=r.holder, epoch=r.epoch)
        self.counters["writes_accepted"] += 1
        self._audit_entry("write", "accepted", conn, req.device, req.epoch, **more)
        try:
            await self._io(b, b.write, req.lba, payload, req.fua,
                           track=self._inflight[req.device])
        except _Refused as exc:
            self._audit_entry("write-failed", "accepted", conn, req.device, req.epoch,
                              exc.reason, **more)
            raise
        return {"ok": True, "reason": "", **more}, b""

    async def _status(self, conn: _Conn, req: Status, _: bytes) -> Reply:
        devices = {
            n: {"holder": r.holder, "epoch": r.epoch, "registrants": sorted(r.registrants),
                "backing": str(self.devices[n].path), "block_size": self.devices[n].block_size,
                "blocks": self.devices[n].size // self.devices[n].block_size,
                "open": self.devices[n].fd is not None}
            for n, r in self.res.items()}
        return {"ok": True, "reason": "", "cluster": self.config.cluster,
                "ports": self.ports, "devices": devices,
                "counters": dict(self.counters)}, b""
