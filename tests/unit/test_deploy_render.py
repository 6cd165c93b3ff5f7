"""`vtlha deploy render`: the permissions (who may do what, as a table) and the files
it writes (modes, idempotence, rotation, no seed printed). The real server's view of
the same permissions is tests/integration/test_bus_security.py."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from vtlha import deploy
from vtlha.cli import main
from vtlha.config import parse_config
from vtlha.errors import ConfigError
from vtlha.natsauth import ENV_SEED, ENV_USER, client_auth
from vtlha.subjects import Subjects

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
S = Subjects("demo")


def raw() -> dict[str, Any]:
    out: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return out


CFG = parse_config(raw())
USERS = deploy.users(CFG)

# (user, subject, may publish)
PUBLISH = [
    ("node-a-heartbeat", S.hb("node-a"), True),
    ("node-a-heartbeat", S.hb("node-b"), False),
    ("node-a-heartbeat", S.lease("node-a"), True),
    ("node-a-heartbeat", S.lease("node-b"), False),
    ("node-a-heartbeat", S.promise("node-b"), True),
    ("node-a-heartbeat", S.promise("node-a"), False),
    ("node-a-heartbeat", S.ping("node-a", "ip-manager"), True),
    ("node-a-heartbeat", S.ping("node-b", "ip-manager"), False),
    ("node-a-heartbeat", S.cmd("node-b", "ip-manager"), False),
    ("node-a-heartbeat", S.kv_subject("group.node-a-data"), True),
    ("node-a-heartbeat", S.kv_subject("group.node-b-mgmt"), True),  # renews after takeover
    ("node-a-heartbeat", S.kv_subject("probe.node-a"), True),
    ("node-a-heartbeat", S.kv_subject("probe.node-b"), False),
    ("node-a-heartbeat", S.kv_subject(Subjects.LEADER_KEY), False),
    ("node-a-heartbeat", S.kv_subject("pair.pair-1"), False),
    ("node-a-heartbeat", S.kv_subject("events.pair-1"), False),
    ("node-a-heartbeat", S.event("node.down"), True),
    ("node-a-heartbeat", S.admin("switchover"), False),
    ("node-a-heartbeat", Subjects.js_api("STREAM", "DELETE", S.kv_stream), False),
    ("node-a-ip-manager", S.mgmt("node-a"), True),
    ("node-a-ip-manager", S.mgmt("node-b"), False),
    ("node-a-ip-manager", S.storage("node-a"), False),
    ("node-a-ip-manager", S.kv_subject("group.node-a-data"), False),
    ("node-a-storage-monitor", S.storage("node-a"), True),
    ("node-a-storage-monitor", S.kv_subject("group.node-a-data"), False),
    ("node-a-storage-monitor", S.hb("node-a"), False),
    ("node-a-storage-monitor", S.event("storage.path_failed"), True),
    ("witness-arbiter", S.cmd("node-a", "ip-manager"), True),
    ("witness-arbiter", S.kv_subject(Subjects.LEADER_KEY), True),
    ("witness-arbiter", S.kv_subject("pair.pair-1"), True),
    ("witness-arbiter", S.kv_subject("events.pair-1"), True),
    ("witness-arbiter", S.kv_subject("group.node-a-data"), True),
    ("witness-arbiter", S.hb("node-a"), False),
    ("witness-arbiter", Subjects.js_api("STREAM", "CREATE", S.kv_stream), True),
    ("witness-arbiter", Subjects.js_api("STREAM", "DELETE", S.kv_stream), False),
    ("witness-arbiter", Subjects.js_api("STREAM", "DELETE", S.events_stream), False),
    ("witness-arbiter", Subjects.js_api("STREAM", "PURGE", S.events_stream), False),
    ("operator", S.admin("switchover"), True),
    ("operator", S.hb("node-a"), False),
    ("operator", S.cmd("node-a", "ip-manager"), False),
    ("operator", S.event("node.down"), False),
    ("operator", S.kv_subject("group.node-a-data"), False),
    ("dashboard", S.admin("switchover"), False),  # it acts as the operator's user only
    ("dashboard", S.kv_subject("group.node-a-data"), False),
    ("dashboard", Subjects.js_api("STREAM", "INFO", S.events_stream), True),
    ("dashboard", Subjects.js_api("STREAM", "NAMES"), True),  # following finds the stream
    ("dashboard", Subjects.js_api("STREAM", "DELETE", S.events_stream), False),
    ("operator", Subjects.js_api("DIRECT", "GET", S.kv_stream, S.kv_subject("pair.pair-1")),
     True),
    ("operator", Subjects.js_api("STREAM", "CREATE", S.kv_stream), False),
    ("operator", Subjects.js_api("STREAM", "DELETE", S.kv_stream), False),
    ("admin", Subjects.js_api("STREAM", "DELETE", S.kv_stream), True),
    ("admin", Subjects.js_api("STREAM", "DELETE", S.events_stream), True),
    ("admin", S.hb("node-a"), False),
    ("admin", S.cmd("node-a", "ip-manager"), False),
]

SUBSCRIBE = [
    ("node-a-ip-manager", S.cmd("node-a", "ip-manager"), True),
    ("node-a-ip-manager", S.cmd("node-b", "ip-manager"), False),
    ("node-a-ip-manager", S.cmd("node-a", "storage-monitor"), False),
    ("node-a-ip-manager", S.ping("node-a", "ip-manager"), True),
    ("node-a-ip-manager", S.lease("node-a"), True),
    ("node-a-ip-manager", S.lease("node-b"), False),
    ("node-a-storage-monitor", S.cmd("node-a", "storage-monitor"), True),
    ("node-a-heartbeat", S.promise("node-a"), True),
    ("node-a-heartbeat", S.promise("node-b"), False),
    ("node-a-heartbeat", S.storage("node-a"), True),
    ("node-a-heartbeat", "_INBOX.node-a-heartbeat.x", True),
    ("node-a-heartbeat", "_INBOX.operator.x", False),
    ("witness-arbiter", S.hb("*"), True),
    ("witness-arbiter", S.admin("*"), True),
    ("operator", S.hb("*"), True),  # vtlha status listens to the health reports
    ("operator", S.storage("node-b"), True),
    ("operator", S.mgmt("*"), True),
    ("operator", S.lease("node-a"), False),
    ("operator", S.cmd("node-a", "ip-manager"), False),
    ("operator", S.admin("*"), False),
    ("dashboard", S.hb("*"), True),
    ("dashboard", S.admin("*"), False),
    ("admin", S.hb("*"), True),
    ("admin", S.promise("node-a"), False),
]


@pytest.mark.parametrize(("user", "subject", "allowed"), PUBLISH)
def test_who_may_publish(user: str, subject: str, allowed: bool) -> None:
    assert USERS[user].may_publish(subject) is allowed


@pytest.mark.parametrize(("user", "subject", "allowed"), SUBSCRIBE)
def test_who_may_subscribe(user: str, subject: str, allowed: bool) -> None:
    assert USERS[user].may_subscribe(subject) is allowed


def test_every_service_of_every_host_has_a_user_and_only_arbiters_command() -> None:
    assert set(USERS) == {f"{h}-{s}" for h in ("node-a", "node-b")
                          for s in ("heartbeat", "storage-monitor", "ip-manager", "arbiter")
                          } | {"witness-arbiter", "operator", "admin", "dashboard"}
    commanders = {u for u, p in USERS.items() if p.may_publish(S.cmd("node-b", "ip-manager"))}
    assert commanders == {"node-a-arbiter", "node-b-arbiter", "witness-arbiter"}
    leader_writers = {u for u, p in USERS.items()
                      if p.may_publish(S.kv_subject(Subjects.LEADER_KEY))}
    assert leader_writers == commanders | {"admin"}


def test_subject_matching() -> None:
    assert deploy.matches("a.*.c", "a.b.c") and not deploy.matches("a.*", "a.b.c")
    assert deploy.matches("a.>", "a.b.c") and not deploy.matches("a.>", "a")
    assert deploy.matches("a.*", "a.*") and not deploy.matches("a.*", "a.>")


def test_render_writes_private_keys_idempotently_and_rotates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = deploy.render(CFG, out)
    assert set(first.configs) == {"node-a", "node-b", "witness"}
    seed = (out / "creds" / "node-a-heartbeat.nk").read_bytes()
    assert seed.startswith(b"SU")
    for p in [*(out / "creds").glob("*.nk"), out / "creds" / deploy.ROUTE_SECRET,
              *first.configs.values()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    conf = first.configs["node-a"].read_text()
    assert "sync_interval: always" in conf and '"host:node-a"' in conf
    assert (out / "creds" / "node-a-heartbeat.pub").read_text().strip() in conf
    assert seed.decode().strip() not in conf

    again = deploy.render(CFG, out)
    assert again.written == []
    assert (out / "creds" / "node-a-heartbeat.nk").read_bytes() == seed

    rotated = deploy.render(CFG, out, rotate=True)
    assert (out / "creds" / "node-a-heartbeat.nk").read_bytes() != seed
    assert rotated.configs["node-a"] in rotated.written


def test_render_command_never_prints_a_seed(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["deploy", "render", str(EXAMPLE), "--out",
                                       str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "witness:" in result.output and "operator" in result.output
    for nk in (tmp_path / "creds").glob("*.nk"):
        assert nk.read_text().strip() not in result.output


def test_tls_and_listen_are_rendered(tmp_path: Path) -> None:
    r = raw()
    r["nats"]["listen"] = {h: {"host": f"10.0.0.{i + 1}", "monitor_port": 8222}
                           for i, h in enumerate(r["nats"]["servers"])}
    r["nats"]["tls"] = {"ca": "/etc/vtlha/ca.pem", "cert": "/etc/vtlha/{host}.pem",
                        "key": "/etc/vtlha/{host}.key"}
    cfg = parse_config(r)
    assert cfg.nats_urls("node-b") == ["nats://10.0.0.2:4222", "nats://10.0.0.3:4222",
                                       "nats://10.0.0.1:4222"]  # own, witness, companion
    conf = deploy.render(cfg, tmp_path).configs["node-b"].read_text()
    assert 'listen: "10.0.0.2:4222"' in conf and 'http: "10.0.0.2:8222"' in conf
    assert '"/etc/vtlha/node-b.pem"' in conf and "verify: true" in conf
    assert "@10.0.0.3:6222" in conf


@pytest.mark.parametrize(("nats", "message"), [
    ({"listen": {"node-a": {"host": "10.0.0.1"}}},
     "listen: gives no address for server(s) node-b, witness"),
    ({"listen": {"nobody": {"host": "10.0.0.1"}}}, "listen.nobody: 'nobody' is not one of"),
    ({"listen": {h: {"host": "10.0.0.1:4222"} for h in ("node-a", "node-b", "witness")}},
     "nats.listen.node-a.host: Value error, not a host address or name"),
    ({"listen": {h: {"host": "10.0.0.1"} for h in ("node-a", "node-b", "witness")}},
     "listen.node-b.client_port: 10.0.0.1:4222 is also listen.node-a.client_port"),
    ({"listen": {h: {"host": "h", "client_port": 6222} for h in ("node-a", "node-b", "witness")}},
     "client_port, cluster_port and monitor_port must differ"),
    ({"tls": {"ca": "/ca.pem"}}, "nats.tls.cert: Field required"),
])
def test_bad_nats_sections_are_named(nats: dict[str, Any], message: str) -> None:
    r = raw()
    r["nats"].update(nats)
    with pytest.raises(ConfigError) as exc:
        parse_config(r, "c.yaml")
    assert message in str(exc.value)


def test_client_auth_from_the_cluster_file_or_the_environment(tmp_path: Path) -> None:
    assert not client_auth(CFG, "node-a-heartbeat", env={}).has_credential
    deploy.render(CFG, tmp_path)
    r = raw()
    r["nats"]["credentials_dir"] = str(tmp_path / "creds")
    cfg = parse_config(r)
    auth = client_auth(cfg, "node-a-heartbeat", env={})
    assert auth.seed_file == str(tmp_path / "creds" / "node-a-heartbeat.nk")
    assert auth.connect_options()["inbox_prefix"] == "_INBOX.node-a-heartbeat"
    assert "SU" not in str(auth.describe())
    other = tmp_path / "creds" / "operator.nk"
    env_auth = client_auth(CFG, "x", env={ENV_SEED: str(other), ENV_USER: "operator"})
    assert env_auth.seed_file == str(other) and env_auth.user == "operator"
    with pytest.raises(ConfigError, match=r"nkey seed file .* is not readable"):
        client_auth(CFG, "x", env={ENV_SEED: str(tmp_path / "missing.nk")})
