"""The operator's tools against a real cluster (real services on a real nats-server,
the ``vtlha`` command line as a separate process): ``vtlha status`` (text, ``--json``,
``--watch``) before and after a node crash, ``vtlha events --kind --since`` by number and
by duration, the defaults from the environment and the per-user file, one clear line
and exit 3 for unreachable NATS and for an unknown cluster; every service's /metrics
accepted by ``promtool check metrics``, the cluster gauges and the failover histogram,
and the example alert rules and Grafana dashboard accepted by ``promtool check rules``
and naming only metrics the services export."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.natsutil import events
from tests.integration.natsutil import metric as sample
from vtlha import eventlog
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster
from vtlha_lab.ports import free_port

#: the operator tools' end-to-end tests: their own target (make test-ops, run by .ci/run)
pytestmark = pytest.mark.ops

ROOT = Path(__file__).resolve().parents[2]
VTLHA = str(Path(sys.executable).parent / "vtlha")
RULES = ROOT / "deploy" / "prometheus" / "vtlha-alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "vtlha-dashboard.json"
SERVICES = ("heartbeat", "storage-monitor", "ip-manager", "arbiter")
A_GROUPS = ("node-a-data", "node-a-mgmt")


#: how long each command took (printed by the tests: a figure of the tool's cost)
TOOK: list[tuple[str, float]] = []


def vtlha(*args: str, c: LocalCluster | None = None, env: dict[str, str] | None = None,
          timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The command line as an operator runs it (with the cluster's file and servers
    unless ``c`` is None)."""
    where = ["--config", str(c.config_path), "--nats", ",".join(c.client_urls())] if c else []
    base = {"HOME": "/nonexistent", "VTLHA_CLI_CONFIG": "/nonexistent/cli.yaml",
            "VTLHA_CONFIG": "", "VTLHA_NATS": "", "VTLHA_CREDS": ""}
    t0 = time.monotonic()
    out = subprocess.run([VTLHA, *args, *where], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **base, **(env or {})})
    TOOK.append((" ".join(args[:3]), time.monotonic() - t0))
    return out


async def seq_since(url: str, cluster: str, wall: float) -> int:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        return await eventlog.seq_since(nc, Subjects(cluster), wall)
    finally:
        await nc.close()


def print_took() -> None:
    for what, s in TOOK:
        print(f"vtlha {what}: {s:.2f} s")
    TOOK.clear()


def status_json(c: LocalCluster) -> dict[str, Any]:
    out = vtlha("status", "--json", c=c)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {x["name"]: x for x in items}


def scrape(c: LocalCluster, host: str, service: str) -> str:
    port = c.cfg.port(host, service)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text: str = r.read().decode()
    return text


@pytest.mark.timeout(400)  # some 30 runs of the command line, a process each
def test_status_events_and_metrics_before_and_after_a_crash(local_cluster: LocalCluster,
                                                            tmp_path: Path) -> None:
    c = local_cluster
    try:
        _status_events_and_metrics(c, tmp_path)
    finally:
        print_took()


def _status_events_and_metrics(c: LocalCluster, tmp_path: Path) -> None:
    c.start()
    c.wait_for(c.home_held, 30, what="every group held by its home node")
    # Synchronise on the tool itself: polled until it reports a healthy cluster.
    c.wait_for(lambda: status_json(c)["ok"], 20, interval=0.2,
               what="vtlha status --json to report no error")
    t = c.cfg.timings
    st = status_json(c)
    assert st["cluster"] == c.cfg.cluster and st["problems"] == []
    assert st["arbiter"]["node"] == "witness" and st["arbiter"]["term"] > 0
    groups = by_name(st["groups"])
    assert set(groups) == set(c.cfg.groups())
    for g in groups.values():
        assert (g["owner"], g["epoch"], g["state"]) == (g["home"], 1, "held"), g
        assert g["served"] is True and g["at_home"] is True
        assert 0 <= g["lease_age_s"] <= t.lease_ttl and 0 < g["lease_valid_for_s"] <= t.lease_ttl
    assert groups["node-a-data"]["storage_state"] == "served"
    nodes = by_name(st["nodes"])
    for n in nodes.values():
        assert n["up"] and n["heartbeat_age_s"] <= t.dead_after
        assert n["storage_ok"] is True and n["mgmt"] is not None
        assert {x["group"] for x in n["leases"]} == {f"{n['name']}-data", f"{n['name']}-mgmt"}
        assert [len(d["paths"]) for d in n["devices"]] == [2, 2, 2, 2]
    assert st["pairs"] == [{"name": "pair-1", "failback": "manual", "maintenance": False,
                            "held_down": [], "nodes": ["node-a", "node-b"],
                            "groups": ["node-a-data", "node-a-mgmt", "node-b-data",
                                       "node-b-mgmt"], "standby": []}]

    text = vtlha("status", c=c)
    assert text.returncode == 0, text.stderr
    print(f"\n$ vtlha status\n{text.stdout}")
    lines = text.stdout.splitlines()
    assert re.match(rf"cluster {c.cfg.cluster}, active arbiter: witness \(term \d+\)", lines[0])
    assert lines[1] == "no problems"
    assert "pair pair-1: failback manual, maintenance off, held down: -, standby: -" in lines
    row = next(ln for ln in lines if ln.startswith("node-a-data "))
    assert row.split()[:6] == ["node-a-data", "node-a", "node-a", "1", "held", "yes"]

    # --watch: one JSON object per refresh
    w = vtlha("status", "--watch", "--json", "--count", "2", "--interval", "0.2", c=c)
    assert w.returncode == 0, w.stderr
    frames = [json.loads(x) for x in w.stdout.splitlines()]
    assert len(frames) == 2 and all(f["ok"] for f in frames)
    assert frames[1]["listened_s"] > frames[0]["listened_s"]

    # node-a crashes: node-b takes its groups over.
    t_kill = time.time()
    c.procs.kill_host("node-a")

    def completed() -> bool:
        # (after the kill: a slow start may have had node-a declared down at first)
        return set(A_GROUPS) <= {e.group for _, e in events(c.client_urls()[0], c.cfg.cluster)
                                 if e.kind == "failover.completed" and e.sent_at >= t_kill}

    c.wait_for(completed, 20, what="both takeovers to complete")
    st = status_json(c)
    assert st["ok"] is False
    first = st["problems"][0]
    assert first["severity"] == "error" and first["about"] == "node-a"
    assert first["text"].startswith("node-a: ")
    assert [p["severity"] for p in st["problems"]] == sorted(
        (p["severity"] for p in st["problems"]), key=lambda s: s != "error")
    groups = by_name(st["groups"])
    for g in A_GROUPS:
        assert (groups[g]["owner"], groups[g]["epoch"]) == ("node-b", 2)
        assert groups[g]["served"] is True and groups[g]["at_home"] is False
    assert not by_name(st["nodes"])["node-a"]["up"]
    text = vtlha("status", c=c)
    assert text.returncode == 0
    print(f"\n$ vtlha status  # node-a crashed\n{text.stdout}")
    assert text.stdout.splitlines()[1].startswith("ERROR   node-a: ")
    assert any(ln.startswith("warning node-a-data: served by node-b, away from its home "
                             "node-a (vtlha failback pair-1)") for ln in text.stdout.splitlines())

    # events: by kind, from a number, from a while ago
    all_events = events(c.client_urls()[0], c.cfg.cluster)
    out = vtlha("events", "--kind", "failover.*", "--since", "10m", "--json", c=c)
    assert out.returncode == 0, out.stderr
    got = [json.loads(x) for x in out.stdout.splitlines()]
    assert got and all(e["kind"].startswith("failover.") for e in got)
    assert {(e["kind"], e["group"]) for e in got} >= {(f"failover.{k}", g) for g in A_GROUPS
                                                      for k in ("started", "completed")}
    assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
    first_done = min(s for s, e in all_events
                     if e.kind == "failover.completed" and e.sent_at >= t_kill)
    out = vtlha("events", "--since", str(first_done), "--kind", "failover.completed", c=c)
    assert out.returncode == 0 and out.stdout.splitlines()[0].startswith(f"#{first_done} ")
    # A duration is resolved to the first event stored since then (the command's own
    # start-up makes a duration typed now end later: checked here in-process, exactly).
    first = asyncio.run(seq_since(c.client_urls()[0], c.cfg.cluster, t_kill))
    down = next(s for s, e in all_events if e.kind == "node.down" and e.sent_at >= t_kill)
    assert 1 < first <= down
    assert all(e.sent_at < t_kill for s, e in all_events if s < first)
    end = max(s for s, _ in events(c.client_urls()[0], c.cfg.cluster))
    later = vtlha("events", "--since", "1ms", "--json", c=c)
    assert later.returncode == 0, later.stderr
    assert all(json.loads(x)["seq"] > end for x in later.stdout.splitlines())

    # metrics: every service's /metrics passes promtool; the cluster gauges
    texts = {(h, s): scrape(c, h, s) for h in ("node-b", "witness") for s in SERVICES
             if not (h == "witness" and s != "arbiter")}
    for (h, s), body in texts.items():
        check = subprocess.run(["promtool", "check", "metrics"], input=body,
                               capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, f"{h} {s}: {check.stdout}{check.stderr}"
        assert sample(body, "vtlha_build_info", service=s) == 1
    arb = texts[("witness", "arbiter")]
    assert sample(arb, "vtlha_group_owner", group="node-a-data", node="node-b") == 1
    assert sample(arb, "vtlha_group_owner", group="node-a-data", node="node-a") == 0
    assert sample(arb, "vtlha_group_served", group="node-a-data") == 1
    assert sample(arb, "vtlha_group_at_home", group="node-a-data") == 0
    assert sample(arb, "vtlha_group_epoch", group="node-a-mgmt") == 2
    assert sample(arb, "vtlha_node_alive", node="node-a") == 0
    assert sample(arb, "vtlha_pair_maintenance", pair="pair-1") == 0
    assert sample(arb, "vtlha_node_held_down", pair="pair-1", node="node-a") == 0
    assert sample(arb, "vtlha_storage_global_failure", group="node-a-data") == 0
    assert sample(arb, "vtlha_failover_duration_seconds_count", kind="failover",
                  rule="heartbeats_stopped") == 2
    done = [e for _, e in events(c.client_urls()[0], c.cfg.cluster)
            if e.kind == "failover.completed"]
    assert sample(arb, "vtlha_failover_duration_seconds_sum", kind="failover",
                  rule="heartbeats_stopped") == pytest.approx(
        sum(e.data["duration_s"] for e in done), abs=0.01)

    # the alert rules and the dashboard parse, and name only metrics that exist
    # (a labelled metric with no child yet is a family without samples: still named)
    exported = {fam.name for body in texts.values()
                for fam in text_string_to_metric_families(body)}
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=10)
    assert check.returncode == 0, check.stdout + check.stderr
    exprs = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"]]
    exprs += [tg["expr"] for p in json.loads(DASHBOARD.read_text())["panels"]
              for tg in p["targets"]]
    as_rules = tmp_path / "dashboard-rules.yaml"
    as_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"vtlha:dashboard_{i}", "expr": e} for i, e in enumerate(exprs)]}]}))
    check = subprocess.run(["promtool", "check", "rules", str(as_rules)], capture_output=True,
                           text=True, timeout=10)
    assert check.returncode == 0, check.stdout + check.stderr
    named = {re.sub(r"_(bucket|count|sum)$", "", m)
             for e in exprs for m in re.findall(r"\bvtlha_[a-z_]+", e)}
    missing = {m for m in named if m not in exported and f"{m}_total" not in exported
               and m.removesuffix("_total") not in exported}
    assert not missing, f"rules or dashboard name metrics no service exports: {missing}"


def test_the_defaults_come_from_the_environment_and_the_per_user_file(
        local_cluster: LocalCluster, tmp_path: Path) -> None:
    c = local_cluster
    c.start()
    c.wait_for(c.home_held, 30, what="every group held by its home node")
    urls = ",".join(c.client_urls())
    env = vtlha("status", "--json", env={"VTLHA_CONFIG": str(c.config_path),
                                         "VTLHA_NATS": urls})
    assert env.returncode == 0, env.stderr
    assert json.loads(env.stdout)["cluster"] == c.cfg.cluster
    f = tmp_path / "home" / ".config" / "vtlha" / "cli.yaml"
    f.parent.mkdir(parents=True)
    f.write_text(yaml.safe_dump({"config": str(c.config_path), "nats": urls}))
    home = vtlha("events", "--kind", "group.assigned", env={
        "HOME": str(tmp_path / "home"), "VTLHA_CLI_CONFIG": ""})
    assert home.returncode == 0, home.stderr
    assert "group.assigned" in home.stdout
    # the command line wins over both: a server nobody listens on
    port = free_port()
    bad = vtlha("status", "--nats", f"nats://127.0.0.1:{port}", env={
        "HOME": str(tmp_path / "home"), "VTLHA_CLI_CONFIG": "", "VTLHA_NATS": urls})
    assert bad.returncode == 3 and f"127.0.0.1:{port}" in bad.stderr


def test_unreachable_nats_and_unknown_cluster_are_one_clear_line(
        local_cluster: LocalCluster) -> None:
    c = local_cluster  # never started: the servers know no such cluster
    port = free_port()
    for cmd in (("status",), ("status", "--json"), ("events",)):
        out = vtlha(*cmd, "--config", str(c.config_path), "--nats",
                    f"nats://127.0.0.1:{port}")
        assert out.returncode == 3 and out.stdout == ""
        assert len(out.stderr.splitlines()) == 1, out.stderr
        assert out.stderr.startswith(f"vtlha {cmd[0]}: cannot reach NATS at "
                                     f"nats://127.0.0.1:{port} within 5 s ("), out.stderr
    out = vtlha("status", c=c)
    assert out.returncode == 3 and out.stdout == ""
    assert out.stderr == (f"vtlha status: cluster {c.cfg.cluster} is unknown on these "
                          f"servers: no KV bucket ha-{c.cfg.cluster} (has it ever run "
                          "there?)\n")
    out = vtlha("events", "--since", "10m", c=c)
    assert out.returncode == 3 and out.stdout == ""
    assert out.stderr == (f"vtlha events: cluster {c.cfg.cluster} is unknown on these "
                          f"servers: no event stream HA_EVENTS_{c.cfg.cluster} (has it ever "
                          "run there?)\n")
