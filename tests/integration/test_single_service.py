"""Rule 8 of the policy: one service of node-a dying alone (SIGKILL of its process
group: the service and what it started, as a container's death would), with real
services on loopback. The outcomes are the table in docs/policy.md, "One service
dying alone"."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from vtlha.messages import Event
from vtlha_lab.localcluster import LocalCluster
from vtlha_lab.tapeclient import status as tape_status

A_GROUPS = ("node-a-data", "node-a-mgmt")


def _ready(c: LocalCluster) -> None:
    c.start()
    c.wait_for(c.home_held, 30, what="every group held by its home node")
    c.wait_for(lambda: all(((c.status(n, "storage-monitor") or {}).get("groups", {})
                            .get(f"{n}-data", {}).get("state") == "served")
                           for n in ("node-a", "node-b")), 30, what="both data groups served")


def _events(c: LocalCluster, kind: str, **match: Any) -> list[Event]:
    return [e for e in c.events() if e.kind == kind
            and all(getattr(e, k) == v for k, v in match.items())]


def _b_serves_a(c: LocalCluster) -> bool:
    owners = c.held_by()
    done = {e.group for e in _events(c, "failover.completed")}
    return all(owners.get(g) == "node-b" for g in A_GROUPS) and set(A_GROUPS) <= done


@pytest.mark.parametrize("service", ["ip-manager", "storage-monitor"])
def test_an_executor_dying_alone_fails_the_node_over(local_cluster: LocalCluster,
                                                     service: str) -> None:
    """Heartbeats go on, but the heartbeat's built-in fatal check "executor <service>
    alive" fails: rule 1 (fatal process error) moves both of node-a's groups."""
    c = local_cluster
    _ready(c)
    n = len(c.events())
    c.procs.find("node-a", service).signal(signal.SIGKILL)
    c.wait_for(lambda: _b_serves_a(c), 30, what="node-b to serve node-a's groups")
    started = _events(c, "failover.started", group="node-a-data")
    assert started and started[-1].data.get("rule") == "fatal_process_error"
    assert f"executor {service} alive" in started[-1].reason
    after = c.events()[n:]
    assert not [e for e in after if e.kind == "node.down"]  # node-a itself is alive
    assert [e for e in after if e.kind == "failover.notify" and e.group == "node-a-data"]
    # node-b really serves: its ip-manager holds node-a's addresses, and the tape portal
    # of node-a's data group answers from node-b at the new epoch.
    c.wait_for(lambda: "198.51.100.101/32" in c.recorded_addresses("node-b"), 10,
               what="node-b's ip-manager to hold node-a's data address")
    st = asyncio.run(tape_status(f"127.0.0.1:{c.cfg.port('node-a', 'tape')}"))
    assert st["node"] == "node-b" and st["epoch"] == started[-1].epoch


def test_the_heartbeat_dying_alone_fails_the_node_over(local_cluster: LocalCluster) -> None:
    c = local_cluster
    _ready(c)
    c.procs.find("node-a", "heartbeat").signal(signal.SIGKILL)
    c.wait_for(lambda: _b_serves_a(c), 30, what="node-b to serve node-a's groups")
    assert _events(c, "node.down", old="node-a")
    started = _events(c, "failover.started", group="node-a-mgmt")
    assert started[-1].data.get("rule") == "heartbeats_stopped"
    # node-a's live executors let go on their own (lease lapsed or release acked).
    c.wait_for(lambda: (c.status("node-a", "ip-manager") or {}).get("held") == {}, 10,
               what="node-a's ip-manager to hold nothing")


def test_the_active_arbiter_dying_alone_moves_nothing(local_cluster: LocalCluster) -> None:
    c = local_cluster
    _ready(c)
    before = c.kv_groups()
    c.procs.find("witness", "arbiter").signal(signal.SIGKILL)
    active = c.wait_for(lambda: [h for h in ("node-a", "node-b")
                                 if c.arbiter_role(h) == "active"], 20,
                        what="a node's arbiter to become active")
    assert len(active) == 1
    c.wait_for(lambda: _events(c, "arbiter.active", new=active[0]), 10,
               what=f"{active[0]}'s arbiter.active event (published after its term is "
               "announced)")
    after = c.kv_groups()
    assert {g: (r.owner, r.epoch) for g, (r, _) in after.items()} == \
           {g: (r.owner, r.epoch) for g, (r, _) in before.items()}
    assert not [e for e in c.events() if e.kind.startswith("failover.")]


def test_a_standby_arbiter_dying_alone_changes_nothing(local_cluster: LocalCluster) -> None:
    c = local_cluster
    _ready(c)
    c.procs.find("node-a", "arbiter").signal(signal.SIGKILL)
    n = len(c.events())
    # A quiet period: nothing at all may happen because of it.
    with pytest.raises(TimeoutError):
        c.wait_for(lambda: [e for e in c.events()[n:]
                            if e.kind.startswith(("failover.", "arbiter.", "node."))],
                   1.5, interval=0.1, what="(nothing)")
    assert c.arbiter_role("witness") == "active"
