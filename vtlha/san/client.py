"""Client for one path of the reference SAN target (test and demo infrastructure
standing in for a real SAN; see ``vtlha.san``).

A :class:`SanClient` is one TCP connection: one path of one node. Requests on it are
sent one at a time (queue depth 1). Every call has a timeout; on a timeout the
connection is closed (a late reply would otherwise be taken for the next request's)
and :class:`SanTimeout` is raised; call :meth:`SanClient.connect` again to go on.
A refusal by the target (``ok: false``) raises :class:`SanRefused` with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from types import TracebackType
from typing import Any

from vtlha.config import ClusterConfig
from vtlha.errors import VtlhaError
from vtlha.san.protocol import (
    MAX_PAYLOAD,
    ProtocolError,
    decode_header,
    encode_frame,
    read_frame,
)

DEFAULT_TIMEOUT = 2.0


class SanError(VtlhaError):
    """Any failure of a SAN request."""


class SanRefused(SanError):
    """The target answered ``ok: false``; ``reason`` says why (it names the holder and
    epoch when a reservation was in the way; EIO/ETIMEDOUT for device errors)."""

    def __init__(self, op: str, reason: str, reply: dict[str, Any]) -> None:
        super().__init__(f"{op} refused: {reason}")
        self.op = op
        self.reason = reason
        self.reply = reply


class SanTimeout(SanError):
    """No reply within the timeout; the connection has been closed."""


class SanConnectionError(SanError):
    """Not connected, the connection was lost, or the reply was not a valid frame."""


class SanClient:
    """One path (one TCP connection) of one node to the SAN target. ``node=None``
    makes an anonymous connection that may only ask for ``status``."""

    def __init__(self, host: str, port: int, node: str | None, path: int = 0,
                 timeout: float = DEFAULT_TIMEOUT, connect_timeout: float | None = None
                 ) -> None:
        self.host = host
        self.port = port
        self.node = node
        self.path = path
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    @classmethod
    def for_path(cls, cfg: ClusterConfig, node: str | None, path: int,
                 host: str = "127.0.0.1", port_base: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> SanClient:
        """A client for ``node``'s path ``path``: port ``san.port + path``."""
        base = cfg.san.port if port_base is None else port_base
        return cls(host, base + path, node, path, timeout)

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        """Open the connection (closing any previous one) and say hello."""
        await self.close()
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.connect_timeout)
        except TimeoutError:
            raise SanTimeout(f"connect to {self.host}:{self.port} timed out after "
                             f"{self.connect_timeout} s") from None
        except OSError as exc:
            raise SanConnectionError(f"cannot connect to {self.host}:{self.port}: "
                                     f"{exc.strerror or exc}") from None
        if self.node is not None:
            await self.call({"op": "hello", "node": self.node, "path": self.path})

    async def close(self) -> None:
        w, self._writer, self._reader = self._writer, None, None
        if w is not None:
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 1.0)

    async def __aenter__(self) -> SanClient:
        await self.connect()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _abort(self) -> None:
        w, self._writer, self._reader = self._writer, None, None
        if w is not None:
            w.transport.abort()
            w.close()

    async def call(self, header: dict[str, Any], payload: bytes = b"",
                   timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
        """Send one request and return the reply's header and payload; raises
        :class:`SanRefused`, :class:`SanTimeout` or :class:`SanConnectionError`."""
        op = str(header.get("op"))
        t = self.timeout if timeout is None else timeout
        async with self._lock:
            if self._reader is None or self._writer is None:
                raise SanConnectionError(f"{op}: not connected to {self.host}:{self.port}")
            rid = next(self._ids)
            try:
                reply, data = await asyncio.wait_for(
                    self._exchange(self._reader, self._writer, {**header, "id": rid},
                                   payload), t)
            except TimeoutError:
                self._abort()
                raise SanTimeout(f"{op} on {self.host}:{self.port}: no reply within {t} s "
                                 "(connection closed)") from None
            except (OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
                self._abort()
                raise SanConnectionError(f"{op} on {self.host}:{self.port}: connection "
                                         f"lost or bad reply: {exc!r}") from None
            if reply.get("id") not in (rid, None):
                self._abort()
                raise SanConnectionError(f"{op}: reply for request {reply.get('id')}, "
                                         f"expected {rid} (connection closed)")
        if not reply.get("ok"):
            raise SanRefused(op, str(reply.get("reason", "")), reply)
        return reply, data

    @staticmethod
    async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        header: dict[str, Any], payload: bytes
                        ) -> tuple[dict[str, Any], bytes]:
        writer.write(encode_frame(header, payload))
        await writer.drain()
        head, data = await read_frame(reader, max_payload=MAX_PAYLOAD)
        return decode_header(head), data

    # ---- the operations --------------------------------------------------------
    async def register(self, device: str) -> dict[str, Any]:
        return (await self.call({"op": "register", "device": device}))[0]

    async def reserve(self, device: str, epoch: int) -> dict[str, Any]:
        return (await self.call({"op": "reserve", "device": device, "epoch": epoch}))[0]

    async def preempt(self, device: str, epoch: int) -> dict[str, Any]:
        return (await self.call({"op": "preempt", "device": device, "epoch": epoch}))[0]

    async def release(self, device: str, epoch: int) -> dict[str, Any]:
        return (await self.call({"op": "release", "device": device, "epoch": epoch}))[0]

    async def read(self, device: str, lba: int, count: int = 1,
                   timeout: float | None = None) -> bytes:
        return (await self.call({"op": "read", "device": device, "lba": lba,
                                 "count": count}, timeout=timeout))[1]

    async def write(self, device: str, lba: int, epoch: int, data: bytes,
                    fua: bool = False, timeout: float | None = None) -> dict[str, Any]:
        header = {"op": "write", "device": device, "lba": lba, "epoch": epoch}
        if fua:
            header["fua"] = True
        return (await self.call(header, data, timeout=timeout))[0]

    async def status(self) -> dict[str, Any]:
        return (await self.call({"op": "status"}))[0]
