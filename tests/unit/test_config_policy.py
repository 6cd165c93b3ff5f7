"""The policy's knobs in the cluster file (issue 7): a pair's failback hold time and
anti-flap settings, the management report's staleness, and the pair record's failures."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from vtlha.config import load_config
from vtlha.errors import ConfigError
from vtlha.messages import PairRecord, decode, encode

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"


def example() -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text())
    assert isinstance(data, dict)
    return copy.deepcopy(data)


def load(tmp_path: Path, data: dict[str, Any]) -> Any:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


def error(tmp_path: Path, data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, data)
    text = str(exc.value)
    assert str(tmp_path / "cluster.yaml") in text
    return text


def test_pair_policy_defaults(tmp_path: Path) -> None:
    pair = load(tmp_path, example()).pairs[0]
    assert pair.failback == "manual"
    assert (pair.failback_hold_time, pair.flap_max, pair.flap_window) == (30.0, 3, 3600.0)


def test_pair_policy_knobs_load(tmp_path: Path) -> None:
    data = example()
    data["pairs"][0].update(failback="auto", failback_hold_time=0, flap_max=5, flap_window=60)
    pair = load(tmp_path, data).pairs[0]
    assert (pair.failback, pair.failback_hold_time, pair.flap_max, pair.flap_window) == (
        "auto", 0.0, 5, 60.0)


@pytest.mark.parametrize(("values", "field", "reason"), [
    ({"failback_hold_time": -1}, "pairs[0].failback_hold_time", "greater than or equal to 0"),
    ({"flap_max": 0}, "pairs[0].flap_max", "greater than or equal to 1"),
    ({"flap_window": 0}, "pairs[0].flap_window", "greater than 0"),
    ({"failback": "sometimes"}, "pairs[0].failback", "'manual' or 'auto'"),
    ({"failback_hold_time": 120, "flap_window": 60}, "pairs[0]",
     "flap_window (60.0) must be >= failback_hold_time (120.0)"),
], ids=["hold-negative", "flap-max-zero", "window-zero", "failback-mode", "window-below-hold"])
def test_pair_policy_knob_errors_name_the_field(tmp_path: Path, values: dict[str, Any],
                                                field: str, reason: str) -> None:
    data = example()
    data["pairs"][0].update(values)
    text = error(tmp_path, data)
    assert field in text and reason in text, text
    assert next(iter(values)) in text, text  # the knob's own name


def test_mgmt_stale_after_defaults_to_three_probe_intervals(tmp_path: Path) -> None:
    data = example()
    data["timings"].pop("mgmt_stale_after", None)
    data["timings"]["probe_interval"] = 0.25
    t = load(tmp_path, data).timings
    assert t.mgmt_stale_after == 0.75


def test_mgmt_stale_after_must_cover_one_probe_interval(tmp_path: Path) -> None:
    data = example()
    data["timings"].update(probe_interval=0.5, mgmt_stale_after=0.25)
    text = error(tmp_path, data)
    assert "timings" in text and "mgmt_stale_after (0.25) must be >= probe_interval" in text


def test_pair_record_failures_are_open_world_and_optional() -> None:
    old = decode(PairRecord, b'{"maintenance": true, "hold": ["node-a"]}')
    assert old.failures == {} and old.hold == ["node-a"]
    rec = PairRecord(hold=["node-a"], failures={"node-a": [1.5e9, 1.5e9 + 60]})
    again = decode(PairRecord, encode(rec)[:-1] + b', "future": 1}')
    assert again == rec
