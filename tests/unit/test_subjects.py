"""Unit tests of subject and KV names against DESIGN.md's "Contracts"."""

from __future__ import annotations

import dataclasses

import pytest

from vtlha.subjects import Subjects

S = Subjects("demo")


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (S.hb("node-a"), "ha.demo.hb.node-a"),
        (S.storage("node-a"), "ha.demo.storage.node-a"),
        (S.mgmt("node-b"), "ha.demo.mgmt.node-b"),
        (S.lease("node-b"), "ha.demo.lease.node-b"),
        (S.promise("node-a"), "ha.demo.promise.node-a"),
        (S.cmd("node-a", "ip-manager"), "ha.demo.cmd.node-a.ip-manager"),
        (S.cmd("node-b", "storage-monitor"), "ha.demo.cmd.node-b.storage-monitor"),
        (S.ping("node-a", "ip-manager"), "ha.demo.ping.node-a.ip-manager"),
        (S.ping("node-b", "storage-monitor"), "ha.demo.ping.node-b.storage-monitor"),
        (S.admin("switchover"), "ha.demo.admin.switchover"),
        (S.admin("failback"), "ha.demo.admin.failback"),
        (S.admin("maintenance"), "ha.demo.admin.maintenance"),
        (S.admin("clear-hold"), "ha.demo.admin.clear-hold"),
        (S.event("node.down"), "ha.demo.events.node.down"),
        (S.event("group.takeover"), "ha.demo.events.group.takeover"),
        (S.event("started"), "ha.demo.events.started"),
        (S.events_all, "ha.demo.events.>"),
    ],
)
def test_subjects_match_the_contract(built: str, expected: str) -> None:
    assert built == expected


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (S.hb(), "ha.demo.hb.*"),
        (S.storage(), "ha.demo.storage.*"),
        (S.mgmt(), "ha.demo.mgmt.*"),
        (S.lease(), "ha.demo.lease.*"),
        (S.promise(), "ha.demo.promise.*"),
    ],
)
def test_per_node_subjects_default_to_a_wildcard(built: str, expected: str) -> None:
    assert built == expected


def test_event_subjects_fall_under_the_events_wildcard() -> None:
    prefix = S.events_all.removesuffix(">")
    for kind in ("node.down", "node.up", "group.takeover", "arbiter.leader"):
        assert S.event(kind).startswith(prefix)


def test_other_clusters_do_not_share_subjects() -> None:
    other = Subjects("prod-2")
    assert other.hb("node-a") == "ha.prod-2.hb.node-a"
    assert other.hb("node-a") != S.hb("node-a")
    assert other.events_all == "ha.prod-2.events.>"


@pytest.mark.parametrize(
    "subject", [S.hb("node-a"), S.storage("node-a"), S.mgmt("node-a"), S.lease("node-a")]
)
def test_node_of(subject: str) -> None:
    assert S.node_of(subject) == "node-a"


def test_jetstream_names() -> None:
    assert S.kv_bucket == "ha-demo"
    assert S.events_stream == "HA_EVENTS_demo"
    assert Subjects("prod-2").kv_bucket == "ha-prod-2"
    assert Subjects("prod-2").events_stream == "HA_EVENTS_prod-2"


def test_kv_keys() -> None:
    assert Subjects.group_key("node-a-data") == "group.node-a-data"
    assert S.group_key("node-b-mgmt") == "group.node-b-mgmt"
    assert Subjects.pair_key("pair-1") == "pair.pair-1"
    assert Subjects.LEADER_KEY == "arbiter.leader"
    assert S.LEADER_KEY == "arbiter.leader"


@pytest.mark.parametrize(
    "name", ["", "Demo", "de.mo", "de mo", "-demo", "de_mo", "de*", "de>", "démo", "demo\n"]
)
def test_invalid_cluster_name_is_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="invalid cluster name"):
        Subjects(name)


@pytest.mark.parametrize("name", ["demo", "a", "0", "prod-2", "x-y-z"])
def test_valid_cluster_names(name: str) -> None:
    assert Subjects(name).cluster == name


def test_subjects_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        S.cluster = "other"  # type: ignore[misc]
