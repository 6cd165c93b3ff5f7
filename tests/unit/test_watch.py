"""Unit tests of ``WatchMonitor``: a KV watch that stops showing the lease holder's own
writes is declared stalled (and restarted), and the direct read backstop is due at its
cadence whatever the watch does (issue 14)."""

from __future__ import annotations

from vtlha.protocol.watch import WatchMonitor

G, H = "node-b-data", "node-a-data"


def monitor() -> WatchMonitor:
    return WatchMonitor(stall_after=0.5, read_every=0.5)


def test_a_write_shown_by_the_watch_is_no_stall() -> None:
    w = monitor()
    w.on_own_write(G, 10, 100.0)
    w.on_delivery(G, 10)
    assert w.stalled(200.0) is None


def test_a_write_not_shown_within_the_bound_is_a_stall() -> None:
    w = monitor()
    w.on_own_write(G, 10, 100.0)
    assert w.stalled(100.25) is None
    why = w.stalled(100.5)
    assert why is not None and G in why and "10" in why
    w.on_restart()
    assert w.stalled(100.5) is None and w.restarts == 1


def test_the_oldest_unmet_write_counts_and_a_later_delivery_meets_all() -> None:
    w = monitor()
    w.on_own_write(G, 10, 100.0)
    w.on_own_write(G, 11, 100.25)  # renewing does not push the deadline back
    assert w.stalled(100.5) is not None
    w.on_delivery(G, 11)
    assert w.stalled(100.5) is None


def test_an_older_delivery_does_not_meet_a_newer_write() -> None:
    w = monitor()
    w.on_own_write(G, 10, 100.0)
    w.on_delivery(G, 9)
    w.on_delivery(H, 12)  # another key's progress says nothing about this one
    assert w.stalled(100.5) is not None


def test_a_write_already_seen_expects_nothing() -> None:
    w = monitor()
    w.on_delivery(G, 12)  # the watch delivered it before the write's answer came
    w.on_own_write(G, 12, 100.0)
    assert w.stalled(101.0) is None


def test_direct_reads_are_due_at_their_cadence() -> None:
    w = monitor()
    assert w.read_due(100.0)
    w.on_read(100.0)
    assert not w.read_due(100.25)
    assert w.read_due(100.5)
