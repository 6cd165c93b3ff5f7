"""The cluster's state as Prometheus gauges, read from the arbiter's view at each scrape
(every arbiter, active or standby, exports them: alert on ``max by (group)`` or on the
active one's, ``vtlha_arbiter_active == 1``). The same model as ``vtlha status``
(``vtlha.clusterstatus.build``), so the two never disagree on what "served" means.

    vtlha_group_owner{group,node}      1 for the owner in the KV, 0 for the other node
    vtlha_group_served{group}          1 while the owner's own reports say it serves it
    vtlha_group_at_home{group}         1 while the group is on its home node
    vtlha_group_epoch{group}           the group's epoch (changes at every move)
    vtlha_pair_maintenance{pair}       1 while automatic failover is suspended
    vtlha_node_held_down{pair,node}    1 while the node is held down (flapping)
    vtlha_storage_global_failure{group}  1 while the group's global storage alarm is raised
    vtlha_problems{severity}           what ``vtlha status`` lists first, counted

A node's liveness is ``vtlha_node_alive{node}`` (the decider's)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vtlha.clusterstatus import ClusterStatus, Heard, Read, build

if TYPE_CHECKING:
    from vtlha_arbiter.pairstate import PairState
    from vtlha_arbiter.view import ClusterView


def families(st: ClusterStatus, alarms: set[str]) -> list[GaugeMetricFamily]:
    """The gauges of one status (pure)."""
    owner = GaugeMetricFamily("vtlha_group_owner", "1 for the node that owns the group in "
                              "the KV, 0 for the other node of its pair", labels=["group", "node"])
    served = GaugeMetricFamily("vtlha_group_served", "1 while the group's owner reports it "
                               "served (lease valid at its epoch, storage served)",
                               labels=["group"])
    home = GaugeMetricFamily("vtlha_group_at_home", "1 while the group is on its home node",
                             labels=["group"])
    epoch = GaugeMetricFamily("vtlha_group_epoch", "The group's epoch (0: never assigned)",
                              labels=["group"])
    global_fail = GaugeMetricFamily("vtlha_storage_global_failure", "1 while the group's "
                                    "global storage alarm is raised (no node reaches a "
                                    "device: nothing fails over)", labels=["group"])
    pairs = {p.name: p for p in st.pairs}
    for g in st.groups:
        for n in pairs[g.pair].nodes:
            owner.add_metric([g.name, n], 1.0 if g.owner == n else 0.0)
        served.add_metric([g.name], 1.0 if g.served else 0.0)
        home.add_metric([g.name], 1.0 if g.at_home else 0.0)
        epoch.add_metric([g.name], float(g.epoch or 0))
        global_fail.add_metric([g.name], 1.0 if g.name in alarms else 0.0)
    maint = GaugeMetricFamily("vtlha_pair_maintenance", "1 while the pair is in maintenance "
                              "(automatic failover suspended)", labels=["pair"])
    held = GaugeMetricFamily("vtlha_node_held_down", "1 while the node is held down after "
                             "repeated failures", labels=["pair", "node"])
    for p in st.pairs:
        maint.add_metric([p.name], 1.0 if p.maintenance else 0.0)
        for n in p.nodes:
            held.add_metric([p.name, n], 1.0 if n in p.held_down else 0.0)
    problems = GaugeMetricFamily("vtlha_problems", "Problems vtlha status would list, by "
                                 "severity", labels=["severity"])
    for sev in ("error", "warning"):
        problems.add_metric([sev], float(sum(p.severity == sev for p in st.problems)))
    return [owner, served, home, epoch, global_fail, maint, held, problems]


class StatusGauges(Collector):
    """Registered in the arbiter's registry; ``collect`` runs in the event loop's thread
    (the /metrics handler), so reading the view needs no lock."""

    def __init__(self, view: ClusterView, pairs: Callable[[], PairState | None],
                 version: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.view = view
        self.clock = clock  # the view's clock
        self.pairs = pairs  # the pairs' state, once the arbiter has started
        self.version = version

    def status(self, now: float) -> ClusterStatus:
        v = self.view
        heard: dict[str, Heard] = {}
        for name, st in v.nodes.items():
            h = heard[name] = Heard()
            if st.heartbeat is not None and st.last_heartbeat is not None:
                h.heartbeat, h.heartbeat_age = st.heartbeat, now - st.last_heartbeat
            if st.mgmt is not None and st.mgmt_at is not None:
                h.mgmt, h.mgmt_age = st.mgmt, now - st.mgmt_at
            if name in v.storage:
                h.storage, at = v.storage[name]
                h.storage_age = now - at
        pairs = self.pairs()
        read = Read(groups=dict(v.records),
                    pairs={p.name: pairs.record(p.name) for p in v.config.pairs}
                    if pairs is not None else {})
        # The leader is this arbiter's business (vtlha_arbiter_active/_term): not a
        # problem counted here.
        out = build(v.config, read, heard, now - v.started_at, time.time(), self.version)
        return out.model_copy(update={"problems": [
            p for p in out.problems if p.about != v.config.cluster]})

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from families(self.status(self.clock()), set(self.view.storage_alarms))
