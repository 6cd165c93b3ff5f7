"""Health inputs with hysteresis, and "healthy since" times. Pure: no clock, no I/O.

keepalived's rule (STYLE.md): a health input changes state only after ``rise`` good or
``fall`` bad results in a row, so that a check or a path that flickers under load does
not move anything. The first result sets the starting state (there is no history to
be hysteretic about) unless a starting state is given.

- ``Hysteresis``: one boolean input (a process check, a management-path report).
- ``CheckStates``: one ``Hysteresis`` per named process check of a node; gives the
  failing fatal and non-fatal checks, as the policy's ``NodeView`` wants them.
- ``Since``: when a boolean last became true and stayed true (the policy's
  ``healthy_since`` and friends); the caller passes ``now``.

Feed one result per *measurement*: a check result repeated in several heartbeats (checks
run every ``check_interval``, heartbeats go out every ``heartbeat_interval``) is one
result, not several.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class Hysteresis:
    """A boolean that changes only after ``rise`` good or ``fall`` bad results in a row."""

    def __init__(self, rise: int, fall: int, initial: bool | None = None) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise ({rise}) and fall ({fall}) must be >= 1")
        self.rise = rise
        self.fall = fall
        self.state: bool | None = initial  # None until the first result
        self.streak = 0  # results in a row that disagree with the state
        self.changed = False  # whether the latest update changed the state

    def update(self, ok: bool) -> bool:
        """Take one result; return the state after it (``changed`` says if it moved)."""
        self.changed = False
        if self.state is None:
            self.state, self.changed = ok, True
        elif ok == self.state:
            self.streak = 0
        else:
            self.streak += 1
            if self.streak >= (self.rise if ok else self.fall):
                self.state, self.streak, self.changed = ok, 0, True
        return self.state


@dataclass(frozen=True)
class CheckSample:
    """One result of one process check (the fields of ``messages.CheckResult`` the
    policy needs)."""

    name: str
    ok: bool
    fatal: bool = False


class CheckStates:
    """The process checks of one node, each behind its own ``Hysteresis``. A check that
    a later round no longer reports is forgotten (the node's configuration changed)."""

    def __init__(self, rise: int, fall: int) -> None:
        self.rise = rise
        self.fall = fall
        self.checks: dict[str, Hysteresis] = {}
        self.fatal: dict[str, bool] = {}

    def update(self, results: Iterable[CheckSample]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Take one round of results; return (fatal failing, non-fatal failing) names,
        sorted, after hysteresis."""
        seen: set[str] = set()
        for r in results:
            seen.add(r.name)
            h = self.checks.get(r.name)
            if h is None:
                h = self.checks[r.name] = Hysteresis(self.rise, self.fall)
            h.update(r.ok)
            self.fatal[r.name] = r.fatal
        for gone in set(self.checks) - seen:
            del self.checks[gone]
            del self.fatal[gone]
        return self.failing()

    def failing(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        bad = sorted(n for n, h in self.checks.items() if h.state is False)
        return (tuple(n for n in bad if self.fatal[n]),
                tuple(n for n in bad if not self.fatal[n]))

    def reset(self) -> None:
        """Forget every check (a node that restarted: a new incarnation)."""
        self.checks.clear()
        self.fatal.clear()


class Since:
    """When a boolean became true and has stayed true since (None while false)."""

    def __init__(self) -> None:
        self.since: float | None = None

    def update(self, ok: bool, now: float) -> float | None:
        if not ok:
            self.since = None
        elif self.since is None:
            self.since = now
        return self.since
