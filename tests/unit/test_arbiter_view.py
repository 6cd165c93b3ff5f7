"""The group watch's stall check (vtlha_arbiter.records, its pure part), and the cluster
view's monotonic reads and liveness rule."""

from __future__ import annotations

import logging

from vtlha_arbiter.records import GroupRecords
from vtlha_arbiter.view import ClusterView

from tests.conftest import EXAMPLE
from vtlha.config import load_config
from vtlha.messages import GroupRecord

CFG = load_config(EXAMPLE)


class _Host:
    config = CFG
    log = logging.getLogger("test")

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry
        self.registry = CollectorRegistry()


def test_a_watch_is_stalled_only_when_quiet_and_a_read_shows_more() -> None:
    view = ClusterView(CFG, started_at=0.0)
    recs = GroupRecords(_Host(), view)  # type: ignore[arg-type]
    recs.watched = {"node-a-data": 40}
    recs.last_delivery = 100.0
    quiet = 100.0 + 6 * CFG.timings.heartbeat_interval
    assert recs.is_stalled({"node-a-data": 45}, quiet)
    assert not recs.is_stalled({"node-a-data": 40}, quiet)  # nothing new: just quiet
    assert not recs.is_stalled({"node-a-data": 45}, 100.0 + CFG.timings.heartbeat_interval)


def test_the_view_ignores_a_revision_older_than_one_it_applied() -> None:
    """Trace 2 of issue 14, on the arbiter's side: an older record after a newer one."""
    view = ClusterView(CFG, started_at=0.0)
    new = GroupRecord(owner="node-b", term=3, epoch=26, state="held", renewed_by="node-b")
    old = GroupRecord(owner="node-a", term=3, epoch=25, state="held", renewed_by="node-a")
    assert view.set_record("node-a-data", new, 120, now=1.0)
    assert not view.set_record("node-a-data", old, 110, now=1.1)
    assert view.records["node-a-data"] == (new, 120)
    assert view.last_renewal["node-a-data"] == 1.0


def test_one_liveness_rule() -> None:
    from vtlha.messages import Heartbeat
    view = ClusterView(CFG, started_at=0.0)
    hb = Heartbeat(cluster=CFG.cluster, node="node-a", incarnation="i", seq=1, interval=0.1)
    assert view.heartbeat(hb, "node-a", 10.0)
    assert not view.heartbeat(hb, "node-a", 10.05)  # a duplicate
    dead_after = CFG.timings.dead_after
    assert view.is_alive("node-a", 10.0 + dead_after - 0.001)
    assert not view.is_alive("node-a", 10.0 + dead_after + 0.001)
    assert view.node_status("node-a", 10.0)["alive"] is True
    assert not view.is_alive("node-b", 10.0)
