"""Where notifiers run and what they may do: `vtlha deploy render`'s user and
permissions of a notifier (its targets' consumers of the event stream and nothing of
the protocol), and its container (unprivileged, the notify scripts mounted read-only).
The real server's view of the same permissions: tests/integration/test_notify.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vtlha import containers, deploy
from vtlha.config import ClusterConfig, parse_config
from vtlha.subjects import Subjects

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"
S = Subjects("demo")
API = Subjects.js_api
EV = S.events_stream


def config(**notifications: Any) -> ClusterConfig:
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    raw["nats"]["credentials_dir"] = "/etc/vtlha/creds"
    raw["notifications"] = notifications or {"targets": [
        {"type": "exec", "name": "page", "command": ["/etc/vtlha/notify/page.sh"],
         "events": ["failover.*"]},
        {"type": "webhook", "name": "chat", "url": "https://chat.example/h", "events": ["*"]}]}
    return parse_config(raw)


def test_no_target_no_notifier() -> None:
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    cfg = parse_config(raw)
    assert not any(u.endswith("-notifier") for u in deploy.users(cfg))
    assert all("notifier" not in cfg.host_services(h) for h in cfg.hosts)


def test_the_witness_runs_the_notifier_by_default_or_the_hosts_named() -> None:
    assert {u for u in deploy.users(config()) if u.endswith("-notifier")} == {
        "witness-notifier"}
    cfg = config(hosts=["node-a", "witness"], targets=config().notifications.targets)
    assert {u for u in deploy.users(cfg) if u.endswith("-notifier")} == {
        "node-a-notifier", "witness-notifier"}
    assert cfg.host_services("node-a")[-1] == "notifier"
    assert "notifier" not in cfg.host_services("node-b")


def test_a_notifier_uses_its_targets_consumers_and_nothing_of_the_protocol() -> None:
    p = deploy.users(config())["witness-notifier"]
    for name in ("notify-page", "notify-chat"):
        assert p.may_publish(API("CONSUMER", "CREATE", EV, name, S.events_all))
        assert p.may_publish(API("CONSUMER", "MSG", "NEXT", EV, name))
        assert p.may_publish(f"$JS.ACK.{EV}.{name}.1.5.5.1700000000.0")
    assert p.may_publish(S.event("input.rejected"))  # its outbox
    for subject in (API("CONSUMER", "CREATE", EV, "other", S.events_all),
                    API("CONSUMER", "DELETE", EV, "notify-page"),
                    API("STREAM", "DELETE", EV), API("STREAM", "PURGE", EV),
                    API("STREAM", "CREATE", EV), S.hb("witness"), S.cmd("node-a", "ip-manager"),
                    S.admin("switchover"), S.kv_subject("group.node-a-data"),
                    S.kv_subject(Subjects.LEADER_KEY)):
        assert not p.may_publish(subject), subject
    assert p.may_subscribe("_INBOX.witness-notifier.x")
    assert not p.may_subscribe(S.events_all)
    assert not p.responses


def test_the_notifier_container_is_unprivileged_and_sees_its_scripts() -> None:
    cfg = config()
    cs = {c.service: c for c in containers.host_containers(cfg, "witness", "img")}
    assert list(cs) == ["nats", "arbiter", "notifier"]
    c = cs["notifier"]
    assert c.user == "10001:10001" and not c.cap_add and "NET_RAW" in c.cap_drop
    assert c.command[0] == "vtlha-notifier"
    assert containers.Mount("/etc/vtlha/notify/page.sh") in c.mounts
    assert containers.Mount("/etc/vtlha/creds/witness-notifier.nk") in c.mounts
    assert c.health_url == f"http://127.0.0.1:{cfg.port('witness', 'notifier')}/healthz"
    node = [c.service for c in containers.host_containers(cfg, "node-a", "img")]
    assert "notifier" not in node
