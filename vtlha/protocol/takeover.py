"""The arbiter's takeover rules, sans-I/O (DESIGN.md "Safety", claim -> release ->
acquire). The arbiter's runner carries them out; these functions decide."""

from __future__ import annotations


def claim_epoch(seen_epoch: int) -> int:
    """A claim writes the next epoch; it is a compare-and-set against the revision the
    arbiter last saw, so a renewal it did not see makes it fail."""
    return seen_epoch + 1


def acquire_wait(*, released_all: bool, last_renewal_seen: float | None, now: float,
                 lease_ttl: float, margin: float) -> float:
    """How long (a duration, from ``now``) the new owner must still wait before it may
    serve: 0 when every executor of the old owner acknowledged the release; otherwise
    what may remain of the old owner's lease, bounded by ``lease_ttl + margin`` after the
    last renewal the arbiter saw (that renewal was sent before it was seen), or the whole
    ``lease_ttl + margin`` when it saw none (a new arbiter, or after a restart)."""
    if released_all:
        return 0.0
    bound = lease_ttl + margin
    if last_renewal_seen is None:
        return bound
    return max(0.0, last_renewal_seen + bound - now)
