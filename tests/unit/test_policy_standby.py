"""Operator standby (``pcs node standby``) and the failback mode at run time: the pure
policy's answers, and what a node in standby means for every automatic rule."""

from __future__ import annotations

import orjson

from vtlha.policy import (
    Refusal,
    Rule,
    SetFailbackMode,
    SetStandby,
    Snapshot,
    Takeover,
    answer,
    decide,
    explain,
    set_failback_mode,
    standby,
)

from .test_policy_rules import AD, AM, AWAY, BD, BM, NOW, A, B, moves, nv, snap, sv

IN_A = frozenset({A})


def test_standby_on_moves_every_group_of_the_node_and_records_it() -> None:
    got = standby(snap(), "pair-1", A, True, NOW)
    assert isinstance(got, tuple)
    assert got[0] == SetStandby("pair-1", A, True, True, "node-a enters standby: it is given "
                                "no group until taken out; its 2 groups move to node-b",
                                Rule.STANDBY)
    assert [(t.group, t.old, t.new, t.rule) for t in got[1:] if isinstance(t, Takeover)] == [
        (AD, A, B, Rule.STANDBY), (AM, A, B, Rule.STANDBY)]
    assert got[1].status == ("node-b takes over node-a-data from node-a: node-a is put in "
                             "standby by an operator")


def test_standby_on_is_all_or_none() -> None:
    """The companion cannot serve node-a's data group (no path to its device): refused,
    with the group's reason; nothing is recorded."""
    s = snap(storage={A: sv(A), B: sv(B, vtl_a0=0)})
    assert standby(s, "pair-1", A, True, NOW) == Refusal(
        "standby on pair-1 node-a", "node-a-data: node-b reaches no path to vtl-a0")
    busy = snap(in_flight=frozenset({AM}))
    assert standby(busy, "pair-1", A, True, NOW) == Refusal(
        "standby on pair-1 node-a", "node-a-mgmt: a takeover is under way")
    dead_b = snap(b=nv(B, age=5.0))
    got = standby(dead_b, "pair-1", A, True, NOW)
    assert isinstance(got, Refusal) and "node-b is not alive" in got.reason


def test_standby_refusals_for_unknown_pair_or_node() -> None:
    assert standby(snap(), "pair-9", A, True, NOW) == Refusal(
        "standby on pair-9 node-a", "there is no pair pair-9")
    assert standby(snap(), "pair-1", "node-z", False, NOW) == Refusal(
        "standby off pair-1 node-z", "node-z is not a node of pair-1")


def test_standby_of_a_node_serving_nothing_and_again() -> None:
    got = standby(snap(owners=AWAY), "pair-1", A, True, NOW)
    assert got == (SetStandby("pair-1", A, True, True, "node-a enters standby: it is given "
                              "no group until taken out; it serves no group", Rule.STANDBY),)
    again = standby(snap(owners=AWAY, standby=IN_A), "pair-1", A, True, NOW)
    assert again == (SetStandby("pair-1", A, True, False, "node-a is already in standby",
                                Rule.STANDBY),)


def test_standby_off_says_how_its_groups_come_home() -> None:
    manual = standby(snap(owners=AWAY, standby=IN_A), "pair-1", A, False, NOW)
    assert manual == (SetStandby("pair-1", A, False, True, "node-a leaves standby: it may be "
                                 "given groups again; its groups come home with `failback "
                                 "pair-1` (failback is manual)", Rule.STANDBY),)
    auto = standby(snap(owners=AWAY, standby=IN_A, failback="auto"), "pair-1", A, False, NOW)
    assert isinstance(auto[0], SetStandby) and "come home by themselves" in auto[0].status
    assert standby(snap(), "pair-1", A, False, NOW) == (
        SetStandby("pair-1", A, False, False, "node-a is not in standby", Rule.STANDBY),)


def test_a_node_in_standby_gets_nothing_automatically() -> None:
    """No failback to it (auto), no takeover to it when its companion dies, no switchover
    to it; its own groups stay with the companion."""
    away = snap(owners=AWAY, standby=IN_A, failback="auto")
    assert moves(decide(away, NOW)) == {}
    b_dead = snap(b=nv(B, age=5.0, down=True), standby=IN_A)
    assert {g for g, (new, _) in moves(decide(b_dead, NOW)).items() if new == A} == set()
    got = answer(away, {"verb": "switchover", "group": AD}, NOW)
    assert got == Refusal("switchover node-a-data", "node-a is in standby (take it out "
                          "first: standby off pair-1 node-a)")
    failback = answer(away, {"verb": "failback", "pair": "pair-1"}, NOW)
    assert isinstance(failback, Refusal) and "node-a is in standby" in failback.reason


def test_a_group_still_on_a_node_in_standby_moves_by_the_standby_rule() -> None:
    """The level-triggered side: whatever happened to the request's moves, a group owned
    by a node in standby goes to a fit companion — not in maintenance, not within the
    hold after its last move."""
    s = snap(standby=IN_A)
    assert moves(decide(s, NOW)) == {AD: (B, Rule.STANDBY), AM: (B, Rule.STANDBY)}
    assert moves(decide(snap(standby=IN_A, maintenance=True), NOW)) == {}
    assert moves(decide(snap(standby=IN_A, moved={AD: 1.0, AM: 1.0}), NOW)) == {}
    # the companion cannot serve the data group: the management group alone moves
    no_path = snap(standby=IN_A, storage={A: sv(A), B: sv(B, vtl_a0=0)})
    assert moves(decide(no_path, NOW)) == {AM: (B, Rule.STANDBY)}
    # both in standby: nothing moves anywhere
    assert moves(decide(snap(standby=frozenset({A, B})), NOW)) == {}


def test_a_home_in_standby_is_passed_over_at_initial_assignment() -> None:
    s = snap(owners={AD: None, AM: None}, standby=IN_A, initial_assign_wait=5.0)
    assert moves(decide(s, NOW)) == {AD: (B, Rule.INITIAL_ASSIGN), AM: (B, Rule.INITIAL_ASSIGN)}
    assert moves(decide(snap(owners={**AWAY, BD: None, BM: None}, standby=IN_A), NOW)) == {
        BD: (B, Rule.INITIAL_ASSIGN), BM: (B, Rule.INITIAL_ASSIGN)}


def test_failback_mode_at_run_time() -> None:
    assert set_failback_mode(snap(), "pair-1", "auto") == SetFailbackMode(
        "pair-1", "auto", True, "failback of pair-1 is now auto: a group away from home goes "
        "back once its home has been healthy for failback_hold_time (8 s)", Rule.FAILBACK_MODE)
    again = set_failback_mode(snap(failback="auto"), "pair-1", "auto")
    assert isinstance(again, SetFailbackMode) and not again.changed
    manual = set_failback_mode(snap(failback="auto"), "pair-1", "manual")
    assert isinstance(manual, SetFailbackMode) and manual.changed
    assert manual.status.endswith("groups away from home stay until `failback pair-1`")
    assert set_failback_mode(snap(), "pair-1", "sometimes") == Refusal(
        "failback-mode sometimes pair-1", "unknown failback mode 'sometimes' (auto or manual)")
    assert set_failback_mode(snap(), "pair-3", "auto") == Refusal(
        "failback-mode auto pair-3", "there is no pair pair-3")


def test_standby_survives_the_events_inputs_and_explain_replays_it() -> None:
    s = snap(standby=IN_A)
    wire = orjson.loads(orjson.dumps({"snapshot": s.to_inputs(), "now": NOW}))
    assert Snapshot.from_inputs(wire["snapshot"]).pairs[0].standby == IN_A
    assert explain(wire) == decide(s, NOW).status
    req = {**wire, "request": {"verb": "standby", "pair": "pair-1", "node": A, "on": False}}
    assert explain(req).startswith("node-a leaves standby")
