"""The storage-monitor's SAN: the seam between the monitor (probes, takeover, release,
reports) and the target that holds the devices, chosen by the cluster file's
``san.kind`` (:func:`make_backend`).

- :class:`ReferenceSan` (``reference``): the project's reference target
  (``vtlha.san``): a connection per path, registered for every device; reservations
  carry the group's epoch and the target refuses an older one.
- :class:`IscsiSan` (``iscsi``): a real iSCSI target with SCSI-3 persistent
  reservations (``vtlha.iscsi``, ``docs/storage.md``). Probes read one block through a
  session per (device, path) that never registers; the reservation of a device is held
  by one session of the storage-monitor's (its *holder*) until the group's data
  service moves it to its own session (it writes, so it must hold it; while the
  group's resources run, a reservation held with this node's key at the epoch is never
  taken back by a re-take), taken with
  :func:`vtlha.iscsi.reservation.take` at the key of the group's epoch and only with a
  :class:`~vtlha.iscsi.session.Permit` of the hold rule (``Permit.from_gate`` of the
  executor's HoldGate, read right before each command); given up with
  :func:`~vtlha.iscsi.reservation.give_up`. A holder session that is lost (a cut path,
  a target restart) is taken again by :meth:`IscsiSan.keep` under the same rule, never
  by the session layer on its own.

Both raise :class:`StorageError` for what the monitor reports; both answer in bounded
time (every call has the probe timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vtlha.config import ClusterConfig
from vtlha.errors import VtlhaError
from vtlha.iscsi.reservation import TakeResult, give_up, take
from vtlha.iscsi.scsi import (
    IscsiConnectError,
    IscsiError,
    NotPermitted,
    PrType,
    SessionLost,
    describe_key,
    key_epoch,
    key_tag,
    make_key,
    node_tag,
)
from vtlha.iscsi.session import Permit, Session, Target, initiator_name
from vtlha.protocol.hold import HoldGate
from vtlha.san import SanClient, SanError, SanRefused
from vtlha.san.multipath import Multipath as SanMultipath

RETAKE_MAX = 10.0  # seconds: the longest back-off between re-takes of a lost holder
PERMIT_TRIES = 3   # takes with a renewed permit after one ran out while taking
KEYS_EVERY = 1.0   # seconds: READ KEYS / READ RESERVATION of a device at most this often


class StorageError(VtlhaError):
    """A probe, takeover or release that did not work; the text says why."""


@dataclass(frozen=True)
class ProbeResult:
    device: str
    ok: bool
    latency: float | None
    error: str | None


@dataclass(frozen=True)
class Took:
    """A device's reservation is this node's at the group's epoch."""

    op: str                     # reserve | preempt (reference); reserved | preempted | moved
    path: int
    old_node: str | None        # the node that held it before (None: free or ours)
    old_epoch: int | None
    key: str | None = None      # iSCSI: our key and the one that held it, as describe_key
    previous_key: str | None = None


class SanBackend(Protocol):
    """What the storage-monitor needs of the SAN (module docstring)."""

    name: str  # san.kind

    def describe(self) -> dict[str, Any]: ...

    def path_indices(self) -> list[int]: ...

    async def probe_round(self, path: int, devices: list[str]) -> list[ProbeResult]: ...

    async def take(self, group: str, device: str, epoch: int) -> Took: ...

    async def give_up(self, group: str, device: str, epoch: int) -> tuple[str, int]: ...

    async def keep(self, group: str, devices: list[str], epoch: int,
                   leave_own: bool = False) -> list[str]: ...

    def reservations(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


def n_paths(config: ClusterConfig, node: str) -> int:
    return max((d.paths.get(node, 0) for d in config.devices.values()), default=0)


# ---- the reference target ------------------------------------------------------------

def _reason(exc: BaseException) -> str:
    return exc.reason if isinstance(exc, SanRefused) else str(exc)


class ReferenceSan:
    name = "reference"

    def __init__(self, config: ClusterConfig, node: str, host: str, groups: set[str],
                 timeout: float, on_connect: Callable[[int], None]) -> None:
        self.config = config
        self.node = node
        self.host = host
        self.timeout = timeout
        self.on_connect = on_connect
        self.clients = {i: SanClient(host, config.san.port + i, node, i, timeout=timeout)
                        for i in range(n_paths(config, node))}
        self.multipath = {g: SanMultipath(config, node, host, config.group_devices(g), timeout)
                          for g in groups}

    def describe(self) -> dict[str, Any]:
        return {"san": self.host, "port_base": self.config.san.port}

    def path_indices(self) -> list[int]:
        return sorted(self.clients)

    async def _connect(self, i: int, devices: list[str]) -> None:
        client = self.clients[i]
        await client.connect()
        self.on_connect(i)
        for d in devices:
            with contextlib.suppress(SanRefused):  # that device's reads will say why
                await client.register(d)

    async def probe_round(self, path: int, devices: list[str]) -> list[ProbeResult]:
        """A connection that drops or times out is opened again (and the devices
        registered again) for the next device's probe; when that fails, the path's
        other devices fail with it in this round."""
        client = self.clients[path]
        no_conn: str | None = None
        out = []
        for device in devices:
            t0 = time.monotonic()
            try:
                if no_conn is not None:
                    raise SanError(no_conn)
                if not client.connected:
                    try:
                        await self._connect(path, devices)
                    except SanError as exc:
                        no_conn = _reason(exc)
                        raise
                block = self.config.devices[device].block_size
                data = await client.read(device, 0, 1, timeout=self.timeout)
                if len(data) < block:
                    raise SanError(f"short read ({len(data)} of {block} bytes)")
                out.append(ProbeResult(device, True, time.monotonic() - t0, None))
            except SanError as exc:
                out.append(ProbeResult(device, False, None, _reason(exc)))
        return out

    async def take(self, group: str, device: str, epoch: int) -> Took:
        """Reserve when it is free (or ours), preempt when another node holds it."""
        mp = self.multipath[group]
        try:
            try:
                reply = await mp.call(lambda c: c.reserve(device, epoch))
                op = "reserve"
            except SanRefused as exc:
                if "conflict" not in exc.reason:
                    raise
                reply = await mp.call(lambda c: c.preempt(device, epoch))
                op = "preempt"
        except SanError as exc:
            raise StorageError(_reason(exc)) from exc
        old = reply.get("old_holder")
        return Took(op, mp.path, old if old and old != self.node else None,
                    reply.get("old_epoch"))

    async def give_up(self, group: str, device: str, epoch: int) -> tuple[str, int]:
        mp = self.multipath[group]
        try:
            await mp.call(functools.partial(SanClient.release, device=device, epoch=epoch))
            return "released", mp.path
        except SanRefused as exc:
            return f"not ours any more ({exc.reason})", mp.path
        except SanError as exc:
            raise StorageError(str(exc)) from exc

    async def keep(self, group: str, devices: list[str], epoch: int,
                   leave_own: bool = False) -> list[str]:
        return []  # the reservation does not expire; the target fences by epoch

    def reservations(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        # A call stuck on a connection ends at once (its reader sees the close).
        for c in [*self.clients.values()]:
            await c.close()
        for m in self.multipath.values():
            await m.close()


# ---- a real iSCSI target ---------------------------------------------------------------

@dataclass
class Holder:
    session: Session
    key: int
    path: int
    checked: float = 0.0   # monotonic time of the last TEST UNIT READY through it


class IscsiSan:
    name = "iscsi"

    def __init__(self, config: ClusterConfig, node: str, gate: HoldGate,
                 timeout: float, on_connect: Callable[[int], None]) -> None:
        assert config.san.iqn is not None  # the config's san checks
        self.config = config
        self.node = node
        self.gate = gate
        self.timeout = timeout
        self.on_connect = on_connect
        self.iqn = config.san.iqn
        self.paths = n_paths(config, node)
        self.names = {node_tag(config.cluster, n.name): n.name for n in config.nodes}
        self.readers: dict[tuple[str, int], Session] = {}
        self.holders: dict[tuple[str, str], Holder] = {}  # (group, device) -> holder
        self.seen: dict[str, dict[str, Any]] = {}  # device -> keys and reservation read
        self.check_every = config.timings.probe_interval
        self.keys_every = KEYS_EVERY
        #: (group, device) -> (failed re-takes in a row, no new attempt before then)
        self.retake_backoff: dict[tuple[str, str], tuple[int, float]] = {}

    def describe(self) -> dict[str, Any]:
        return {"iqn": self.iqn, "portals": self.config.san.portals[:self.paths]}

    def path_indices(self) -> list[int]:
        return list(range(self.paths))

    def target(self, device: str, path: int) -> Target:
        lun = self.config.devices[device].lun
        assert lun is not None
        return Target(self.config.san.portals[path], self.iqn, lun)

    def _initiator(self, role: str) -> str:
        return initiator_name(self.config.cluster, self.node, role)

    # -- probes: read-only sessions ---------------------------------------------------

    async def _reader(self, device: str, path: int) -> Session:
        s = self.readers.get((device, path))
        if s is not None and not s.is_lost:
            return s
        if s is not None:
            await s.close()
        s = await Session.open(self.target(device, path), self._initiator(f"probe{path}"),
                               self.timeout)
        self.on_connect(path)
        self.readers[(device, path)] = s
        return s

    async def probe_round(self, path: int, devices: list[str]) -> list[ProbeResult]:
        """A one-block READ of each device through this path (its own session, never
        registered), then, at most every KEYS_EVERY s per device, READ KEYS and READ
        RESERVATION for the status. The devices are
        probed side by side (each session has its own thread): a path that stopped
        answering costs one timeout per round, not one per device."""
        return list(await asyncio.gather(*(self._probe(path, d) for d in devices)))

    async def _probe(self, path: int, device: str) -> ProbeResult:
        t0 = time.monotonic()
        try:
            s = await self._reader(device, path)
            await s.read(0, 1)
            latency = time.monotonic() - t0
            if time.monotonic() - self.seen.get(device, {}).get("read_mono", 0.0) \
                    >= self.keys_every:
                keys, res = await s.read_keys(), await s.read_reservation()
                self.seen[device] = self._seen(keys.generation, keys.keys, res.key, res.type)
        except IscsiError as exc:
            gone = self.readers.pop((device, path), None)
            if gone is not None:
                await gone.close()
            return ProbeResult(device, False, None, str(exc))
        return ProbeResult(device, True, latency, None)

    def _seen(self, generation: int, keys: tuple[int, ...], holder: int | None,
              pr_type: int) -> dict[str, Any]:
        try:
            type_name = PrType(pr_type).name.replace("_", " ").lower()
        except ValueError:
            type_name = f"type {pr_type}"
        tag = key_tag(holder) if holder is not None else None
        return {"generation": generation,
                "keys": [describe_key(k, self.names) for k in keys],
                "reservation": None if holder is None else describe_key(holder, self.names),
                "holder": None if tag is None else self.names.get(tag),
                "epoch": None if holder is None else key_epoch(holder),
                "type": None if holder is None else type_name,
                "read_at": time.time(), "read_mono": time.monotonic()}

    def reservations(self) -> dict[str, Any]:
        return {d: {k: v for k, v in seen.items() if k != "read_mono"}
                for d, seen in sorted(self.seen.items())}

    # -- the reservation: one holder session per (group, device) -----------------------

    def _permit(self, group: str) -> Permit | None:
        return Permit.from_gate(self.gate, group, time.monotonic())

    async def take(self, group: str, device: str, epoch: int,
                   leave_own: bool = False) -> Took:
        """Make a new session of this node the holder at ``epoch``'s key, on the first
        path that works (path failover first); only with the hold rule's permit. With
        ``leave_own`` (the group's data service runs and holds the reservation itself), a
        reservation already held with this key is left where it is (op ``held``)."""
        old = self.holders.pop((group, device), None)
        if old is not None:
            await old.session.close()
        self.retake_backoff.pop((group, device), None)
        key = make_key(self.config.cluster, self.node, epoch)
        errors: list[str] = []
        for path in range(self.paths):
            permit = self._permit(group)
            if permit is None or permit.epoch != epoch:
                raise StorageError(f"{device}: no permit of the hold rule for {group} at "
                                   f"epoch {epoch}: nothing registered")
            try:
                s = await Session.open(self.target(device, path),
                                       self._initiator(f"holder{path}"), self.timeout)
            except (SessionLost, IscsiConnectError) as exc:
                errors.append(f"path {path}: {exc}")
                continue
            self.on_connect(path)
            try:
                held = (await s.read_reservation()).key if leave_own else None
                if held == key:
                    # Held with this node's key at this epoch through another session:
                    # the group's data service's, which writes and so must stay the
                    # holder (Write Exclusive). Nothing is taken from it.
                    self.holders[(group, device)] = Holder(s, key, path)
                    return Took("held", path, None, None, describe_key(key, self.names),
                                describe_key(key, self.names))
                result = await self._take_permitted(s, group, key, epoch)
            except (SessionLost, IscsiConnectError) as exc:
                await s.close()
                errors.append(f"path {path}: {exc}")
                continue
            except IscsiError as exc:
                await s.close()
                raise StorageError(f"{device} path {path}: {exc}") from exc
            self.holders[(group, device)] = Holder(s, key, path)
            prev = result.previous
            tag = key_tag(prev) if prev is not None else None
            who = self.names.get(tag) if tag is not None else None
            return Took(result.how.value, path, who if who != self.node else None,
                        key_epoch(prev) if prev is not None else None,
                        describe_key(key, self.names),
                        describe_key(prev, self.names) if prev is not None else None)
        raise StorageError(f"{device}: no path works ({'; '.join(errors)})")

    async def _take_permitted(self, s: Session, group: str, key: int,
                              epoch: int) -> TakeResult:
        """``take()`` with the permit read right before it (the login may have taken
        longer than a renewal's validity on a loaded host); when the permit ran out
        meanwhile but a later notice renewed it, once more with the renewed one. No
        valid permit: NotPermitted, nothing sent."""
        for _ in range(PERMIT_TRIES):
            permit = self._permit(group)
            if permit is None or permit.epoch != epoch:
                raise NotPermitted(f"no permit of the hold rule for {group} at epoch "
                                   f"{epoch}: nothing registered")
            try:
                return await take(s, key, permit)
            except NotPermitted:
                renewed = self._permit(group)
                if renewed is None or renewed.valid_until <= permit.valid_until:
                    raise
        raise NotPermitted(f"the permit for {group} at epoch {epoch} ran out "
                           f"{PERMIT_TRIES} times while taking")

    async def give_up(self, group: str, device: str, epoch: int) -> tuple[str, int]:
        """RELEASE and unregister through the holder session. A holder session that is
        lost cannot release (tgt ties the registration to it) and nothing may register
        again without the permit: its key stays, at this older epoch, until the next
        owner preempts it; that counts as given up."""
        h = self.holders.pop((group, device), None)
        if h is None:
            return "not held by this node", 0
        if h.session.is_lost:
            await h.session.close()
            return ("holder session lost: its key stays registered until the next owner "
                    "preempts it"), h.path
        try:
            after = await give_up(h.session, h.key)
        except SessionLost as exc:
            await h.session.close()
            return f"holder session lost ({exc}): the next owner preempts its key", h.path
        except IscsiError as exc:
            self.holders[(group, device)] = h
            raise StorageError(f"{device}: {exc}") from exc
        await h.session.close()
        if after.key is None:
            how = "released"
        elif after.key == h.key:
            how = ("held by this node's key through another session (a data service "
                   "that did not release it): the next owner preempts it")
        else:
            how = f"not ours any more (held by {describe_key(after.key, self.names)})"
        return how, h.path

    async def _alive(self, h: Holder) -> bool:
        """Is the holder session still logged in? A TEST UNIT READY through it at most
        every probe interval (bounded by the session's timeout); a reservation conflict
        or a preempt's unit attention is an answer: the session is alive."""
        now = time.monotonic()
        if h.session.is_lost:
            return False
        if now - h.checked < self.check_every:
            return True
        h.checked = now
        with contextlib.suppress(IscsiError):
            await h.session.test_unit_ready()
        return not h.session.is_lost

    async def keep(self, group: str, devices: list[str], epoch: int,
                   leave_own: bool = False) -> list[str]:
        """While the group is held: a holder session that was lost is taken again
        (under the hold rule's permit, by :meth:`take`; ``leave_own``: not from this
        node's own key, which the data service's session holds: tgt cannot tell which
        session of a key holds, READ FULL STATUS is missing). What was done, for the
        log."""
        done = []
        for device in devices:
            h = self.holders.get((group, device))
            if h is not None and await self._alive(h):
                continue
            # A failed re-take (a hung or unreachable target) is tried again only after
            # a back-off (probe_interval doubling, at most RETAKE_MAX s): each attempt
            # may take the login timeout on every path, with the group's lock held.
            failures, not_before = self.retake_backoff.get((group, device), (0, 0.0))
            now = time.monotonic()
            if now < not_before:
                continue
            try:
                t = await self.take(group, device, epoch, leave_own)
            except StorageError as exc:
                wait = min(RETAKE_MAX, self.check_every * 2 ** failures)
                self.retake_backoff[(group, device)] = (failures + 1, time.monotonic() + wait)
                done.append(f"{device}: holder session lost, not taken again (next try in "
                            f"{wait:g} s): {exc}")
                continue
            self.retake_backoff.pop((group, device), None)
            done.append(f"{device}: holder session lost; taken again on path {t.path} "
                        f"({t.op})")
        return done

    async def close(self) -> None:
        sessions = [*self.readers.values(), *(h.session for h in self.holders.values())]
        self.readers.clear()
        self.holders.clear()
        for s in sessions:
            with contextlib.suppress(Exception):
                await s.close()


def make_backend(config: ClusterConfig, node: str, host: str, groups: set[str],
                 gate: HoldGate, timeout: float,
                 on_connect: Callable[[int], None]) -> SanBackend:
    if config.san.kind == "iscsi":
        return IscsiSan(config, node, gate, timeout, on_connect)
    return ReferenceSan(config, node, host, groups, timeout, on_connect)
