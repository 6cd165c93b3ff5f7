"""IP backends: how floating addresses are really held.

``RecordingBackend`` only records what it holds (a JSON file in the node's state
directory): the non-root loopback mode and unit tests. It says so in its description.
``NetlinkBackend`` (``netlink.py``) configures them for real in the network namespace
the service runs in.

Every backend is idempotent: adding a held address or removing one that is not held
does nothing (the ip-manager reports such no-ops as events)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import orjson


class IpBackend(Protocol):
    description: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    async def held(self) -> set[str]: ...

    async def add(self, address: str) -> None: ...

    async def renew(self, address: str) -> None:
        """Extend the address's kernel lifetime, where the backend has one."""

    async def remove(self, address: str) -> None: ...


class RecordingBackend:
    description = "recording: addresses are only recorded in a file, not configured"

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> set[str]:
        try:
            return set(orjson.loads(self.path.read_bytes()))
        except FileNotFoundError:
            return set()

    def _write(self, addrs: set[str]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(sorted(addrs)))
        os.replace(tmp, self.path)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"file": str(self.path)}

    async def held(self) -> set[str]:
        return self._read()

    async def add(self, address: str) -> None:
        self._write(self._read() | {address})

    async def renew(self, address: str) -> None:
        return None  # recorded addresses have no kernel lifetime

    async def remove(self, address: str) -> None:
        self._write(self._read() - {address})
