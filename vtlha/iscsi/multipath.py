"""One LUN through every path of one node: one :class:`Session` per path (a portal),
used one at a time, for the writer (the holder) and for probes.

A call that fails for want of a path (:class:`SessionLost`, a failed login) is tried on
the next path; an answer of the target (RESERVATION CONFLICT, any other check
condition) is raised as is. This is the manual's "path failover first".

The difference from the reference target's multipath (``vtlha.san.multipath``): a new
session is **not** registered by this layer on its own. A writer (``key`` given) makes
each session it opens the holder with :func:`vtlha.iscsi.reservation.take`, with the
permit that ``permit()`` returns at that moment — a valid lease notice's, or None when
the node holds none, and then nothing is sent (:class:`NotPermitted`). Since Write
Exclusive's holder is one session, moving to another path moves the reservation (our
own key PREEMPTed there), and a newer owner's key is never taken (:class:`NewerHolder`).
A reader (no ``key``) never sends a PR OUT.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from vtlha.iscsi.reservation import take
from vtlha.iscsi.scsi import IscsiConnectError, IscsiError, NotPermitted, SessionLost
from vtlha.iscsi.session import DEFAULT_TIMEOUT, Permit, Session, Target

T = TypeVar("T")


@dataclass(frozen=True)
class PathProbe:
    path: int
    ok: bool
    latency: float | None       # seconds, when it answered
    error: str | None


class Multipath:
    def __init__(self, targets: list[Target], initiator: Callable[[int], str],
                 timeout: float = DEFAULT_TIMEOUT, key: int | None = None,
                 permit: Callable[[], Permit | None] | None = None) -> None:
        if (key is None) != (permit is None):
            raise ValueError("a writer needs both key and permit; a reader neither")
        self.targets = list(targets)
        self.initiator = initiator
        self.timeout = timeout
        self.key = key
        self.permit = permit
        self.sessions: list[Session | None] = [None] * len(self.targets)
        self.current = 0
        self.failovers = 0  # times a call moved to another path

    async def _open(self, i: int) -> Session:
        s = self.sessions[i]
        if s is not None and not s.is_lost:
            return s
        if s is not None:
            await s.close()
            self.sessions[i] = None
        s = await Session.open(self.targets[i], self.initiator(i), self.timeout)
        try:
            if self.key is not None:
                assert self.permit is not None
                permit = self.permit()
                if permit is None:
                    raise NotPermitted(f"path {i}: no permit: the new session stays "
                                       "unregistered")
                await take(s, self.key, permit)
        except BaseException:
            await s.close()
            raise
        self.sessions[i] = s
        return s

    async def call(self, fn: Callable[[Session], Awaitable[T]]) -> T:
        """``fn(session)`` on the current path, then on each other path in turn."""
        if not self.targets:
            raise IscsiError("no path")
        errors: list[str] = []
        for k in range(len(self.targets)):
            i = (self.current + k) % len(self.targets)
            try:
                out = await fn(await self._open(i))
            except (SessionLost, IscsiConnectError) as exc:
                errors.append(f"path {i}: {exc}")
                await self._drop(i)
                continue
            if i != self.current:
                self.failovers += 1
                self.current = i
            return out
        raise SessionLost(f"no path works ({'; '.join(errors)})")

    async def probe(self, lba: int = 0) -> list[PathProbe]:
        """A one-block READ through every path (opening it when needed), each bounded by
        the session's timeout; a path that fails is closed and reopened next time.
        Readers only: a writer's sessions are its holders, probes have their own."""
        if self.key is not None:
            raise ValueError("probe through a reader's Multipath, not the writer's")
        out = []
        for i in range(len(self.targets)):
            t0 = time.monotonic()
            try:
                await (await self._open(i)).read(lba, 1)
                out.append(PathProbe(i, True, time.monotonic() - t0, None))
            except IscsiError as exc:
                await self._drop(i)
                out.append(PathProbe(i, False, None, str(exc)))
        return out

    async def _drop(self, i: int) -> None:
        s, self.sessions[i] = self.sessions[i], None
        if s is not None:
            with contextlib.suppress(Exception):
                await s.close()

    async def close(self) -> None:
        for i in range(len(self.sessions)):
            await self._drop(i)
