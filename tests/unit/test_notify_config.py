"""The ``notifications:`` section of the cluster file and which events go to which
target: glob matching, placeholders, bad config refused with the field named, and the
event stream's retention limits."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from vtlha import bus
from vtlha.config import load_config, parse_config
from vtlha.errors import ConfigError
from vtlha.notifyconfig import (
    ExecTarget,
    Notifications,
    kind_matches,
    placeholder_problem,
    render_argv,
)
from vtlha.subjects import Subjects

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"


def example(**notifications: Any) -> dict[str, Any]:
    data = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    if notifications:
        data["notifications"] = notifications
    return data  # type: ignore[no-any-return]


def script(**over: Any) -> dict[str, Any]:
    return {"type": "exec", "name": "page", "command": ["/usr/local/bin/page", "{kind}"],
            "events": ["failover.*"], **over}


def hook(**over: Any) -> dict[str, Any]:
    return {"type": "webhook", "name": "chat", "url": "https://chat.example/hook",
            "events": ["*"], **over}


def error_of(data: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    text = str(exc.value)
    assert str(path) in text
    return text


# ---- matching -------------------------------------------------------------------
@pytest.mark.parametrize(("patterns", "kind", "want"), [
    (["failover.*"], "failover.started", True),
    (["failover.*"], "failover.completed", True),
    (["failover.*"], "failback.started", False),
    (["failover.*"], "failover", False),
    (["*.failed"], "switchover.failed", True),
    (["*.failed"], "storage.start_failed", False),
    (["node.down"], "node.down", True),
    (["node.down"], "node.down.extra", False),
    (["node.down"], "node.up", False),
    (["*"], "storage.global_failure", True),
    (["storage.*"], "storage.global_failure", True),
    (["fail*"], "failover.started", True),      # * crosses dots, as the shell's does
    (["f?ilover.started"], "failover.started", True),
    (["[fs]*.refused"], "switchover.refused", True),
    (["[fs]*.refused"], "maintenance.refused", False),
    (["lease.*", "node.*"], "node.held_down", True),
    (["FAILOVER.*"], "failover.started", False),  # case counts
])
def test_kind_matches(patterns: list[str], kind: str, want: bool) -> None:
    assert kind_matches(patterns, kind) is want


def test_for_kind_picks_every_target_that_wants_it() -> None:
    n = Notifications.model_validate({"targets": [
        script(name="a", events=["failover.*"]), hook(name="b", events=["node.down"]),
        hook(name="c", events=["*.completed", "node.*"])]})
    assert [t.name for t in n.for_kind("failover.completed")] == ["a", "c"]
    assert [t.name for t in n.for_kind("node.down")] == ["b", "c"]
    assert n.for_kind("lease.acquired") == []


# ---- placeholders ----------------------------------------------------------------
def test_render_argv_fills_fields_and_leaves_absent_ones_empty() -> None:
    argv = render_argv(["/bin/x", "--kind={kind}", "{group}", "{old}->{new}", "{{lit}}"],
                       {"kind": "failover.started", "group": "node-a-data", "old": "node-a",
                        "new": None})
    assert argv == ["/bin/x", "--kind=failover.started", "node-a-data", "node-a->", "{lit}"]


@pytest.mark.parametrize(("arg", "problem"), [
    ("{kind}", None), ("plain", None), ("{{", None),
    ("{kindd}", "unknown placeholder {kindd}"),
    ("{kind!r}", "takes no format"), ("{epoch:04d}", "takes no format"),
    ("{", "literal brace"), ("{0}", "unknown placeholder {0}"),
])
def test_placeholder_problem(arg: str, problem: str | None) -> None:
    found = placeholder_problem(arg)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_longest_delivery_counts_every_attempt_and_capped_backoff() -> None:
    t = ExecTarget.model_validate(script(timeout=2, attempts=4, backoff=1, max_backoff=3))
    assert t.longest_delivery() == 4 * 2 + 1 + 2 + 3


# ---- the cluster file --------------------------------------------------------------
def test_example_has_no_notifier_and_a_target_puts_one_on_the_witness() -> None:
    assert parse_config(example()).notifier_hosts == []
    cfg = parse_config(example(targets=[script(), hook()]))
    assert cfg.notifier_hosts == ["witness"]
    assert [t.type for t in cfg.notifications.targets] == ["exec", "webhook"]
    cfg = parse_config(example(hosts=["node-a", "node-b"], targets=[hook()]))
    assert cfg.notifier_hosts == ["node-a", "node-b"]
    assert cfg.port("witness", "notifier") == 9105 + 100 * 2


@pytest.mark.parametrize(("notifications", "field", "reason"), [
    ({"targets": [script(command=["page.sh"])]},
     "notifications.targets[0].exec.command", "absolute path"),
    ({"targets": [script(command=["/bin/page", "{who}"])]},
     "notifications.targets[0].exec.command", "unknown placeholder {who}"),
    ({"targets": [script(timeout=0)]}, "notifications.targets[0].exec.timeout",
     "greater than 0"),
    ({"targets": [script(attempts=0)]}, "notifications.targets[0].exec.attempts",
     "greater than or equal to 1"),
    ({"targets": [script(events=[])]}, "notifications.targets[0].exec.events",
     "at least 1"),
    ({"targets": [script(events=["failover started"])]},
     "notifications.targets[0].exec.events[0]", "should match pattern"),
    ({"targets": [script(env={"VTLHA_KIND": "x"})]}, "notifications.targets[0].exec.env",
     "VTLHA_* variables are the event's"),
    ({"targets": [script(name="Page")]}, "notifications.targets[0].exec.name",
     "should match pattern"),
    ({"targets": [hook(url="ftp://chat.example/hook")]},
     "notifications.targets[0].webhook.url", "not an http:// or https:// URL"),
    ({"targets": [hook(headers={"Bad Header": "x"})]},
     "notifications.targets[0].webhook.headers", "not a valid header"),
    ({"targets": [hook(retries=3)]}, "notifications.targets[0].webhook.retries",
     "Extra inputs are not permitted"),
    ({"targets": [{"name": "x", "url": "http://h/", "events": ["*"]}]},
     "notifications.targets", "targets[0].type: must be exec or webhook"),
    ({"targets": [hook(), hook()]}, "notifications.targets",
     "target names must be unique, 'chat' is repeated"),
    ({"ack_wait": 0.5, "targets": [hook()]}, "notifications.ack_wait",
     "greater than or equal to 1"),
    ({"hosts": ["nowhere"], "targets": [hook()]}, "notifications.hosts[0]",
     "'nowhere' is not a host of the cluster"),
])
def test_bad_notifications_are_refused_naming_the_field(
        tmp_path: Path, notifications: dict[str, Any], field: str, reason: str) -> None:
    text = error_of(example(**notifications), tmp_path)
    # (a cross-check's error is at the top level and starts with the field's path)
    line = next((ln for ln in text.splitlines() if f"{field}:" in ln), None)
    assert line is not None, f"{field} not named in:\n{text}"
    assert reason in line, text


# ---- retention -----------------------------------------------------------------------
def test_event_retention_from_the_cluster_file(tmp_path: Path) -> None:
    data = example()
    data["nats"].update(events_max_age=3600, events_max_bytes=8 * 1024 * 1024,
                        events_max_msgs=5000)
    n = parse_config(data).nats
    cfg = bus.events_stream_config(Subjects("demo"), 3, n.events_max_bytes, n.events_max_age,
                                   n.events_duplicate_window, n.stream_max_msgs)
    assert (cfg.max_age, cfg.max_bytes, cfg.max_msgs) == (3600, 8 * 1024 * 1024, 5000)
    assert parse_config(example()).nats.stream_max_msgs == -1  # no count limit
    data["nats"]["events_max_msgs"] = 10
    assert "greater than or equal to 1000" in error_of(data, tmp_path)
    data["nats"].update(events_max_msgs=None, events_max_age=60)
    assert "must not exceed events_max_age" in error_of(data, tmp_path)


# ---- the examples in the docs stay valid -------------------------------------------------
def test_the_examples_in_the_cluster_file_and_the_docs_are_valid() -> None:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# notifications:")
    commented = yaml.safe_load("\n".join(ln[2:] for ln in lines[start:]
                                         if ln.startswith("#")))
    doc = (EXAMPLE.parents[1] / "docs" / "notifications.md").read_text()
    documented = yaml.safe_load(doc.split("```yaml\n", 1)[1].split("```", 1)[0])
    for section in (commented, documented):
        cfg = parse_config(example(**section["notifications"]))
        assert cfg.notifier_hosts == ["witness"]
        assert {t.type for t in cfg.notifications.targets} == {"exec", "webhook"}
