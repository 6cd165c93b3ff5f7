"""A seed's fault plan: what goes wrong, when, and for how long; then everything heals.

Faults (each between any two steps of any process, the arbiters included): a process
crashed (restarted later, or at the heal), paused, a whole host crashed (its processes
and its NATS server), a link cut, the KV in a raft election (nobody's request answered),
a watch stalled or replaying an older value, lost, duplicated, slow and reordered
messages, stale follower reads, operator switchovers. At ``heal_at`` every fault ends,
except that one node may stay down for good (its companion is then the healthy one)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .network import Weather
from .timings import GROUPS, HOSTS, NODES, WITNESS

PROCS = tuple([f"{n}/{svc}" for n in NODES for svc in ("lease", "ip", "sm", "arbiter")]
              + [f"{WITNESS}/arbiter"])
LINKS = ((NODES[0], NODES[1]), (NODES[0], WITNESS), (NODES[1], WITNESS))


@dataclass(frozen=True)
class Fault:
    at: float
    #: crash pause host cut election stall replay switchover recreate, and traps armed
    #: for an arbiter's next claim: crash-after-claim lose-claim-answer pause-after-claim
    #: (for 2 x leader_ttl)
    kind: str
    target: str = ""
    until: float = 0.0  # when it ends by itself (crash: the restart); 0: at the heal
    arg: int = 0


@dataclass
class Plan:
    faults: list[Fault] = field(default_factory=list)
    heal_at: float = 1.5
    down_for_good: str | None = None
    stalled_for_good: tuple[str, ...] = ()  # watches the heal does not restart
    weather: Weather = field(default_factory=Weather)
    offsets: dict[str, float] = field(default_factory=dict)
    watch_lag: float = 0.005
    arbiter_lag: float = 0.01
    stale: float = 0.0


def _window(rng: random.Random, plan: Plan, longest: float) -> tuple[float, float]:
    start = rng.uniform(0.1, plan.heal_at)
    return start, min(plan.heal_at, start + rng.uniform(0.005, longest))


def _fault(rng: random.Random, plan: Plan) -> Fault:
    kind = rng.choice(("crash", "crash", "pause", "pause", "host", "cut", "cut", "election",
                       "stall", "replay", "switchover", "switchover", "trap"))
    start, end = _window(rng, plan, 0.9)
    if kind in ("crash", "pause", "stall"):
        procs = PROCS if kind != "stall" else tuple(p for p in PROCS if "lease" in p
                                                    or "arbiter" in p)
        return Fault(start, kind, rng.choice(procs), end if rng.random() < 0.7 else 0.0)
    if kind == "host":
        return Fault(start, kind, rng.choice(HOSTS), end if rng.random() < 0.5 else 0.0)
    if kind == "cut":
        a, b = rng.choice(LINKS)
        return Fault(start, kind, f"{a}|{b}", end)
    if kind == "election":
        return Fault(start, kind, "", min(plan.heal_at, start + rng.uniform(0.1, 0.8)))
    if kind == "replay":
        proc = rng.choice([p for p in PROCS if "lease" in p or "arbiter" in p])
        return Fault(start, kind, f"{proc}|{rng.choice(GROUPS)}", arg=rng.randint(0, 3))
    if kind == "trap":
        arbiter = rng.choice([p for p in PROCS if "arbiter" in p])
        return Fault(start, rng.choice(("crash-after-claim", "lose-claim-answer")), arbiter)
    return Fault(start, "switchover", rng.choice(GROUPS))


def draw(seed: int, recreate: bool = False) -> Plan:
    """The plan of ``seed``; with ``recreate`` the KV bucket is sometimes recreated (not
    by default: see docs/safety.md "The simulator", what it found; the plans then differ
    from the default ones in whether a node stays down)."""
    rng = random.Random(seed * 7919 + 1)
    plan = Plan(heal_at=rng.uniform(0.8, 1.6))
    plan.offsets = {h: rng.uniform(0.0, 1e4) for h in HOSTS}
    plan.watch_lag = rng.uniform(0.0, 0.1 if rng.random() < 0.3 else 0.01)
    plan.arbiter_lag = rng.uniform(0.0, 0.2)
    if rng.random() < 0.4:
        plan.weather = Weather(loss=rng.uniform(0.0, 0.2), dup=rng.uniform(0.0, 0.2),
                               slow=rng.uniform(0.0, 0.3), slow_delay=rng.uniform(0.0, 0.2))
    plan.stale = rng.uniform(0.0, 0.3) if rng.random() < 0.3 else 0.0
    plan.faults = sorted((_fault(rng, plan) for _ in range(rng.randint(1, 6))),
                         key=lambda f: f.at)
    if recreate and rng.random() < 0.03:
        plan.faults.append(Fault(rng.uniform(0.1, plan.heal_at), "recreate"))
    if rng.random() < 0.15:
        plan.down_for_good = rng.choice(NODES)
        plan.faults.append(Fault(rng.uniform(0.1, plan.heal_at), "host", plan.down_for_good))
        plan.faults.sort(key=lambda f: f.at)
    return plan
