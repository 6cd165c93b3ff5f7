"""Checks on the event stream for the lab tests and the benchmark (issue 16): every copy
the stream holds (no dedupe), a stream's raft leader moved to a server, and one failover
of node-a measured with the event stream's leader healthy or killed with node-a."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

from vtlha import bus
from vtlha.errors import InvalidMessage
from vtlha.messages import Event, decode
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster

A_GROUPS = ("node-a-data", "node-a-mgmt")


def raw_events(c: LocalCluster) -> list[Event]:
    """Every event message in the stream, each copy (what a reader that does not dedupe
    would see)."""
    subj = Subjects(c.cfg.cluster)

    async def _go() -> list[Event]:
        nc = await c.connect()
        try:
            js = nc.jetstream(timeout=2.0)
            info = await js.stream_info(subj.events_stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    raw = await asyncio.wait_for(js.get_msg(subj.events_stream, seq), 2.0)
                    out.append(decode(Event, raw.data or b""))
                except InvalidMessage:
                    continue
            return out
        finally:
            await nc.close()

    return asyncio.run(bus.retry_js("raw events", _go, deadline=30.0))


def copies(events: list[Event]) -> dict[str, int]:
    """id -> how many copies, for ids stored more than once."""
    return {i: n for i, n in Counter(e.id for e in events).items() if n > 1}


def move_leader(c: LocalCluster, server: str, events: bool, timeout: float = 30.0) -> None:
    """Ask the KV's (or the event stream's) raft leader to step down towards ``server``
    until it is there."""
    subj = Subjects(c.cfg.cluster)
    stream = subj.events_stream if events else bus.kv_stream(subj)

    async def _ask() -> None:
        nc = await c.connect()
        try:
            await bus.prefer_leader(nc, nc.jetstream(timeout=2), stream, server)
        finally:
            await nc.close()

    def _there() -> bool:
        if c.kv_leader(events=events) == server:
            return True
        with contextlib.suppress(Exception):  # an election in progress: ask again
            asyncio.run(_ask())
        return False

    c.wait_for(_there, timeout, interval=1.0, what=f"the {stream} leader on {server}")


def failover_trial(c: LocalCluster, kill_events_leader: bool) -> dict[str, Any]:
    """node-a crashes (every process and its nats-server; links stay up). The KV's leader
    is on the witness; the event stream's is on node-a (``kill_events_leader``: it dies
    with node-a) or on the witness. Returns the failover time (crash -> node-b holds both
    groups in the KV), when the stream had the failover's events, and the events."""
    c.wait_for(c.home_held, 60, what="every group held by its home node")
    move_leader(c, "witness", events=False)
    move_leader(c, "node-a" if kill_events_leader else "witness", events=True)
    n_before = len(raw_events(c))
    t0 = time.monotonic()
    c.crash("node-a")
    c.wait_for(lambda: all(c.held_by().get(g) == "node-b" for g in A_GROUPS), 60,
               interval=0.005, what="node-b to hold node-a's groups")
    held_s = time.monotonic() - t0

    def _ended() -> bool:
        evs = raw_events(c)[n_before:]
        return all(any(e.kind == "failover.completed" and e.group == g for e in evs)
                   for g in A_GROUPS)

    c.wait_for(_ended, 60, interval=0.1, what="the failover's events in the stream")
    stored_s = time.monotonic() - t0
    evs = raw_events(c)[n_before:]
    return {"kill_events_leader": kill_events_leader, "failover_s": held_s,
            "events_stored_s": stored_s, "events": evs}
