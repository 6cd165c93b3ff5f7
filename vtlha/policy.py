"""The failover policy: ``decide(snapshot, now) -> Decision``. Pure.

No I/O, no clock reads, no NATS: everything the policy knows is in the snapshot,
and ``now`` is the arbiter's monotonic clock passed in. The runner feeds it and
carries out the actions it returns; every action carries a status sentence (as
Patroni's loop returns one) and the name of the rule that made it, and the event
that records it carries ``snapshot.to_inputs()`` so the decision can be re-run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Rule(StrEnum):
    ALL_HEALTHY = "all_healthy"
    INITIAL_ASSIGN = "initial_assign"
    HEARTBEATS_STOPPED = "heartbeats_stopped"
    NODE_BACK = "node_back"
    BOTH_DOWN = "both_down"
    RESUME_ACQUIRE = "resume_acquire"


@dataclass(frozen=True)
class NodeView:
    """What the arbiter knows of one node. Times are the arbiter's monotonic clock."""

    name: str
    last_heartbeat: float | None = None
    incarnation: str | None = None
    declared_down: bool = False


@dataclass(frozen=True)
class GroupView:
    name: str
    home: str
    kind: str  # "data" | "mgmt"
    owner: str | None = None  # None: no KV record yet
    epoch: int = 0
    state: str | None = None
    revision: int = 0


@dataclass(frozen=True)
class PairView:
    name: str
    nodes: tuple[str, str]
    failback: str = "manual"
    maintenance: bool = False


@dataclass(frozen=True)
class Snapshot:
    dead_after: float
    started_at: float  # when the arbiter began watching (monotonic)
    pairs: tuple[PairView, ...]
    nodes: dict[str, NodeView]
    groups: dict[str, GroupView]
    in_flight: frozenset[str] = frozenset()  # groups with a takeover under way
    initial_assign_wait: float = 0.0  # an unowned group waits this long for its home node

    def to_inputs(self) -> dict[str, Any]:
        d = asdict(self)
        d["in_flight"] = sorted(self.in_flight)
        return d

    @classmethod
    def from_inputs(cls, d: dict[str, Any]) -> Snapshot:
        return cls(
            dead_after=d["dead_after"],
            started_at=d["started_at"],
            pairs=tuple(
                PairView(p["name"], tuple(p["nodes"]), p["failback"], p["maintenance"])
                for p in d["pairs"]
            ),
            nodes={k: NodeView(**v) for k, v in d["nodes"].items()},
            groups={k: GroupView(**v) for k, v in d["groups"].items()},
            in_flight=frozenset(d["in_flight"]),
            initial_assign_wait=d.get("initial_assign_wait", 0.0),
        )


# ---- actions -----------------------------------------------------------------


@dataclass(frozen=True)
class MarkDown:
    node: str
    pair: str
    status: str
    rule: Rule


@dataclass(frozen=True)
class MarkUp:
    node: str
    pair: str
    status: str
    rule: Rule


@dataclass(frozen=True)
class Assign:
    group: str
    node: str
    pair: str
    status: str
    rule: Rule


@dataclass(frozen=True)
class Takeover:
    group: str
    old: str
    new: str
    pair: str
    epoch: int  # epoch the arbiter saw; the claim writes epoch + 1
    revision: int  # revision the arbiter saw; the claim is a CAS against it
    status: str
    rule: Rule


@dataclass(frozen=True)
class Resume:
    """Finish an acquisition left half done (an arbiter restarted mid-takeover, or the
    new owner's executors did not answer in time)."""

    group: str
    node: str
    pair: str
    epoch: int
    revision: int
    status: str
    rule: Rule


Action = MarkDown | MarkUp | Assign | Takeover | Resume


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...] = field(default_factory=tuple)

    @property
    def status(self) -> str:
        if not self.actions:
            return "no action: every node is as expected"
        return "; ".join(a.status for a in self.actions)


# ---- predicates --------------------------------------------------------------


def heartbeat_age(node: NodeView, now: float) -> float | None:
    return None if node.last_heartbeat is None else now - node.last_heartbeat


def is_alive(node: NodeView, now: float, dead_after: float) -> bool:
    age = heartbeat_age(node, now)
    return age is not None and age <= dead_after


def is_dead(node: NodeView, snap: Snapshot, now: float) -> bool:
    """Dead: no heartbeat for dead_after, counting from the arbiter's own start for a
    node it has never heard (so a restarting arbiter does not fail everything over)."""
    since = node.last_heartbeat if node.last_heartbeat is not None else snap.started_at
    return now - since > snap.dead_after


def _silence(node: NodeView, now: float) -> str:
    age = heartbeat_age(node, now)
    if age is None:
        return f"no heartbeat from {node.name} since the arbiter started"
    return f"heartbeats from {node.name} stopped {age:.2f} s ago"


# ---- the policy --------------------------------------------------------------


def decide(snap: Snapshot, now: float) -> Decision:
    actions: list[Action] = []
    for pair in snap.pairs:
        actions += _decide_pair(snap, pair, now)
    return Decision(tuple(actions))


def _decide_pair(snap: Snapshot, pair: PairView, now: float) -> list[Action]:
    out: list[Action] = []
    dead = {n for n in pair.nodes if is_dead(snap.nodes[n], snap, now)}
    for n in pair.nodes:
        view = snap.nodes[n]
        if n in dead and not view.declared_down:
            out.append(MarkDown(n, pair.name, f"{n} is down: {_silence(view, now)}",
                                Rule.HEARTBEATS_STOPPED))
        elif n not in dead and view.declared_down:
            out.append(MarkUp(n, pair.name,
                              f"{n} is back (heartbeats resumed); failback is {pair.failback}",
                              Rule.NODE_BACK))
    for g in sorted(snap.groups.values(), key=lambda g: g.name):
        if g.home not in pair.nodes or g.name in snap.in_flight:
            continue
        action = _decide_group(snap, pair, g, dead, now)
        if action is not None:
            out.append(action)
    return out


def _other(pair: PairView, node: str) -> str:
    return pair.nodes[1] if pair.nodes[0] == node else pair.nodes[0]


def _decide_group(
    snap: Snapshot, pair: PairView, g: GroupView, dead: set[str], now: float
) -> Action | None:
    if g.owner is None:
        return _initial_owner(snap, pair, g, dead, now)
    if g.owner not in dead:
        if g.state == "acquiring" and is_alive(snap.nodes[g.owner], now, snap.dead_after):
            return Resume(g.name, g.owner, pair.name, g.epoch, g.revision,
                          f"{g.owner} finishes acquiring {g.name} (epoch {g.epoch})",
                          Rule.RESUME_ACQUIRE)
        return None
    new = _other(pair, g.owner)
    if new in dead or pair.maintenance:
        return None
    return Takeover(
        g.name, g.owner, new, pair.name, g.epoch, g.revision,
        f"{new} takes over {g.name}: {_silence(snap.nodes[g.owner], now)}",
        Rule.HEARTBEATS_STOPPED,
    )


def _initial_owner(
    snap: Snapshot, pair: PairView, g: GroupView, dead: set[str], now: float
) -> Action | None:
    if is_alive(snap.nodes[g.home], now, snap.dead_after):
        return Assign(g.name, g.home, pair.name,
                      f"{g.home} serves its home group {g.name}", Rule.INITIAL_ASSIGN)
    other = _other(pair, g.home)
    waited = now - snap.started_at > snap.initial_assign_wait
    if g.home in dead and other not in dead and waited and not pair.maintenance:
        return Assign(g.name, other, pair.name,
                      f"{other} serves {g.name}: its home {g.home} is down "
                      f"({_silence(snap.nodes[g.home], now)})", Rule.INITIAL_ASSIGN)
    return None
