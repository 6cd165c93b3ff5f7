"""The simulated cluster's timings and the liveness bound (``docs/safety.md``)."""

from __future__ import annotations

from dataclasses import dataclass

NODES = ("node-a", "node-b")
WITNESS = "witness"
HOSTS = (*NODES, WITNESS)
GROUPS = tuple(f"{n}-{kind}" for n in NODES for kind in ("data", "mgmt"))


def home(group: str) -> str:
    return group.rsplit("-", 1)[0]


def companion(node: str) -> str:
    return NODES[1] if node == NODES[0] else NODES[0]


def executors_of(group: str) -> tuple[str, ...]:
    """The services that carry a group out: the ip-manager, and the storage-monitor for
    a data group."""
    return ("ip", "sm") if group.endswith("-data") else ("ip",)


@dataclass(frozen=True)
class Timings:
    lease_ttl: float = 0.3
    margin: float = 0.03
    interval: float = 0.1  # renewal, heartbeat and decision cadence
    tick: float = 0.05  # the lease holder's tick
    dead_after: float = 0.3
    leader_ttl: float = 0.6
    standby_delay: float = 0.3
    command_timeout: float = 0.1
    kv_timeout: float = 0.1  # a KV request unanswered this long: unavailable
    promise_timeout: float = 0.1
    max_delay: float = 0.004  # one-way network delay, uniform in [0, max_delay]
    acquire_deadline: float = 1.0  # the mover gives a takeover up after this

    def liveness_bound(self) -> float:
        """From the moment every fault has healed (a KV majority, the witness and one node
        healthy) until every group is served again, at most:

        - an active arbiter: ``leader_ttl`` (the lapsed key's holder is taken over) plus a
          poll (``leader_ttl/6``), plus ``standby_delay`` when the next one is a node's
          (the witness's arbiter crashed: a trap sprang on it after the heal);
        - its hold-off: ``lease_ttl`` (the term announcement runs within it);
        - a decision: ``interval`` (its cadence) — a dead owner is declared within
          ``dead_after`` ≤ the two lines above;
        - the claim and the acquire gate: ``lease_ttl + margin`` (the old owner's lease),
          overlapping a restarted lease holder's own ``lease_ttl`` embargo;
        - the first renewal and the notice: ``tick + kv_timeout`` (one lost or stalled
          write retried).
        """
        return (self.leader_ttl + self.leader_ttl / 6 + self.standby_delay
                + 2 * self.lease_ttl + self.margin + self.interval + self.tick
                + self.kv_timeout)
