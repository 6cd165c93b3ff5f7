"""The group watch's stall check (vtlha_arbiter.records, its pure part), the cluster
view's monotonic reads and liveness rule, and what a recreated bucket resets."""

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


def test_a_group_reported_failed_reaches_the_policy_with_its_epoch_and_reason() -> None:
    """The storage-monitor gives a group up (a resource failed past migration_threshold)
    by reporting it ``failed``: the view hands that to the storage rule; the other
    states, and groups the config does not know, are not failures."""
    from vtlha.messages import GroupStorage, PathHealth, StorageReport
    from vtlha.policy import GroupFailure
    view = ClusterView(CFG, started_at=0.0)
    report = StorageReport(
        cluster=CFG.cluster, node="node-a", seq=1,
        paths=[PathHealth(device="vtl-a0", path=0, reachable=True)],
        groups=[GroupStorage(group="node-a-data", epoch=3, state="failed",
                             reason="resource tape: monitor failed: not running"),
                GroupStorage(group="node-b-data", epoch=2, state="starting"),
                GroupStorage(group="nobody-data", epoch=1, state="failed")])
    view.storage_report(report, "node-a", now=5.0)
    got = view.storage_view("node-a", report, 5.0)
    assert got.failed == {"node-a-data": GroupFailure(
        3, "resource tape: monitor failed: not running")}
    assert view.storage_state("node-a", "node-a-data", 3) == (
        "failed", "resource tape: monitor failed: not running")


def test_a_recreated_bucket_forgets_the_old_records_and_their_revisions() -> None:
    """Issue 14: after the bucket is recreated its revisions start again, below the
    view's high-water marks. ``GroupRecords.forget`` drops them, so the new bucket's
    records apply; an answer to a request sent before (its generation) does not."""
    view = ClusterView(CFG, started_at=0.0)
    recs = GroupRecords(_Host(), view)  # type: ignore[arg-type]
    old = GroupRecord(owner="node-a", term=9, epoch=4, state="held", renewed_by="node-a")
    new = GroupRecord(owner="node-a", term=2, epoch=1, state="acquiring", renewed_by="witness")
    recs._apply("node-a-data", old, 120)
    assert not view.set_record("node-a-data", new, 3, now=1.0)  # kept: looks older
    before = recs.generation
    recs.forget()
    assert view.records == {} and view.last_renewal == {}
    recs._apply("node-a-data", old, 121, before)  # the old bucket's late answer
    assert view.records == {}
    recs._apply("node-a-data", new, 3, recs.generation)
    assert view.records["node-a-data"] == (new, 3)


def test_the_election_restarts_on_a_recreated_bucket() -> None:
    """``ElectionRunner.restart``: standby at once (the change reported with the old
    term), and a fresh machine that takes the new bucket's leader key at a revision
    below every one it saw in the old bucket."""
    from vtlha_arbiter.election import ElectionRunner

    from vtlha.protocol.election import Action, Held, Ok, Op

    async def _changed(active: bool, term: int) -> None:
        pass

    runner = ElectionRunner(None, "arbiter.leader", "witness", preferred=True,  # type: ignore[arg-type]
                            leader_ttl=3.0, standby_delay=1.0, on_change=_changed)
    el = runner.machine
    el.on_result(0.0, Action(Op.READ), 0.0, Held("node-a", 80, "x", 70))
    el.on_result(0.1, Action(Op.TAKE_OVER, 80), 0.1, Ok(81))
    assert el.is_active(0.2) and el.term == 81
    runner._reported = (True, 81)  # reported active (the machine ran on a fake clock)
    el.observe(0.3, Held("node-b", 2, "y", 0))
    assert el.is_active(0.3)  # the old machine takes the new key's revision as stale
    runner.restart("the KV bucket was recreated")
    assert runner._changes.get_nowait() == (False, 81)
    fresh = runner.machine
    assert fresh is not el and fresh.term == 0 and not fresh.is_active(0.3)
    assert fresh.reason == "the KV bucket was recreated"
    fresh.on_result(0.4, Action(Op.READ), 0.4, Held("node-b", 2, "y", 0))
    assert fresh.leader == "node-b"  # seen, not ignored as older than revision 81


_PATHS = [(d, i) for d, dev in sorted(CFG.devices.items()) if "node-a" in dev.paths
          for i in range(dev.paths["node-a"])]


def _report_body(seq: int, up: tuple[bool, ...], errors: tuple[bool, ...],
                 failed: bool) -> bytes:
    import orjson
    return orjson.dumps({
        "cluster": CFG.cluster, "node": "node-a", "seq": seq, "sent_at": 1000.0 + seq,
        "paths": [{"device": d, "path": i, "reachable": u, "error": "timeout" if e else None}
                  for (d, i), u, e in zip(_PATHS, up, errors, strict=True)],
        "groups": [{"group": "node-a-data", "epoch": 3,
                    "state": "failed" if failed else "served"}]})


def _bodies() -> object:
    from hypothesis import strategies as st
    n = len(_PATHS)
    flags = st.tuples(*[st.booleans()] * n)
    # a few reachabilities and errors, each report a combination of them: repeats are
    # the rule (five reports a second of an unchanged node), and reports differing only
    # in their paths' errors or only in their groups come up often
    return st.tuples(st.lists(flags, min_size=1, max_size=2),
                     st.lists(flags, min_size=1, max_size=2)).flatmap(
        lambda pools: st.lists(st.tuples(st.sampled_from(pools[0]),
                                         st.sampled_from(pools[1]), st.booleans()),
                               min_size=1, max_size=30))


def test_a_report_the_same_as_the_last_gives_the_view_a_full_working_out_gives() -> None:
    """The arbiter's storage handler passes each report's paths and groups as parsed
    (``raw``); one equal to the node's last report's reuses that report's devices, since
    times and failures. Whatever the sequence of reports, the view is the one working
    every report out in full gives (the "since" times included)."""
    from hypothesis import given, settings

    from vtlha.messages import StorageReport, parse, validate

    @settings(max_examples=150, deadline=None)
    @given(_bodies())
    def check(seq: list[tuple[tuple[bool, ...], tuple[bool, ...], bool]]) -> None:
        fast, full = ClusterView(CFG, started_at=0.0), ClusterView(CFG, started_at=0.0)
        reused = 0
        for k, (up, errors, failed) in enumerate(seq):
            obj = parse(StorageReport, _report_body(k, up, errors, failed))
            report = validate(StorageReport, obj)
            before = fast.storage_views.get("node-a")
            fast.storage_report(report, "node-a", now=10.0 + k,
                                raw=(obj["paths"], obj["groups"]))
            full.storage_report(report, "node-a", now=10.0 + k)
            got = fast.storage_views["node-a"]
            reused += before is not None and got.devices is before.devices
            assert got == full.storage_views["node-a"]
            assert got.received_at == 10.0 + k
            assert fast.storage["node-a"] == full.storage["node-a"]
        # a repeat of the content just before is always reused
        repeats = sum(seq[k] == seq[k - 1] for k in range(1, len(seq)))
        assert reused >= repeats

    check()


def test_a_report_is_worked_out_again_when_its_sender_is_refused() -> None:
    """A refused report (another node's subject) changes nothing, its raw content
    included: the next report is compared with the last accepted one."""
    import pytest

    from vtlha.errors import InvalidMessage
    from vtlha.messages import StorageReport, parse, validate
    view = ClusterView(CFG, started_at=0.0)
    n = len(_PATHS)
    good = parse(StorageReport, _report_body(1, (True,) * n, (False,) * n, False))
    bad = parse(StorageReport, _report_body(2, (False,) * n, (False,) * n, False))
    view.storage_report(validate(StorageReport, good), "node-a", now=1.0,
                        raw=(good["paths"], good["groups"]))
    with pytest.raises(InvalidMessage):
        view.storage_report(validate(StorageReport, bad), "node-b", now=2.0,
                            raw=(bad["paths"], bad["groups"]))
    view.storage_report(validate(StorageReport, bad), "node-a", now=3.0,
                        raw=(bad["paths"], bad["groups"]))
    assert all(p.reachable == 0 for p in view.storage_views["node-a"].devices.values())
    assert set(view.lost_since["node-a"]) == {d for d, _ in _PATHS}
