"""The split-brain observer's merge (``vtlha_lab.observer.merge``) on hand-made poll
histories: an overlap that lies within one node's gap between two polls is reported
(conservatively) but not as *observed*; one the polls saw is both."""

from __future__ import annotations

from vtlha_lab.observer import NodeLog, merge

X = "198.51.100.101/32"


def log(name: str, *polls: tuple[float, frozenset[str]]) -> NodeLog:
    """A node's log as ``poll_node`` keeps it, from every poll (time, answering)."""
    lg = NodeLog(name, f"ns-{name}")
    for t, answering in polls:
        lg.record(t, answering)
    return lg


ON, OFF = frozenset({X}), frozenset()


def test_an_overlap_within_a_poll_gap_is_not_observed() -> None:
    # node-a last seen answering at 0.90, next polled at 1.00 (a 100 ms gap); node-b
    # first seen answering at 0.95: node-a may have stopped before.
    a = log("node-a", (0.80, ON), (0.90, ON), (1.00, OFF), (1.10, OFF))
    b = log("node-b", (0.85, OFF), (0.95, ON), (1.05, ON))
    out = merge([a, b], {X}, end=2.0)
    assert out["overlaps"] == [(0.95, 1.00, X, ["node-a", "node-b"])]
    assert out["observed"] == []


def test_two_nodes_seen_answering_at_once_is_observed() -> None:
    a = log("node-a", (0.80, ON), (0.90, ON), (0.97, ON), (1.00, OFF))
    b = log("node-b", (0.85, OFF), (0.95, ON), (1.05, ON))
    out = merge([a, b], {X}, end=2.0)
    assert out["overlaps"] == [(0.95, 1.00, X, ["node-a", "node-b"])]
    assert out["observed"] == [(0.95, 0.97, X, ["node-a", "node-b"])]


def test_other_addresses_changing_do_not_end_a_span() -> None:
    y = "198.51.100.102/32"
    a = log("node-a", (0.80, frozenset({X, y})), (0.90, ON), (0.99, ON), (1.00, OFF))
    b = log("node-b", (0.85, OFF), (0.95, ON), (1.05, ON))
    out = merge([a, b], {X, y}, end=2.0)
    assert out["observed"] == [(0.95, 0.99, X, ["node-a", "node-b"])]
    assert not [o for o in out["overlaps"] if o[2] == y]
