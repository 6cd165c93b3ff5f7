"""Unit tests of the executors' fencing tokens: the highest term and, per group, the
highest epoch seen; refusals name why; both survive a restart (a new store on the
same file)."""

from __future__ import annotations

from pathlib import Path

from vtlha.fencing import FencingStore


def store(tmp_path: Path) -> FencingStore:
    return FencingStore(tmp_path / "node-a" / "fencing.json")


def test_fresh_store_accepts_anything(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.term == 0
    assert s.epochs == {}
    assert s.refusal(0, None, None) is None
    assert s.refusal(0, "node-a-data", 0) is None
    assert s.refusal(7, "node-a-data", 3) is None


def test_equal_and_higher_term_accepted_lower_refused(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record(5)
    assert s.refusal(5, None, None) is None
    assert s.refusal(6, None, None) is None
    reason = s.refusal(4, None, None)
    assert reason is not None
    assert "stale term" in reason
    assert "4" in reason and "5" in reason


def test_equal_and_higher_epoch_accepted_lower_refused(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record(5, "node-a-data", 3)
    assert s.refusal(5, "node-a-data", 3) is None
    assert s.refusal(5, "node-a-data", 4) is None
    reason = s.refusal(5, "node-a-data", 2)
    assert reason is not None
    assert "stale epoch" in reason
    assert "node-a-data" in reason


def test_epochs_are_per_group(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record(1, "node-a-data", 9)
    assert s.refusal(1, "node-a-mgmt", 1) is None
    assert s.refusal(1, "node-b-data", 0) is None
    assert s.refusal(1, "node-a-data", 8) is not None


def test_term_is_checked_before_epoch(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record(5, "node-a-data", 3)
    reason = s.refusal(4, "node-a-data", 10)
    assert reason is not None and "stale term" in reason
    reason = s.refusal(4, "node-a-data", 1)
    assert reason is not None and "stale term" in reason


def test_a_command_without_group_is_checked_on_term_only(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record(5, "node-a-data", 3)
    assert s.refusal(5, None, None) is None
    assert s.refusal(5, "node-a-data", None) is None


def test_record_never_lowers(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record(5, "node-a-data", 3)
    s.record(2, "node-a-data", 1)
    assert s.term == 5
    assert s.epochs == {"node-a-data": 3}
    assert s.refusal(2, None, None) is not None
    assert s.refusal(5, "node-a-data", 1) is not None


def test_persisted_across_a_new_store(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record(7, "node-a-data", 4)
    s.record(7, "node-b-mgmt", 2)
    assert s.path.exists()

    again = store(tmp_path)
    assert again.term == 7
    assert again.epochs == {"node-a-data": 4, "node-b-mgmt": 2}
    term_reason = again.refusal(6, None, None)
    assert term_reason is not None and "stale term" in term_reason
    epoch_reason = again.refusal(7, "node-a-data", 3)
    assert epoch_reason is not None and "stale epoch" in epoch_reason
    assert again.refusal(7, "node-b-mgmt", 2) is None
    assert again.refusal(8, "node-a-data", 5) is None


def test_no_temporary_file_left_behind(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record(3, "node-a-data", 1)
    files = sorted(p.name for p in s.path.parent.iterdir())
    assert files == [s.path.name]


# ---- release floors and the KV bucket's identity (issue 14) ------------------------------


def test_a_release_raises_the_groups_floor_and_it_is_persisted(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record(3, "node-a-data", 4)  # an acquire: no floor
    assert s.floors == {}
    s.record(3, "node-a-data", 5, release=True)
    s.record(3, "node-a-data", 2, release=True)  # never lowers
    assert s.floors == {"node-a-data": 5}
    assert store(tmp_path).floors == {"node-a-data": 5}


def test_a_command_without_a_bucket_is_checked_against_the_persisted_one(
        tmp_path: Path) -> None:
    s = store(tmp_path)
    s.adopt("2026-12-06T10:00:00.000000001Z")
    s.record(40, "node-a-data", 9)
    assert not s.is_other_bucket("")  # legacy/unknown: the persisted tokens decide
    reason = s.refusal(2, "node-a-data", 1)
    assert reason is not None and "stale term" in reason


def test_another_bucket_needs_confirming_and_adopting_it_starts_afresh(tmp_path: Path) -> None:
    old, new = "2026-12-06T10:00:00.000000001Z", "2026-12-06T11:00:00.000000002Z"
    s = store(tmp_path)
    assert s.adopt(old) is False  # the first identity seen: named, nothing reset
    s.record(40, "node-a-data", 9, release=True)
    assert s.is_other_bucket(new) and not s.is_other_bucket(old)
    assert s.adopt(new) is True
    assert (s.bucket, s.term, s.epochs, s.floors) == (new, 0, {}, {})
    assert s.refusal(1, "node-a-data", 1) is None  # the new bucket's arbiter
    again = store(tmp_path)
    assert again.bucket == new and again.term == 0
    assert again.is_other_bucket(old)  # the old bucket's arbiter must be refused


def test_bucket_refusal_names_both_buckets(tmp_path: Path) -> None:
    reason = FencingStore.bucket_refusal("old-id", "new-id")
    assert "old-id" in reason and "new-id" in reason
    assert "cannot confirm" in FencingStore.bucket_refusal("x", None)


def test_a_store_of_an_older_version_loads_without_bucket_or_floors(tmp_path: Path) -> None:
    p = tmp_path / "node-a" / "fencing.json"
    p.parent.mkdir(parents=True)
    p.write_bytes(b'{"term": 7, "epochs": {"node-a-data": 3}}')
    s = FencingStore(p)
    assert (s.bucket, s.term, s.epochs, s.floors) == ("", 7, {"node-a-data": 3}, {})
    assert s.adopt("id-1") is False and s.term == 7  # unknown -> named, tokens kept
