"""The chaos checker is a pure function over a history: each violation class is caught
in a hand-made history, and a clean history passes (Jepsen's habit: every checker has
histories that must fail)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vtlha_lab.chaos.checker import check
from vtlha_lab.chaos.report import print_summary, write_report

TIMINGS = {"heartbeat_interval": 0.1, "dead_after": 0.3, "lease_ttl": 0.3, "margin": 0.03,
           "leader_ttl": 3.0, "leader_standby_delay": 1.0, "command_timeout": 0.25,
           "check_interval": 0.2, "probe_interval": 0.2, "probe_timeout": 1.0,
           "storage_settle": 2.0, "storage_stale_after": 0.6, "mgmt_stale_after": 0.6,
           "initial_assign_wait": 10.0, "rise": 2, "fall": 2}
A, B = "198.51.100.101", "198.51.100.102"
T0 = 1000.0  # the fault's start


def clean() -> list[dict[str, Any]]:
    """node-a's heartbeat killed at T0: node-a stops answering at +0.3 s, node-b answers
    from +0.8 s (bound 1.13 s); node-b's own address never stops; events, epochs and
    blocks as they should be; the baseline brings node-a-data home at +6 s."""
    h: list[dict[str, Any]] = [
        {"type": "run", "phase": "start", "t": T0 - 10, "seed": 7, "command": "vtlha-lab chaos "
         "run --seed 7 --iterations 1 --faults kill-heartbeat", "timings": TIMINGS,
         "homes": {"node-a-data": "node-a", "node-b-data": "node-b"},
         "addresses": {A: "node-a-data", B: "node-b-data"},
         "data_groups": ["node-a-data"], "devices": {"node-a-data": ["vtl-a0"]}},
        {"type": "arp", "t": T0 - 9, "addr": A, "nodes": ["node-a"]},
        {"type": "arp", "t": T0 - 9, "addr": B, "nodes": ["node-b"]},
        {"type": "reservation", "t": T0 - 9, "device": "vtl-a0", "holder": "node-a", "epoch": 1},
        {"type": "fault", "phase": "start", "t": T0, "iteration": 0, "kinds": ["kill-heartbeat"]},
        {"type": "fault", "phase": "end", "t": T0 + 0.01, "iteration": 0,
         "kinds": ["kill-heartbeat"], "detail": [{"host": "node-a"}]},
        {"type": "arp", "t": T0 + 0.3, "addr": A, "nodes": []},
        {"type": "event", "t": T0 + 0.35, "seq": 10, "kind": "node.down", "group": None},
        {"type": "event", "t": T0 + 0.36, "seq": 11, "kind": "failover.started",
         "group": "node-a-data", "epoch": 2, "rule": "heartbeats_stopped"},
        {"type": "arp", "t": T0 + 0.8, "addr": A, "nodes": ["node-b"]},
        {"type": "reservation", "t": T0 + 0.9, "device": "vtl-a0", "holder": "node-b", "epoch": 2},
        {"type": "event", "t": T0 + 2.0, "seq": 12, "kind": "failover.completed",
         "group": "node-a-data", "epoch": 2, "started": 11},
        {"type": "check", "t": T0 + 4.0, "iteration": 0, "owners": {
            "node-a-data": {"owner": "node-b", "epoch": 2, "state": "held"},
            "node-b-data": {"owner": "node-b", "epoch": 1, "state": "held"}}},
        {"type": "baseline", "phase": "start", "t": T0 + 4.0, "iteration": 0},
        {"type": "event", "t": T0 + 5.0, "seq": 13, "kind": "failback.started",
         "group": "node-a-data", "epoch": 3},
        {"type": "arp", "t": T0 + 5.5, "addr": A, "nodes": ["node-a"]},
        {"type": "reservation", "t": T0 + 5.5, "device": "vtl-a0", "holder": "node-a", "epoch": 3},
        {"type": "event", "t": T0 + 5.8, "seq": 14, "kind": "failback.completed",
         "group": "node-a-data", "epoch": 3, "started": 13},
        {"type": "baseline", "phase": "end", "t": T0 + 6.0, "iteration": 0, "ok": True,
         "waited": 2.0, "bound": 15.0},
    ]
    # blocks: every 0.1 s, by node-a (epoch 1) before the fault, node-b (2) from +1.5 s,
    # node-a again (3) from +5.6 s
    block = 0
    t = T0 - 8
    while t < T0 + 8:
        if t < T0 + 0.2:
            node, epoch = "node-a", 1
        elif T0 + 1.5 <= t < T0 + 5.5:
            node, epoch = "node-b", 2
        elif t >= T0 + 5.6:
            node, epoch = "node-a", 3
        else:
            t += 0.1
            continue
        h.append({"type": "ack", "t": t + 0.01, "sent": t, "group": "node-a-data",
                  "block": block, "node": node, "epoch": epoch})
        block += 1
        t += 0.1
    h.append({"type": "verify", "t": T0 + 9, "group": "node-a-data", "exit": 0,
              "checked": block, "bad": [], "nodes": {"node-a": block}})
    return sorted(h, key=lambda r: r["t"])


def classes(history: list[dict[str, Any]]) -> set[str]:
    return {v.cls for v in check(history).violations}


def test_a_clean_history_passes_and_measures_the_outage() -> None:
    result = check(clean())
    assert result.ok, [v.detail for v in result.violations]
    (it,) = result.iterations
    assert it.unavailable == pytest.approx(0.5)
    assert it.recovery == pytest.approx(0.8)
    assert it.data_unavailable == pytest.approx(1.3, abs=0.11)
    assert result.seed == 7 and "--seed 7" in result.command


def test_two_nodes_answering_in_one_round_is_a_double_answer() -> None:
    h = clean()
    h.append({"type": "arp", "t": T0 + 0.7, "addr": A, "nodes": ["node-a", "node-b"]})
    result = check(sorted(h, key=lambda r: r["t"]))
    (v,) = [v for v in result.violations if v.cls == "double-answer"]
    assert "node-a, node-b" in v.detail and "100 ms" in v.detail and v.iteration == 0


def test_a_group_owned_but_unserved_at_the_check_is_stranded() -> None:
    h = [r for r in clean() if not (r["type"] == "arp" and r["addr"] == A
                                    and r["t"] > T0 + 0.5)]
    h = [r for r in h if not (r["type"] == "ack" and T0 + 1 < r["t"] < T0 + 5.5)]
    result = check(h)
    stranded = [v for v in result.violations if v.cls == "stranded"]
    assert stranded and "node-a-data owned by node-b" in stranded[0].detail
    assert "recovery-bound" in classes(h)


def test_a_missing_required_event_and_an_unfinished_move_are_lost_events() -> None:
    h = [r for r in clean() if r.get("kind") not in ("failover.completed", "node.down")]
    details = [v.detail for v in check(h).violations if v.cls == "lost-event"]
    assert any("must cause node.down" in d for d in details)
    assert any("must cause failover.completed" in d for d in details)
    assert any("failover.started of node-a-data epoch 2 (#11) never completed" in d
               for d in details)


def test_a_fault_whose_injector_failed_is_reported_not_expected(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The kill-arbiter-at-claim injector cannot arm its KV watch (JetStream still
    electing after kill-nats): nothing is killed, so no event is expected of it — but the
    report and the summary say it was not injected."""
    h = [r for r in clean() if r.get("kind") not in ("node.down", "failover.started",
                                                   "failover.completed")]
    for r in h:
        if r["type"] == "fault":
            r["kinds"] = ["kill-arbiter-at-claim"]
    assert any(v.cls == "lost-event" for v in check(h).violations)  # as planned: lost
    h.append({"type": "fault", "phase": "injected", "t": T0 + 0.001, "iteration": 0,
              "kinds": [], "planned": ["kill-arbiter-at-claim"], "detail": []})
    result = check(sorted(h, key=lambda r: r["t"]))
    assert not [v for v in result.violations if v.cls in ("lost-event", "recovery-bound")]
    (it,) = result.iterations
    assert it.kinds == () and it.not_injected == ("kill-arbiter-at-claim",)
    report = tmp_path / "report.md"
    write_report(result, h, report, tmp_path / "pics")
    text = report.read_text()
    assert "**not injected**" in text and "iteration 0 `kill-arbiter-at-claim`" in text
    assert "| `(not injected)` | 1 |" in text
    print_summary(result)
    assert "NOT INJECTED (it 0): kill-arbiter-at-claim" in capsys.readouterr().out


def test_a_lost_or_wrong_block_is_caught() -> None:
    h = clean()
    verify = next(r for r in h if r["type"] == "verify")
    verify["checked"] -= 1
    verify["bad"] = [{"block": 3, "got": "vtlha tape block 00000004;"}]
    assert {"lost-block", "wrong-block"} <= classes(h)
    h2 = [r for r in clean() if not (r["type"] == "ack" and r["block"] == 5)]
    assert "lost-block" in classes(h2)


def test_an_epoch_going_back_is_caught() -> None:
    h = clean()
    h.append({"type": "reservation", "t": T0 + 7, "device": "vtl-a0", "holder": "node-b",
              "epoch": 2})
    result = check(sorted(h, key=lambda r: r["t"]))
    (v,) = [v for v in result.violations if v.cls == "epoch-back"]
    assert "device vtl-a0" in v.detail and "epoch 2 after 3" in v.detail


def test_a_block_acknowledged_by_a_fenced_writer_is_caught() -> None:
    h = clean()
    h.append({"type": "ack", "t": T0 + 1.3, "sent": T0 + 1.2, "group": "node-a-data",
              "block": 9999, "node": "node-a", "epoch": 1})
    assert "fenced-writer" in classes(sorted(h, key=lambda r: r["t"]))


def test_a_failover_during_a_fault_that_moves_nothing_is_needless() -> None:
    h = clean()
    for r in h:
        if r["type"] == "fault":
            r["kinds"] = ["kill-arbiter"]
    assert "needless-failover" in classes(h)
    h2 = clean()
    h2.append({"type": "event", "t": T0 + 7, "seq": 15, "kind": "failover.started",
               "group": "node-b-data", "epoch": 2, "rule": "heartbeats_stopped"})
    h2.append({"type": "event", "t": T0 + 7.5, "seq": 16, "kind": "failover.completed",
               "group": "node-b-data", "epoch": 2, "started": 15})
    (v,) = [v for v in check(sorted(h2, key=lambda r: r["t"])).violations
            if v.cls == "needless-failover"]
    assert "between faults" in v.detail


def test_a_recovery_slower_than_the_bound_and_a_slow_baseline_are_caught() -> None:
    h = clean()
    for r in h:
        if r["type"] == "arp" and r["addr"] == A and r["nodes"] == ["node-b"]:
            r["t"] = T0 + 1.5  # bound for kill-heartbeat: 1.13 s
        if r["type"] == "baseline" and r["phase"] == "end":
            r["waited"] = 20.0
    details = [v.detail for v in check(sorted(h, key=lambda r: r["t"])).violations]
    assert any("served again 1.50 s after the fault (bound 1.13 s)" in d for d in details)
    assert any("home again after 20.0 s (bound 15.0 s)" in d for d in details)


def test_fail_on_safety_fails_only_on_a_safety_class(tmp_path: Path) -> None:
    """CI's gate (`--fail-on safety`): a stranded group is reported but passes; a double
    answer fails; the default (`any`) fails on both."""
    from click.testing import CliRunner

    from vtlha_lab.chaos.cli import chaos

    stranded = [r for r in clean() if not (r["type"] == "arp" and r["addr"] == A
                                           and r["t"] > T0 + 0.5)]
    double = [*clean(), {"type": "arp", "t": T0 + 0.7, "addr": A,
                         "nodes": ["node-a", "node-b"]}]
    assert check(stranded).safe and not check(stranded).ok
    assert not check(sorted(double, key=lambda r: r["t"])).safe
    for name, hist, any_rc, safety_rc in (("stranded", stranded, 1, 0), ("double", double, 1, 1)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in sorted(hist, key=lambda r: r["t"])))
        assert CliRunner().invoke(chaos, ["check", str(path)]).exit_code == any_rc
        res = CliRunner().invoke(chaos, ["check", str(path), "--fail-on", "safety"])
        assert res.exit_code == safety_rc, res.output
        assert ("not failed on" in res.output) == (safety_rc == 0)


def test_recovery_counts_from_when_an_injector_really_injected() -> None:
    """An injector that prepares first (kill-arbiter-at-claim arms a KV watch, seconds
    after a kill-nats) says when its fault began: the recovery counts from there, not
    from the iteration's start (iteration 4 of the third 200-run was charged 7.7 s, of
    which 7.2 s were arming)."""
    h = clean()
    for r in h:
        if r["type"] == "fault" and r["phase"] == "start":
            r["t"] = T0 - 7.0  # arming began 7 s before the fault
    assert any(v.cls == "recovery-bound" for v in check(h).violations)
    h.append({"type": "fault", "phase": "injected", "t": T0 + 0.001, "iteration": 0,
              "kinds": ["kill-heartbeat"], "planned": ["kill-heartbeat"],
              "detail": [{"host": "node-a", "injected_at": T0}]})
    result = check(sorted(h, key=lambda r: r["t"]))
    assert result.violations == []
    assert result.iterations[0].start == T0
