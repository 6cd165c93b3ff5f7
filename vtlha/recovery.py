"""What a node does when a resource of a data group it serves fails: restart it here,
or give the group up so that the arbiter moves it (Pacemaker's fail counts,
``migration-threshold`` and ``failure-timeout``). Pure: no I/O, no clock reads; the
storage-monitor passes the time in and carries the verdict out.

A **failure** is a failed ``monitor`` of a served group's resource (an error, "not
running", or no answer within its timeout) or a failed ``start`` while the group is
acquired. Failures are counted per (group, resource) on this node; a failure older
than the resource's ``failure_timeout`` no longer counts (0: never expires). Once the
count, this failure included, reaches ``migration_threshold`` the node gives the group
up (0: never, always restart); before that it restarts the resource here (``stop``
then ``start``). A restart that fails itself gives the group up at once: it is
counted as a failure too, so the node's count remembers it.

The counts are the node's memory of its own failures: they are kept when the group
moves away and back (a group that comes back within ``failure_timeout`` of failing
here is given up at its next failure when the threshold is reached), and they start
afresh when the storage-monitor restarts or an operator cleans the group up
(``FailCounts.forget``, ``vtlha cleanup``). A restart after a failed ``start`` waits
``restart_delay`` first (a back-off: no start storm for a resource that cannot start)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

RESTART_DELAY = 0.5  # seconds before the start that follows a failed start
RESTART_DELAY_MAX = 8.0


class Next(StrEnum):
    """What follows a failure."""

    RESTART = "restart"  # stop, then start, on this node
    GIVE_UP = "give_up"  # report the group failed here: the arbiter moves it


@dataclass(frozen=True)
class Verdict:
    next: Next
    failures: int  # failures within failure_timeout, this one included
    threshold: int  # migration_threshold (0: never give up)
    why: str  # a phrase for the event and the report

    @property
    def gives_up(self) -> bool:
        return self.next is Next.GIVE_UP


def recent(times: tuple[float, ...], now: float, failure_timeout: float) -> tuple[float, ...]:
    """The failure times that still count at ``now`` (all of them when failure_timeout
    is 0)."""
    if failure_timeout <= 0:
        return times
    return tuple(t for t in times if now - t < failure_timeout)


def verdict(failures: int, threshold: int, failure_timeout: float,
            restart_failed: bool = False) -> Verdict:
    """The verdict after ``failures`` counted failures (this one included)."""
    window = "" if failure_timeout <= 0 else f" within failure_timeout {failure_timeout:g} s"
    counted = f"{failures} failure{'' if failures == 1 else 's'}{window}"
    if restart_failed:
        return Verdict(Next.GIVE_UP, failures, threshold,
                       f"the restart failed ({counted}): given up on this node")
    if threshold > 0 and failures >= threshold:
        return Verdict(Next.GIVE_UP, failures, threshold,
                       f"{counted}, migration_threshold {threshold} reached: given up on "
                       f"this node")
    limit = "no migration_threshold" if threshold == 0 else f"migration_threshold {threshold}"
    return Verdict(Next.RESTART, failures, threshold,
                   f"{counted} ({limit}): restarted on this node")


def restart_delay(failures: int, base: float = RESTART_DELAY,
                  cap: float = RESTART_DELAY_MAX) -> float:
    """The back-off before starting a resource again after its ``failures``-th counted
    failed start: ``base``, doubling with each failure, at most ``cap``."""
    return float(min(cap, base * 2.0 ** max(0, failures - 1)))


class FailCounts:
    """Failure times per (group, resource) on one node, on the caller's monotonic
    clock."""

    def __init__(self) -> None:
        self._times: dict[tuple[str, str], tuple[float, ...]] = {}

    def count(self, group: str, resource: str, now: float, failure_timeout: float) -> int:
        return len(recent(self._times.get((group, resource), ()), now, failure_timeout))

    def record(self, group: str, resource: str, at: float, *, threshold: int,
               failure_timeout: float, restart_failed: bool = False) -> Verdict:
        """One more failure at ``at``, and what to do about it. Expired failures are
        forgotten."""
        key = (group, resource)
        times = (*recent(self._times.get(key, ()), at, failure_timeout), at)
        self._times[key] = times
        return verdict(len(times), threshold, failure_timeout, restart_failed)

    def forget(self, group: str) -> dict[str, int]:
        """An operator's cleanup: every failure of the group's resources forgotten;
        how many each resource had (expired ones included)."""
        gone = {r: len(t) for (g, r), t in self._times.items() if g == group and t}
        self._times = {k: t for k, t in self._times.items() if k[0] != group}
        return gone

    def counts(self, now: float, timeouts: dict[tuple[str, str], float]) -> dict[
            tuple[str, str], int]:
        """Every (group, resource) with failures that still count (``timeouts``: each
        one's failure_timeout; a key without one counts every failure)."""
        out = {}
        for key, times in self._times.items():
            n = len(recent(times, now, timeouts.get(key, 0.0)))
            if n:
                out[key] = n
        return out
