"""The arbiter decides at once on a heartbeat whose fatal checks changed (a fatal
check's failover does not wait for the next tick); real Arbiter, not started (no
NATS): its heartbeat handler fed real messages, its decider's ``decide_now`` counted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from vtlha_arbiter.main import Arbiter

from tests.conftest import EXAMPLE
from vtlha.config import load_config
from vtlha.messages import CheckResult, GroupRecord, Heartbeat, MgmtReport, encode


def _beat(arb: Arbiter, seq: int, *checks: CheckResult, node: str = "node-a") -> Msg:
    hb = Heartbeat(cluster=arb.config.cluster, node=node, incarnation="i1", seq=seq,
                   interval=0.1, checks=list(checks))
    return Msg(_client=None, subject=arb.subjects.hb(node), data=encode(hb))  # type: ignore[arg-type]


def test_a_fatal_check_changing_makes_a_decision_at_once(tmp_path: Path) -> None:
    async def run() -> list[int]:
        arb = Arbiter(load_config(EXAMPLE), "witness", ["nats://127.0.0.1:1"], tmp_path)
        decided: list[int] = []

        async def decide_now() -> None:
            decided.append(arb.view.nodes["node-a"].seq)

        arb.decider.decide_now = decide_now  # type: ignore[method-assign]
        ok = CheckResult(name="vtl-daemon", ok=True, fatal=True)
        bad = CheckResult(name="vtl-daemon", ok=False, fatal=True)
        ui_bad = CheckResult(name="vtl-ui", ok=False, fatal=False)

        async def feed(msg: Msg) -> None:
            await arb._on_heartbeat(msg)
            await asyncio.gather(*[t for t in arb._tasks if t.get_name() == "decide-on-check"])

        await feed(_beat(arb, 0, bad))  # not ready yet (starting): the tick decides
        arb.ready = True
        await feed(_beat(arb, 1, ok))  # recovered: a decision
        await feed(_beat(arb, 2, ok))  # nothing changed
        await feed(_beat(arb, 3, bad))  # began failing: a decision
        await feed(_beat(arb, 4, bad, ui_bad))  # a non-fatal one: the tick's
        await feed(_beat(arb, 4, ok))  # a repeated seq is dropped: nothing
        await feed(_beat(arb, 5, ok, ui_bad))  # the fatal one ceased failing: a decision
        await feed(_beat(arb, 0, bad, node="node-b"))  # node-b's first, failing: a decision
        return decided

    assert asyncio.run(run()) == [1, 3, 5, 5]


def test_a_late_node_gets_a_decision_when_it_is_due_to_be_dead(tmp_path: Path) -> None:
    """A node whose last heartbeat is 1.5 intervals old is late: the decider sets one
    timer for when it would be dead (the latest of its heartbeat and its groups'
    renewals, plus dead_after) and decides then — not up to a tick later."""
    async def run() -> None:
        arb = Arbiter(load_config(EXAMPLE), "witness", ["nats://127.0.0.1:1"], tmp_path)
        dec = arb.decider
        due_at: list[tuple[float, bool]] = []
        fired = asyncio.Event()

        async def decide_now() -> None:
            now = time.monotonic()
            due_at.append((now, arb.view.is_alive("node-a", now)))
            fired.set()

        dec.decide_now = decide_now  # type: ignore[method-assign]
        await arb._on_heartbeat(_beat(arb, 0))
        last = arb.view.nodes["node-a"].last_heartbeat
        assert last is not None
        dead_after = arb.config.timings.dead_after
        dec.watch_nodes(last + 0.05, acting=True)  # on time: no watch
        assert dec.death_watch == {}
        dec.watch_nodes(last + 0.2, acting=False)  # a standby decides nothing
        assert dec.death_watch == {}
        # a renewal of node-a's group seen after its heartbeat: dead later than that
        rec = GroupRecord(owner="node-a", term=1, epoch=1, state="held", renewed_by="node-a")
        arb.view.set_record("node-a-data", rec, 5, last + 0.02)
        dec.watch_nodes(last + 0.2, acting=True)
        dec.watch_nodes(last + 0.25, acting=True)  # the same due: one timer
        assert dec.death_watch == {"node-a": pytest.approx(last + 0.02 + dead_after)}
        await asyncio.wait_for(fired.wait(), 10)
        (at, alive), = due_at
        assert at >= last + 0.02 + dead_after and not alive
        assert dec.death_watch == {}

    asyncio.run(run())


def test_a_management_path_changing_makes_a_decision_at_once(tmp_path: Path) -> None:
    async def run() -> list[bool | None]:
        arb = Arbiter(load_config(EXAMPLE), "witness", ["nats://127.0.0.1:1"], tmp_path)
        arb.ready = True
        decided: list[bool | None] = []

        async def decide_now() -> None:
            m = arb.view.nodes["node-a"].mgmt
            decided.append(m.healthy if m is not None and m.monitored else None)

        arb.decider.decide_now = decide_now  # type: ignore[method-assign]

        async def report(healthy: bool, monitored: bool = True) -> None:
            r = MgmtReport(cluster=arb.config.cluster, node="node-a", link_up=healthy,
                           healthy=healthy, monitored=monitored)
            await arb._on_mgmt(Msg(_client=None, subject=arb.subjects.mgmt("node-a"),  # type: ignore[arg-type]
                                   data=encode(r)))
            await asyncio.gather(*[t for t in arb._tasks if t.get_name() == "decide-on-mgmt"])

        await report(True)  # the first word: healthy (was nothing)
        await report(True)  # the same: the tick's
        await report(False)  # failed: at once
        await report(False)
        await report(True, monitored=False)  # not measured: unknown
        return decided

    assert asyncio.run(run()) == [True, False, None]
