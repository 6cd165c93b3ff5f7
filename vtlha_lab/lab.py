"""The network lab: a cluster in Linux network namespaces on one machine (root).

For a cluster file it creates, with names unique to this lab (``vtlha-<id>-…``):

- one namespace per node, one for the witness, one for clients, and one "switch"
  namespace holding the bridges (``br-data``; ``br-mgmt`` when nodes have management
  addresses, with each node's management gateway address on it);
- per host a veth pair: ``eth0`` (data) in the host's namespace, its peer on
  ``br-data``; nodes with a ``mgmt_ip`` also get ``eth1`` on ``br-mgmt``;
- each host's fixed addresses (service IP, management IP); the client gets
  ``.200`` in each network;
- one **uplink**: a veth whose host end (``vu<id>``) has one documentation-range address
  (a /30 that overlaps no network the host routes and nothing the lab uses) and whose
  other end is in the witness's namespace, so the CLI and tests
  on the host reach the lab's NATS cluster through the witness's server;
- a nats-server per node and the witness, clustered (routes over the data network),
  JetStream with ``sync_interval: always``; each host's services inside its namespace
  (an arbiter on every host, each with its own HTTP port in its own namespace).

Everything is removed by ``down()``: processes first, then the namespaces (which takes
their veths with them), then the uplink. The lab's record (``lab.json`` in its work
directory and in the registry directory) lets ``vtlha-lab down`` clean up a lab started
by another process.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from vtlha.config import ClusterConfig
from vtlha.errors import FatalError
from vtlha.priority import raise_priority
from vtlha_lab import netns as ns_util
from vtlha_lab.localcluster import SAN, LocalCluster, service_binary
from vtlha_lab.natsserver import NatsServer, NatsServerSpec
from vtlha_lab.tgt import SOCKET_DIR as TGTD_SOCKETS

LOG = logging.getLogger("vtlha_lab.lab")
PREFIX = "vtlha-"
REGISTRY = Path(os.environ.get("VTLHA_LAB_REGISTRY", "/run/vtlha-labs"))
CLIENT = "client"
SWITCH = "sw"


@dataclass
class LabRecord:
    """Everything needed to find and remove a lab, also from another process."""

    lab_id: str
    work_dir: str
    config: str
    namespaces: dict[str, str]  # role/host -> namespace name
    uplink_host_if: str
    uplink_host_ip: str  # with prefix
    uplink_peer_ip: str  # with prefix (in the witness's namespace)
    nats_port: int = 4222
    pids: list[int] = field(default_factory=list)
    #: tgtd's control port (``san.kind: iscsi``): its socket files go with the lab
    tgtd_control_port: int | None = None

    @property
    def nats_url(self) -> str:
        return f"nats://{self.uplink_peer_ip.split('/')[0]}:{self.nats_port}"

    def save(self) -> None:
        data = orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2)
        Path(self.work_dir, "lab.json").write_bytes(data)
        REGISTRY.mkdir(parents=True, exist_ok=True)
        (REGISTRY / f"{self.lab_id}.json").write_bytes(data)

    @classmethod
    def load(cls, path: Path) -> LabRecord:
        return cls(**json.loads(path.read_text()))


def registered_labs() -> list[LabRecord]:
    out = []
    for p in sorted(REGISTRY.glob("*.json")) if REGISTRY.exists() else []:
        with contextlib.suppress(OSError, ValueError, TypeError):
            out.append(LabRecord.load(p))
    return out


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host's namespace has an address in or a route to (the
    default route aside)."""
    nets: list[ipaddress.IPv4Network] = []
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=2):
            nets.append(ipaddress.IPv4Interface(
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network)
        for r in ipr.get_routes(family=2, table=254):
            if r["dst_len"] > 0 and r.get_attr("RTA_DST"):
                nets.append(ipaddress.IPv4Network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}",
                                                  strict=False))
    return nets


UPLINK_RANGES = ("203.0.113.0/24", "192.0.2.0/24", "198.51.100.0/24")


def _config_networks(cfg: ClusterConfig) -> list[ipaddress.IPv4Network]:
    """What the witness's namespace and the lab's clients use: the uplink must not
    overlap the witness's subnet nor any address of the cluster."""
    nets = []
    if cfg.witness.service_ip:
        nets.append(ipaddress.IPv4Interface(cfg.witness.service_ip).network)
    for n in cfg.nodes:
        addrs = [n.service_ip, *(a for g in (n.data_group, n.mgmt_group)
                                 for a in cfg.group_addresses(g))]
        if n.mgmt_ip:
            addrs.append(n.mgmt_ip)
        nets += [ipaddress.IPv4Network(ipaddress.IPv4Interface(a).ip) for a in addrs]
        for a in (n.service_ip, n.mgmt_ip):  # the client's .200 in each network
            if a:
                nets.append(ipaddress.IPv4Network(ipaddress.IPv4Interface(_client_ip(a)).ip))
        if n.groups.mgmt.gateway:
            nets.append(ipaddress.IPv4Network(n.groups.mgmt.gateway))
    return nets


def _free_uplink_net(cfg: ClusterConfig) -> ipaddress.IPv4Network:
    """A /30 of a documentation range that overlaps nothing the host's namespace routes
    (its own networks, other labs' uplinks) and nothing the lab itself uses."""
    taken = _host_networks() + _config_networks(cfg)
    for rng in UPLINK_RANGES:
        for net in reversed(list(ipaddress.IPv4Network(rng).subnets(new_prefix=30))):
            if not any(net.overlaps(t) for t in taken):
                return net
    raise FatalError("no free /30 in the documentation ranges for the lab's uplink: every "
                     "one overlaps a network of the host or of the cluster file")


def _client_ip(cidr: str) -> str:
    net = ipaddress.IPv4Interface(cidr).network
    return f"{net.network_address + 200}/{net.prefixlen}"


#: what the lab runs, by command, with the Debian package that has it
LAB_TOOLS = {"ip": "iproute2", "nft": "nftables", "setpriv": "util-linux"}
ISCSI_TOOLS = {"tgtd": "tgt", "tgtadm": "tgt"}


def require_tools(iscsi: bool) -> None:
    """Refuse to build a lab that cannot work: without nft there is no fence, without
    tgtd no iSCSI target, and the lab would come up half-made and fail in confusing ways."""
    need = {**LAB_TOOLS, **(ISCSI_TOOLS if iscsi else {})}
    missing = sorted({f"{cmd} (Debian package {pkg})" for cmd, pkg in need.items()
                      if shutil.which(cmd) is None})
    if missing:
        raise FatalError("the network lab needs " + ", ".join(missing)
                         + ": `make sysdeps` as root installs them")


class Lab(LocalCluster):
    """A cluster in network namespaces. Same interface as LocalCluster (loopback)."""

    def __init__(self, config_path: Path, work_dir: Path, lab_id: str | None = None) -> None:
        super().__init__(config_path, work_dir)
        if os.geteuid() != 0:
            raise FatalError("the network lab needs root (network namespaces, veth, bridges)")
        if self.cfg.witness.service_ip is None:
            raise FatalError(f"{config_path}: witness.service_ip: the lab needs the "
                             "witness's data-network address")
        require_tools(iscsi=self.cfg.san.kind == "iscsi")
        self.lab_id = lab_id or secrets.token_hex(3)
        hosts = [*self.cfg.hosts, CLIENT, SWITCH]
        names = {h: f"{PREFIX}{self.lab_id}-{h}"[:48] for h in hosts}
        net = _free_uplink_net(self.cfg)
        self.record = LabRecord(
            lab_id=self.lab_id, work_dir=str(work_dir), config=str(config_path),
            namespaces=names, uplink_host_if=f"vu{self.lab_id}",
            uplink_host_ip=f"{net.network_address + 1}/30",
            uplink_peer_ip=f"{net.network_address + 2}/30",
            nats_port=self.cfg.ports.nats_client)
        self.has_mgmt = any(n.mgmt_ip for n in self.cfg.nodes)
        #: extra environment for one host's service (test hooks)
        self.service_env: dict[tuple[str, str], dict[str, str]] = {}

    # ---- names and addresses -------------------------------------------------
    def ns(self, host: str) -> str:
        return self.record.namespaces[host]

    def service_ip(self, host: str) -> str:
        if host == self.cfg.witness.host:
            assert self.cfg.witness.service_ip is not None
            return self.cfg.witness.service_ip
        return self.cfg.node(host).service_ip

    def client_urls(self) -> list[str]:
        return [self.record.nats_url]  # through the uplink, to the witness's server

    def nats_urls(self, host: str) -> list[str]:
        """Own server first (loopback inside the namespace), then the others in
        ``server_order`` (the witness's before the companion's)."""
        others = [f"nats://{self.service_ip(h).split('/')[0]}:{self.cfg.ports.nats_client}"
                  for h in self.cfg.server_order(host) if h != host]
        own = ([f"nats://127.0.0.1:{self.cfg.ports.nats_client}"]
               if host in self.cfg.nats.servers else [])
        return own + others

    # ---- network ---------------------------------------------------------------
    def _create_namespaces(self) -> None:
        for name in self.record.namespaces.values():
            if ns_util.exists(name):
                raise FatalError(f"namespace {name} exists already")
            netns.create(name)
            with IPRoute(netns=name, flags=0) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def _veth(self, host: str, ifname: str, sw_if: str, bridge: str,
              addresses: list[str]) -> None:
        sw = self.ns(SWITCH)
        with IPRoute(netns=sw, flags=0) as ipr:
            ipr.link("add", ifname=sw_if, kind="veth", peer={"ifname": ifname,
                                                              "net_ns_fd": self.ns(host)})
            idx = ipr.link_lookup(ifname=sw_if)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname=bridge)[0], state="up")
        with IPRoute(netns=self.ns(host), flags=0) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            for a in addresses:
                ip, plen = a.split("/")
                ipr.addr("add", index=idx, address=ip, prefixlen=int(plen))
            ipr.link("set", index=idx, state="up")

    def _bridges(self) -> None:
        with IPRoute(netns=self.ns(SWITCH), flags=0) as ipr:
            for br in ("br-data", "br-mgmt") if self.has_mgmt else ("br-data",):
                ipr.link("add", ifname=br, kind="bridge")
                ipr.link("set", index=ipr.link_lookup(ifname=br)[0], state="up")
            if self.has_mgmt:
                idx = ipr.link_lookup(ifname="br-mgmt")[0]
                gws = {n.groups.mgmt.gateway for n in self.cfg.nodes if n.groups.mgmt.gateway}
                for gw in sorted(gws):
                    plen = ipaddress.IPv4Interface(
                        next(n.mgmt_ip for n in self.cfg.nodes if n.mgmt_ip)).network.prefixlen
                    ipr.addr("add", index=idx, address=gw, prefixlen=plen)

    def _uplink(self) -> None:
        rec = self.record
        with IPRoute() as ipr:
            ipr.link("add", ifname=rec.uplink_host_if, kind="veth",
                     peer={"ifname": "up0", "net_ns_fd": self.ns(self.cfg.witness.host)})
            idx = ipr.link_lookup(ifname=rec.uplink_host_if)[0]
            ip, plen = rec.uplink_host_ip.split("/")
            ipr.addr("add", index=idx, address=ip, prefixlen=int(plen))
            ipr.link("set", index=idx, state="up")
        with IPRoute(netns=self.ns(self.cfg.witness.host), flags=0) as ipr:
            idx = ipr.link_lookup(ifname="up0")[0]
            ip, plen = rec.uplink_peer_ip.split("/")
            ipr.addr("add", index=idx, address=ip, prefixlen=int(plen))
            ipr.link("set", index=idx, state="up")

    def build_network(self) -> None:
        CREATED.add(self.lab_id)
        self._create_namespaces()
        self._bridges()
        for i, host in enumerate(self.cfg.hosts):
            self._veth(host, "eth0", f"d{i}", "br-data", [self.service_ip(host)])
            if host != self.cfg.witness.host:
                mgmt = self.cfg.node(host).mgmt_ip
                if mgmt:
                    self._veth(host, "eth1", f"m{i}", "br-mgmt", [mgmt])
        node0 = self.cfg.nodes[0]
        self._veth(CLIENT, "eth0", "dc", "br-data", [_client_ip(node0.service_ip)])
        if self.has_mgmt and node0.mgmt_ip:
            self._veth(CLIENT, "eth1", "mc", "br-mgmt", [_client_ip(node0.mgmt_ip)])
        self._uplink()

    def set_links(self, host: str, up: bool, ifnames: tuple[str, ...] = ("eth0", "eth1")) -> None:
        """Cut (or restore) a host's links inside its namespace: a real partition."""
        with IPRoute(netns=self.ns(host), flags=0) as ipr:
            for ifname in ifnames:
                found = ipr.link_lookup(ifname=ifname)
                if found:
                    ipr.link("set", index=found[0], state="up" if up else "down")

    def nft(self, host: str, script: str) -> None:
        """Apply an nftables script inside a host's namespace (test faults such as a cut
        path; the ip-manager's fence does not fork nft)."""
        subprocess.run([*self.prefix(host), "nft", "-f", "-"], input=script.encode(),
                       check=True, timeout=10, capture_output=True)

    def cut_path(self, host: str, peer: str, port: int | None = None) -> None:
        """Drop every packet between ``host`` and ``peer`` (inside ``host``'s namespace),
        or with ``port`` only that TCP port of the peer (e.g. one path to the SAN target).
        ``heal_path`` undoes it."""
        ip = self.service_ip(peer).split("/")[0]
        out = f"ip daddr {ip}" + (f" tcp dport {port}" if port else "")
        inp = f"ip saddr {ip}" + (f" tcp sport {port}" if port else "")
        self.nft(host, f"""table inet vtlha_cut {{
  chain in {{ type filter hook input priority -300; {inp} drop; }}
  chain out {{ type filter hook output priority -300; {out} drop; }}
}}
""")

    def cut_nats(self, host: str, peer: str) -> None:
        """Drop NATS traffic only (client and route ports, either direction) between
        ``host`` and ``peer``, inside ``host``'s namespace; everything else (the SAN,
        ARP, the data and management networks) stays up. ``heal_path`` undoes it."""
        ip = self.service_ip(peer).split("/")[0]
        ports = f"{{ {self.cfg.ports.nats_client}, {self.cfg.ports.nats_cluster} }}"
        self.nft(host, f"""table inet vtlha_cut {{
  chain in {{ type filter hook input priority -300;
    ip saddr {ip} tcp sport {ports} drop; ip saddr {ip} tcp dport {ports} drop; }}
  chain out {{ type filter hook output priority -300;
    ip daddr {ip} tcp dport {ports} drop; ip daddr {ip} tcp sport {ports} drop; }}
}}
""")

    def heal_path(self, host: str) -> None:
        self.nft(host, "delete table inet vtlha_cut\n")

    def mac(self, host: str, ifname: str = "eth0") -> str:
        with IPRoute(netns=self.ns(host), flags=0) as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
            return str(link.get_attr("IFLA_ADDRESS"))

    def neighbour(self, host: str, ip: str) -> str | None:
        """The MAC the host's neighbour table holds for ``ip`` (None if none)."""
        with IPRoute(netns=self.ns(host), flags=0) as ipr:
            for n in ipr.get_neighbours(family=2):
                if n.get_attr("NDA_DST") == ip and n.get_attr("NDA_LLADDR"):
                    return str(n.get_attr("NDA_LLADDR"))
        return None

    def addresses(self, host: str) -> list[str]:
        """IPv4 addresses configured in the host's namespace, as a/plen."""
        with IPRoute(netns=self.ns(host), flags=0) as ipr:
            return sorted(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                          for a in ipr.get_addr(family=2)
                          if not a.get_attr("IFA_ADDRESS").startswith("127."))

    def fenced(self, host: str) -> list[str]:
        """The addresses in a node's fence held set (read with nft in its namespace;
        none when its fence table is not there)."""
        from vtlha.fence import TABLE, parse_held

        out = subprocess.run([*self.prefix(host), "nft", "list", "set", "inet", TABLE, "held"],
                             capture_output=True, text=True, timeout=10, check=False)
        return sorted(parse_held(out.stdout)) if out.returncode == 0 else []

    def floating_on(self, host: str) -> list[str]:
        floating = {a for g in self.cfg.groups() for a in self.cfg.group_addresses(g)}
        return [a for a in self.addresses(host) if a in floating]

    # ---- processes -------------------------------------------------------------
    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def nats_specs(self) -> list[NatsServerSpec]:
        routes = [f"{self.service_ip(h).split('/')[0]}:{self.cfg.ports.nats_cluster}"
                  for h in self.cfg.nats.servers]
        specs = [NatsServerSpec(
            name=h, host="0.0.0.0", client_port=self.cfg.ports.nats_client,
            monitor_port=self.cfg.ports.nats_monitor,
            store_dir=self.work_dir / "nats" / h / "jetstream",
            cluster_port=self.cfg.ports.nats_cluster if len(routes) > 1 else None,
            routes=routes if len(routes) > 1 else [], tags=[f"host:{h}"],
        ) for h in self.cfg.nats.servers]
        if self.secured:  # `vtlha deploy render`'s configs, on every address of the host
            for spec in specs:
                spec.config_text = self._rendered_config(spec.name, spec.store_dir,
                                                         bind="0.0.0.0")
        return specs

    def nats_listen(self) -> dict[str, dict[str, Any]] | None:
        """Each server listens on its host's service address (the lab's ports)."""
        ports = self.cfg.ports
        return {h: {"host": self.service_ip(h).split("/")[0], "client_port": ports.nats_client,
                    "cluster_port": ports.nats_cluster, "monitor_port": ports.nats_monitor}
                for h in self.cfg.nats.servers}

    def tls_addresses(self) -> list[str]:
        return ["127.0.0.1", self.record.uplink_peer_ip,
                *(self.service_ip(h) for h in self.cfg.nats.servers)]

    def start_nats(self) -> None:
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        for spec in self.nats_specs():
            srv = NatsServer(spec, self.work_dir / "logs" / f"{spec.name}-nats-server.log",
                             prefix=self.prefix(spec.name), nice=self.cfg.scheduling.nice)
            srv.start()
            self.servers[spec.name] = srv
        for host in self.servers:
            self.wait_nats(host)

    def wait_nats(self, host: str, timeout: float = 60, streams: bool = True) -> None:
        # (a restarted server's /healthz waits for its streams to catch up: once, in CI, a
        # stalled catch-up took longer than 30 s)
        srv = self.servers[host]
        srv.wait_ready(timeout=timeout, jetstream=len(self.servers) == 1,
                       fetch=self._monitor_fetch(host, srv.spec.monitor_port), streams=streams)

    def _monitor_fetch(self, host: str, port: int) -> Callable[[str], int]:
        ns = self.ns(host)
        return lambda path: ns_util.http_get(ns, "127.0.0.1", port, path)[0]

    def start_service(self, host: str, service: str) -> None:
        argv = [*self.prefix(host), service_binary(service), "--config", str(self.config_path),
                "--node", host, "--state-dir", str(self.state_root),
                "--nats", ",".join(self.nats_urls(host)), "--http-host", "0.0.0.0",
                "--http-port", str(getattr(self.cfg.ports, service.replace("-", "_")))]
        if service == "ip-manager":
            argv += ["--backend", "netlink"]
        if service == "storage-monitor":
            argv += ["--san", self.san_host()]
        self.procs.spawn(host, service, argv, env=self.service_env.get((host, service)))

    def san_host(self) -> str:
        """The nodes reach the SAN target at the witness's service IP."""
        return self.service_ip(self.cfg.witness.host).split("/")[0]

    def tgtd_prefix(self) -> list[str]:
        """tgtd (``san.kind: iscsi``) runs in the witness's namespace, its portals on the
        witness's service address: the nodes reach it over the lab's data network."""
        return self.prefix(self.cfg.witness.host)

    def spawn_san(self) -> None:
        """The SAN target runs in the witness's namespace, on every address."""
        argv = [*self.prefix(self.cfg.witness.host), *self.san_argv()]
        argv[argv.index("--host") + 1] = "0.0.0.0"
        self.procs.spawn(SAN, "san-target", argv)

    def spawn_in(self, host: str, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """A helper process (test server, client probe) inside ``host``'s namespace."""
        return self.procs.spawn(host, name, [*self.prefix(host), *argv]).proc

    def probe_service(self, target: str, port: int, duration: float,
                      timeout: float = 0.05, first: str = "node-a") -> Path:
        """A TCP service on every node answering with the node's name (the appliance's
        data service: ``vtlha_lab.probes serve``), and the client connecting to
        ``target:port`` every 5 ms for ``duration`` seconds. Returns the client's
        timeline file once ``first`` answered it."""
        for n in self.cfg.nodes:
            self.spawn_in(n.name, "serve", [sys.executable, "-m", "vtlha_lab.probes", "serve",
                                            "--port", str(port), "--name", n.name])
        timeline = self.work_dir / "probe.jsonl"
        self.spawn_in(CLIENT, "probe", [sys.executable, "-m", "vtlha_lab.probes", "probe",
                                        "--target", f"{target}:{port}", "--out", str(timeline),
                                        "--interval", "0.005", "--duration", str(duration),
                                        "--timeout", str(timeout)])
        from vtlha_lab.probes import answered_by

        self.wait_for(lambda: answered_by(timeline, first, 0), 10,
                      what=f"the client reaching {target} on {first}")
        return timeline

    def http_get(self, host: str, service: str, path: str, timeout: float = 1.0) -> Any:
        port = getattr(self.cfg.ports, service.replace("-", "_"))
        status, body = ns_util.http_get(self.ns(host), "127.0.0.1", port, path, timeout)
        if status >= 500 and path == "/status":
            raise OSError(f"{host}/{service} answered {status}")
        return orjson.loads(body)

    def crash(self, host: str, cut_links: bool = True) -> list[str]:
        """The machine dies: every process killed and (by default) its links down (a dead
        machine answers nothing, whatever its kernel still had configured)."""
        killed = super().crash(host)
        if cut_links:
            self.set_links(host, up=False)
        return killed

    # ---- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self.record.save()
        try:
            self.build_network()
            self.create_devices()
            self.start_nats()
            self.start_san()
            self.start_services()
        finally:
            self._save_pids()

    def _save_pids(self) -> None:
        self.record.pids = [c.proc.pid for c in self.procs.children] + [
            s.proc.pid for s in self.servers.values() if s.proc is not None]
        if self.tgtd is not None and self.tgtd.proc is not None:
            self.record.pids.append(self.tgtd.proc.pid)
            self.record.tgtd_control_port = self.tgtd.spec.control_port
        self.record.save()

    def stop(self) -> None:
        if os.getpid() != self.owner_pid:
            return  # a forked helper (pyroute2 forks for namespace sockets) owns nothing
        try:
            super().stop()
        finally:
            teardown(self.record)


class OverlapObserver:
    """Runs ``vtlha_lab.observer`` (a process of its own) over the lab's nodes for the
    duration of a ``with`` block; afterwards ``samples``, ``max_gap``, ``overlaps``
    (spans in which two nodes answered for one address: configured on an up link and in
    the fence set; ``observed``: those the polls saw) and ``holders`` (per address, who
    answered when) hold what it saw."""

    def __init__(self, lab: Lab, interval: float = 0.01) -> None:
        self.lab = lab
        self.interval = interval
        self.out = lab.work_dir / f"observer-{secrets.token_hex(3)}.json"
        self.samples = 0
        self.max_gap = 0.0
        self.overlaps: list[tuple[float, str, list[str]]] = []
        #: the overlaps the polls saw (each node seen answering within it), not merely
        #: within a gap between two polls of one node (``vtlha_lab.observer``)
        self.observed: list[tuple[float, str, list[str]]] = []
        self.holders: dict[str, list[tuple[float, str]]] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OverlapObserver:
        floating = sorted({a for g in self.lab.cfg.groups()
                           for a in self.lab.cfg.group_addresses(g)})
        argv = [sys.executable, "-m", "vtlha_lab.observer", "--out", str(self.out),
                "--interval", str(self.interval)]
        for n in self.lab.cfg.nodes:
            argv += ["--node", f"{n.name}={self.lab.ns(n.name)}"]
        for a in floating:
            argv += ["--address", a]
        self.proc = subprocess.Popen(argv)
        # the observer measures the services: it runs at their priority, or its own
        # scheduling delays would read as gaps in what they serve
        raise_priority(self.lab.cfg.scheduling.nice, LOG, self.proc.pid)
        ready = Path(str(self.out) + ".ready")
        deadline = time.monotonic() + 15
        while not ready.exists():  # every node polled once: it is watching
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("the overlap observer did not start polling")
            time.sleep(0.01)
        return self

    def stopped_answering_at(self, addr: str, node: str, since: float) -> float | None:
        """The first moment after ``since`` at which ``node`` no longer answered for
        ``addr`` (after the ``with`` block)."""
        for t, who in self.holders.get(addr, []):
            if t >= since and node not in who.split(","):
                return t
        return None

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        data = json.loads(self.out.read_text())
        self.samples, self.max_gap = data["samples"], data["max_gap"]
        if data.get("errors"):
            raise RuntimeError(f"the overlap observer failed: {data['errors']}")
        self.overlaps = [tuple(o) for o in data["overlaps"]]
        self.observed = [tuple(o) for o in data.get("observed", [])]
        self.holders = {a: [tuple(h) for h in hs]
                        for a, hs in data["history"].items()}


def teardown(rec: LabRecord) -> list[str]:
    """Remove a lab: its processes, namespaces and uplink. Returns what was removed."""
    removed: list[str] = []
    for pid in rec.pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    # Any process still inside one of the lab's namespaces (e.g. started by hand).
    for name in rec.namespaces.values():
        if ns_util.exists(name):
            inside = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                    text=True, timeout=5, check=False).stdout.split()
            for p in inside:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(p), signal.SIGKILL)
    deadline = time.monotonic() + 5
    for name in rec.namespaces.values():
        while ns_util.exists(name):
            try:
                netns.remove(name)
                removed.append(name)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    if _remove_link(rec.uplink_host_if):
        removed.append(rec.uplink_host_if)
    if rec.tgtd_control_port is not None:  # the killed tgtd's control socket files
        for suffix in ("", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                (TGTD_SOCKETS / f"socket.{rec.tgtd_control_port}{suffix}").unlink()
    with contextlib.suppress(FileNotFoundError):
        (REGISTRY / f"{rec.lab_id}.json").unlink()
    return removed


def _remove_link(name: str) -> bool:
    """Delete the host link ``name`` if it is there; whether it was."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            # the uplink is a veth: the kernel removes it on its own, a moment after its
            # peer's namespace went, and may do so between the lookup and the delete
            if exc.code != errno.ENODEV:
                raise
        return True


#: ids of the labs this process created (the hygiene check looks at these only, so a
#: lab another process runs meanwhile is not blamed on us)
CREATED: set[str] = set()


def leftovers(only_created_here: bool = False) -> list[str]:
    """Namespaces and host links of labs still present (for hygiene checks)."""
    names = [n for n in ns_util.list_netns() if n.startswith(PREFIX)]
    if only_created_here:
        names = [n for n in names if n[len(PREFIX):].split("-")[0] in CREATED]
    with IPRoute() as ipr:
        links = [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
    ups = [n for n in links if n.startswith("vu") and len(n) == 8]
    if only_created_here:
        ups = [n for n in ups if n[2:] in CREATED]
    return names + ups
