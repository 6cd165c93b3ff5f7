"""The state that decides whether an arbiter's event is due survives a change of the
active arbiter (issue 16), with real services on loopback: no second ``node.down``
after an arbiter change during a node's outage (and one ``node.up`` when it is back),
and every ``<kind>.started`` ends with ``.completed``/``.failed``, by whichever arbiter
finishes it."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from vtlha.eventstate import EventState
from vtlha.messages import Event, decode
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster

A_GROUPS = ("node-a-data", "node-a-mgmt")


def _of(c: LocalCluster, kind: str, **match: Any) -> list[Event]:
    return [e for e in c.events() if e.kind == kind
            and all(getattr(e, k) == v for k, v in match.items())]


def _since(c: LocalCluster, t: float, kind: str, **match: Any) -> list[Event]:
    return [e for e in _of(c, kind, **match) if e.sent_at >= t]


def _event_state(c: LocalCluster, pair: str) -> EventState | None:
    async def _go() -> EventState | None:
        nc = await c.connect()
        try:
            subj = Subjects(c.cfg.cluster)
            kv = await nc.jetstream().key_value(subj.kv_bucket)
            return decode(EventState, (await kv.get(subj.event_state_key(pair))).value or b"")
        except Exception:
            return None
        finally:
            await nc.close()

    return asyncio.run(_go())


def _new_active(c: LocalCluster) -> str:
    c.procs.find("witness", "arbiter").signal(signal.SIGKILL)
    (active,) = c.wait_for(lambda: [h for h in ("node-a", "node-b")
                                    if c.arbiter_role(h) == "active"], 20,
                           what="a node's arbiter to become active")
    c.wait_for(lambda: _of(c, "arbiter.active", new=active), 10,
               what=f"{active}'s arbiter.active event")
    return str(active)


def test_an_arbiter_change_during_a_node_outage_sends_no_second_node_down(
        local_cluster: LocalCluster) -> None:
    c = local_cluster
    c.start()
    c.wait_for(c.home_held, 30, what="every group held by its home node")
    # (a node whose heartbeat starts late is declared down and up once at start: only
    # what follows the crash counts)
    t_crash = time.time()
    c.crash("node-a")
    c.wait_for(lambda: all(c.held_by().get(g) == "node-b" for g in A_GROUPS), 30,
               what="node-b to hold node-a's groups")
    assert len(_since(c, t_crash, "node.down", old="node-a")) == 1
    c.wait_for(lambda: (s := _event_state(c, "pair-1")) is not None and "node-a" in s.down,
               10, what="the KV to record node-a as declared down")
    active = _new_active(c)
    assert active == "node-b"  # node-a's arbiter died with node-a
    # The new arbiter decides (hold-off over, several ticks) and says nothing new.
    c.wait_for(lambda: (c.status("node-b", "arbiter") or {}).get("acting"), 10,
               what="node-b's arbiter acting")
    with pytest.raises(TimeoutError):
        c.wait_for(lambda: len(_since(c, t_crash, "node.down", old="node-a")) > 1,
                   c.cfg.timings.lease_ttl + 2.0, interval=0.1, what="(no second node.down)")
    assert (c.status("node-b", "arbiter") or {})["nodes"]["node-a"]["declared_down"]
    # node-a back: exactly one node.up, from the new active arbiter.
    c.start_node("node-a")
    c.wait_for(lambda: _since(c, t_crash, "node.up", new="node-a"), 30,
               what="node.up for node-a")
    (up,) = _since(c, t_crash, "node.up", new="node-a")
    assert up.node == "node-b"
    c.wait_for(lambda: (s := _event_state(c, "pair-1")) is not None and not s.down, 10,
               what="the KV to record nobody down")


def test_every_started_move_ends_once_when_the_arbiter_dies_in_the_middle(
        local_cluster: LocalCluster) -> None:
    c = local_cluster
    c.start()
    c.wait_for(c.home_held, 30, what="every group held by its home node")
    c.wait_for(lambda: all(((c.status(n, "storage-monitor") or {}).get("groups", {})
                            .get(f"{n}-data", {}).get("state") == "served")
                           for n in ("node-a", "node-b")), 30, what="both data groups served")
    # node-a's lease holder dies: its groups move to node-b, the data group's storage
    # takes a while to be served (the tape service starts) - the arbiter is killed then.
    c.procs.find("node-a", "heartbeat").signal(signal.SIGKILL)
    c.wait_for(lambda: _of(c, "failover.started", group="node-a-data"), 20,
               what="failover.started for node-a-data")
    ended_before = _of(c, "failover.completed", group="node-a-data")
    c.procs.find("witness", "arbiter").signal(signal.SIGKILL)
    c.wait_for(lambda: [h for h in ("node-a", "node-b") if c.arbiter_role(h) == "active"],
               20, what="a node's arbiter to become active")
    c.wait_for(lambda: all(_ends(c, g) for g in A_GROUPS), 60,
               what="an end for every started move")
    for g in A_GROUPS:
        started = _of(c, "failover.started", group=g)
        ends = _ends(c, g)
        assert len(started) == 1 and len(ends) == 1, (g, started, ends)
        assert ends[0].data["started"] == started[0].id
    adopted = [e for g in A_GROUPS for e in _ends(c, g) if e.data.get("adopted")]
    print(f"\nends by the new arbiter: {[(e.group, e.kind) for e in adopted]}; "
          f"data group ended before the kill: {bool(ended_before)}")
    c.wait_for(lambda: (s := _event_state(c, "pair-1")) is not None and not s.started, 10,
               what="the KV to record no unfinished move")


def _ends(c: LocalCluster, group: str) -> list[Event]:
    return [e for e in c.events() if e.group == group
            and e.kind in ("failover.completed", "failover.failed")]


async def test_the_store_writes_by_compare_and_set_and_a_conflict_reads_again(
        nats_server: Any, request: pytest.FixtureRequest) -> None:
    import logging

    import nats

    from tests.conftest import cluster_name
    from vtlha import bus
    from vtlha.eventstate import EventStateStore, EventStateSync, make_state

    subj = Subjects(cluster_name(request))
    nc = await nats.connect(nats_server.spec.url)
    try:
        kv = await bus.ensure_kv(nc.jetstream(), subj, replicas=1)
        log = logging.getLogger("test")
        mine = EventStateStore(kv, subj, ["pair-1"], log)
        other = EventStateStore(kv, subj, ["pair-1"], log)
        assert await mine.load() == {"pair-1": EventState()}
        down = make_state(["node-a"], {}, [], [])
        assert await mine.write("pair-1", down)
        assert (await other.load())["pair-1"] == down
        # another arbiter wrote in between: refused, read again, the next sync writes
        await other.write("pair-1", make_state([], {"node-b": ["x"]}, [], []))
        wanted = make_state(["node-a", "node-b"], {}, [], [])
        assert not await mine.write("pair-1", wanted)
        assert mine.written["pair-1"].alarms == {"node-b": ["x"]}
        acting = True
        sync = EventStateSync(mine, lambda: {"pair-1": wanted}, lambda: acting)
        await sync.sync()
        assert (await other.load())["pair-1"] == wanted
        # load_changed: only what someone else changed since this store last saw it
        assert await mine.load_changed() == {}
        await other.write("pair-1", EventState())
        assert await mine.load_changed() == {"pair-1": EventState()}
        assert await EventStateStore(kv, subj, ["pair-1"], log).load_changed() == {
            "pair-1": EventState()}  # a fresh store: everything
        await mine.write("pair-1", wanted)
        # not acting: nothing is written
        acting = False
        sync.current = lambda: {"pair-1": EventState()}
        await sync.sync()
        assert (await other.load())["pair-1"] == wanted
    finally:
        await nc.close()
