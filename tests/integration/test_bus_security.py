"""The bus with `vtlha deploy render`'s credentials, permissions and TLS, on a real
nats-server (one for the module, TLS with a throwaway CA made here): forged inputs are
refused (the error reported, the message never delivered), nothing connects without a
credential or without the CA, and a whole local cluster still fails over with every
service on its own least-privilege user."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType

from tests.conftest import EXAMPLE
from vtlha import deploy
from vtlha.config import load_config
from vtlha.natsauth import NONE, ClientAuth, client_auth
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster, prepare_config
from vtlha_lab.natsserver import NatsServer, nats_server_binary
from vtlha_lab.tlsmaterial import make_tls

# nats-py leaves the transport of a connection refused during its TLS handshake (no CA,
# plain text against TLS) to the garbage collector; its ResourceWarning then surfaces in
# whichever test runs next, as an unraisable exception (CI saw it once).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CLUSTER = "sec"
S = Subjects(CLUSTER)
DEADLINE = 5.0


# ---- the module's server -------------------------------------------------------------
class Secured:
    def __init__(self, config_path: Path, server: NatsServer) -> None:
        self.config_path = config_path
        self.cfg = load_config(config_path)
        self.server = server
        self.url = server.spec.url

    def auth(self, user: str) -> ClientAuth:
        return client_auth(self.cfg, user, env={})


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """The example cluster on one nats-server (the witness's), rendered with credentials
    and TLS; the server started from the rendered config, as the lab does."""
    d = tmp_path_factory.mktemp("secured")
    path = prepare_config(EXAMPLE, d, cluster=CLUSTER, single_server=True)
    raw = yaml.safe_load(path.read_text())
    raw["nats"]["credentials_dir"] = str(d / "deploy" / "creds")
    raw["nats"]["tls"] = make_tls(d / "tls")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(path)
    deploy.render(cfg, d / "deploy")
    c = LocalCluster(path, d)
    (d / "logs").mkdir(exist_ok=True)
    spec = c.nats_specs()[0]
    srv = NatsServer(spec, d / "logs" / "nats-server.log")
    srv.start()
    try:
        srv.wait_ready()
        yield Secured(path, srv)
    finally:
        srv.stop()


class Client:
    """A connection as one user that records the errors the server reports."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.got_error = asyncio.Event()
        self.nc: NATS | None = None

    async def connect(self, url: str, auth: ClientAuth) -> NATS:
        async def _err(exc: Exception) -> None:
            self.errors.append(str(exc))
            self.got_error.set()

        self.nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False,
                                     error_cb=_err, **auth.connect_options())
        return self.nc

    async def refused(self, subject: str) -> None:
        """Wait until the server has reported a permissions violation naming ``subject``
        (nats-py lowercases the server's error)."""
        async with asyncio.timeout(DEADLINE):
            while not any("permissions violation" in e and subject.lower() in e
                          for e in self.errors):
                self.got_error.clear()
                await self.got_error.wait()


async def as_user(s: Secured, user: str) -> Client:
    c = Client()
    await c.connect(s.url, s.auth(user))
    return c


async def close(*clients: Client) -> None:
    for c in clients:
        if c.nc is not None:
            await c.nc.close()


async def received_in_order(nc: NATS, subject: str) -> tuple[list[str], Any]:
    got: list[str] = []
    arrived = asyncio.Event()

    async def _cb(msg: Any) -> None:
        got.append(msg.subject)
        arrived.set()

    sub = await nc.subscribe(subject, cb=_cb)
    await nc.flush()
    return got, (sub, arrived)


# ---- the rendered configs --------------------------------------------------------------
def test_rendered_configs_of_all_three_servers_pass_the_config_test(tmp_path: Path) -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["nats"]["tls"] = make_tls(tmp_path / "tls")
    raw["nats"]["listen"] = {h: {"host": "127.0.0.1", "client_port": 14222 + 10 * i,
                                 "cluster_port": 16222 + 10 * i, "monitor_port": 18222 + 10 * i}
                             for i, h in enumerate(raw["nats"]["servers"])}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    r = deploy.render(load_config(path), tmp_path / "out", store_root=tmp_path / "store")
    assert set(r.configs) == {"node-a", "node-b", "witness"}
    for server, conf in r.configs.items():
        res = subprocess.run([nats_server_binary(), "-t", "-c", str(conf)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, (server, res.stdout, res.stderr)
        assert "is valid" in res.stdout + res.stderr


# ---- who cannot connect --------------------------------------------------------------
async def test_without_a_credential_nothing_connects(secured: Secured) -> None:
    tls_only = ClientAuth(ca=secured.cfg.nats.tls.ca if secured.cfg.nats.tls else None)
    with pytest.raises((nats.errors.Error, OSError)) as exc:
        await Client().connect(secured.url, tls_only)
    assert "authorization" in str(exc.value).lower() or isinstance(exc.value, nats.errors.Error)


async def test_without_the_ca_tls_refuses(secured: Secured) -> None:
    auth = secured.auth("operator")
    no_ca = ClientAuth(user=auth.user, seed_file=auth.seed_file)  # the system's CAs only
    with pytest.raises((nats.errors.Error, OSError)):
        await Client().connect(secured.url, no_ca)
    with pytest.raises((nats.errors.Error, OSError)):  # and not in plain text either
        await Client().connect(secured.url, NONE)
    ok = Client()  # the same credential with the CA connects
    await ok.connect(secured.url, auth)
    await close(ok)


# ---- forged inputs are refused ------------------------------------------------------
async def test_a_nodes_heartbeat_cannot_forge_the_companions_heartbeat_or_a_command(
        secured: Secured) -> None:
    hb_a = await as_user(secured, "node-a-heartbeat")
    arbiter = await as_user(secured, "witness-arbiter")
    ipm_b = await as_user(secured, "node-b-ip-manager")
    assert arbiter.nc and ipm_b.nc and hb_a.nc
    try:
        hbs, (_, hb_arrived) = await received_in_order(arbiter.nc, S.hb("*"))
        cmds, _ = await received_in_order(ipm_b.nc, S.cmd("node-b", "ip-manager"))
        await hb_a.nc.publish(S.hb("node-b"), b"{}")
        await hb_a.nc.publish(S.cmd("node-b", "ip-manager"), b"{}")
        await hb_a.nc.publish(S.hb("node-a"), b"{}")  # allowed: the sentinel after them
        await hb_a.nc.flush()
        await hb_a.refused(S.hb("node-b"))
        await hb_a.refused(S.cmd("node-b", "ip-manager"))
        async with asyncio.timeout(DEADLINE):
            await hb_arrived.wait()
        await ipm_b.nc.flush()  # anything routed before the sentinel has arrived by now
        assert hbs == [S.hb("node-a")]
        assert cmds == []
        assert hb_a.nc.is_connected  # refused, not disconnected
    finally:
        await close(hb_a, arbiter, ipm_b)


async def test_the_operator_cannot_forge_a_heartbeat_but_may_ask_the_arbiter(
        secured: Secured) -> None:
    op = await as_user(secured, "operator")
    arbiter = await as_user(secured, "witness-arbiter")
    assert op.nc and arbiter.nc
    try:
        hbs, _ = await received_in_order(arbiter.nc, S.hb("*"))
        admins, (_, admin_arrived) = await received_in_order(arbiter.nc, S.admin("*"))
        await op.nc.publish(S.hb("node-a"), b"{}")
        await op.nc.publish(S.admin("maintenance"), b"{}")
        await op.nc.flush()
        await op.refused(S.hb("node-a"))
        async with asyncio.timeout(DEADLINE):
            await admin_arrived.wait()
        assert hbs == [] and admins == [S.admin("maintenance")]
    finally:
        await close(op, arbiter)


async def test_only_the_arbiter_creates_and_only_admin_deletes_the_bucket_and_a_monitor_cannot_write_ownership(  # noqa: E501
        secured: Secured) -> None:
    from vtlha import bus

    arb = await as_user(secured, "witness-arbiter")
    mon = await as_user(secured, "node-a-storage-monitor")
    op = await as_user(secured, "operator")
    adm = await as_user(secured, "admin")
    assert arb.nc and mon.nc and op.nc and adm.nc
    try:
        kv = await bus.retry_js("kv", lambda: bus.ensure_kv(arb.nc.jetstream(), S, 1))  # type: ignore[union-attr]
        await bus.ensure_events_stream(arb.nc.jetstream(), S, 1, 1024 * 1024, 3600.0)
        rev = await kv.create(S.group_key("node-a-data"), b'{"owner":"node-a"}')

        mkv = await mon.nc.jetstream(timeout=1.0).key_value(S.kv_bucket)
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await mkv.put(S.group_key("node-a-data"), b'{"owner":"node-b"}')
        await mon.refused(S.kv_subject(S.group_key("node-a-data")))
        okv = await op.nc.jetstream().key_value(S.kv_bucket)
        entry = await okv.get(S.group_key("node-a-data"))  # the operator reads
        assert entry.revision == rev and entry.value == b'{"owner":"node-a"}'

        for who in (op, mon):  # nobody creates another bucket but the arbiter (and admin)
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await who.nc.jetstream(timeout=1.0).create_key_value(  # type: ignore[union-attr]
                    KeyValueConfig(bucket="ha-other", storage=StorageType.MEMORY))
        for who in (arb, op):  # ... and nobody deletes one but admin
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await who.nc.jetstream(timeout=1.0).delete_key_value(S.kv_bucket)  # type: ignore[union-attr]
            await who.refused(Subjects.js_api("STREAM", "DELETE", S.kv_stream))
        assert (await okv.get(S.group_key("node-a-data"))).revision == rev
        assert await adm.nc.jetstream().delete_key_value(S.kv_bucket)
        await adm.nc.jetstream().delete_stream(S.events_stream)
    finally:
        await close(arb, mon, op, adm)


# ---- and every protocol step still works ----------------------------------------------
def test_a_cluster_on_least_privilege_users_with_tls_fails_over(
        secured: Secured, tmp_path: Path) -> None:
    """node-a killed: node-b serves its groups and the events are in the stream, every
    service connected as its own user over TLS, and none was refused anything."""
    c = LocalCluster(secured.config_path, tmp_path, nats_urls=[secured.url])
    c.state_root = tmp_path / "state"  # this test's own state (the file's is the module's)
    raw = yaml.safe_load(secured.config_path.read_text())
    raw["state_dir"] = str(c.state_root)
    c.config_path = tmp_path / "cluster.yaml"
    c.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    c.cfg = load_config(c.config_path)
    assert c.secured
    try:
        c.start()
        c.wait_for(c.home_held, 40, what="every group held by its home node")
        st = c.status("node-a", "heartbeat")
        assert st is not None and st["nats_auth"] == {
            "user": "node-a-heartbeat", "tls": True,
            "credential": str(Path(raw["nats"]["credentials_dir"]) / "node-a-heartbeat.nk")}
        before = c.kv_groups()
        c.procs.kill_host("node-a")

        def b_holds_a() -> bool:
            recs = c.kv_groups()
            return all(recs[g][0].owner == "node-b" and recs[g][0].state == "held"
                       for g in ("node-a-data", "node-a-mgmt"))

        c.wait_for(b_holds_a, 15, what="node-b to hold node-a's groups")
        after = c.kv_groups()
        for g in ("node-a-data", "node-a-mgmt"):
            assert after[g][0].epoch == before[g][0].epoch + 1

        def completed() -> bool:
            return {"node-a-data", "node-a-mgmt"} <= {
                e.group for e in c.events() if e.kind == "failover.completed"}

        c.wait_for(completed, 20, what="both takeovers to complete")
        c.wait_for(lambda: "198.51.100.101/32" in c.recorded_addresses("node-b"), 5,
                   what="node-b's ip-manager to hold node-a's data address")
        kinds = {e.kind for e in c.events()}
        assert {"node.down", "failover.started", "failover.completed"} <= kinds
        # the operator's CLI reads with its own credential (from the cluster file)
        from click.testing import CliRunner

        from vtlha.cli import main

        out = CliRunner().invoke(main, ["status", "--config", str(c.config_path)])
        assert out.exit_code == 0 and "node-a-data" in out.output, out.output
        # it may listen to the health reports: node-b heard, its groups served
        out = CliRunner().invoke(main, ["status", "--json", "--config", str(c.config_path)])
        assert out.exit_code == 0, out.output
        st = json.loads(out.stdout)
        assert {n["name"]: n["up"] for n in st["nodes"]} == {"node-a": False, "node-b": True}
        assert all(g["served"] for g in st["groups"]), st["groups"]
        out = CliRunner().invoke(main, ["events", "--config", str(c.config_path)])
        assert out.exit_code == 0 and "failover.completed" in out.output, out.output
        # a duration is resolved by the server's STREAM.MSG.GET by time: permitted
        out = CliRunner().invoke(main, ["events", "--since", "10m", "--kind", "failover.*",
                                        "--config", str(c.config_path)])
        assert out.exit_code == 0 and "failover.completed" in out.output, out.output
        assert "node.down" not in out.output
    finally:
        c.stop()
    refused = [f"{p.name}: {line}" for p in (tmp_path / "logs").rglob("*.log")
               for line in p.read_text(errors="replace").splitlines()
               if "permissions violation" in line.lower()]
    assert refused == []
    seeds = [nk.read_text().strip() for nk in Path(raw["nats"]["credentials_dir"]).glob("*.nk")]
    leaked = [p.name for p in (tmp_path / "logs").rglob("*.log")
              if any(seed in p.read_text(errors="replace") for seed in seeds)]
    assert leaked == []
