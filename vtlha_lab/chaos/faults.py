"""The chaos suite's fault table: one row per fault kind, machine-readable.

Each row says what the fault does, how the runner undoes it, which moves and events it
must (or must not) cause, and two **recovery bounds** as formulas over the cluster's
timings (``timings`` of the cluster file) and a few measured constants (``CONSTANTS``):

- ``address_bound``: from the fault's start until every floating address is answered
  again (by exactly one node) and stays so;
- ``data_bound``: from the fault's start until every data group's tape portal
  acknowledges blocks again.

The checker (``vtlha_lab.chaos.checker``) and the generated docs (``docs/policy.md``'s
fault rows, the bound in ``docs/safety.md``: ``vtlha-lab chaos docs``) read this table
and nothing else: it is the only copy of these expectations."""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Moves(StrEnum):
    """Whether a fault may move groups between nodes."""

    NONE = "none"    # any move started during the fault's window is needless
    MAY = "may"      # a move may or may not happen (depends on timing, restart delay)
    MUST = "must"    # the victim's groups must move (and their events appear)


#: Measured constants the bounds use (seconds), with where they come from.
CONSTANTS: dict[str, tuple[float, str]] = {
    "slack": (0.5, "scheduling slack on a loaded 2-core machine (observer rounds, "
                   "arbiter ticks, process wake-ups)"),
    "service_start": (8.0, "a Python service's start to its first answer "
                           "(docs/architecture.md: 1-8 s measured)"),
    "storage_start": (3.0, "reservations taken and the tape data service started on the "
                           "new owner"),
    "raft_election": (8.1, "a JetStream stream leader election after its leader died "
                           "(PLATFORM.md: 4.3-8.1 s)"),
    "monitor_interval": (10.0, "the default resource agent's monitor interval (the "
                               "monitors are checked every 0.5 s)"),
    "cli": (2.0, "an operator command (`vtlha failback`, `vtlha clear-hold`): process "
                 "start and the request"),
}

#: The runner's wait, after a fault is undone, until every group is served at its home
#: node again (killed services restarted, `vtlha clear-hold`, `vtlha failback`).
BASELINE_BOUND = ("service_start + (rise + 1) * check_interval + dead_after + lease_ttl"
                  " + margin + storage_start + cli + 2 * slack")


@dataclass(frozen=True)
class Fault:
    kind: str
    does: str
    recovery: str
    moves: Moves
    events: tuple[str, ...]        # kinds that must appear in the window (may be empty)
    address_bound: str             # formula (seconds from the fault's start)
    data_bound: str                # formula (seconds from the fault's start)
    duration: str = "0"            # formula: how long the fault lasts before it is undone
    window: str = "0"              # formula: the runner watches at least this long
    notes: str = ""
    #: the move waits while the group moved less than failback_hold_time ago (the
    #: policy's hold after a move): then a move is not required during the fault
    waits_for_hold: bool = False


_FAILOVER = "dead_after + lease_ttl + margin + slack"
_CHECK = "(fall + 1) * check_interval + heartbeat_interval + lease_ttl + margin + slack"
#: a storage failure: ``fall`` probes in a row fail, each after up to ``probe_timeout``
#: (a dropped path answers nothing), then the report goes stale on the arbiter's side
_STORAGE = ("fall * (probe_interval + probe_timeout) + probe_interval + storage_stale_after"
            " + lease_ttl + margin + storage_start + slack")

FAULTS: tuple[Fault, ...] = (
    Fault("kill-heartbeat", "SIGKILL of a node's heartbeat service (its lease holder)",
          "the supervisor restarts it (after its delay, or never: then the baseline does)",
          Moves.MUST, ("node.down", "failover.started", "failover.completed"),
          _FAILOVER, _FAILOVER + " + storage_start",
          notes="a restart rarely fits in dead_after: the node's groups fail over"),
    Fault("kill-ip-manager", "SIGKILL of a node's ip-manager",
          "supervisor restart", Moves.MUST,
          ("check.alarm", "failover.started", "failover.completed"),
          _CHECK, _CHECK + " + storage_start",
          notes="the built-in fatal check moves both groups; the fence lapses at lease end"),
    Fault("kill-storage-monitor", "SIGKILL of a node's storage-monitor (its data service "
          "dies with it)", "supervisor restart", Moves.MUST,
          ("check.alarm", "failover.started", "failover.completed"),
          _CHECK, _CHECK + " + storage_start"),
    Fault("kill-arbiter", "SIGKILL of a node's arbiter (a standby)", "supervisor restart",
          Moves.NONE, (), "slack", "slack"),
    Fault("kill-active-arbiter", "SIGKILL of the active arbiter (normally the witness's)",
          "supervisor restart", Moves.NONE, ("arbiter.active",), "slack", "slack",
          window="leader_ttl + leader_standby_delay + lease_ttl + slack",
          notes="a standby takes the leader key after leader_ttl"),
    Fault("kill-arbiter-at-claim", "a node's heartbeat killed, and the active arbiter "
          "SIGKILLed the moment its claim of a group is stored in the KV (state "
          "acquiring, as a KV watch shows it)",
          "supervisor restarts both", Moves.MUST,
          ("node.down", "failover.started", "arbiter.active", "failover.completed"),
          "leader_ttl + leader_standby_delay + lease_ttl + " + _FAILOVER,
          "leader_ttl + leader_standby_delay + lease_ttl + " + _FAILOVER + " + storage_start",
          notes="the new active arbiter finishes the half-done takeover (resume_acquire)"),
    Fault("kill-tape-service", "SIGKILL of the tape data service on the node serving a "
          "data group", "the storage-monitor's monitor finds it gone and restarts it on "
          "the node (stop, start); the second failure there within failure_timeout "
          "(migration_threshold 2) gives the group up and the companion takes it over "
          "(storage_local_failure)", Moves.MAY, ("storage.agent_failed",),
          "monitor_interval + lease_ttl + margin + slack",
          "monitor_interval + lease_ttl + margin + storage_start + slack",
          notes="a group given up moves with its address (the address bound is the "
                "move's); a group given up less than failback_hold_time after its last "
                "move waits for the policy's hold after a move, unserved"),
    Fault("stop-service", "SIGSTOP of one service of a node, SIGCONT after the duration",
          "SIGCONT", Moves.MAY, (), _CHECK + " + dead_after",
          _CHECK + " + dead_after + storage_start", duration="3 * lease_ttl + dead_after"),
    Fault("stop-node", "SIGSTOP of every process of a node, its nats-server included; "
          "SIGCONT after the duration", "SIGCONT", Moves.MUST,
          ("node.down", "failover.started", "failover.completed"),
          _FAILOVER, _FAILOVER + " + storage_start", duration="3 * lease_ttl + dead_after"),
    Fault("cut-links", "a node's links (data and management) down, up after the duration",
          "links up", Moves.MUST, ("node.down", "failover.started", "failover.completed"),
          _FAILOVER, _FAILOVER + " + storage_start", duration="3 * lease_ttl + dead_after"),
    Fault("cut-witness", "a node cut from the witness only (nftables drop of the NATS "
          "client and route ports between them, both ways)", "the drop removed",
          Moves.MAY, (), "raft_election + " + _FAILOVER,
          "raft_election + " + _FAILOVER + " + storage_start",
          duration="3 * lease_ttl + dead_after",
          notes="liveness is not guaranteed in this topology (docs/safety.md)"),
    Fault("kill-nats", "SIGKILL of one nats-server (a node's or the witness's), restarted "
          "after the duration", "restart with the same store", Moves.NONE, (),
          "slack", "slack", duration="2 * lease_ttl"),
    Fault("kill-nats-leader", "SIGKILL of the nats-server leading the KV stream, restarted "
          "after the duration", "restart with the same store", Moves.NONE, (),
          "raft_election + slack", "raft_election + slack", duration="2 * lease_ttl",
          notes="both nodes serve on mutual promises during the election"),
    Fault("cut-path", "one storage path of a node cut (nftables drop of one SAN port)",
          "the drop removed", Moves.NONE, (), "slack", "probe_timeout + slack",
          duration="fall * probe_interval + probe_timeout + 2 * probe_interval",
          notes="a device stays served while one of its paths is up"),
    Fault("cut-all-paths", "every storage path of a node cut", "the drops removed",
          Moves.MUST, ("storage.device_lost", "failover.started", "failover.completed"),
          _STORAGE, _STORAGE, duration=_STORAGE, waits_for_hold=True,
          notes="the data group moves (its address with it), the management group stays"),
    Fault("device-fail", "one device fails for both nodes (its backing file truncated: EIO)",
          "the backing file restored to its size", Moves.NONE,
          ("storage.global_failure",), "slack",
          "storage_settle + " + _STORAGE + " + (rise + 1) * probe_interval + slack",
          duration="storage_settle + " + _STORAGE,
          notes="a global failure: an alarm, no failover; the data group's writes to that "
                "device fail meanwhile"),
    Fault("mgmt-down", "a node's management link down", "link up", Moves.MUST,
          ("failover.started", "failover.completed"),
          "(fall + 1) * probe_interval + lease_ttl + margin + slack", "slack",
          duration="(fall + 2) * probe_interval + lease_ttl + margin + 1",
          waits_for_hold=True, notes="the management group alone moves"),
    Fault("flap", "a node's data link down and up repeatedly (5 x 0.1 s down, 0.2 s up)",
          "link up", Moves.MAY, (), _FAILOVER + " + 1.5",
          _FAILOVER + " + 1.5 + storage_start", duration="1.5"),
    Fault("standby", "an operator puts a node in standby (`vtlha standby on --yes`); "
          "`standby off` after the duration",
          "standby off (its groups stay on the companion: the baseline fails back)",
          Moves.MUST, ("node.standby", "switchover.started", "switchover.completed"),
          "cli + 2 * lease_ttl + dead_after + " + _FAILOVER,
          "cli + 2 * lease_ttl + dead_after + " + _FAILOVER + " + storage_start",
          duration="cli + 2 * lease_ttl + dead_after",
          notes="every group of the node moves to its companion at the request; with another "
                "fault on the companion its groups wait for `standby off` (a node in "
                "standby is given nothing): the duration is in the bound"),
    Fault("double", "two of the other faults at once (on either or both nodes)",
          "both recoveries", Moves.MAY, (),
          "max of the two", "max of the two",
          notes="moves: none only when both allow none, otherwise may (one fault can "
                "mask the other's); no event required; the larger of the two bounds"),
    Fault("hostile", "hostile input on every subject: malformed JSON, wrong types, huge "
          "and negative numbers, NaN, oversized messages, commands with stale terms",
          "none needed",
          Moves.NONE, (), "slack", "slack", duration="1"),
)

BY_KIND: dict[str, Fault] = {f.kind: f for f in FAULTS}
#: kinds that ``double`` combines
SINGLE_KINDS: tuple[str, ...] = tuple(f.kind for f in FAULTS
                                      if f.kind not in ("double", "kill-arbiter-at-claim"))

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def names(timings: Mapping[str, float]) -> dict[str, float]:
    """What a formula may name: the timings and the constants."""
    return {**{k: v for k, (v, _) in CONSTANTS.items()}, **dict(timings)}


def evaluate(formula: str, timings: Mapping[str, float]) -> float:
    """A formula's value: numbers, names, + - * / and parentheses, nothing else."""
    env = names(timings)

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise ValueError(f"{formula!r}: unknown name {node.id}")
            return float(env[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](ev(node.left), ev(node.right)))
        raise ValueError(f"{formula!r}: only numbers, names, + - * / and parentheses")

    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"{formula!r}: not a formula: {exc.msg}") from None
    return ev(tree)


@dataclass(frozen=True)
class Expectation:
    """What the checker expects of one iteration (one fault, or two at once)."""

    kinds: tuple[str, ...]
    moves: Moves
    events: tuple[str, ...]
    address_bound: float
    data_bound: float
    window: float = 0.0


def expectation(kinds: tuple[str, ...], timings: Mapping[str, float],
                held: bool = False) -> Expectation:
    """What one iteration must show; ``held``: a group moved less than
    failback_hold_time before the fault (a row that ``waits_for_hold`` then need not
    move anything)."""
    rows = [BY_KIND[k] for k in kinds if k != "double"]
    if not rows:
        raise ValueError(f"no fault kind in {kinds}")
    order = [Moves.NONE, Moves.MAY, Moves.MUST]
    if len(rows) == 1:
        moves = rows[0].moves
    else:  # two faults: a required move of one may be prevented by the other
        moves = max((r.moves for r in rows), key=order.index)
        moves = Moves.MAY if moves is Moves.MUST else moves
    evs = rows[0].events if len(rows) == 1 else ()
    if held and len(rows) == 1 and rows[0].waits_for_hold and moves is Moves.MUST:
        moves = Moves.MAY
        evs = tuple(e for e in evs if not e.startswith("failover."))
    return Expectation(
        kinds=tuple(kinds), moves=moves, events=evs,
        address_bound=max(evaluate(r.address_bound, timings) for r in rows),
        data_bound=max(evaluate(r.data_bound, timings) for r in rows),
        window=max(evaluate(r.window, timings) for r in rows))


def duration(kind: str, timings: Mapping[str, float]) -> float:
    return evaluate(BY_KIND[kind].duration, timings)
