"""``vtlha.clusterstatus.build`` (pure): what was read and heard -> the status, problems
first; and its rendering (no reads) shows every problem and the pair line."""

from __future__ import annotations

from rich.console import Console

from tests.conftest import EXAMPLE
from vtlha.cli.statusview import render
from vtlha.clusterstatus import ClusterStatus, Heard, Read, build
from vtlha.config import load_config
from vtlha.messages import (
    CheckResult,
    GroupRecord,
    GroupStorage,
    Heartbeat,
    LeaderRecord,
    LeaseState,
    MgmtReport,
    PairRecord,
    PathHealth,
    StorageReport,
)

CFG = load_config(EXAMPLE)
ENV = {"cluster": CFG.cluster}
DEVICES = ("vtl-a0", "vtl-a1", "vtl-b0", "vtl-b1")


def _hb(node: str, leases: list[LeaseState], checks: list[CheckResult] | None = None
        ) -> Heartbeat:
    return Heartbeat(**ENV, node=node, incarnation=f"inc-{node}", seq=5, interval=0.1,
                     checks=checks or [], leases=leases)


def _storage(node: str, served: list[tuple[str, int]],
             down: frozenset[tuple[str, int]] | set[tuple[str, int]] = frozenset()
             ) -> StorageReport:
    paths = [PathHealth(device=d, path=p, reachable=(d, p) not in down, latency=0.0004,
                        error="EIO" if (d, p) in down else None)
             for d in DEVICES for p in (0, 1)]
    return StorageReport(**ENV, node=node, seq=3, paths=paths, groups=[
        GroupStorage(group=g, epoch=e, state="served") for g, e in served])


def _mgmt(node: str, healthy: bool = True) -> MgmtReport:
    return MgmtReport(**ENV, node=node, link_up=True, gateway_ok=healthy, latency=0.001,
                      healthy=healthy, detail="" if healthy else "gateway 203.0.113.254 "
                      "unreachable")


def _holding(*groups: tuple[str, int]) -> list[LeaseState]:
    return [LeaseState(group=g, epoch=e, phase="holding", valid_for=0.25, age=0.05)
            for g, e in groups]


def _healthy_heard() -> dict[str, Heard]:
    a = [("node-a-data", 1), ("node-a-mgmt", 1)]
    b = [("node-b-data", 1), ("node-b-mgmt", 1)]
    return {
        "node-a": Heard(_hb("node-a", _holding(*a)), 0.02, _storage("node-a", a[:1]), 0.1,
                        _mgmt("node-a"), 0.1),
        "node-b": Heard(_hb("node-b", _holding(*b)), 0.03, _storage("node-b", b[:1]), 0.1,
                        _mgmt("node-b"), 0.1)}


def _read(owners: dict[str, tuple[str, int]] | None = None,
          pair: PairRecord | None = None, leader: bool = True) -> Read:
    owners = owners or {g: (home, 1) for g, (home, _) in CFG.groups().items()}
    return Read(
        leader=(LeaderRecord(node="witness", term=77), 77) if leader else None,
        groups={g: (GroupRecord(owner=o, term=77, epoch=e, state="held"), 10 + e)
                for g, (o, e) in owners.items()},
        pairs={"pair-1": pair} if pair else {})


def _build(read: Read, heard: dict[str, Heard]) -> ClusterStatus:
    return build(CFG, read, heard, listened=0.4, gathered_at=1.7e9, version="0.1.0")


def _texts(st: ClusterStatus) -> list[str]:
    return [p.text for p in st.problems]


def test_a_healthy_cluster_has_no_problems_and_every_group_served() -> None:
    st = _build(_read(), _healthy_heard())
    assert st.problems == [] and st.ok
    assert st.arbiter is not None and (st.arbiter.node, st.arbiter.term) == ("witness", 77)
    assert all(g.served and g.at_home and g.owner == g.home for g in st.groups)
    data = next(g for g in st.groups if g.name == "node-a-data")
    assert data.storage_state == "served" and data.lease_age_s == 0.05
    assert data.lease_valid_for_s == 0.25
    a = next(n for n in st.nodes if n.name == "node-a")
    assert a.up and a.heartbeat_age_s == 0.02 and a.storage_ok
    assert [len(d.paths) for d in a.devices] == [2, 2, 2, 2]
    assert a.mgmt is not None and a.mgmt.healthy
    assert st.pairs[0].failback == "manual" and not st.pairs[0].maintenance
    # the JSON carries the verdict
    assert '"ok":true' in st.model_dump_json()


def test_a_dead_node_after_failover_errors_first_then_warnings() -> None:
    heard = _healthy_heard()
    del heard["node-a"]
    b = heard["node-b"]
    moved = [("node-a-data", 2), ("node-a-mgmt", 2), ("node-b-data", 1), ("node-b-mgmt", 1)]
    b.heartbeat = _hb("node-b", _holding(*moved))
    b.storage = _storage("node-b", [("node-a-data", 2), ("node-b-data", 1)])
    st = _build(_read({"node-a-data": ("node-b", 2), "node-a-mgmt": ("node-b", 2),
                       "node-b-data": ("node-b", 1), "node-b-mgmt": ("node-b", 1)},
                      PairRecord(failback="manual", hold=["node-a"])), heard)
    assert not st.ok
    assert _texts(st)[0] == "node-a: no heartbeat heard within 0.4 s"
    severities = [p.severity for p in st.problems]
    assert severities == sorted(severities, key=lambda s: s != "error")
    assert ("node-a-data: served by node-b, away from its home node-a (vtlha failback "
            "pair-1)") in _texts(st)
    assert all(g.served for g in st.groups)  # node-b serves all four
    a = next(n for n in st.nodes if n.name == "node-a")
    assert not a.up and a.held_down and a.heartbeat_age_s is None
    assert st.pairs[0].held_down == ["node-a"]


def test_not_served_reasons_come_from_the_owners_own_reports() -> None:
    heard = _healthy_heard()
    a = heard["node-a"]
    # node-a's lease holder is still acquiring its mgmt group; its storage is starting
    a.heartbeat = _hb("node-a", [
        LeaseState(group="node-a-data", epoch=1, phase="holding", valid_for=0.2, age=0.1),
        LeaseState(group="node-a-mgmt", epoch=1, phase="acquiring", valid_for=0.0)])
    assert a.storage is not None
    a.storage = a.storage.model_copy(update={"groups": [
        GroupStorage(group="node-a-data", epoch=1, state="failed", reason="agent tape: "
                     "start exited 1")]})
    st = _build(_read(), heard)
    by = {g.name: g for g in st.groups}
    assert by["node-a-mgmt"].served is False
    assert by["node-a-mgmt"].served_detail == "node-a's lease is acquiring, not valid yet"
    assert by["node-a-data"].served is False
    assert by["node-a-data"].served_detail == ("storage failed on node-a: agent tape: start "
                                               "exited 1")
    assert "node-a-data: not served by node-a: storage failed on node-a: agent tape: start " \
        "exited 1" in _texts(st)


def test_checks_paths_management_maintenance_and_no_arbiter() -> None:
    heard = _healthy_heard()
    heard["node-a"].heartbeat = _hb("node-a", _holding(("node-a-data", 1), ("node-a-mgmt", 1)),
                                    [CheckResult(name="vtl-daemon", ok=False, fatal=True,
                                                 detail="pid 42 gone"),
                                     CheckResult(name="ui", ok=False, fatal=False)])
    heard["node-a"].mgmt = _mgmt("node-a", healthy=False)
    heard["node-b"].storage = _storage("node-b", [("node-b-data", 1)],
                                       down={("vtl-a0", 1), ("vtl-b1", 0), ("vtl-b1", 1)})
    st = _build(_read(pair=PairRecord(failback="auto", maintenance=True), leader=False),
                heard)
    t = _texts(st)
    assert t[0] == "no active arbiter: nothing fails over"
    errors = {p.text for p in st.problems if p.severity == "error"}
    assert errors == {"no active arbiter: nothing fails over",
                      "node-a: fatal check vtl-daemon failing: pid 42 gone",
                      "node-a: management path unhealthy: gateway 203.0.113.254 unreachable",
                      "node-b: device vtl-b1 unreachable (no path up)"}
    warnings = {p.text for p in st.problems if p.severity == "warning"}
    assert warnings == {"pair-1: in maintenance: automatic failover suspended (vtlha "
                        "maintenance off pair-1)",
                        "node-a: non-fatal check ui failing",
                        "node-b: device vtl-a0: path 1 down (EIO)"}
    b = next(n for n in st.nodes if n.name == "node-b")
    assert b.storage_ok is False


def test_a_device_lost_by_both_nodes_is_a_global_storage_failure() -> None:
    heard = _healthy_heard()
    gone = {("vtl-a1", 0), ("vtl-a1", 1)}
    heard["node-a"].storage = _storage("node-a", [("node-a-data", 1)], down=gone)
    heard["node-b"].storage = _storage("node-b", [("node-b-data", 1)], down=gone)
    st = _build(_read(), heard)
    assert ("pair-1: device vtl-a1 unreachable from every node (a global storage failure: "
            "nothing fails over)") in _texts(st)


def test_an_unassigned_group_and_an_unheard_owner() -> None:
    heard = _healthy_heard()
    del heard["node-b"]
    st = _build(_read({"node-a-data": ("node-a", 1), "node-a-mgmt": ("node-a", 1),
                       "node-b-mgmt": ("node-b", 1)}), heard)
    by = {g.name: g for g in st.groups}
    assert by["node-b-data"].owner is None and by["node-b-data"].served is False
    assert by["node-b-mgmt"].served is None
    assert "node-b-data: no owner recorded (never assigned: is an arbiter active?)" in _texts(st)
    assert "node-b-mgmt: not known to be served by node-b: no heartbeat heard from node-b" \
        in _texts(st)


def test_the_rendering_shows_problems_first_and_the_pair_line() -> None:
    heard = _healthy_heard()
    del heard["node-a"]
    st = _build(_read(pair=PairRecord(failback="auto", hold=["node-a"])), heard)
    console = Console(width=200, record=True, color_system=None)
    console.print(render(st))
    out = console.export_text()
    lines = out.splitlines()
    assert lines[0].startswith("cluster demo, active arbiter: witness (term 77)")
    assert lines[1] == "ERROR   node-a: no heartbeat heard within 0.4 s"
    assert "pair pair-1: failback auto, maintenance off, held down: node-a, standby: -" \
        in lines
    assert any(ln.startswith("node-a-data") and "node-a" in ln for ln in lines)
    assert any(ln.startswith("vtl-a0") and "2/2 up" in ln for ln in lines)


def test_a_node_in_standby_is_a_warning_that_says_how_to_take_it_out() -> None:
    st = _build(_read(pair=PairRecord(standby=["node-b"])), _healthy_heard())
    node_b = next(n for n in st.nodes if n.name == "node-b")
    assert node_b.standby and st.pairs[0].standby == ["node-b"]
    assert any(p.severity == "warning" and p.text == (
        "node-b: in standby: given no group, not even if its companion fails "
        "(vtlha standby off pair-1 node-b)") for p in st.problems)


def test_a_storage_report_older_than_storage_stale_after_confirms_nothing() -> None:
    """As the policy: a report older than ``storage_stale_after`` says nothing of the
    devices (a restarted node's last report from before its crash is not "ok")."""
    heard = _healthy_heard()
    stale = CFG.timings.storage_stale_after + 0.5
    a = heard["node-a"]
    heard["node-a"] = Heard(a.heartbeat, a.heartbeat_age, a.storage, stale, a.mgmt,
                            a.mgmt_age)
    st = _build(_read(), heard)
    node_a = next(n for n in st.nodes if n.name == "node-a")
    assert node_a.storage_ok is None and node_a.storage_age_s == stale
    assert any(p.about == "node-a" and f"no fresh storage report (the last is {stale:g} "
               "s old)" in p.text for p in st.problems), _texts(st)
    node_b = next(n for n in st.nodes if n.name == "node-b")
    assert node_b.storage_ok  # 0.1 s old: fresh
