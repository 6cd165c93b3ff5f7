"""Unit tests of the executors' hold rule (``HoldGate``, DESIGN.md "Roles on a node"):
hold a group only while the arbiter's latest accepted command says acquire at epoch e
AND a lease notice for that group and epoch e is valid (``now < valid_until - margin``).
Plain objects, no mocks; times are binary-exact so boundaries compare exactly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtlha.protocol.hold import HoldGate, Why

MARGIN = 0.03125
G, H = "node-a-data", "node-a-mgmt"
NOW = 1000.0
VALID = NOW + 0.25  # a notice's valid_until


def gate(command: int | None = None, notice: tuple[int, float, bool] | None = None) -> HoldGate:
    g = HoldGate(MARGIN)
    if command is not None:
        g.on_acquire(G, command)
    if notice is not None:
        g.on_notice(G, *notice)
    return g


# ---- hold only with an acquire command AND a valid notice of the same epoch -------------


@pytest.mark.parametrize(("command", "notice", "why"), [
    (None, None, Why.NO_COMMAND),
    (None, (1, VALID, False), Why.NO_COMMAND),
    (1, None, Why.NO_NOTICE),
    (2, (1, VALID, False), Why.OTHER_EPOCH),  # the notice is for the old epoch
    (1, (2, VALID, False), Why.OTHER_EPOCH),  # the lease holder is ahead of the command
    (1, (1, VALID, False), Why.HOLD),
    (1, (1, VALID, True), Why.REVOKED),
], ids=["nothing", "notice-only", "command-only", "notice-older-epoch",
        "notice-newer-epoch", "both", "revoked"])
def test_holds_only_with_command_and_valid_notice_of_same_epoch(
        command: int | None, notice: tuple[int, float, bool] | None, why: Why) -> None:
    g = gate(command, notice)
    assert g.verdict(G, NOW) is why
    assert g.should_hold(G, NOW) is (why is Why.HOLD)


def test_order_of_command_and_notice_does_not_matter() -> None:
    first_notice = HoldGate(MARGIN)
    first_notice.on_notice(G, 3, VALID, False)
    assert not first_notice.should_hold(G, NOW)
    first_notice.on_acquire(G, 3)
    assert first_notice.should_hold(G, NOW)
    assert gate(3, (3, VALID, False)).should_hold(G, NOW)


def test_groups_are_independent() -> None:
    g = gate(1, (1, VALID, False))
    assert g.verdict(H, NOW) is Why.NO_COMMAND
    g.on_acquire(H, 1)
    assert g.verdict(H, NOW) is Why.NO_NOTICE
    g.on_notice(H, 1, VALID, True)
    assert g.verdict(H, NOW) is Why.REVOKED
    assert g.should_hold(G, NOW)


# ---- the margin -------------------------------------------------------------------------


@pytest.mark.parametrize(("now", "why"), [
    (VALID - MARGIN - 0.0078125, Why.HOLD),
    (VALID - MARGIN, Why.EXPIRED),  # stops at valid_until - margin, not at valid_until
    (VALID - 0.0078125, Why.EXPIRED),
    (VALID, Why.EXPIRED),
    (VALID + 10.0, Why.EXPIRED),
])
def test_holding_stops_margin_before_valid_until(now: float, why: Why) -> None:
    assert gate(1, (1, VALID, False)).verdict(G, now) is why


def test_valid_until_is_where_holding_stops() -> None:
    assert gate(1, (1, VALID, False)).valid_until(G) == VALID - MARGIN
    assert gate(1, None).valid_until(G) is None
    assert gate(None, (1, VALID, False)).valid_until(G) is None
    assert gate(2, (1, VALID, False)).valid_until(G) is None
    assert gate(1, (1, VALID, True)).valid_until(G) is None


def test_lease_runs_out_on_its_own_when_notices_stop() -> None:
    """A node cut off, or whose lease holder died, stops answering within the lease."""
    g = gate(1, (1, VALID, False))
    for now in (NOW, NOW + 0.125, VALID - MARGIN - 0.0078125):
        assert g.should_hold(G, now)
    assert g.verdict(G, VALID - MARGIN) is Why.EXPIRED


# ---- revoked, released --------------------------------------------------------------------


def test_revoked_notice_releases_at_once() -> None:
    g = gate(1, (1, VALID, False))
    g.on_notice(G, 1, 0.0, True)
    assert g.verdict(G, NOW) is Why.REVOKED
    assert g.valid_until(G) is None


def test_release_command_releases_at_once_and_lasts() -> None:
    g = gate(1, (1, VALID, False))
    g.on_release(G)
    assert g.verdict(G, NOW) is Why.NO_COMMAND
    assert g.valid_until(G) is None
    g.on_notice(G, 1, VALID + 1.0, False)  # the lease holder keeps renewing: still released
    assert g.verdict(G, NOW) is Why.NO_COMMAND
    g.on_acquire(G, 2)  # given back later, at a new epoch: needs a notice of that epoch
    assert g.verdict(G, NOW) is Why.OTHER_EPOCH


def test_release_of_a_group_not_held_changes_nothing() -> None:
    g = HoldGate(MARGIN)
    g.on_release(G)
    assert g.verdict(G, NOW) is Why.NO_COMMAND


# ---- epochs and ordering ----------------------------------------------------------------


@pytest.mark.parametrize("revoked", [False, True])
def test_notice_of_an_older_epoch_is_ignored(revoked: bool) -> None:
    g = gate(2, (2, VALID, False))
    g.on_notice(G, 1, VALID + 5.0, revoked)  # the old epoch's notice, arriving late
    assert g.verdict(G, NOW) is Why.HOLD
    assert g.valid_until(G) == VALID - MARGIN
    old_command = gate(1, (2, VALID, False))
    old_command.on_notice(G, 1, VALID, False)
    assert old_command.verdict(G, NOW) is Why.OTHER_EPOCH


def test_notice_of_a_newer_epoch_replaces_even_when_shorter() -> None:
    g = gate(1, (1, VALID + 5.0, False))
    g.on_notice(G, 2, VALID, False)
    assert g.verdict(G, NOW) is Why.OTHER_EPOCH  # the command is still for epoch 1
    g.on_acquire(G, 2)
    assert g.valid_until(G) == VALID - MARGIN


def test_out_of_order_notices_of_one_epoch_do_not_shorten_validity() -> None:
    g = gate(1, (1, VALID + 0.125, False))
    g.on_notice(G, 1, VALID, False)  # an earlier renewal's notice, delivered late
    assert g.valid_until(G) == VALID + 0.125 - MARGIN
    assert g.should_hold(G, VALID)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=2000.0, allow_nan=False), min_size=1,
                max_size=8))
def test_validity_is_the_latest_notice_of_an_epoch_in_any_order(untils: list[float]) -> None:
    g = gate(1)
    for u in untils:
        g.on_notice(G, 1, u, False)
    assert g.valid_until(G) == max(untils) - MARGIN
    assert g.should_hold(G, NOW) is (max(untils) - MARGIN > NOW)


# ---- restart ----------------------------------------------------------------------------


def test_after_restart_nothing_is_held_until_a_notice() -> None:
    """A restarted executor (a new HoldGate) holds nothing, even once the arbiter's
    command is accepted again, until a valid notice of that epoch arrives."""
    g = HoldGate(MARGIN)
    assert g.verdict(G, NOW) is Why.NO_COMMAND
    g.on_acquire(G, 1)
    assert g.verdict(G, NOW) is Why.NO_NOTICE
    g.on_notice(G, 1, NOW - 1.0, False)  # an old notice (already expired)
    assert g.verdict(G, NOW) is Why.EXPIRED
    g.on_notice(G, 1, VALID, False)
    assert g.verdict(G, NOW) is Why.HOLD
