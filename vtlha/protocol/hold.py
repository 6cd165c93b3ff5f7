"""The executors' hold rule, sans-I/O (DESIGN.md "Roles on a node").

An executor (ip-manager, storage-monitor) holds a group only while BOTH:
- the arbiter's latest accepted command for the group says acquire, at epoch e; and
- a lease notice for that group and epoch e is valid: ``now < valid_until - margin``.

When notices stop (the lease holder died, or the node is cut off), the lease lapses and
the executor releases on its own; a revoked notice (the group was taken) releases at
once; a release command releases at once. After a restart nothing is held until a valid
notice arrives."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Why(StrEnum):
    HOLD = "hold"
    NO_COMMAND = "no acquire command"
    NO_NOTICE = "no lease notice yet"
    OTHER_EPOCH = "lease notice for another epoch"
    EXPIRED = "lease expired"
    REVOKED = "lease revoked"


@dataclass
class HoldGate:
    margin: float
    desired: dict[str, int] = field(default_factory=dict)  # group -> epoch to hold
    notices: dict[str, tuple[int, float, bool]] = field(default_factory=dict)

    def on_acquire(self, group: str, epoch: int) -> None:
        self.desired[group] = epoch

    def on_release(self, group: str) -> None:
        self.desired.pop(group, None)

    def on_notice(self, group: str, epoch: int, valid_until: float, revoked: bool) -> None:
        cur = self.notices.get(group)
        if cur is not None and epoch < cur[0]:
            return  # an older epoch's notice arriving late
        if cur is not None and epoch == cur[0] and cur[2]:
            return  # a revoke is final for its epoch
        if cur is not None and epoch == cur[0] and not revoked and not cur[2]:
            valid_until = max(valid_until, cur[1])  # notices may arrive out of order
        self.notices[group] = (epoch, valid_until, revoked)

    def verdict(self, group: str, now: float) -> Why:
        epoch = self.desired.get(group)
        if epoch is None:
            return Why.NO_COMMAND
        notice = self.notices.get(group)
        if notice is None:
            return Why.NO_NOTICE
        n_epoch, valid_until, revoked = notice
        if n_epoch != epoch:
            return Why.OTHER_EPOCH
        if revoked:
            return Why.REVOKED
        if now >= valid_until - self.margin:
            return Why.EXPIRED
        return Why.HOLD

    def should_hold(self, group: str, now: float) -> bool:
        return self.verdict(group, now) is Why.HOLD

    def valid_until(self, group: str) -> float | None:
        """When holding must stop (before the margin), or None when not holding."""
        notice = self.notices.get(group)
        if notice is None or self.desired.get(group) != notice[0] or notice[2]:
            return None
        return notice[1] - self.margin
