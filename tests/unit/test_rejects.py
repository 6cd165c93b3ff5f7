"""Invalid input is reported once per source per interval, within a budget, and the
table of sources stays bounded (vtlha.rejects)."""

from __future__ import annotations

from vtlha.rejects import RejectLog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_one_report_per_source_per_interval_with_the_count_since() -> None:
    clock = Clock()
    log = RejectLog(interval=10, budget=5, clock=clock)
    first = log.note("heartbeat", "vtlha.c.hb.node-a", "not JSON")
    assert first is not None and first.dropped == 1
    for _ in range(4):
        assert log.note("heartbeat", "vtlha.c.hb.node-a", "not JSON") is None
    assert log.held_back() == 4
    other = log.note("heartbeat", "vtlha.c.hb.node-b", "bad seq")  # another source
    assert other is not None and other.subject.endswith("node-b")
    clock.t += 10
    again = log.note("heartbeat", "vtlha.c.hb.node-a", "truncated")
    assert again is not None and again.dropped == 5 and again.error == "truncated"
    assert log.held_back() == 0


def test_a_flood_on_many_subjects_makes_at_most_budget_reports_per_interval() -> None:
    clock = Clock()
    log = RejectLog(interval=10, budget=3, clock=clock)
    reports = [log.note("command", f"s.{i}", "x") for i in range(50)]
    assert sum(r is not None for r in reports) == 3
    clock.t += 10
    reports = [log.note("command", f"s.{i}", "x") for i in range(50)]
    assert sum(r is not None for r in reports) == 3
    # the held-back sources carry their counts: s.10 was dropped twice, never reported
    assert log.held_back() == 50 * 2 - 6


def test_the_source_table_is_bounded_and_errors_are_cut() -> None:
    log = RejectLog(max_sources=10)
    for i in range(500):
        log.note("storage", f"s.{i}", "e" * 10_000)
    assert len(log._sources) == 10
    r = RejectLog().note("storage", "s", "e" * 10_000)
    assert r is not None and len(r.error) == 300
