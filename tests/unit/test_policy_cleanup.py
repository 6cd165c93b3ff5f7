"""The operator's cleanup of a data group (Pacemaker's ``resource cleanup``): the pure
policy's answer — which nodes forget the group's failures, whether its holder starts it
again, and the refusals."""

from __future__ import annotations

import dataclasses

import orjson

from vtlha.policy import Cleanup, GroupFailure, Refusal, Rule, Snapshot, answer, cleanup, explain

from .test_policy_rules import AD, AM, BD, NOW, A, B, nv, snap, sv


def test_cleanup_forgets_on_both_nodes_and_says_who_restarts_a_failed_group() -> None:
    assert cleanup(snap(), AD, None, NOW) == Cleanup(
        AD, (A, B), 4, "the failures of node-a-data's resources on node-a and node-b are "
        "forgotten", Rule.CLEANUP)
    failed = dataclasses.replace(sv(A), failed={AD: GroupFailure(4, "tape: start failed")})
    got = cleanup(snap(storage={A: failed, B: sv(B)}), AD, None, NOW)
    assert isinstance(got, Cleanup) and got.epoch == 4
    assert got.status.endswith("; node-a, which holds it and reports it failed (tape: start "
                               "failed), starts it again")
    # a failure reported at an older epoch says nothing about the group now
    old = dataclasses.replace(sv(A), failed={AD: GroupFailure(3, "old")})
    got = cleanup(snap(storage={A: old, B: sv(B)}), AD, None, NOW)
    assert isinstance(got, Cleanup) and "starts it again" not in got.status


def test_cleanup_on_one_node_and_with_the_companion_down() -> None:
    assert cleanup(snap(), BD, B, NOW) == Cleanup(
        BD, (B,), 6, "the failures of node-b-data's resources on node-b are forgotten",
        Rule.CLEANUP)
    got = cleanup(snap(b=nv(B, age=5.0)), AD, None, NOW)
    assert isinstance(got, Cleanup) and got.nodes == (A,)
    assert "node-b is down (its storage-monitor forgets its counts when it starts again)" \
        in got.status


def test_cleanup_refusals_name_the_reason() -> None:
    assert cleanup(snap(), "node-z-data", None, NOW) == Refusal(
        "cleanup node-z-data", "there is no group node-z-data")
    assert cleanup(snap(), AM, None, NOW) == Refusal(
        "cleanup node-a-mgmt", "node-a-mgmt is a management group: it has no storage "
        "resources")
    assert cleanup(snap(), AD, "node-z", NOW) == Refusal(
        "cleanup node-a-data on node-z", "node-z is not a node of pair-1")
    assert cleanup(snap(in_flight=frozenset({AD})), AD, None, NOW) == Refusal(
        "cleanup node-a-data", "a takeover of node-a-data is under way (try again when it "
        "ends)")
    assert cleanup(snap(a=nv(A, age=5.0)), AD, A, NOW) == Refusal(
        "cleanup node-a-data on node-a", "node-a is down: no storage-monitor to clean up")


def test_cleanup_as_a_request_and_replayed_by_explain() -> None:
    s = snap()
    assert answer(s, {"verb": "cleanup", "group": AD}, NOW) == (cleanup(s, AD, None, NOW),)
    assert answer(s, {"verb": "cleanup", "group": AD, "node": B}, NOW) == (
        cleanup(s, AD, B, NOW),)
    wire = orjson.loads(orjson.dumps({"snapshot": s.to_inputs(), "now": NOW,
                                      "request": {"verb": "cleanup", "group": AD}}))
    assert Snapshot.from_inputs(wire["snapshot"]).groups[AD].devices == ("vtl-a0",)
    assert explain(wire).startswith("the failures of node-a-data's resources")
