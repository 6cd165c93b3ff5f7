"""The timing profile docs/deploy.md recommends for a real pair is a valid cluster file
(the rules of ``Timings`` hold), and slower than the example's where it says so."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.conftest import EXAMPLE
from vtlha.config import parse_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


def _profile() -> dict[str, object]:
    text = DOC.read_text()
    section = text[text.index("## Timings for a real pair"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None, "no yaml block in the timing section"
    profile: dict[str, object] = yaml.safe_load(block.group(1))
    return profile


def test_the_documented_production_profile_loads() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw.update(_profile())
    cfg = parse_config(raw, str(DOC))
    t = cfg.timings
    assert t.heartbeat_interval == 0.5 and t.lease_ttl == 2.0
    assert cfg.scheduling.nice == -10
    # the cost the doc states: dead_after + lease_ttl + margin
    assert round(t.dead_after + t.lease_ttl + t.margin, 1) == 3.7
