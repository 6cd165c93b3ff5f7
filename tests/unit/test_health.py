"""Hysteresis and "healthy since" trackers (vtlha.health): plain sequences, no mocks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtlha.health import CheckSample, CheckStates, Hysteresis, Since


def run(h: Hysteresis, results: str) -> str:
    """Feed 'g'/'b' results; the state after each as 'G'/'B'."""
    return "".join("G" if h.update(r == "g") else "B" for r in results)


@pytest.mark.parametrize(("rise", "fall", "results", "states"), [
    (2, 2, "g", "G"),  # the first result sets the state
    (2, 2, "b", "B"),
    (2, 2, "gbg", "GGG"),  # one bad result in a row is not enough
    (2, 2, "gbbg", "GGBB"),  # two are; one good is not enough to come back
    (2, 2, "gbbgg", "GGBBG"),
    (2, 3, "gbbbgbg", "GGGBBBB"),  # fall 3; then good bad good never rises
    (1, 1, "gbgb", "GBGB"),  # rise = fall = 1: no hysteresis
    (3, 1, "gbggg", "GBBBG"),
    (2, 2, "gbgbgbgb", "GGGGGGGG"),  # a flicker never changes it
])
def test_state_changes_only_after_rise_or_fall_in_a_row(rise: int, fall: int, results: str,
                                                         states: str) -> None:
    assert run(Hysteresis(rise, fall), results) == states


def test_initial_state_counts_from_the_first_result() -> None:
    h = Hysteresis(2, 2, initial=True)
    assert h.state is True
    assert run(h, "b") == "G"
    assert h.changed is False
    assert run(h, "b") == "B"
    assert h.changed is True


def test_changed_reports_each_transition_once() -> None:
    h = Hysteresis(2, 2)
    changes = []
    for r in "gbbbbgggb":
        h.update(r == "g")
        changes.append(h.changed)
    assert changes == [True, False, True, False, False, False, True, False, False]


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 2)])
def test_rise_and_fall_must_be_positive(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        Hysteresis(rise, fall)


@settings(max_examples=200, deadline=None)
@given(rise=st.integers(1, 4), fall=st.integers(1, 4), results=st.lists(st.booleans(),
                                                                         max_size=40))
def test_a_change_needs_that_many_agreeing_results_in_a_row(rise: int, fall: int,
                                                            results: list[bool]) -> None:
    h = Hysteresis(rise, fall)
    prev: bool | None = None
    for i, ok in enumerate(results):
        state = h.update(ok)
        if prev is not None and state != prev:
            need = rise if state else fall
            assert state == ok
            assert i + 1 >= need and all(r == ok for r in results[i + 1 - need:i + 1])
        prev = state


def test_check_states_split_fatal_and_nonfatal_after_hysteresis() -> None:
    cs = CheckStates(rise=2, fall=2)
    ok = [CheckSample("vtl", True, fatal=True), CheckSample("disk", True)]
    bad = [CheckSample("vtl", False, fatal=True), CheckSample("disk", False)]
    assert cs.update(ok) == ((), ())
    assert cs.update(bad) == ((), ())  # one bad result: not yet
    assert cs.update(bad) == (("vtl",), ("disk",))
    assert cs.update(ok) == (("vtl",), ("disk",))
    assert cs.update(ok) == ((), ())


def test_check_states_forget_checks_no_longer_reported_and_reset() -> None:
    cs = CheckStates(rise=1, fall=1)
    assert cs.update([CheckSample("a", False), CheckSample("b", False, True)]) == (("b",),
                                                                                  ("a",))
    assert cs.update([CheckSample("b", False, True)]) == (("b",), ())
    cs.reset()
    assert cs.failing() == ((), ())


def test_since_is_when_it_became_true_and_none_while_false() -> None:
    s = Since()
    assert s.update(False, 1.0) is None
    assert s.update(True, 2.0) == 2.0
    assert s.update(True, 5.0) == 2.0
    assert s.update(False, 6.0) is None
    assert s.update(True, 7.5) == 7.5
