"""The arbiter's mover against a real nats-server (no services): an automatic claim
decided on a stale view — a stalled ``group.>`` watch, the owner renewing meanwhile —
re-reads the key, which brings the view up to date (issue 14: before, an automatic claim
lost its compare-and-set on every tick, forever). An owner decided dead that renewed
since is alive: that claim is given up (``owner_renewed``), and the next decision, on the
fresh revision, wins once the renewals have stopped (``policy.renews``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry, Counter
from vtlha_arbiter.mover import Mover
from vtlha_arbiter.records import GroupRecords
from vtlha_arbiter.term import Activation
from vtlha_arbiter.view import ClusterView

from tests.conftest import EXAMPLE
from vtlha import bus
from vtlha.config import load_config
from vtlha.messages import GroupRecord, decode, encode
from vtlha.policy import Rule, Takeover
from vtlha.subjects import Subjects
from vtlha_lab.natsserver import NatsServer

CFG = load_config(EXAMPLE)
GROUP = "node-a-mgmt"


class _Host:
    """What the mover needs of the service: the real connection, events recorded."""

    def __init__(self, nc: NATS, cluster: str) -> None:
        self.config = CFG.model_copy(update={"cluster": cluster})
        self.node = "witness"
        self.subjects = Subjects(cluster)
        self.log = logging.getLogger("test")
        self.registry = CollectorRegistry()
        self.invalid_messages = Counter("x_invalid", "x", ["kind"], registry=self.registry)
        self._nc = nc
        self.stopping = False
        self.events: list[str] = []
        self.emitted = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def nc(self) -> NATS:
        return self._nc

    async def emit(self, kind: str, reason: str, **fields: Any) -> str | None:
        return self.emit_soon(kind, reason, **fields)

    def emit_soon(self, kind: str, reason: str, **fields: Any) -> str | None:
        self.events.append(kind)
        self.emitted.set()
        return f"id-{len(self.events)}"

    def spawn(self, coro: Coroutine[Any, Any, None], name: str, critical: bool = True) -> Any:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task


class _Election:
    term, active_since = 7, 0.0

    def is_active(self) -> bool:
        return True


@pytest.fixture
async def host(nats_server: NatsServer, request: pytest.FixtureRequest) -> AsyncIterator[_Host]:
    nc = await nats.connect(nats_server.spec.url)
    h = _Host(nc, f"mover-{request.node.name[:20].replace('_', '-')}")
    try:
        yield h
    finally:
        h.stopping = True
        for t in h.tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*h.tasks, return_exceptions=True)
        await nc.close()


async def test_a_claim_on_a_stale_revision_reads_again_and_the_next_decision_wins(
        host: _Host) -> None:
    kv = await bus.ensure_kv(host.nc.jetstream(), host.subjects, 1)
    key = host.subjects.group_key(GROUP)
    rev0 = await kv.create(key, encode(GroupRecord(owner="node-a", term=1, epoch=3,
                                                   state="held", renewed_by="node-a")))
    view = ClusterView(host.config, started_at=0.0)
    records = GroupRecords(host, view)  # type: ignore[arg-type]
    records.kv = kv
    await records.load()  # the view at rev0; no watch: it "stalled" here
    for _ in range(3):  # node-a renews meanwhile; the arbiter sees none of it
        e = await kv.get(key)
        assert e.revision is not None
        await kv.update(key, encode(GroupRecord(owner="node-a", term=1, epoch=3, state="held",
                                                renewed_by="node-a")), last=e.revision)
    latest = (await kv.get(key)).revision
    act = Activation(host)  # type: ignore[arg-type]
    act.election = _Election()  # type: ignore[assignment]
    act.term, act.active_since, act.announced_term = 7, 0.0, 7
    mover = Mover(host, view, records, act)  # type: ignore[arg-type]

    def decided(revision: int) -> Takeover:
        return Takeover(GROUP, "node-a", "node-b", "pair-1", epoch=3, revision=revision,
                        status="node-b takes over node-a-mgmt: heartbeats from node-a stopped",
                        rule=Rule.HEARTBEATS_STOPPED)

    # decided on the stale view: the re-read shows node-a renewing after rev0 (it was
    # alive then): given up, and the view now has the latest revision and that renewal
    mover.start(decided(rev0), {"snapshot": {}, "now": 0.0})
    assert await asyncio.wait_for(mover.runs[GROUP].claimed, 10.0) is False
    assert mover.takeovers.labels("owner_renewed")._value.get() == 1
    assert view.records[GROUP][1] == latest and GROUP in view.last_renewal
    assert decode(GroupRecord, (await kv.get(key)).value or b"").epoch == 3  # no claim

    # node-a renews no more; the policy decides again (policy.renews has let it), on the
    # fresh revision: the claim wins
    mover.start(decided(view.records[GROUP][1]), {"snapshot": {}, "now": 0.0})
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        got = decode(GroupRecord, (await kv.get(key)).value or b"")
        if got.epoch == 4:
            break
        await asyncio.sleep(0.01)
    assert (got.owner, got.epoch, got.term, got.state) == ("node-b", 4, 7, "acquiring")
    # the claim carries what may remain of node-a's lease, for node-b's lease holder to
    # count from when it sees the claim
    t = host.config.timings
    assert got.wait is not None and 0.0 <= got.wait <= t.lease_ttl + t.margin
    # the run takes the claim's answer on its next turn, then announces the move
    await asyncio.wait_for(host.emitted.wait(), 10.0)
    assert host.events[0] == "failover.started"
    assert mover.takeovers.labels("claim_lost")._value.get() == 0
