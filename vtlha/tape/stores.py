"""Where the tape data service's blocks go: the SAN of the cluster file's ``san.kind``.

- :class:`ReferenceStore` (``reference``): the project's reference target, over its
  multipath connections; the target refuses a write at an epoch below the device's
  reservation.
- :class:`IscsiStore` (``iscsi``): a real iSCSI target with SCSI-3 persistent
  reservations (``vtlha.iscsi``). Under Write Exclusive only the session holding the
  reservation may write, so **this process holds it**: per device a writer
  :class:`vtlha.iscsi.multipath.Multipath` with the node's key at the group's epoch,
  which makes each session it opens the holder with ``take()`` (our own key, held by
  the storage-monitor's session, moves here: a PREEMPT of our own key) — only with the
  permit the storage-monitor hands over (:mod:`vtlha.iscsi.permitfile`), read at each
  use. A write whose path is lost goes to the next path, taking the reservation there
  under the permit of that moment (path failover first). A RESERVATION CONFLICT (a
  newer owner preempted us) or a newer owner's key found on a failover is
  :class:`Fenced`: the service stops.

Both raise :class:`StoreError` for a write or read that did not work (the client is
told and sends it again) and :class:`Fenced` when the group is not ours any more."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, Protocol

from vtlha.config import ClusterConfig
from vtlha.errors import VtlhaError
from vtlha.iscsi.multipath import Multipath as IscsiMultipath
from vtlha.iscsi.permitfile import read_permit
from vtlha.iscsi.reservation import NewerHolder, give_up
from vtlha.iscsi.scsi import IscsiError, NotPermitted, ReservationConflict, make_key
from vtlha.iscsi.session import Permit, Target, initiator_name
from vtlha.san.client import SanClient, SanError, SanRefused
from vtlha.san.multipath import Multipath as SanMultipath
from vtlha.san.multipath import node_paths


class StoreError(VtlhaError):
    """A read or write that did not work this time."""


class Fenced(StoreError):
    """The target refused us for the reservation: another node owns the group now."""


class NoPermit(StoreError):
    """No valid permit of the hold rule right now: nothing was sent."""


PERMIT_WAIT = 5.0  # seconds a start waits for a valid permit (a renewal late under load)
PERMIT_POLL = 0.02


class Store(Protocol):
    block_size: int

    async def start(self) -> None: ...

    async def write(self, device: str, lba: int, data: bytes) -> None: ...

    async def read(self, device: str, lba: int) -> bytes: ...

    def permit_valid(self) -> str | None: ...

    def status(self) -> dict[str, Any]: ...

    async def close(self, release: bool) -> None: ...


class ReferenceStore:
    def __init__(self, cfg: ClusterConfig, node: str, epoch: int, devices: list[str],
                 san_host: str, san_port: int, timeout: float) -> None:
        self.epoch = epoch
        self.block_size = max(cfg.devices[d].block_size for d in devices)
        self.mp = SanMultipath(cfg, node, san_host, devices, timeout, port_base=san_port)

    async def start(self) -> None:
        try:
            await self.mp.call(lambda c: c.status())  # the target answers on some path
        except SanError as exc:
            raise StoreError(str(exc)) from exc

    async def write(self, device: str, lba: int, data: bytes) -> None:
        async def _w(c: SanClient) -> Any:
            return await c.write(device, lba, self.epoch, data, fua=True)

        try:
            await self.mp.call(_w)
        except SanRefused as exc:
            if "reservation" in exc.reason:
                raise Fenced(exc.reason) from exc
            raise StoreError(exc.reason) from exc
        except SanError as exc:
            raise StoreError(str(exc)) from exc

    async def read(self, device: str, lba: int) -> bytes:
        try:
            return await self.mp.call(lambda c: c.read(device, lba))
        except SanRefused as exc:
            raise StoreError(exc.reason) from exc
        except SanError as exc:
            raise StoreError(str(exc)) from exc

    def permit_valid(self) -> str | None:
        return None  # the reference target fences by the epoch in every write

    def status(self) -> dict[str, Any]:
        return {"path": self.mp.path, "path_failovers": self.mp.failovers}

    async def close(self, release: bool) -> None:
        await self.mp.close()  # the storage-monitor releases the reservations


class IscsiStore:
    def __init__(self, cfg: ClusterConfig, node: str, group: str, epoch: int,
                 devices: list[str], permit_file: Path, timeout: float) -> None:
        assert cfg.san.iqn is not None
        self.group = group
        self.epoch = epoch
        self.permit_file = permit_file
        self.block_size = max(cfg.devices[d].block_size for d in devices)
        self.key = make_key(cfg.cluster, node, epoch)
        paths = node_paths(cfg, node, devices)

        def initiator(i: int) -> str:
            return initiator_name(cfg.cluster, node, f"data{i}")

        self.mps: dict[str, IscsiMultipath] = {}
        # One call at a time per device: a client that timed out sends its block again
        # on a new connection while the first call may still be failing over; two
        # failovers at once would take the reservation from each other's new session.
        self.locks = {d: asyncio.Lock() for d in devices}
        for d in devices:
            lun = cfg.devices[d].lun
            assert lun is not None
            self.mps[d] = IscsiMultipath(
                [Target(cfg.san.portals[i], cfg.san.iqn, lun) for i in paths], initiator,
                timeout, key=self.key, permit=self.permit)

    def permit(self) -> Permit | None:
        return read_permit(self.permit_file, self.group, self.epoch)

    def permit_valid(self) -> str | None:
        """None while the storage-monitor's permit for this group and epoch is valid;
        else why not (then nothing is registered and no write is acknowledged)."""
        p = self.permit()
        if p is None:
            return f"no permit for {self.group} at epoch {self.epoch}"
        left = p.valid_until - time.monotonic()
        return None if left > 0 else f"the permit ran out {-left:.3f} s ago"

    async def _call(self, device: str, what: str, fn: Any) -> Any:
        try:
            async with self.locks[device]:
                return await self.mps[device].call(fn)
        except (ReservationConflict, NewerHolder) as exc:
            raise Fenced(f"{what} {device}: {exc}") from exc
        except NotPermitted as exc:
            raise NoPermit(f"{what} {device}: {exc}") from exc
        except IscsiError as exc:
            raise StoreError(f"{what} {device}: {exc}") from exc

    async def start(self) -> None:
        """Become the holder of every device (on its first path that works). A permit
        that ran out (the storage-monitor's renewal is late, or the group is being let
        go) is waited for, at most PERMIT_WAIT s; nothing is sent meanwhile."""
        deadline = time.monotonic() + PERMIT_WAIT
        for d in self.mps:
            while True:
                try:
                    await self._call(d, "take", lambda s: s.test_unit_ready())
                    break
                except NoPermit:
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(PERMIT_POLL)
            mp = self.mps[d]
            s = mp.sessions[mp.current]
            if s is not None and s.block_size != self.block_size:
                raise StoreError(f"{d}: the LUN's blocks are {s.block_size} B, the cluster "
                                 f"file says {self.block_size}")

    async def write(self, device: str, lba: int, data: bytes) -> None:
        await self._call(device, "write", lambda s: s.write(lba, data))

    async def read(self, device: str, lba: int) -> bytes:
        out: bytes = await self._call(device, "read", lambda s: s.read(lba, 1))
        return out

    def status(self) -> dict[str, Any]:
        return {"path": {d: mp.current for d, mp in self.mps.items()},
                "path_failovers": sum(mp.failovers for mp in self.mps.values())}

    async def close(self, release: bool) -> None:
        """With ``release`` (a clean stop): RELEASE and unregister through each holder
        session (bounded by the session timeout), so the storage-monitor's release finds
        nothing of ours left; then log out."""
        for mp in self.mps.values():
            s = mp.sessions[mp.current]
            if release and s is not None and not s.is_lost:
                with contextlib.suppress(IscsiError):
                    await give_up(s, self.key)
            await mp.close()
