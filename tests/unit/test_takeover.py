"""The arbiter's takeover rules (vtlha.protocol.takeover): table tests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtlha.protocol.takeover import acquire_wait, claim_epoch

TTL, MARGIN = 0.3, 0.03


@pytest.mark.parametrize(("released", "seen", "now", "expected"), [
    (True, 10.0, 10.01, 0.0),            # every old executor acked: no wait
    (True, None, 10.0, 0.0),
    (False, None, 10.0, TTL + MARGIN),   # never saw a renewal: the whole lease + margin
    (False, 10.0, 10.0, TTL + MARGIN),   # renewal seen just now
    (False, 10.0, 10.1, TTL + MARGIN - 0.1),
    (False, 10.0, 10.33, 0.0),           # its lease (and the margin) ran out
    (False, 10.0, 99.0, 0.0),
])
def test_acquire_wait(released: bool, seen: float | None, now: float, expected: float) -> None:
    got = acquire_wait(released_all=released, last_renewal_seen=seen, now=now,
                       lease_ttl=TTL, margin=MARGIN)
    assert got == pytest.approx(expected, abs=1e-9)


@given(seen=st.floats(0, 1e6), delay=st.floats(0, 10))
def test_wait_never_ends_before_the_old_lease_plus_margin(seen: float, delay: float) -> None:
    """The old owner's lease ends at most lease_ttl after it *sent* its last renewal, which
    was before the arbiter saw it: the gate opens no earlier than seen + ttl + margin."""
    now = seen + delay
    wait = acquire_wait(released_all=False, last_renewal_seen=seen, now=now, lease_ttl=TTL,
                        margin=MARGIN)
    assert now + wait >= seen + TTL + MARGIN - 1e-9
    assert wait >= 0


def test_claim_writes_the_next_epoch() -> None:
    assert claim_epoch(1) == 2 and claim_epoch(41) == 42
