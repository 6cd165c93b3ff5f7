"""docs/policy.md stays in step with the code: the Graphviz source it shows is
docs/policy.dot (rendered next to it as docs/policy.svg), and every rule and every
policy knob is described."""

from __future__ import annotations

import re
from pathlib import Path

from vtlha.config import Pair, Timings
from vtlha.policy import Rule

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_doc_shows_the_dot_source_and_the_rendered_picture() -> None:
    text = (DOCS / "policy.md").read_text()
    (shown,) = re.findall(r"```dot\n(.*?)```", text, flags=re.S)
    assert shown == (DOCS / "policy.dot").read_text()
    assert "](policy.svg)" in text
    svg = (DOCS / "policy.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg


def test_every_rule_and_knob_is_described() -> None:
    text = (DOCS / "policy.md").read_text()
    for rule in Rule:
        if rule is not Rule.ALL_HEALTHY:  # never returned: the "no action" status
            assert f"`{rule.value}`" in text, rule
    for knob in ("failback", "failback_hold_time", "flap_max", "flap_window"):
        assert knob in Pair.model_fields and f"`{knob}`" in text, knob
    for knob in ("dead_after", "check_interval", "probe_interval", "storage_stale_after",
                 "mgmt_stale_after", "rise", "fall", "initial_assign_wait", "leader_ttl"):
        assert knob in Timings.model_fields and f"`{knob}`" in text, knob


def test_the_single_service_table_has_a_row_per_service() -> None:
    text = (DOCS / "policy.md").read_text()
    header = "| service | what happens | restarted within `dead_after` | stays down |"
    assert header in text
    rows = text.split(header, 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == [
        "**heartbeat** (the lease holder)", "**ip-manager**", "**storage-monitor**",
        "**arbiter**"]
