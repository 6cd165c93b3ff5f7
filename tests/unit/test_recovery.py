"""Local recovery of a failed resource (vtlha.recovery, pure): failures counted per
(group, resource) within failure_timeout, a restart below migration_threshold, the group
given up at it; the resource config's fields, validated with errors that name them."""

from __future__ import annotations

import pytest

from vtlha.config import Resource, parse_config
from vtlha.errors import ConfigError
from vtlha.recovery import FailCounts, Next, recent, restart_delay, verdict

G, R = "node-a-data", "tape"


def record(fc: FailCounts, at: float, threshold: int = 2, timeout: float = 600.0,
           restart_failed: bool = False) -> tuple[Next, int]:
    v = fc.record(G, R, at, threshold=threshold, failure_timeout=timeout,
                  restart_failed=restart_failed)
    return v.next, v.failures


def test_default_one_restart_then_the_group_is_given_up() -> None:
    """migration_threshold 2 (the default): the first failure is restarted here, the
    second within failure_timeout gives the group up."""
    fc = FailCounts()
    assert record(fc, 100.0) == (Next.RESTART, 1)
    assert record(fc, 160.0) == (Next.GIVE_UP, 2)
    assert fc.count(G, R, 160.0, 600.0) == 2


def test_a_failure_older_than_failure_timeout_no_longer_counts() -> None:
    fc = FailCounts()
    assert record(fc, 100.0) == (Next.RESTART, 1)
    assert record(fc, 700.0) == (Next.RESTART, 1)  # exactly failure_timeout later: expired
    assert record(fc, 1299.9) == (Next.GIVE_UP, 2)
    assert fc.count(G, R, 2000.0, 600.0) == 0


@pytest.mark.parametrize(("threshold", "expected"), [
    (1, [Next.GIVE_UP]),
    (3, [Next.RESTART, Next.RESTART, Next.GIVE_UP]),
    (0, [Next.RESTART] * 5),
])
def test_migration_threshold(threshold: int, expected: list[Next]) -> None:
    """1: the first failure moves the group; 3: two restarts first; 0: never moved,
    always restarted (Pacemaker's meanings)."""
    fc = FailCounts()
    got = [record(fc, 10.0 * i, threshold=threshold)[0] for i in range(len(expected))]
    assert got == expected


def test_a_failure_timeout_of_zero_never_expires() -> None:
    fc = FailCounts()
    assert record(fc, 0.0, timeout=0.0) == (Next.RESTART, 1)
    assert record(fc, 1e9, timeout=0.0) == (Next.GIVE_UP, 2)
    assert recent((1.0, 2.0), 1e12, 0.0) == (1.0, 2.0)


def test_a_failed_restart_gives_up_at_once_and_is_counted() -> None:
    fc = FailCounts()
    assert record(fc, 0.0, threshold=5) == (Next.RESTART, 1)
    assert record(fc, 1.0, threshold=5, restart_failed=True) == (Next.GIVE_UP, 2)
    assert record(fc, 2.0, threshold=0, restart_failed=True)[0] is Next.GIVE_UP


def test_counts_are_per_group_and_resource() -> None:
    fc = FailCounts()
    fc.record(G, R, 0.0, threshold=2, failure_timeout=600.0)
    assert fc.record(G, "library", 1.0, threshold=2, failure_timeout=600.0).next is Next.RESTART
    assert fc.record("node-b-data", R, 1.0, threshold=2,
                     failure_timeout=600.0).next is Next.RESTART
    assert fc.counts(2.0, {(G, R): 600.0}) == {(G, R): 1, (G, "library"): 1,
                                              ("node-b-data", R): 1}
    assert fc.counts(700.0, {(G, R): 600.0, (G, "library"): 600.0,
                             ("node-b-data", R): 600.0}) == {}


def test_the_sentences_say_what_was_counted_and_what_follows() -> None:
    assert verdict(1, 2, 600.0).why == ("1 failure within failure_timeout 600 s "
                                        "(migration_threshold 2): restarted on this node")
    assert verdict(2, 2, 600.0).why == ("2 failures within failure_timeout 600 s, "
                                        "migration_threshold 2 reached: given up on this node")
    assert verdict(4, 0, 0.0).why == "4 failures (no migration_threshold): restarted on this node"
    assert verdict(1, 2, 600.0, restart_failed=True).why == (
        "the restart failed (1 failure within failure_timeout 600 s): given up on this node")
    assert verdict(2, 2, 600.0).gives_up and not verdict(1, 2, 600.0).gives_up


# ---- the resource's fields in the cluster file ---------------------------------------


def test_the_defaults_mirror_pacemaker_with_one_restart() -> None:
    r = Resource()
    assert (r.migration_threshold, r.failure_timeout) == (2, 600.0)


def _config(**resource: object) -> dict[str, object]:
    node = {"name": "node-a", "service_ip": "198.51.100.1/24",
            "groups": {"data": {"devices": ["d0"], "resources": [{"name": "tape", **resource}]}}}
    return {"cluster": "c", "nats": {"servers": ["node-a"]},
            "pairs": [{"name": "p", "nodes": [node, {"name": "node-b",
                                                     "service_ip": "198.51.100.2/24"}]}],
            "devices": {"d0": {"backing": "d0.img", "paths": {"node-a": 1}}}}


@pytest.mark.parametrize(("fields", "message"), [
    ({"migration_threshold": -1}, "resources[0].migration_threshold: Input should be "
                                  "greater than or equal to 0"),
    ({"migration_threshold": True}, "resources[0].migration_threshold: Input should be a "
                                    "valid integer"),
    ({"migration_threshold": 1.5}, "resources[0].migration_threshold: Input should be a "
                                   "valid integer"),
    ({"failure_timeout": -1}, "resources[0].failure_timeout: Input should be greater than "
                              "or equal to 0"),
    ({"failure_timeout": 30}, "failure_timeout (30 s) must be longer than "
                              "(migration_threshold - 1) * (monitor_interval + "
                              "monitor_timeout + stop_timeout + start_timeout) = 55 s"),
    ({"failure_timeout": 100, "migration_threshold": 3}, "= 110 s"),
])
def test_bad_values_are_refused_naming_the_field(fields: dict[str, object],
                                                  message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_config(**fields), "cluster.yaml")
    text = str(e.value)
    assert text.startswith("cluster.yaml: invalid cluster config")
    assert "pairs[0].nodes[0].groups.data.resources[0]" in text
    assert message in text


@pytest.mark.parametrize("fields", [
    {"failure_timeout": 0},  # never expires
    {"failure_timeout": 30, "migration_threshold": 1},  # one failure moves: no gap to cover
    {"failure_timeout": 30, "migration_threshold": 0},  # never moves
    {"failure_timeout": 5, "monitor_interval": 0.5, "monitor_timeout": 1, "stop_timeout": 1,
     "start_timeout": 2},
])
def test_consistent_values_load(fields: dict[str, object]) -> None:
    r = parse_config(_config(**fields)).node("node-a").groups.data.effective_resources()[0]
    for k, v in fields.items():
        assert getattr(r, k) == v


def test_a_restart_after_a_failed_start_backs_off_doubling_to_a_cap() -> None:
    assert [restart_delay(n) for n in (1, 2, 3, 4, 5, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert restart_delay(0) == 0.5 and restart_delay(3, base=0.1, cap=0.3) == 0.3


def test_cleanup_forgets_every_failure_of_the_group_only() -> None:
    fc = FailCounts()
    record(fc, 100.0)
    record(fc, 110.0)
    fc.record(G, "other", 120.0, threshold=2, failure_timeout=600.0)
    fc.record("node-b-data", R, 130.0, threshold=2, failure_timeout=600.0)
    assert fc.forget(G) == {R: 2, "other": 1}
    assert fc.count(G, R, 140.0, 600.0) == 0 and fc.forget(G) == {}
    assert fc.count("node-b-data", R, 140.0, 600.0) == 1
