"""A whole cluster as local processes on loopback: nats-server(s), the witness's
arbiter and every node's services (an arbiter among them). The demo and the
integration tests use it.

Loopback mode: each host's ports are the config's base ports + 100 x host index
(plus a free offset chosen at start so runs never collide), addresses are only
recorded by the recording IP backend, and it says so."""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import random
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import yaml
from nats.aio.client import Client as NATS

from vtlha import bus, eventlog
from vtlha.config import ClusterConfig, load_config
from vtlha.messages import Event, GroupRecord
from vtlha.natsauth import ClientAuth, client_auth
from vtlha.ownership import read_groups
from vtlha.priority import raise_priority
from vtlha.subjects import Subjects
from vtlha_lab.natsserver import NatsServer, NatsServerSpec
from vtlha_lab.ports import LOWEST, below_ephemeral, port_free
from vtlha_lab.procs import ProcessGroup
from vtlha_lab.tgt import Tgtd, TgtdSpec

LOG = logging.getLogger("vtlha_lab.localcluster")
SAN = "san"  # the SAN target's process group name (not a host of the cluster)
NODE_SERVICES = ("storage-monitor", "ip-manager", "heartbeat", "arbiter")
DEVICE_BYTES = 16 * 1024 * 1024  # sparse: 4096 blocks of 4 KiB per device


def service_binary(service: str) -> str:
    return str(Path(sys.executable).parent / f"vtlha-{service}")


def all_ports(cfg: ClusterConfig) -> list[int]:
    kinds = ("nats_client", "nats_cluster", "nats_monitor", "heartbeat", "storage_monitor",
             "ip_manager", "arbiter", "notifier", "dashboard", "tape")
    return [cfg.port(h, k) for h in cfg.hosts for k in kinds]


def san_ports(cfg: ClusterConfig) -> list[int]:
    """The SAN target's ports: ``san.port + i`` for every path index in use."""
    n = max((k for d in cfg.devices.values() for k in d.paths.values()), default=1)
    return [cfg.san.port + i for i in range(n)]


def prepare_config(src: Path, dst_dir: Path, cluster: str | None = None,
                   single_server: bool = False, tries: int = 200) -> Path:
    """Copy the cluster file to ``dst_dir`` with a free port offset, the state root
    under ``dst_dir``, optionally another cluster name, and optionally one NATS server
    (the witness's: quick tests; not partition-safe). Every port stays below the
    kernel's ephemeral range (see ``vtlha_lab.ports``)."""
    raw: dict[str, Any] = yaml.safe_load(src.read_text())
    base = load_config(src)
    dst_dir.mkdir(parents=True, exist_ok=True)
    room = below_ephemeral() - max(all_ports(base) + san_ports(base))
    lowest = max(0, LOWEST - min(all_ports(base) + san_ports(base)))
    for _ in range(tries):
        offset = random.randrange(lowest, max(room, lowest + 1))
        ports = {k: v + offset for k, v in base.ports.model_dump().items()}
        raw["ports"] = ports
        raw.setdefault("san", {})["port"] = base.san.port + offset
        raw["state_dir"] = str(dst_dir / "state")
        if cluster:
            raw["cluster"] = cluster
        if single_server:
            raw.setdefault("nats", {})["servers"] = [base.witness.host]
        dst = dst_dir / "cluster.yaml"
        dst.write_text(yaml.safe_dump(raw, sort_keys=False))
        cfg = load_config(dst)
        if all(port_free(p) for p in all_ports(cfg) + san_ports(cfg)):
            return dst
    raise RuntimeError("no free port range found for a local cluster")


class LocalCluster:
    def __init__(self, config_path: Path, work_dir: Path,
                 nats_urls: list[str] | None = None) -> None:
        self.config_path = config_path
        self.cfg = load_config(config_path)
        self.work_dir = work_dir
        self.state_root = Path(self.cfg.state_dir)
        self.procs = ProcessGroup(work_dir / "logs")
        self.external_nats = nats_urls
        self.servers: dict[str, NatsServer] = {}
        self.owner_pid = os.getpid()
        #: the iSCSI target (``san.kind: iscsi``): a tgtd started by ``start_san``
        self.tgtd: Tgtd | None = None

    # ---- set-up ------------------------------------------------------------
    def backing(self, device: str) -> Path:
        """A device's backing file (relative paths are under the state root)."""
        p = Path(self.cfg.devices[device].backing)
        return p if p.is_absolute() else self.state_root / p

    def create_devices(self) -> None:
        for name in self.cfg.devices:
            p = self.backing(name)
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                with open(p, "wb") as f:
                    f.truncate(DEVICE_BYTES)

    @property
    def secured(self) -> bool:
        """The cluster file names a credentials directory: the servers run `vtlha deploy
        render`'s configs (users, permissions, TLS when given) with the credentials
        there, and every client connects with its own (``render`` must have run)."""
        return self.cfg.nats.credentials_dir is not None

    def secure(self, tls: bool = True) -> None:
        """Run this cluster as a deployment runs (before ``start``): the cluster file
        names a credentials directory (and says where each server listens, in the
        network lab), a least-privilege credential per service per host is written as
        `vtlha deploy render` writes it (the servers' configs are rendered at start), and
        with ``tls`` a throwaway CA and a certificate for every address the servers are
        reached at secure clients and routes. Every service, the CLI and the tests then
        connect as their own user."""
        from vtlha import deploy
        from vtlha_lab.tlsmaterial import make_tls

        raw = yaml.safe_load(self.config_path.read_text())
        nats_cfg = raw.setdefault("nats", {})
        listen = self.nats_listen()
        if listen is not None:
            nats_cfg["listen"] = listen
        nats_cfg["credentials_dir"] = str(self.work_dir / "deploy" / "creds")
        if tls:
            nats_cfg["tls"] = make_tls(self.work_dir / "tls", self.tls_addresses())
        self.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.cfg = load_config(self.config_path)
        # The credentials only: each server's config is rendered when it starts
        # (``nats_specs``), with the lab's store directory and bind address.
        deploy.ensure_credentials(self.work_dir / "deploy" / "creds", list(deploy.users(self.cfg)),
                                  False)

    def nats_listen(self) -> dict[str, dict[str, Any]] | None:
        """Where each server listens, for the cluster file (None: loopback, the default)."""
        return None

    def tls_addresses(self) -> list[str]:
        """Every address a server is reached at (the certificate names them)."""
        return ["127.0.0.1"]

    def _rendered_config(self, host: str, store_dir: Path, bind: str | None = None) -> str:
        from vtlha import deploy

        assert self.cfg.nats.credentials_dir is not None
        creds = deploy.read_credentials(Path(self.cfg.nats.credentials_dir),
                                        deploy.users(self.cfg))
        return deploy.render_server_config(self.cfg, host, creds, store_dir,
                                           str(self.config_path), bind=bind)

    def nats_specs(self) -> list[NatsServerSpec]:
        cluster = len(self.cfg.nats.servers) > 1
        routes = [f"127.0.0.1:{self.cfg.port(h, 'nats_cluster')}" for h in self.cfg.nats.servers]
        specs = [NatsServerSpec(
            name=h, client_port=self.cfg.port(h, "nats_client"),
            monitor_port=self.cfg.port(h, "nats_monitor"),
            store_dir=self.work_dir / "nats" / h / "jetstream",
            cluster_port=self.cfg.port(h, "nats_cluster") if cluster else None,
            routes=routes if cluster else [], tags=[f"host:{h}"],
        ) for h in self.cfg.nats.servers]
        if self.secured:
            for spec in specs:
                spec.config_text = self._rendered_config(spec.name, spec.store_dir)
        return specs

    def start_nats(self) -> None:
        if self.external_nats:
            return
        for spec in self.nats_specs():
            srv = NatsServer(spec, self.work_dir / "logs" / f"{spec.name}-nats-server.log",
                             nice=self.cfg.scheduling.nice)
            (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
            srv.start()
            self.servers[spec.name] = srv
        for host in self.servers:
            self.wait_nats(host)

    def wait_nats(self, host: str, timeout: float = 60, streams: bool = True) -> None:
        # (a restarted server's /healthz waits for its streams to catch up: once, in CI, a
        # stalled catch-up took longer than 30 s)
        # Clustered: full /healthz, which waits for the JetStream meta leader too.
        self.servers[host].wait_ready(timeout=timeout, jetstream=len(self.servers) == 1,
                                      streams=streams)

    def restart_nats(self, host: str, streams: bool = True) -> None:
        """Start a host's nats-server again (same store) after it was killed; with
        ``streams`` False, wait for its JetStream only, not for every stream to catch
        up (nats-server's catch-up of a stream has stalled for over a minute under
        load, "catchup failed, too many retries", then replayed a snapshot)."""
        srv = self.servers[host]
        srv.kill()
        srv.start()
        self.wait_nats(host, streams=streams)

    def nats_urls(self, host: str) -> list[str]:
        return self.external_nats or self.cfg.nats_urls(first=host)

    def client_urls(self) -> list[str]:
        """URLs for a client in this (the host's) namespace: tests, the CLI, the demo."""
        return self.nats_urls(self.cfg.witness.host)

    async def connect(self) -> NATS:
        """A short-lived client connection (no reconnects, errors not printed)."""

        async def _quiet(exc: Exception) -> None:
            pass

        return await nats.connect(self.client_urls(), connect_timeout=2, allow_reconnect=False,
                                  error_cb=_quiet, **self.client_auth().connect_options())

    def client_auth(self, user: str = "operator") -> ClientAuth:
        """``user``'s credential from the cluster file (none unless it names a credentials
        directory): tests, the CLI and the demo read as the operator."""
        return client_auth(self.cfg, user, env={})

    def start_service(self, host: str, service: str) -> None:
        argv = [service_binary(service), "--config", str(self.config_path), "--node", host,
                "--state-dir", str(self.state_root), "--nats", ",".join(self.nats_urls(host))]
        if service == "ip-manager":
            argv += ["--backend", "recording"]
        if service == "storage-monitor":
            argv += ["--san", self.san_host(), "--portal-host", "127.0.0.1"]
        self.procs.spawn(host, service, argv)

    # ---- the reference SAN target -------------------------------------------
    def san_host(self) -> str:
        """Where the nodes reach the SAN target (loopback here)."""
        return "127.0.0.1"

    def san_argv(self) -> list[str]:
        return [str(Path(sys.executable).parent / "vtlha-lab"), "san", "serve",
                "--config", str(self.config_path), "--state-dir", str(self.state_root),
                "--host", "127.0.0.1", "--create-size", "0"]

    def spawn_san(self) -> None:
        self.procs.spawn(SAN, "san-target", self.san_argv())

    def tgtd_prefix(self) -> list[str]:
        """How tgtd is run (in the lab: inside the witness's namespace)."""
        return []

    def start_tgtd(self) -> Tgtd:
        """``san.kind: iscsi``: Debian's tgtd (root) as the SAN, a portal per path
        (``san.portals``), a LUN per device (``devices.X.lun``) on its backing file."""
        san = self.cfg.san
        assert san.iqn is not None
        paths = max((n for d in self.cfg.devices.values() for n in d.paths.values()),
                    default=1)
        blocks = {d.block_size for d in self.cfg.devices.values()}
        if len(blocks) != 1:
            raise RuntimeError(f"tgtd: one block size for every LUN, the devices have {blocks}")
        spec = TgtdSpec(san.iqn, san.portals[:paths],
                        {name: self.backing(name) for name in self.cfg.devices},
                        block_size=blocks.pop(),
                        numbers={name: d.lun for name, d in self.cfg.devices.items()
                                 if d.lun is not None})
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.tgtd = Tgtd(spec, self.work_dir / "logs" / "tgtd.log", prefix=self.tgtd_prefix(),
                         nice=self.cfg.scheduling.nice)
        self.tgtd.start()
        return self.tgtd

    def start_san(self, timeout: float = 15.0) -> None:
        """Start the SAN target (outside the nodes: its own process, host name ``san``,
        so crashing a host never takes it along) and wait until it listens. With
        ``san.kind: iscsi`` that is a real iSCSI target (:meth:`start_tgtd`)."""
        if self.cfg.san.kind == "iscsi":
            self.start_tgtd()
            return
        self.spawn_san()
        child = self.procs.find(SAN, "san-target")
        # it stands in for an array, which no load on the nodes slows down
        raise_priority(self.cfg.scheduling.nice, LOG, child.proc.pid)

        def _listening() -> bool:
            if child.proc.poll() is not None:
                raise RuntimeError(f"the SAN target exited {child.proc.returncode}; log: "
                                   f"{child.log_path}")
            return "san target listening" in child.log_path.read_text(errors="replace")

        self.wait_for(_listening, timeout, what="the SAN target to listen")

    def start_node(self, host: str) -> None:
        for svc in NODE_SERVICES:
            self.start_service(host, svc)

    def start(self) -> None:
        self.create_devices()
        self.start_nats()
        self.start_san()
        self.start_services()

    def start_services(self, timeout: float = 30.0) -> None:
        """The witness's arbiter first, then every node's services; the nodes' (standby)
        arbiters only once the witness's is the active one: it is preferred, and waiting
        makes it so however slowly the processes start."""
        witness = self.cfg.witness.host
        self.start_service(witness, "arbiter")
        for n in self.cfg.nodes:
            for svc in NODE_SERVICES:
                if svc != "arbiter":
                    self.start_service(n.name, svc)
        self.wait_for(lambda: self.arbiter_role(witness) == "active", timeout,
                      what=f"{witness}'s arbiter to become the active arbiter")
        for n in self.cfg.nodes:
            self.start_service(n.name, "arbiter")

    def crash(self, host: str) -> list[str]:
        """The host dies: SIGKILL every process of it, its nats-server included. Returns
        what was killed."""
        killed = [c.service for c in self.procs.kill_host(host)]
        srv = self.servers.get(host)
        if srv is not None and srv.proc is not None and srv.proc.poll() is None:
            srv.kill()
            killed.append("nats-server")
        return killed

    def stop(self) -> None:
        if os.getpid() != self.owner_pid:
            return  # a forked helper (pyroute2 forks for namespace sockets) owns nothing
        self.procs.stop_all()
        if self.tgtd is not None:
            self.tgtd.stop()
        for srv in self.servers.values():
            srv.stop()

    # ---- looking in ----------------------------------------------------------
    def http_get(self, host: str, service: str, path: str, timeout: float = 1.0) -> Any:
        port = self.cfg.port(host, service)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return orjson.loads(r.read())

    def status(self, host: str, service: str) -> dict[str, Any] | None:
        try:
            out: dict[str, Any] = self.http_get(host, service, "/status")
            return out
        except OSError:
            return None

    def wait_for(self, predicate: Any, timeout: float, interval: float = 0.02,
                 what: str = "condition", diagnose: Callable[[], str] | None = None) -> Any:
        """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes;
        on a timeout the error carries what ``diagnose`` says (the state a CI log
        needs to explain it: the lab's own logs are gone by then)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = predicate()
            except (OSError, http.client.HTTPException, nats.errors.Error):  # not reachable yet
                # (a service still starting may answer a half-read request): try again
                value = None
            if value:
                return value
            if time.monotonic() >= deadline:
                why = ""
                if diagnose is not None:
                    try:
                        why = "\n" + diagnose()
                    except Exception as exc:  # the timeout is the error to raise
                        why = f"\n(diagnosis failed: {exc!r})"
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}{why}")
            time.sleep(interval)

    def kv_groups(self) -> dict[str, tuple[GroupRecord, int]]:
        """group -> (record, revision) read from the KV now (a fresh connection; retried
        for a while when JetStream is not answering, e.g. just after a server restart)."""

        async def _go() -> dict[str, tuple[GroupRecord, int]]:
            nc = await self.connect()
            try:
                return await read_groups(nc.jetstream(), Subjects(self.cfg.cluster),
                                         self.cfg.groups())
            finally:
                await nc.close()

        async def _retried() -> dict[str, tuple[GroupRecord, int]]:
            return await bus.retry_js("kv read", _go, deadline=15.0)

        return asyncio.run(_retried())

    def kv_leader(self, events: bool = False) -> str | None:
        """The server leading the KV's (or, with ``events``, the event stream's) raft
        group now (None when not reachable)."""
        from vtlha.subjects import Subjects

        subj = Subjects(self.cfg.cluster)
        stream = subj.events_stream if events else bus.kv_stream(subj)

        async def _go() -> str | None:
            nc = await self.connect()
            try:
                return await bus.stream_leader(nc.jetstream(timeout=2), stream)
            finally:
                await nc.close()

        try:
            return asyncio.run(_go())
        except Exception:
            return None

    def events(self) -> list[Event]:
        """Every event in the stream now (a fresh connection)."""

        async def _go() -> list[Event]:
            nc = await self.connect()
            try:
                return [e for _, e in await eventlog.read(nc.jetstream(),
                                                          Subjects(self.cfg.cluster))]
            finally:
                await nc.close()

        async def _retried() -> list[Event]:  # JetStream may be electing a leader
            return await bus.retry_js("events", _go, deadline=30.0)

        return asyncio.run(_retried())

    def held_by(self) -> dict[str, str]:
        """group -> owner for every group whose KV record is in state ``held``."""
        return {g: r.owner for g, (r, _) in self.kv_groups().items() if r.state == "held"}

    def home_held(self) -> bool:
        """Every group of the cluster held by its home node (per the KV)."""
        return self.held_by() == {g: h for g, (h, _) in self.cfg.groups().items()}

    def arbiter_role(self, host: str) -> str | None:
        """'active' or 'standby' as the host's arbiter reports it; None: no answer."""
        st = self.status(host, "arbiter")
        return None if st is None else str(st.get("role"))

    def active_arbiters(self) -> list[str]:
        """Every host whose arbiter reports itself active (one, unless something is
        wrong; none during a takeover of the leader key)."""
        return [h for h in self.cfg.hosts if self.arbiter_role(h) == "active"]

    def recorded_addresses(self, host: str) -> list[str]:
        p = self.state_root / host / "addresses.json"
        try:
            out: list[str] = orjson.loads(p.read_bytes())
        except FileNotFoundError:
            return []
        return out
