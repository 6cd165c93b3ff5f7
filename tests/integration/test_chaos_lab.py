"""The chaos runner over a real network lab, for one cheap iteration: the history holds
what the observer saw (each node answering its own addresses by ARP), the tape clients'
acknowledged blocks (all read back), the events, the fault, its check and the baseline;
the checker's measurements come from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vtlha_lab.chaos.checker import check
from vtlha_lab.chaos.runner import RunOptions, run
from vtlha_lab.lab import leftovers

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_one_iteration_writes_a_real_history_and_checks_it(tmp_path: Path) -> None:
    hist = tmp_path / "history.jsonl"
    opts = RunOptions(seed=5, iterations=1, faults=["kill-arbiter"],
                      config=ROOT / "examples" / "cluster.yaml", work_dir=tmp_path / "w",
                      history=hist)
    n = run(opts)
    records = [json.loads(line) for line in hist.read_text().splitlines()]
    assert len(records) == n > 20
    types = {r["type"] for r in records}
    assert {"run", "fault", "check", "baseline", "arp", "kernel", "reservation", "ack",
            "event", "verify", "observer.start", "observer.stats"} <= types
    run_rec = next(r for r in records if r["type"] == "run")
    assert run_rec["plan"] == [["kill-arbiter"]] and "--seed 5" in run_rec["command"]
    # The observer saw each home node answer for its own addresses.
    for addr, group in run_rec["addresses"].items():
        home = run_rec["homes"][group]
        assert [home] in [r["nodes"] for r in records if r["type"] == "arp"
                          and r["addr"] == addr], addr
    # Blocks were acknowledged by both nodes and every one was read back intact.
    for g in run_rec["data_groups"]:
        acks = [r for r in records if r["type"] == "ack" and r["group"] == g]
        assert len(acks) > 10
        (verify,) = [r for r in records if r["type"] == "verify" and r["group"] == g]
        assert verify["checked"] == len(acks) and verify["bad"] == []
    assert "arbiter.active" in {r["kind"] for r in records if r["type"] == "event"}
    fault = next(r for r in records if r["type"] == "fault" and r["phase"] == "end")
    assert fault["detail"][0]["service"] == "arbiter"
    result = check(records)
    (it,) = result.iterations
    assert it.kinds == ("kill-arbiter",) and it.check > it.start and it.baseline_ok is not None
    print(f"\nchaos, one iteration: {n} records; violations: "
          f"{[(v.cls, v.detail) for v in result.violations]}")
    assert not [p for p in leftovers(only_created_here=True)]
