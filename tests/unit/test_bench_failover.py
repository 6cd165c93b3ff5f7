"""bench/failover.py's measurement (``bench/failover_measure.py``) and summary
(``bench/failover_report.py``), on hand-made probe timelines (no lab, no root)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.failover_measure import arp_measures, headline, tcp_measures
from bench.failover_report import pct, ratios, summarize, targets


def tcp(*answers: tuple[float, str | None]) -> list[dict[str, Any]]:
    return [{"t": t, "ok": who is not None, "who": who, "error": None if who else "Timeout"}
            for t, who in answers]


def test_tcp_from_the_fault_and_from_the_last_answer_of_the_old_node() -> None:
    tl = tcp((9.9, "node-a"), (10.0, "node-a"), (10.05, None), (10.2, None),
             (10.3, "node-b"), (10.31, "node-b"))
    m = tcp_measures(tl, 10.02, "node-a", "node-b")
    assert m["tcp_from_fault_s"] == pytest.approx(0.28)
    assert m["tcp_gap_s"] == pytest.approx(0.30)  # from node-a's last answer
    assert m["tcp_longest_gap_s"] == pytest.approx(0.30)


def test_tcp_without_a_takeover_measures_none() -> None:
    m = tcp_measures(tcp((1.0, "node-a"), (2.0, None)), 1.5, "node-a", "node-b")
    assert m["tcp_from_fault_s"] is None and m["tcp_gap_s"] is None


A, B, AB, NOBODY = (frozenset({"node-a"}), frozenset({"node-b"}),
                    frozenset({"node-a", "node-b"}), frozenset())


def test_arp_links_cut_nobody_then_node_b() -> None:
    m = arp_measures([(0.0, A), (10.01, NOBODY), (10.35, B)], 10.0, 12.0, "node-a", "node-b")
    assert m["arp_from_fault_s"] == pytest.approx(0.35)
    assert m["arp_gap_s"] == pytest.approx(0.34)
    assert m["arp_nobody_longest_s"] == pytest.approx(0.34)
    assert m["arp_double_s"] == 0


def test_arp_a_killed_keepalived_keeps_answering_beside_the_backup() -> None:
    m = arp_measures([(0.0, A), (10.4, AB)], 10.0, 12.0, "node-a", "node-b")
    assert m["arp_from_fault_s"] == pytest.approx(0.4)
    assert m["arp_gap_s"] == 0.0
    assert m["arp_double_s"] == pytest.approx(1.6)  # until the end: it does not heal


def test_headline_per_case() -> None:
    m = {"tcp_from_fault_s": 1.0, "tcp_gap_s": 0.2, "tcp_longest_gap_s": 0.3,
         "arp_from_fault_s": 1.1, "arp_gap_s": 0.1, "arp_nobody_longest_s": 0.0,
         "ack_longest_gap_s": 2.0}
    assert headline("crash", m) == (1.0, 1.1)
    assert headline("switchover", m) == (0.2, 0.1)
    assert headline("split", m) == (0.3, 0.0)
    assert headline("data", m) == (2.0, 1.1)


def test_percentiles_interpolate_between_ranks() -> None:
    xs = [float(i) for i in range(1, 11)]
    assert pct(xs, 50) == pytest.approx(5.5)
    assert pct(xs, 99) == pytest.approx(9.91)
    assert pct([3.0], 99) == 3.0


def rec(system: str, case: str, outage: float | None, **kw: Any) -> dict[str, Any]:
    return {"interval": 0.1, "case": case, "system": system, "trial": 0, "load1": 1.0,
            "outage_s": outage, "outage_arp_s": outage, "error": None, **kw}


def test_summary_ratio_and_targets() -> None:
    recs = [rec("vtl-ha", "crash", 0.4), rec("vtl-ha", "crash", 0.5),
            rec("keepalived", "crash", 0.35, double_holders=True, ended_two_holders=True),
            rec("keepalived", "crash", 0.36, double_holders=True, ended_two_holders=True),
            rec("vtl-ha", "fatal", 0.5, fall=2, check_interval_s=0.2),
            rec("vtl-ha", "data", 1.5),
            {**rec("vtl-ha", "links", None), "error": "RuntimeError('x')"}]
    rows = summarize(recs)
    ratios(rows)
    by = {(r["case"], r["system"]): r for r in rows}
    assert by[("crash", "keepalived")]["ended_two_holders"] == 2
    assert by[("crash", "vtl-ha")]["double_holders"] == 0
    assert by[("crash", "vtl-ha")]["ratio"]["p50"] == pytest.approx(0.45 / 0.355)
    assert by[("links", "vtl-ha")]["failed"] == 1 and by[("links", "vtl-ha")]["outage"] is None
    said = "\n".join(targets(rows, recs))
    assert "crash at 0.1 s" in said and "NOT met" in said.splitlines()[0]
    assert "fatal at 0.1 s: p99 0.500 s vs target 0.65 s (0.25 + fall x check_interval): met" \
        in said
    assert "data path" in said and said.rstrip().endswith("NOT met")


def test_data_gap_is_split_into_the_service_start_and_the_clients_connect(
        tmp_path: Path) -> None:
    from bench.failover_ours import tape_measures

    acks = tmp_path / "tape.jsonl"
    lines = [{"block": 7, "node": "node-a", "epoch": 1, "t": 99.9, "sent": 99.8,
              "opened": 90.0, "connected": 90.001},
             {"retry": 8, "error": "write: ConnectionRefusedError", "t": 100.1},
             {"block": 8, "node": "node-b", "epoch": 2, "t": 101.25, "sent": 100.2,
              "opened": 100.2, "connected": 101.2},
             {"block": 9, "node": "node-b", "epoch": 2, "t": 101.3, "sent": 101.27,
              "opened": 100.2, "connected": 101.2}]
    acks.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    service = tmp_path / "tape.log"
    service.write_text("\n".join([
        json.dumps({"ts": 50.0, "msg": "tape service ready", "epoch": 1}),  # before: not it
        "not json",
        json.dumps({"ts": 100.5, "msg": "reservation held"}),
        json.dumps({"ts": 100.58, "msg": "tape service ready", "epoch": 2}),
        json.dumps({"ts": 130.0, "msg": "tape service ready", "epoch": 3})]) + "\n")
    m = tape_measures(acks, 100.0, service)
    assert m["acks"] == 3
    assert m["ack_longest_gap_s"] == pytest.approx(1.35)  # 99.9 -> 101.25
    assert m["ack_from_fault_s"] == pytest.approx(1.25)
    assert m["ack_connect_wait_s"] == pytest.approx(1.0)
    assert m["service_ready_s"] == pytest.approx(0.58)
    # no service log (or none after the fault), and an old log without connect times
    m = tape_measures(acks, 100.0, tmp_path / "missing.log")
    assert m["service_ready_s"] is None
    acks.write_bytes(orjson.dumps({"block": 1, "node": "node-b", "t": 101.0}) + b"\n")
    assert tape_measures(acks, 100.0)["ack_connect_wait_s"] is None


def test_both_data_cases_say_what_their_gap_is_made_of() -> None:
    parts = {"service_ready_s": 0.58, "ack_connect_wait_s": 1.0}
    recs = [rec("vtl-ha", "data", 1.2, **parts),
            rec("vtl-ha", "data-reconnect", 0.7, service_ready_s=0.6,
                ack_connect_wait_s=0.01)]
    assert headline("data-reconnect", {"ack_longest_gap_s": 0.7,
                                       "arp_from_fault_s": 0.3}) == (0.7, 0.3)
    said = targets(summarize(recs), recs)
    assert ("data at 0.1 s: node-b's tape service ready 0.580 / 0.580 s after the fault "
            "(p50 / p99); the connect of the first block node-b acknowledged took 1.000 / "
            "1.000 s (p50 / max)") in said
    assert any(s.startswith("data-reconnect at 0.1 s: node-b's tape service ready 0.600")
               for s in said)


def test_a_double_holder_within_a_poll_gap_only_is_counted_apart() -> None:
    gap_only = {"double_holders": True, "overlaps": [[1.0, 1.05, "a", ["x", "y"]]],
                "overlaps_observed": [], "arp_double_s": 0}
    seen = {"double_holders": True, "overlaps": [[1.0, 1.05, "a", ["x", "y"]]],
            "overlaps_observed": [[1.0, 1.02, "a", ["x", "y"]]], "arp_double_s": 0}
    older = {"double_holders": True, "arp_double_s": 0}  # before the observer said
    recs = [rec("vtl-ha", "fatal", 0.5, **gap_only), rec("vtl-ha", "fatal", 0.5, **seen),
            rec("vtl-ha", "fatal", 0.5, **older), rec("vtl-ha", "fatal", 0.5)]
    (row,) = summarize(recs)
    assert row["double_holders"] == 3 and row["double_seen"] == 2
