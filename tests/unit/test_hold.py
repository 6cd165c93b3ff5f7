"""Unit tests of the executors' hold rule (``HoldGate``, DESIGN.md "Roles on a node"):
level-triggered — hold group G at epoch e exactly while a lease notice for (G, e) from
the node's own lease holder is valid (``now < valid_until - margin``); an acquire command
changes no verdict; a release at epoch e' drops G at once and no notice below e' brings
it back. Plain objects, no mocks; times are binary-exact so boundaries compare exactly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtlha.protocol.hold import HoldGate, Why

MARGIN = 0.03125
G, H = "node-a-data", "node-a-mgmt"
NOW = 1000.0
VALID = NOW + 0.25  # a notice's valid_until


def gate(release: int | None = None,
         notice: tuple[int, float, bool] | None = None) -> HoldGate:
    g = HoldGate(MARGIN)
    if release is not None:
        g.on_release(G, release)
    if notice is not None:
        g.on_notice(G, *notice)
    return g


# ---- level-triggered: a valid notice is enough; no command is needed --------------------


@pytest.mark.parametrize(("release", "notice", "why"), [
    (None, None, Why.NO_NOTICE),
    (None, (1, VALID, False), Why.HOLD),  # no command at all: the notice alone holds
    (2, (1, VALID, False), Why.RELEASED),  # released at 2: a notice of 1 never holds
    (2, (2, VALID, False), Why.HOLD),  # the floor is "below", not "at"
    (2, (3, VALID, False), Why.HOLD),  # given back later at a newer epoch
    (None, (1, VALID, True), Why.REVOKED),
], ids=["nothing", "notice-only", "below-floor", "at-floor", "above-floor", "revoked"])
def test_holds_exactly_while_a_valid_notice_at_or_above_the_floor(
        release: int | None, notice: tuple[int, float, bool] | None, why: Why) -> None:
    g = gate(release, notice)
    assert g.verdict(G, NOW) is why
    assert g.should_hold(G, NOW) is (why is Why.HOLD)


def test_an_acquire_command_changes_no_verdict() -> None:
    """Commands only make the executor converge sooner; holding never depends on one
    arriving (trace 1 and 3 of issue 14: the arbiter died after the claim)."""
    for notice in (None, (3, VALID, False), (3, VALID, True)):
        g, with_cmd = gate(None, notice), gate(None, notice)
        with_cmd.on_acquire(G, 3)
        assert g.verdict(G, NOW) is with_cmd.verdict(G, NOW)
    g = gate(None, (3, VALID, False))
    assert g.epoch(G) == 3


def test_groups_are_independent() -> None:
    g = gate(None, (1, VALID, False))
    assert g.verdict(H, NOW) is Why.NO_NOTICE
    g.on_notice(H, 1, VALID, True)
    assert g.verdict(H, NOW) is Why.REVOKED
    g.on_release(H, 5)
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
    assert gate(None, (1, VALID, False)).verdict(G, now) is why


def test_valid_until_is_where_holding_stops() -> None:
    assert gate(None, (1, VALID, False)).valid_until(G) == VALID - MARGIN
    assert gate(1, None).valid_until(G) is None
    assert gate(2, (1, VALID, False)).valid_until(G) is None  # below the floor
    assert gate(None, (1, VALID, True)).valid_until(G) is None


def test_lease_runs_out_on_its_own_when_notices_stop() -> None:
    """A node cut off, or whose lease holder died, stops answering within the lease."""
    g = gate(None, (1, VALID, False))
    for now in (NOW, NOW + 0.125, VALID - MARGIN - 0.0078125):
        assert g.should_hold(G, now)
    assert g.verdict(G, VALID - MARGIN) is Why.EXPIRED


# ---- revoked, released --------------------------------------------------------------------


def test_revoked_notice_releases_at_once() -> None:
    g = gate(None, (1, VALID, False))
    g.on_notice(G, 1, 0.0, True)
    assert g.verdict(G, NOW) is Why.REVOKED
    assert g.valid_until(G) is None


def test_release_command_releases_at_once_and_lasts() -> None:
    g = gate(None, (1, VALID, False))
    g.on_release(G, 2)  # the arbiter claimed it for another node at epoch 2
    assert g.verdict(G, NOW) is Why.RELEASED
    assert g.valid_until(G) is None
    # The lease holder's watch lags: it renewed once more (or its notice was late).
    g.on_notice(G, 1, VALID + 1.0, False)
    assert g.verdict(G, NOW) is Why.RELEASED
    g.on_notice(G, 2, VALID, False)  # given back later, at the floor's epoch or above
    assert g.verdict(G, NOW) is Why.HOLD


def test_release_without_an_epoch_is_above_the_noticed_epoch() -> None:
    g = gate(None, (4, VALID, False))
    g.on_release(G)
    assert g.verdict(G, NOW) is Why.RELEASED
    g.on_notice(G, 5, VALID, False)
    assert g.verdict(G, NOW) is Why.HOLD


def test_release_floor_never_lowers() -> None:
    g = gate(5, None)
    g.on_release(G, 3)
    g.on_notice(G, 4, VALID, False)
    assert g.verdict(G, NOW) is Why.RELEASED


def test_release_floor_survives_a_restart_through_the_floors_given() -> None:
    """The executor persists floors with its fencing tokens and hands them to its new
    gate: a restart does not let an old epoch's notice hold again."""
    g = HoldGate(MARGIN, floors={G: 7})
    g.on_notice(G, 6, VALID, False)
    assert g.verdict(G, NOW) is Why.RELEASED
    g.reset({G: 7})
    g.on_notice(G, 6, VALID, False)
    assert g.verdict(G, NOW) is Why.RELEASED


def test_reset_forgets_notices_and_floors_of_an_old_bucket() -> None:
    """A recreated KV bucket starts its epochs again: after reset, epoch 1 holds."""
    g = gate(9, (12, VALID, False))
    g.reset()
    g.on_notice(G, 1, VALID, False)
    assert g.verdict(G, NOW) is Why.HOLD


def test_release_of_a_group_not_held_changes_nothing_now() -> None:
    g = HoldGate(MARGIN)
    g.on_release(G, 3)
    assert g.verdict(G, NOW) is Why.NO_NOTICE


# ---- epochs and ordering ----------------------------------------------------------------


@pytest.mark.parametrize("revoked", [False, True])
def test_notice_of_an_older_epoch_is_ignored(revoked: bool) -> None:
    g = gate(None, (2, VALID, False))
    g.on_notice(G, 1, VALID + 5.0, revoked)  # the old epoch's notice, arriving late
    assert g.verdict(G, NOW) is Why.HOLD
    assert g.epoch(G) == 2
    assert g.valid_until(G) == VALID - MARGIN


def test_notice_of_a_newer_epoch_replaces_even_when_shorter() -> None:
    g = gate(None, (1, VALID + 5.0, False))
    g.on_notice(G, 2, VALID, False)
    assert g.epoch(G) == 2
    assert g.valid_until(G) == VALID - MARGIN


def test_a_revoke_is_final_for_its_epoch() -> None:
    g = gate(None, (3, VALID, False))
    g.on_notice(G, 3, 0.0, True)
    g.on_notice(G, 3, VALID + 1.0, False)  # a renewal's notice delivered after the revoke
    assert g.verdict(G, NOW) is Why.REVOKED
    g.on_notice(G, 4, VALID, False)
    assert g.verdict(G, NOW) is Why.HOLD


def test_a_revoke_is_final_only_for_notices_decided_before_it() -> None:
    """``since`` is when the lease holder decided (renewal sent, or dropped). A notice of
    the revoked epoch decided after the drop comes from a lease holder that took the group
    again by compare-and-set (a recreated bucket starting at the same epoch): it holds."""
    g = HoldGate(MARGIN)
    g.on_notice(G, 1, VALID, False, since=NOW - 0.5)
    g.on_notice(G, 1, 0.0, True, since=NOW - 0.25)  # dropped
    g.on_notice(G, 1, VALID + 1.0, False, since=NOW - 0.375)  # decided before: late
    assert g.verdict(G, NOW) is Why.REVOKED
    g.on_notice(G, 1, VALID, False, since=NOW - 0.125)  # decided after the drop
    assert g.verdict(G, NOW) is Why.HOLD
    g.on_notice(G, 1, 0.0, True, since=NOW - 0.25)  # the old revoke delivered again
    assert g.verdict(G, NOW) is Why.HOLD
    g.on_notice(G, 1, 0.0, True, since=NOW)  # a new drop
    assert g.verdict(G, NOW) is Why.REVOKED


def test_out_of_order_notices_of_one_epoch_do_not_shorten_validity() -> None:
    g = gate(None, (1, VALID + 0.125, False))
    g.on_notice(G, 1, VALID, False)  # an earlier renewal's notice, delivered late
    assert g.valid_until(G) == VALID + 0.125 - MARGIN
    assert g.should_hold(G, VALID)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=2000.0, allow_nan=False), min_size=1,
                max_size=8))
def test_validity_is_the_latest_notice_of_an_epoch_in_any_order(untils: list[float]) -> None:
    g = gate()
    for u in untils:
        g.on_notice(G, 1, u, False)
    assert g.valid_until(G) == max(untils) - MARGIN
    assert g.should_hold(G, NOW) is (max(untils) - MARGIN > NOW)


# ---- restart ----------------------------------------------------------------------------


def test_after_restart_nothing_is_held_until_a_notice() -> None:
    """A restarted executor (a new HoldGate) holds nothing until a valid notice."""
    g = HoldGate(MARGIN)
    assert g.verdict(G, NOW) is Why.NO_NOTICE
    g.on_acquire(G, 1)
    assert g.verdict(G, NOW) is Why.NO_NOTICE
    g.on_notice(G, 1, NOW - 1.0, False)  # an old notice (already expired)
    assert g.verdict(G, NOW) is Why.EXPIRED
    g.on_notice(G, 1, VALID, False)
    assert g.verdict(G, NOW) is Why.HOLD
