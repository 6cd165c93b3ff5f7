"""The executors' hold rule, sans-I/O (DESIGN.md "Roles on a node").

Executors are **level-triggered**: an executor (ip-manager, storage-monitor) holds group
G at epoch E exactly while a lease notice for (G, E) from its own lease holder is
valid (``now < valid_until - margin``), and converges to that continuously. The lease
holder issues such notices only for a group its node owns in the KV at E whose acquire
gate has opened, so no command is needed to start holding: a lost command, a dead or
deposed arbiter cannot strand a group.

Commands only make things faster:
- an acquire makes the executor converge now (``on_acquire`` changes no verdict);
- a release at epoch E' drops G at once, and sets the group's **release floor**: no
  notice for an epoch below E' makes it hold again (a late notice of the old epoch, or a
  lease holder whose watch lags, cannot bring the group back after the release was
  acknowledged). The executor persists the floor with its fencing tokens.

When notices stop (the lease holder died, or the node is cut off) the lease lapses and
the executor releases on its own; a revoked notice (the group was taken) releases at
once and is final for its epoch — for every notice decided before it (``since``: when
the lease holder sent the renewal or promise request, or dropped the group; one host's
monotonic clock). A notice of that epoch decided *after* the revoke comes from a lease
holder that took the group again by a successful compare-and-set (a bucket recreated
with the same epochs), and counts. After a restart nothing is held until a valid notice
arrives."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Why(StrEnum):
    HOLD = "hold"
    NO_NOTICE = "no lease notice yet"
    RELEASED = "released at a newer epoch"
    EXPIRED = "lease expired"
    REVOKED = "lease revoked"


@dataclass
class HoldGate:
    margin: float
    #: group -> (epoch, valid_until, revoked, since) of the latest notice
    notices: dict[str, tuple[int, float, bool, float]] = field(default_factory=dict)
    #: group -> release floor: a notice for an epoch below it never makes it hold
    floors: dict[str, int] = field(default_factory=dict)

    # ---- inputs ------------------------------------------------------------------
    def on_notice(self, group: str, epoch: int, valid_until: float, revoked: bool,
                  since: float = 0.0) -> None:
        """A lease notice from this node's lease holder."""
        cur = self.notices.get(group)
        if cur is not None and epoch < cur[0]:
            return  # an older epoch's notice arriving late
        if cur is not None and epoch == cur[0]:
            if cur[2] and (revoked or since <= cur[3]):
                return  # a revoke is final for what was decided before it
            if revoked and not cur[2] and since < cur[3]:
                return  # a revoke older than the renewal that took the group again
            if not revoked and not cur[2]:
                valid_until = max(valid_until, cur[1])  # notices may arrive out of order
                since = max(since, cur[3])
        self.notices[group] = (epoch, valid_until, revoked, since)

    def on_acquire(self, group: str, epoch: int) -> None:
        """An acquire command: it only asks the executor to converge now; whether it
        holds is the notices' business alone."""

    def on_release(self, group: str, epoch: int | None = None) -> None:
        """A release command at ``epoch`` (the new owner's epoch): drop now, and never
        hold again on a notice below it. Without an epoch: above whatever is noticed."""
        if epoch is None:
            cur = self.notices.get(group)
            epoch = cur[0] + 1 if cur is not None else 0
        self.floors[group] = max(self.floors.get(group, 0), epoch)

    def reset(self, floors: dict[str, int] | None = None) -> None:
        """Forget every notice and floor (a new KV bucket: its epochs start again)."""
        self.notices.clear()
        self.floors = dict(floors or {})

    # ---- verdicts ----------------------------------------------------------------
    def verdict(self, group: str, now: float) -> Why:
        notice = self.notices.get(group)
        if notice is None:
            return Why.NO_NOTICE
        epoch, valid_until, revoked, _ = notice
        if epoch < self.floors.get(group, 0):
            return Why.RELEASED
        if revoked:
            return Why.REVOKED
        if now >= valid_until - self.margin:
            return Why.EXPIRED
        return Why.HOLD

    def should_hold(self, group: str, now: float) -> bool:
        return self.verdict(group, now) is Why.HOLD

    def epoch(self, group: str) -> int | None:
        """The epoch of the latest notice (the one to hold at), or None."""
        notice = self.notices.get(group)
        return notice[0] if notice is not None else None

    def valid_until(self, group: str) -> float | None:
        """When holding must stop (before the margin), or None when no notice allows
        holding (whatever the clock says)."""
        notice = self.notices.get(group)
        if notice is None or notice[2] or notice[0] < self.floors.get(group, 0):
            return None
        return notice[1] - self.margin
