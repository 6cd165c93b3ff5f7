"""The arbiter's cluster gauges (``vtlha_arbiter.gauges``), read from a real
``ClusterView`` fed the messages the arbiter receives, as Prometheus exposes them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from vtlha_arbiter.gauges import StatusGauges
from vtlha_arbiter.view import ClusterView

from tests.unit.test_clusterstatus import CFG, _hb, _holding, _mgmt, _storage
from vtlha.messages import GroupRecord, PairRecord


class _Pairs:
    def __init__(self, rec: PairRecord) -> None:
        self.rec = rec

    def record(self, pair: str) -> PairRecord:
        return self.rec


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_gauges_follow_the_view_at_each_scrape() -> None:
    view = ClusterView(CFG, started_at=100.0)
    pairs = _Pairs(PairRecord(failback="manual", maintenance=True, hold=["node-a"]))
    reg = CollectorRegistry()
    now = 101.0
    clock = [now]
    reg.register(StatusGauges(view, lambda: pairs, "0.1.0",  # type: ignore[arg-type,return-value]
                              clock=lambda: clock[0]))
    moved = {"node-a-data": ("node-b", 2), "node-a-mgmt": ("node-b", 2),
             "node-b-data": ("node-b", 1), "node-b-mgmt": ("node-b", 1)}
    for g, (owner, epoch) in moved.items():
        view.set_record(g, GroupRecord(owner=owner, term=5, epoch=epoch, state="held",
                                       renewed_by=owner), 10 + epoch, now)
    view.heartbeat(_hb("node-b", _holding(*((g, e) for g, (_, e) in moved.items()))),
                   "node-b", now)
    view.storage_report(_storage("node-b", [("node-a-data", 2), ("node-b-data", 1)]),
                        "node-b", now)
    view.mgmt_report(_mgmt("node-b"), "node-b", now)
    view.storage_alarms.add("node-b-data")

    s = _samples(reg)
    assert s[("vtlha_group_owner", (("group", "node-a-data"), ("node", "node-b")))] == 1
    assert s[("vtlha_group_owner", (("group", "node-a-data"), ("node", "node-a")))] == 0
    assert s[("vtlha_group_served", (("group", "node-a-data"),))] == 1
    assert s[("vtlha_group_at_home", (("group", "node-a-data"),))] == 0
    assert s[("vtlha_group_at_home", (("group", "node-b-mgmt"),))] == 1
    assert s[("vtlha_group_epoch", (("group", "node-a-mgmt"),))] == 2
    assert s[("vtlha_pair_maintenance", (("pair", "pair-1"),))] == 1
    assert s[("vtlha_node_held_down", (("node", "node-a"), ("pair", "pair-1")))] == 1
    assert s[("vtlha_node_held_down", (("node", "node-b"), ("pair", "pair-1")))] == 0
    assert s[("vtlha_storage_global_failure", (("group", "node-b-data"),))] == 1
    assert s[("vtlha_storage_global_failure", (("group", "node-a-data"),))] == 0
    # node-a never heard: an error; maintenance, held down, away from home: warnings
    assert s[("vtlha_problems", (("severity", "error"),))] == 1
    assert s[("vtlha_problems", (("severity", "warning"),))] == 4

    # the next scrape sees the next state: node-b's storage no longer serves node-a-data
    view.storage_report(_storage("node-b", [("node-b-data", 1)]).model_copy(
        update={"seq": 4}), "node-b", now + 0.1)
    clock[0] = now + 0.1
    assert _samples(reg)[("vtlha_group_served", (("group", "node-a-data"),))] == 0
    # ... and once node-b's heartbeats are older than dead_after it is an error too
    clock[0] = now + CFG.timings.dead_after + 0.1
    assert _samples(reg)[("vtlha_problems", (("severity", "error"),))] == 3


def test_before_the_pairs_are_read_the_config_gives_them() -> None:
    view = ClusterView(CFG, started_at=0.0)
    reg = CollectorRegistry()
    reg.register(StatusGauges(view, lambda: None, "0.1.0"))
    s = _samples(reg)
    assert s[("vtlha_pair_maintenance", (("pair", "pair-1"),))] == 0
    assert s[("vtlha_group_epoch", (("group", "node-a-data"),))] == 0
    assert s[("vtlha_group_served", (("group", "node-a-data"),))] == 0
