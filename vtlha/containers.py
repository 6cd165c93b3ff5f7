"""What runs in containers on each host, and the compose file and systemd units for it.

One image (``make images``) holds every service and nats-server; what differs between
the containers of a host — command, user, capabilities, mounts, health port — depends on
the cluster file and is decided here, once, for both outputs of ``vtlha deploy render``:

    OUT/compose/<host>.yaml                    podman-compose / docker compose, per host
    OUT/systemd/<host>/vtlha-<cluster>-<host>-<svc>.service   a unit per container

A container is named ``vtlha-<cluster>-<host>-<service>`` (``<service>``: ``nats`` or one
of the four), its compose project ``vtlha-<cluster>-<host>``.

A node runs its nats-server and the four services; the witness its nats-server and an
arbiter. Every container uses the host's network (the services reach each other and
the bus on the host's addresses; the ip-manager moves the host's addresses; the network
lab joins each host's containers to that host's namespace instead) and sees the
host's paths at the same place inside: the cluster file, the host's nats-server config,
each service's own credential (no other), the TLS files, and the host's state directory.
heartbeat, arbiter and nats-server run as the image's ``vtlha`` user (uid 10001); the
ip-manager runs as root with ``NET_ADMIN``/``NET_RAW`` (addresses, the nftables fence,
gratuitous ARP), the storage-monitor as root (resource agents start the appliance's
services). Every container runs at the cluster file's ``scheduling.nice``
(``vtlha.priority``: a lease is only as good as the process renewing it): the services
raise their own priority at start, nats-server is started by ``python3 -m
vtlha.priority``; both need ``SYS_NICE``, which podman's default set lacks even for root
(without it a service warns and runs at the default). The restart policy is the
supervisor: compose restarts a container that exits or is killed (``restart: always``);
the units restart through systemd.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from vtlha.config import BUILTIN_TAPE_AGENT, SERVICES, ClusterConfig
from vtlha.natsauth import seed_path, service_user

#: the image's unprivileged user (deploy/image/Containerfile)
IMAGE_UID = 10001
#: what a container runs as: None = root
RUNS_AS: dict[str, str | None] = {
    "nats": f"{IMAGE_UID}:{IMAGE_UID}", "heartbeat": f"{IMAGE_UID}:{IMAGE_UID}",
    "arbiter": f"{IMAGE_UID}:{IMAGE_UID}", "storage-monitor": None, "ip-manager": None,
    "notifier": f"{IMAGE_UID}:{IMAGE_UID}"}
CAPABILITIES = {"ip-manager": ("NET_ADMIN", "NET_RAW")}
#: what raising the scheduling priority needs (``scheduling.nice`` < 0)
NICE_CAPABILITY = "SYS_NICE"
#: dropped from every other container: podman's default set gives a root container
#: NET_RAW (seen here: the storage-monitor had it), which only the ip-manager needs
DROPPED = ("NET_RAW",)
HEALTH_INTERVAL = "10s"
HEALTH_TIMEOUT = "3s"
HEALTH_RETRIES = 3
HEALTH_START = "30s"
STOP_TIMEOUT = 10  # seconds: above the services' own SHUTDOWN_GRACE (3 s)


@dataclass(frozen=True)
class Mount:
    path: str  # the same inside the container as on the host
    writable: bool = False

    def spec(self) -> str:
        return f"{self.path}:{self.path}:{'rw' if self.writable else 'ro'}"


@dataclass(frozen=True)
class Container:
    cluster: str
    host: str
    service: str  # "nats" or one of SERVICES
    image: str
    command: tuple[str, ...]
    user: str | None
    mounts: tuple[Mount, ...]
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    pid_host: bool = False
    health_url: str | None = None
    network: str = "host"  # podman's --network: "host", or "ns:/run/netns/NAME" in the lab

    @property
    def name(self) -> str:
        return f"vtlha-{self.cluster}-{self.host}-{self.service}"

    @property
    def health_command(self) -> list[str] | None:
        """A probe of ``health_url`` (``vtlha.healthz``: the image has no curl)."""
        if self.health_url is None:
            return None
        return ["python3", "-m", "vtlha.healthz", self.health_url]


@dataclass(frozen=True)
class HostPaths:
    """Where the deployment's files are on every host (the same path in the containers).
    ``conf_dir`` holds the rendered ``nats/<host>.conf``."""

    config: str = "/etc/vtlha/cluster.yaml"
    conf_dir: str = "/etc/vtlha"
    store_root: str | None = None  # JetStream stores: <store_root>/<host>

    def nats_conf(self, host: str) -> str:
        return str(PurePosixPath(self.conf_dir) / "nats" / f"{host}.conf")


def _abs(path: str, what: str) -> str:
    if not PurePosixPath(path).is_absolute():
        raise ValueError(f"{what}: {path!r} is not an absolute path (containers mount "
                         f"host paths at the same place)")
    return path


def _tls_mounts(cfg: ClusterConfig, host: str, server: bool) -> list[Mount]:
    tls = cfg.nats.tls
    if tls is None:
        return []
    files = [tls.ca] + ([tls.cert_for(host), tls.key_for(host)] if server else [])
    return [Mount(_abs(f, "nats.tls")) for f in files]


def _service_mounts(cfg: ClusterConfig, host: str, service: str,
                    paths: HostPaths) -> list[Mount]:
    out = [Mount(_abs(paths.config, "--config-path")),
           Mount(_abs(str(cfg.state_path(host)), "state_dir"), writable=True)]
    if cfg.nats.credentials_dir:
        out.append(Mount(_abs(str(seed_path(cfg.nats.credentials_dir,
                                            service_user(host, service))),
                              "nats.credentials_dir")))
    out += _tls_mounts(cfg, host, server=False)
    if service == "heartbeat" and cfg.has_node(host):  # pid files of the process checks
        out += [Mount(_abs(str(PurePosixPath(c.path).parent), f"checks.{c.name}.path"))
                for c in cfg.node(host).checks if c.kind == "pidfile" and c.path]
    if service == "storage-monitor" and cfg.has_node(host):  # resource agents
        own = cfg.node(host).data_group, cfg.companion(host).data_group
        out += [Mount(_abs(r.agent, f"resources.{r.name}.agent"))
                for g in own for r in cfg.group_resources(g) if r.agent != BUILTIN_TAPE_AGENT]
    if service == "notifier":  # notify scripts (what they run must be in the image)
        out += [Mount(_abs(t.command[0], f"notifications.targets.{t.name}.command"))
                for t in cfg.notifications.targets if t.type == "exec"]
    return list(dict.fromkeys(out))  # each path once, first wins


def _nice_caps(cfg: ClusterConfig) -> tuple[str, ...]:
    """``SYS_NICE`` when the cluster file asks for a raised priority (nothing else needs
    it: a nice value at or above the default is any process's right)."""
    return (NICE_CAPABILITY,) if cfg.scheduling.nice < 0 else ()


def _nats_command(cfg: ClusterConfig, conf: str) -> tuple[str, ...]:
    """nats-server at the services' priority: it holds the KV the leases are renewed
    in (the lab raises its servers the same way). ``vtlha.priority`` raises it and execs
    the server (warning and running it anyway when the container may not raise it)."""
    nice = cfg.scheduling.nice
    wrap = ("python3", "-m", "vtlha.priority", str(nice)) if nice < 0 else ()
    return (*wrap, "nats-server", "-c", conf)


def _nats_container(cfg: ClusterConfig, host: str, image: str,
                    paths: HostPaths, network: str) -> Container:
    at = cfg.nats_listen(host)
    store = (PurePosixPath(paths.store_root) / host if paths.store_root
             else PurePosixPath(cfg.state_path(host)) / "nats")
    probe_host = "127.0.0.1" if at.host in ("0.0.0.0", "::") else at.host
    health = (f"http://{probe_host}:{at.monitor_port}/healthz"
              if at.monitor_port is not None else None)
    mounts = [Mount(_abs(paths.nats_conf(host), "--conf-dir")),
              Mount(_abs(str(store.parent) if paths.store_root is None else str(store),
                         "state_dir"), writable=True),
              *_tls_mounts(cfg, host, server=True)]
    return Container(cfg.cluster, host, "nats", image, _nats_command(cfg, paths.nats_conf(host)),
                     RUNS_AS["nats"], tuple(dict.fromkeys(mounts)), cap_add=_nice_caps(cfg),
                     cap_drop=DROPPED, health_url=health, network=network)


def host_containers(cfg: ClusterConfig, host: str, image: str,
                    paths: HostPaths = HostPaths(), network: str = "host") -> list[Container]:
    """The containers of ``host``: its nats-server (when it runs one), then its
    services (all four on a node, the arbiter on the witness, a notifier where
    ``notifications.hosts`` says). ``network``: podman's network for all of them (the
    host's; the network lab gives the host's namespace)."""
    out = []
    if host in cfg.nats.servers:
        out.append(_nats_container(cfg, host, image, paths, network))
    for svc in cfg.host_services(host):
        out.append(Container(
            cfg.cluster, host, svc, image,
            (f"vtlha-{svc}", "--config", paths.config, "--node", host),
            RUNS_AS[svc], tuple(_service_mounts(cfg, host, svc, paths)),
            cap_add=CAPABILITIES.get(svc, ()) + (_nice_caps(cfg) if svc in SERVICES else ()),
            cap_drop=() if svc in CAPABILITIES else DROPPED, pid_host=svc == "heartbeat",
            health_url=f"http://127.0.0.1:{cfg.port(host, svc)}/healthz", network=network))
    return out


# ---- compose ---------------------------------------------------------------------------
def project_name(cluster: str, host: str) -> str:
    """The compose project of a host's containers."""
    return f"vtlha-{cluster}-{host}"


def render_compose(host: str, containers: list[Container], source: str = "") -> str:
    """A compose file (podman-compose, docker compose) for one host's containers."""
    services: dict[str, object] = {}
    for c in containers:
        spec: dict[str, object] = {
            "image": c.image, "container_name": c.name, "command": list(c.command),
            "network_mode": c.network, "restart": "always",
            "stop_grace_period": f"{STOP_TIMEOUT}s"}
        if c.user:
            spec["user"] = c.user
        if c.pid_host:
            spec["pid"] = "host"
        if c.cap_add:
            spec["cap_add"] = list(c.cap_add)
        if c.cap_drop:
            spec["cap_drop"] = list(c.cap_drop)
        spec["volumes"] = [m.spec() for m in c.mounts]
        if c.health_command:
            spec["healthcheck"] = {"test": ["CMD", *c.health_command],
                                   "interval": HEALTH_INTERVAL, "timeout": HEALTH_TIMEOUT,
                                   "retries": HEALTH_RETRIES, "start_period": HEALTH_START}
        services[c.service] = spec
    head = (f"# vtl-ha containers of {host}; rendered by `vtlha deploy render`"
            + (f" from {source}" if source else "") + "\n"
            f"# podman-compose -p {project_name(containers[0].cluster, host)} -f THIS up -d "
            f"(docs/deploy.md, \"Running\")\n")
    return head + yaml.safe_dump({"services": services}, sort_keys=False, width=100)


# ---- systemd ---------------------------------------------------------------------------
def podman_run_args(c: Container) -> list[list[str]]:
    """``podman run`` options of ``c``, each with its value, then the image and the
    command (the unit's ExecStart, one group a line)."""
    args = [["--name", c.name], ["--network", c.network], [f"--stop-timeout={STOP_TIMEOUT}"]]
    if c.user:
        args.append(["--user", c.user])
    if c.pid_host:
        args.append(["--pid", "host"])
    args += [["--cap-add", cap] for cap in c.cap_add]
    args += [["--cap-drop", cap] for cap in c.cap_drop]
    args += [["--volume", m.spec()] for m in c.mounts]
    if c.health_command:  # a string: podman runs it with /bin/sh -c
        args += [["--health-cmd", " ".join(c.health_command)],
                 [f"--health-interval={HEALTH_INTERVAL}", f"--health-timeout={HEALTH_TIMEOUT}",
                  f"--health-retries={HEALTH_RETRIES}", f"--health-start-period={HEALTH_START}"]]
    return [*args, [c.image], list(c.command)]


def _systemd_quote(arg: str) -> str:
    """One ExecStart argument: shell-like quoting, with ``%`` and ``$`` escaped for
    systemd (which expands specifiers and variables)."""
    return shlex.quote(arg).replace("%", "%%").replace("$", "$$")


def render_unit(c: Container, containers: list[Container], source: str = "") -> str:
    """A unit in the form of ``podman generate systemd --new`` (podman 4.3 has no
    Quadlet): systemd is the supervisor, the container is created at each start."""
    after = ["network-online.target"]
    if c.service != "nats":  # start after the host's nats-server, but never need it
        after += [f"{o.name}.service" for o in containers if o.service == "nats"]
    run = " \\\n    ".join(" ".join(_systemd_quote(a) for a in group)
                              for group in podman_run_args(c))
    return f"""\
# {c.name}.service: vtl-ha {c.service} of {c.host} in a container; rendered by
# `vtlha deploy render`{" from " + source if source else ""}. Install: docs/deploy.md, "systemd".
[Unit]
Description=vtl-ha {c.service} ({c.host}, container {c.name})
Wants=network-online.target
After={" ".join(after)}

[Service]
Environment=PODMAN_SYSTEMD_UNIT=%n
Restart=always
RestartSec=1
TimeoutStartSec=120
TimeoutStopSec={STOP_TIMEOUT + 10}
ExecStartPre=/bin/rm -f %t/%n.ctr-id
ExecStart=/usr/bin/podman run --cidfile=%t/%n.ctr-id --cgroups=no-conmon --rm \\
    --sdnotify=conmon --replace -d \\
    {run}
ExecStop=/usr/bin/podman stop --ignore -t {STOP_TIMEOUT} --cidfile=%t/%n.ctr-id
ExecStopPost=/usr/bin/podman rm -f --ignore -t {STOP_TIMEOUT} --cidfile=%t/%n.ctr-id
Type=notify
NotifyAccess=all

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class RenderedContainers:
    compose: dict[str, Path]
    units: dict[str, list[Path]]


def write_if_changed(path: Path, text: str, written: list[Path]) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
        written.append(path)


def render_containers(cfg: ClusterConfig, out: Path, image: str, paths: HostPaths,
                      written: list[Path], source: str = "",
                      networks: Mapping[str, str] | None = None) -> RenderedContainers:
    """Write every host's compose file and units under ``out``; ``networks``: host ->
    podman network where it is not the host's (the network lab's namespaces)."""
    compose: dict[str, Path] = {}
    units: dict[str, list[Path]] = {}
    (out / "compose").mkdir(parents=True, exist_ok=True)
    for host in cfg.hosts:
        containers = host_containers(cfg, host, image, paths,
                                     (networks or {}).get(host, "host"))
        compose[host] = out / "compose" / f"{host}.yaml"
        write_if_changed(compose[host], render_compose(host, containers, source), written)
        unit_dir = out / "systemd" / host
        unit_dir.mkdir(parents=True, exist_ok=True)
        units[host] = []
        for c in containers:
            path = unit_dir / f"{c.name}.service"
            write_if_changed(path, render_unit(c, containers, source), written)
            units[host].append(path)
    return RenderedContainers(compose, units)
