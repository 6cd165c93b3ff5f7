"""The cluster file: one YAML file for the whole cluster, validated on load.

Errors name the file, the field (as a dotted path) and the reason. Timing rules
(STYLE.md) are enforced here so that no service runs with timings that cannot work:
``dead_after >= 2 * heartbeat_interval``, ``lease_ttl >= dead_after``,
``margin < lease_ttl``, retry deadlines shorter than the lease.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from vtlha.errors import ConfigError
from vtlha.iscsi.scsi import node_tag
from vtlha.notifyconfig import Notifications

NAME_RE = r"^[a-z0-9][a-z0-9-]*$"
Name = Annotated[str, StringConstraints(pattern=NAME_RE, max_length=63)]

SERVICES = ("heartbeat", "storage-monitor", "ip-manager", "arbiter")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timings(_Model):
    heartbeat_interval: float = Field(0.1, gt=0, le=10)
    dead_after: float = Field(0.3, gt=0)
    lease_ttl: float = Field(0.3, gt=0)
    margin: float = Field(0.03, ge=0)
    leader_ttl: float = Field(
        3.0, gt=0, description="the active arbiter renews the leader key every leader_ttl/3; "
        "a standby takes it over once it has seen no change of the key for this long")
    leader_standby_delay: float = Field(
        1.0, ge=0, description="a node's arbiter claims the leader key (absent or lapsed) "
        "this much later than the witness's, so that the witness's arbiter is preferred")
    command_timeout: float = Field(0.25, gt=0, description="per-attempt timeout of a command")
    check_interval: float = Field(0.5, gt=0, description="how often process checks run")
    probe_interval: float = Field(0.5, gt=0, description="how often storage paths are probed")
    probe_timeout: float = Field(1.0, gt=0)
    storage_settle: float = Field(
        2.0, ge=0, description="after a global storage failure, the companion must reach "
        "every device of a group this long without a break before the owner's loss counts "
        "as local (the two recover at slightly different times: no failover on that)")
    storage_stale_after: float = Field(
        1.5, gt=0, description="a node's storage report older than this (as the arbiter "
        "received it) cannot confirm anything: its companion takes over no data group on "
        "its word. Default: 3 x probe_interval; must be >= probe_interval")
    mgmt_stale_after: float = Field(
        1.5, gt=0, description="a node's management-path report older than this (as the "
        "arbiter received it) says nothing: the policy treats the path as unknown, which "
        "moves nothing. Default: 3 x probe_interval; must be >= probe_interval")
    initial_assign_wait: float = Field(
        10.0, ge=0, description="a group nobody owns yet waits this long after the arbiter "
        "starts for its home node before it is given to the companion")
    rise: int = Field(2, ge=1, description="good results in a row before healthy")
    fall: int = Field(2, ge=1, description="bad results in a row before failed")

    @model_validator(mode="before")
    @classmethod
    def _default_storage_stale_after(cls, data: object) -> object:
        """storage_stale_after and mgmt_stale_after default to 3 x probe_interval
        (whatever that is)."""
        if isinstance(data, dict):
            interval = data.get("probe_interval", cls.model_fields["probe_interval"].default)
            if isinstance(interval, int | float) and not isinstance(interval, bool):
                for key in ("storage_stale_after", "mgmt_stale_after"):
                    if key not in data:
                        data = {**data, key: 3 * interval}
        return data

    @model_validator(mode="after")
    def _timing_rules(self) -> Timings:
        if self.dead_after < 2 * self.heartbeat_interval:
            raise ValueError(
                f"dead_after ({self.dead_after}) must be >= 2 * heartbeat_interval "
                f"({2 * self.heartbeat_interval}): one late heartbeat must not look like a death"
            )
        if self.lease_ttl < self.dead_after:
            raise ValueError(
                f"lease_ttl ({self.lease_ttl}) must be >= dead_after ({self.dead_after})"
            )
        if self.margin >= self.lease_ttl:
            raise ValueError(f"margin ({self.margin}) must be < lease_ttl ({self.lease_ttl})")
        if self.storage_stale_after < self.probe_interval:
            raise ValueError(
                f"storage_stale_after ({self.storage_stale_after}) must be >= probe_interval "
                f"({self.probe_interval}): a report is not stale before the next one is due"
            )
        if self.mgmt_stale_after < self.probe_interval:
            raise ValueError(
                f"mgmt_stale_after ({self.mgmt_stale_after}) must be >= probe_interval "
                f"({self.probe_interval}): a report is not stale before the next one is due"
            )
        if self.command_timeout >= self.lease_ttl:
            raise ValueError(
                f"command_timeout ({self.command_timeout}) must be shorter than "
                f"lease_ttl ({self.lease_ttl}): a retried command must end within the lease"
            )
        return self


class Check(_Model):
    name: Name
    kind: Literal["pidfile", "tcp", "command"]
    path: str | None = None  # pidfile
    host: str = "127.0.0.1"  # tcp
    port: int | None = Field(None, ge=1, le=65535)  # tcp
    command: list[str] | None = None  # command
    timeout: float = Field(1.0, gt=0)
    fatal: bool = False

    @model_validator(mode="after")
    def _fields_for_kind(self) -> Check:
        need = {"pidfile": "path", "tcp": "port", "command": "command"}[self.kind]
        if getattr(self, need) in (None, [], ""):
            raise ValueError(f"a {self.kind} check needs '{need}'")
        return self


def _check_iface(value: str) -> str:
    try:
        ipaddress.IPv4Interface(value)
    except ValueError as exc:
        raise ValueError(f"not an IPv4 address with prefix: {value!r}") from exc
    if "/" not in value:
        raise ValueError(f"address needs a prefix length, e.g. {value}/32")
    return value


BUILTIN_TAPE_AGENT = "builtin:tape"


class Resource(_Model):
    """A storage resource of a data group, started and stopped by a resource agent (an
    executable run as ``AGENT start|stop|monitor``, as Pacemaker's resource agents; exit
    0 is success, and for ``monitor`` 7 means not running). ``builtin:tape`` is the
    reference tape data service's agent shipped with vtl-ha."""

    name: Name = "tape"
    agent: str = Field(BUILTIN_TAPE_AGENT, min_length=1, description="executable path, or "
                       "builtin:tape")
    start_timeout: float = Field(20.0, gt=0, description="seconds before a start is a failure")
    stop_timeout: float = Field(20.0, gt=0, description="seconds before a stop is a failure")
    monitor_timeout: float = Field(5.0, gt=0)
    monitor_interval: float = Field(10.0, ge=0, description="seconds between monitor runs "
                                    "while the resource runs (0: never)")
    migration_threshold: StrictInt = Field(
        2, ge=0, description="Pacemaker's migration-threshold: after this many failures of "
        "the resource on a node (a failed monitor while served, or a failed start), counted "
        "within failure_timeout, the node gives its group up and the arbiter moves the group "
        "to the companion (rule storage_local_failure); each failure before that is "
        "recovered locally (stop, then start). 2 (the default): one local restart, the "
        "second failure moves the group; 1: the first failure moves it; 0: never move, "
        "always restart. A restart that fails itself gives the group up at once")
    failure_timeout: float = Field(
        600.0, ge=0, description="Pacemaker's failure-timeout: seconds after which a "
        "failure no longer counts towards migration_threshold (0: failures never expire)")

    @model_validator(mode="after")
    def _failures_can_add_up(self) -> Resource:
        """A resource that fails at every monitor must reach migration_threshold: its
        failures are at most monitor_interval + monitor_timeout + stop_timeout +
        start_timeout apart (a restart in between), so failure_timeout must cover
        migration_threshold - 1 such gaps, or it would be restarted forever."""
        if self.failure_timeout == 0 or self.migration_threshold < 2:
            return self
        gap = self.monitor_interval + self.monitor_timeout + self.stop_timeout \
            + self.start_timeout
        need = (self.migration_threshold - 1) * gap
        if self.failure_timeout <= need:
            raise ValueError(
                f"failure_timeout ({self.failure_timeout:g} s) must be longer than "
                f"(migration_threshold - 1) * (monitor_interval + monitor_timeout + "
                f"stop_timeout + start_timeout) = {need:g} s: failures of a resource that "
                f"fails at every monitor would expire before migration_threshold "
                f"({self.migration_threshold}) is reached, and it would be restarted forever "
                f"(0 makes failures never expire)")
        return self


class DataGroup(_Model):
    addresses: list[str] = Field(default_factory=list)
    devices: list[Name] = Field(default_factory=list)
    resources: list[Resource] | None = Field(
        None, description="storage resources started on the owner after the reservations "
        "are taken (default: the reference tape data service when the group has devices; "
        "[] for none)")

    @field_validator("resources")
    @classmethod
    def _unique(cls, v: list[Resource] | None) -> list[Resource] | None:
        names = [r.name for r in v or []]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"resource names must be unique in a group, {dup[0]!r} is repeated")
        return v

    def effective_resources(self) -> list[Resource]:
        if self.resources is not None:
            return list(self.resources)
        return [Resource()] if self.devices else []

    @field_validator("addresses")
    @classmethod
    def _addrs(cls, v: list[str]) -> list[str]:
        return [_check_iface(a) for a in v]


class MgmtGroup(_Model):
    addresses: list[str] = Field(default_factory=list)
    gateway: str | None = None

    @field_validator("addresses")
    @classmethod
    def _addrs(cls, v: list[str]) -> list[str]:
        return [_check_iface(a) for a in v]

    @field_validator("gateway")
    @classmethod
    def _gw(cls, v: str | None) -> str | None:
        if v is not None:
            ipaddress.IPv4Address(v)
        return v


class Groups(_Model):
    data: DataGroup = Field(default_factory=DataGroup)
    mgmt: MgmtGroup = Field(default_factory=MgmtGroup)


class Node(_Model):
    name: Name
    service_ip: str
    mgmt_ip: str | None = None
    groups: Groups = Field(default_factory=Groups)
    checks: list[Check] = Field(default_factory=list)
    executor_checks: bool = Field(
        True, description="the heartbeat adds a built-in fatal check per local executor "
        "('executor ip-manager alive', and 'executor storage-monitor alive' when the "
        "pair has devices): a node whose executor died alone is not healthy")

    _ip = field_validator("service_ip")(classmethod(lambda cls, v: _check_iface(v)))

    @field_validator("mgmt_ip")
    @classmethod
    def _mgmt(cls, v: str | None) -> str | None:
        return None if v is None else _check_iface(v)

    @property
    def data_group(self) -> str:
        return f"{self.name}-data"

    @property
    def mgmt_group(self) -> str:
        return f"{self.name}-mgmt"


class Pair(_Model):
    name: Name
    failback: Literal["manual", "auto"] = Field(
        "manual", description="manual: a group away from its home goes back only on an "
        "operator's failback; auto: once its home has been healthy for failback_hold_time")
    failback_hold_time: float = Field(
        30.0, ge=0, description="seconds a home node must stay healthy (alive, no fatal "
        "check failing, management path and storage fine for the group) before an automatic "
        "failback; also, a group moved less than this ago is moved again only when its "
        "owner dies or fails a fatal check")
    flap_max: int = Field(3, ge=1, description="a node that failed this many times within "
                          "flap_window is held down (given no group automatically) until "
                          "an operator clears the hold")
    flap_window: float = Field(3600.0, gt=0, description="seconds over which a node's "
                               "failures count towards flap_max")
    nodes: list[Node] = Field(min_length=2, max_length=2)

    @model_validator(mode="after")
    def _flap_window(self) -> Pair:
        if self.flap_window < self.failback_hold_time:
            raise ValueError(
                f"flap_window ({self.flap_window}) must be >= failback_hold_time "
                f"({self.failback_hold_time}): failures closer together than the hold time "
                f"count once, so a shorter window could never hold a node down")
        return self


class Witness(_Model):
    host: Name = "witness"
    service_ip: str | None = None

    @field_validator("service_ip")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        return None if v is None else _check_iface(v)


class NatsListen(_Model):
    """Where one nats-server listens; clients and the other servers reach it there."""

    host: str = Field(min_length=1, description="address (or DNS name) the server listens "
                      "on and is reached at")
    client_port: int = Field(4222, ge=1, le=65535)
    cluster_port: int = Field(6222, ge=1, le=65535, description="routes between servers")
    monitor_port: int | None = Field(None, ge=1, le=65535, description="the HTTP monitoring "
                                     "endpoint (/healthz, /varz); none when not given")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if any(c.isspace() or c in "\"'/@[]" for c in v):
            raise ValueError(f"not a host address or name: {v!r}")
        if ":" in v:  # only an IPv6 address has one; "host:port" is a mistake
            try:
                ipaddress.IPv6Address(v)
            except ValueError:
                raise ValueError(f"not a host address or name: {v!r} (give the port as "
                                 f"client_port)") from None
        return v

    @model_validator(mode="after")
    def _distinct_ports(self) -> NatsListen:
        ports = [p for p in (self.client_port, self.cluster_port, self.monitor_port) if p]
        if len(set(ports)) != len(ports):
            raise ValueError(f"client_port, cluster_port and monitor_port must differ, "
                             f"got {ports}")
        return self


class NatsTls(_Model):
    """TLS for clients and routes. ``cert`` and ``key`` may contain ``{host}``, replaced by
    the server's host name (one certificate per server)."""

    ca: str = Field(min_length=1, description="CA file: clients and servers trust it")
    cert: str = Field(min_length=1, description="server certificate (PEM), e.g. "
                      "/etc/vtlha/tls/{host}.pem; used for routes too, so it must allow "
                      "client and server authentication")
    key: str = Field(min_length=1, description="the certificate's private key (PEM)")
    timeout: float = Field(2.0, gt=0, description="TLS handshake timeout, seconds")

    def cert_for(self, host: str) -> str:
        return self.cert.replace("{host}", host)

    def key_for(self, host: str) -> str:
        return self.key.replace("{host}", host)


class Nats(_Model):
    servers: list[Name] = Field(min_length=1)
    listen: dict[Name, NatsListen] = Field(
        default_factory=dict, description="per server host: where it listens (every server "
        "of `servers`, or none: the loopback lab, 127.0.0.1 with the `ports` of each host)")
    credentials_dir: str | None = Field(
        None, description="directory holding each service's NATS credential "
        "(<host>-<service>.nk, an nkey seed; `vtlha deploy render` writes them); "
        "none: connect without credentials (the lab)")
    tls: NatsTls | None = Field(None, description="TLS for clients and routes; none: plain")
    replicas: int | None = Field(None, ge=1, le=5, description="JetStream replicas (default: "
                                 "one per server, at most 3)")
    keep_leaders_on_witness: bool = Field(
        True, description="the active arbiter asks stream leaders elsewhere to step down "
        "towards the witness (turn off only to test a leader on a node)")
    events_max_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024,
                                  description="event stream size limit (oldest dropped)")
    events_max_age: float = Field(30 * 86400.0, gt=0, description="event stream age limit, s")
    events_max_msgs: int | None = Field(
        None, ge=1000, description="event stream count limit (oldest dropped); none: "
        "no count limit")
    events_duplicate_window: float = Field(
        120.0, gt=0, description="seconds within which the event stream drops a second "
        "copy of an event (same id); readers drop later copies by id whatever the age")
    outbox_max_events: int = Field(10_000, ge=10, description="events a service keeps in "
                                   "its outbox while the stream is unavailable")
    outbox_max_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024,
                                  description="size bound of a service's outbox, bytes")

    @model_validator(mode="after")
    def _listen_every_server(self) -> Nats:
        if not self.listen:
            return self
        for host in self.listen:
            if host not in self.servers:
                raise ValueError(f"listen.{host}: {host!r} is not one of servers "
                                 f"({', '.join(self.servers)})")
        missing = [s for s in self.servers if s not in self.listen]
        if missing:
            raise ValueError(f"listen: gives no address for server(s) {', '.join(missing)} "
                             f"(give every server of `servers`, or none for the loopback lab)")
        seen: dict[tuple[str, int], str] = {}
        for host, at in self.listen.items():
            for kind, port in (("client_port", at.client_port),
                               ("cluster_port", at.cluster_port),
                               ("monitor_port", at.monitor_port)):
                if port is None:
                    continue
                other = seen.setdefault((at.host, port), f"listen.{host}.{kind}")
                if other != f"listen.{host}.{kind}":
                    raise ValueError(f"listen.{host}.{kind}: {at.host}:{port} is also "
                                     f"{other}")
        return self

    @model_validator(mode="after")
    def _window_within_age(self) -> Nats:
        if self.events_duplicate_window > self.events_max_age:
            raise ValueError(f"events_duplicate_window ({self.events_duplicate_window} s) "
                             f"must not exceed events_max_age ({self.events_max_age} s)")
        return self

    @property
    def stream_max_msgs(self) -> int:
        """``events_max_msgs`` as the stream takes it (-1: no limit)."""
        return -1 if self.events_max_msgs is None else self.events_max_msgs

    @property
    def stream_replicas(self) -> int:
        return self.replicas if self.replicas is not None else min(3, len(self.servers))


class San(_Model):
    """The SAN the data groups' devices are on (docs/storage.md).

    ``kind: reference`` (the default): the project's own reference target
    (``vtlha/san/``, ``vtlha-lab san serve``) on ``host``, path ``i`` at ``port + i``.
    ``kind: iscsi``: a real iSCSI target with SCSI-3 persistent reservations; path ``i``
    is the portal ``portals[i]`` ("host:port"), every device is a LUN (``devices.X.lun``)
    of the target ``iqn``."""

    kind: Literal["reference", "iscsi"] = Field("reference", description="reference: the "
                                                "project's target; iscsi: a real one")
    host: Name = "witness"
    port: int = Field(3260, ge=1, le=65535)
    iqn: str | None = Field(None, min_length=1, description="kind iscsi: the target's IQN")
    portals: list[str] = Field(default_factory=list, description="kind iscsi: path i's "
                               "portal, \"host:port\"")

    @field_validator("portals")
    @classmethod
    def _portals(cls, v: list[str]) -> list[str]:
        for k, p in enumerate(v):
            host, sep, port = p.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"portals[{k}]: {p!r} is not \"host:port\"")
        return v


class Device(_Model):
    backing: str
    paths: dict[Name, int] = Field(default_factory=dict)
    block_size: int = Field(4096, ge=512)
    lun: int | None = Field(None, ge=0, le=16383, description="san.kind iscsi: the "
                            "device's LUN at the target")

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: dict[str, int]) -> dict[str, int]:
        for node, n in v.items():
            if n < 1:
                raise ValueError(f"node {node} needs at least one path, got {n}")
        return v


class IpSettings(_Model):
    """How the ip-manager holds floating addresses."""

    backend: Literal["netlink", "recording"] = Field(
        "netlink", description="netlink: real addresses in the node's network namespace "
        "(root); recording: only recorded in a file (loopback mode, says so)")
    garp_count: int = Field(3, ge=1, le=100, description="gratuitous ARPs sent per address "
                            "right after it is added")
    garp_interval: float = Field(0.2, gt=0, le=10, description="seconds between them")
    data_interface: str | None = Field(None, description="interface for data addresses "
                                       "(default: the one holding the node's service_ip)")
    mgmt_interface: str | None = Field(None, description="interface for management addresses "
                                       "(default: the one holding the node's mgmt_ip)")


class Scheduling(_Model):
    """CPU priority of the HA services (``vtlha.priority``)."""

    nice: int = Field(
        -10, ge=-20, le=19, description="the nice value every vtl-ha service (and the lab's "
        "nats-servers) runs at when the host allows it (root or CAP_SYS_NICE): under CPU "
        "contention a service at the default priority renews late and its leases lapse")


class Ports(_Model):
    """Base ports; in loopback mode each host adds 100 x its index."""

    nats_client: int = 4222
    nats_cluster: int = 6222
    nats_monitor: int = 8222
    heartbeat: int = 9101
    storage_monitor: int = 9102
    ip_manager: int = 9103
    arbiter: int = 9104
    notifier: int = 9105
    dashboard: int = 9106  # the web dashboard (services/dashboard), where it runs
    tape: int = 10001  # the reference tape data service, on the data group's portal address


@dataclass(frozen=True)
class Lookups:
    """A cluster file's lookups by name, built once (``ClusterConfig.lookups``)."""

    nodes: tuple[Node, ...]
    hosts: tuple[str, ...]
    host_index: Mapping[str, int]
    node: Mapping[str, Node]
    pair: Mapping[str, Pair]
    pair_of: Mapping[str, Pair]
    companion: Mapping[str, Node]
    #: group name -> (home node, kind)
    groups: Mapping[str, tuple[str, str]]
    #: node -> the devices it has paths to, by name
    devices_of: Mapping[str, tuple[str, ...]]

    @classmethod
    def of(cls, cfg: ClusterConfig) -> Lookups:
        nodes = tuple(n for p in cfg.pairs for n in p.nodes)
        hosts = (*(n.name for n in nodes), cfg.witness.host)
        groups: dict[str, tuple[str, str]] = {}
        for n in nodes:
            groups[n.data_group] = (n.name, "data")
            groups[n.mgmt_group] = (n.name, "mgmt")
        host_index: dict[str, int] = {}
        for i, h in enumerate(hosts):
            host_index.setdefault(h, i)
        devices_of: dict[str, list[str]] = {n.name: [] for n in nodes}
        for d in sorted(cfg.devices):  # each device's paths once, not every node x device
            for on in cfg.devices[d].paths:
                if on in devices_of:
                    devices_of[on].append(d)
        return cls(
            nodes=nodes, hosts=hosts, host_index=MappingProxyType(host_index),
            node=MappingProxyType({n.name: n for n in reversed(nodes)}),
            pair=MappingProxyType({p.name: p for p in reversed(cfg.pairs)}),
            pair_of=MappingProxyType({n.name: p for p in reversed(cfg.pairs) for n in p.nodes}),
            companion=MappingProxyType({n.name: o for p in cfg.pairs for n in p.nodes
                                        for o in p.nodes if o.name != n.name}),
            groups=MappingProxyType(groups),
            devices_of=MappingProxyType({k: tuple(ds) for k, ds in devices_of.items()}))


class ClusterConfig(_Model):
    cluster: Name
    timings: Timings = Field(default_factory=Timings)
    nats: Nats
    witness: Witness = Field(default_factory=Witness)
    pairs: list[Pair] = Field(min_length=1)
    san: San = Field(default_factory=San)
    devices: dict[Name, Device] = Field(default_factory=dict)
    ports: Ports = Field(default_factory=Ports)
    ip: IpSettings = Field(default_factory=IpSettings)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    notifications: Notifications = Field(default_factory=Notifications)
    state_dir: str = "/var/lib/vtlha"

    @model_validator(mode="after")
    def _cross_checks(self) -> ClusterConfig:
        # An "after" model validator's error is located at the top level, so each
        # problem starts with the dotted path of the field it is about.
        problems = [*_node_problems(self), *_address_problems(self), *_san_problems(self),
                    *_notify_problems(self)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---- lookups -------------------------------------------------------------
    # The model is frozen: its lookups are built once (an arbiter facing many pairs asks
    # them for every group of every snapshot; rebuilt per call they made it quadratic).
    @cached_property
    def lookups(self) -> Lookups:
        return Lookups.of(self)

    def model_copy(self, *, update: Mapping[str, Any] | None = None,
                   deep: bool = False) -> Self:
        """A copy, its lookups built again (``update`` may change what they index)."""
        out = super().model_copy(update=update, deep=deep)
        out.__dict__.pop("lookups", None)
        return out

    @property
    def nodes(self) -> list[Node]:
        return list(self.lookups.nodes)

    @property
    def hosts(self) -> list[str]:
        """Every host in index order: nodes in file order, then the witness."""
        return [*self.lookups.hosts]

    def host_index(self, host: str) -> int:
        try:
            return self.lookups.host_index[host]
        except KeyError:
            raise ValueError(f"{host!r} is not a host of the cluster") from None

    def node(self, name: str) -> Node:
        return self.lookups.node[name]

    def has_node(self, name: str) -> bool:
        return name in self.lookups.node

    def pair(self, name: str) -> Pair:
        return self.lookups.pair[name]

    def pair_of(self, node: str) -> Pair:
        return self.lookups.pair_of[node]

    def companion(self, node: str) -> Node:
        return self.lookups.companion[node]

    def groups(self) -> Mapping[str, tuple[str, str]]:
        """group name -> (home node, kind) for every group of the cluster (read-only)."""
        return self.lookups.groups

    def group_addresses(self, group: str) -> list[str]:
        home, kind = self.groups()[group]
        node = self.node(home)
        return list(node.groups.data.addresses if kind == "data" else node.groups.mgmt.addresses)

    def group_devices(self, group: str) -> list[str]:
        home, kind = self.groups()[group]
        return list(self.node(home).groups.data.devices) if kind == "data" else []

    def group_resources(self, group: str) -> list[Resource]:
        home, kind = self.groups()[group]
        return self.node(home).groups.data.effective_resources() if kind == "data" else []

    def port(self, host: str, service: str) -> int:
        """Loopback-mode port of a host's service (base + 100 x host index)."""
        base: int = getattr(self.ports, service.replace("-", "_"))
        return base + 100 * self.host_index(host)

    def nats_listen(self, server: str) -> NatsListen:
        """Where ``server``'s nats-server listens: ``nats.listen`` when the cluster file
        gives it, else the loopback lab's (127.0.0.1, the host's ports)."""
        if server in self.nats.listen:
            return self.nats.listen[server]
        return NatsListen(host="127.0.0.1", client_port=self.port(server, "nats_client"),
                          cluster_port=self.port(server, "nats_cluster"),
                          monitor_port=self.port(server, "nats_monitor"))

    def server_order(self, first: str | None = None) -> list[str]:
        """The servers a client on host ``first`` tries, in order: its own, then the
        witness's, then the companion's (the configured order otherwise). A node whose
        own server died must not sit on its companion's: a fault of the companion (even
        a 1 s link cut) would then cost it its own groups too (chaos iteration 164 of
        the fourth 200-run: node-b's server killed, node-a's links cut 0.1 s later, and
        node-b's services on node-a's server lost all four groups)."""
        witness = self.witness.host
        return sorted(self.nats.servers, key=lambda s: (s != first, s != witness))

    def nats_urls(self, first: str | None = None, host: str = "127.0.0.1") -> list[str]:
        """Client URLs of the configured servers in ``server_order(first)``: from
        ``nats.listen`` when given, else loopback mode's (``host``, the hosts' ports)."""
        order = self.server_order(first)
        if self.nats.listen:
            return [f"nats://{_url_host(self.nats.listen[s].host)}:"
                    f"{self.nats.listen[s].client_port}" for s in order]
        return [f"nats://{host}:{self.port(s, 'nats_client')}" for s in order]

    @property
    def notifier_hosts(self) -> list[str]:
        """The hosts that run a notifier: ``notifications.hosts``, by default the
        witness; none when no target is configured."""
        if not self.notifications.targets:
            return []
        hosts = self.notifications.hosts
        return list(hosts) if hosts is not None else [self.witness.host]

    def host_services(self, host: str) -> tuple[str, ...]:
        """The services that run on ``host``: the four on a node, the arbiter on the
        witness, and a notifier on each of ``notifier_hosts``."""
        own = SERVICES if self.has_node(host) else ("arbiter",)
        return own + (("notifier",) if host in self.notifier_hosts else ())

    def state_path(self, host: str) -> Path:
        return Path(self.state_dir) / host


def _url_host(host: str) -> str:
    """A host as it goes into a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def _node_places(cfg: ClusterConfig) -> Iterator[tuple[str, Node]]:
    for i, p in enumerate(cfg.pairs):
        for j, n in enumerate(p.nodes):
            yield f"pairs[{i}].nodes[{j}]", n


def _node_problems(cfg: ClusterConfig) -> Iterator[str]:
    first: dict[str, str] = {}
    for at, n in _node_places(cfg):
        if n.name in first:
            yield (f"{at}.name: node names must be unique, {n.name!r} is repeated "
                   f"(first at {first[n.name]}.name)")
        first.setdefault(n.name, at)
    if cfg.witness.host in first:
        yield f"witness.host: witness host {cfg.witness.host!r} is also a node"
    for k, s in enumerate(cfg.nats.servers):
        if s not in first and s != cfg.witness.host:
            yield f"nats.servers[{k}]: {s!r}, which is neither a node nor the witness"
    for name, dev in cfg.devices.items():
        for node in dev.paths:
            if node not in first:
                yield f"devices.{name}.paths: device {name} has paths for unknown node {node!r}"
    tags: dict[int, str] = {}
    for at, n in _node_places(cfg):
        tag = node_tag(cfg.cluster, n.name)
        if tags.setdefault(tag, n.name) != n.name:
            yield (f"{at}.name: node {n.name!r} has the same SCSI reservation key tag "
                   f"({tag:06x}) as {tags[tag]!r} in cluster {cfg.cluster!r} "
                   "(docs/storage.md, \"Keys\"): rename a node or the cluster")


def _address_problems(cfg: ClusterConfig) -> Iterator[str]:
    first: dict[str, str] = {}
    for at, n in _node_places(cfg):
        for k, d in enumerate(n.groups.data.devices):
            if d not in cfg.devices:
                yield (f"{at}.groups.data.devices[{k}]: node {n.name} data group uses "
                       f"unknown device {d!r}")
        for kind, addrs in (("data", n.groups.data.addresses), ("mgmt", n.groups.mgmt.addresses)):
            for k, a in enumerate(addrs):
                here = f"{at}.groups.{kind}.addresses[{k}]"
                ip = str(ipaddress.IPv4Interface(a).ip)
                if ip in first:
                    yield (f"{here}: floating addresses must be unique, {ip} is repeated "
                           f"(first at {first[ip]})")
                first.setdefault(ip, here)


def _san_problems(cfg: ClusterConfig) -> Iterator[str]:
    """``san.kind: iscsi`` needs the target's IQN, a portal per path index in use and a
    LUN per device."""
    if cfg.san.kind != "iscsi":
        return
    if cfg.san.iqn is None:
        yield "san.iqn: san.kind iscsi needs the target's IQN"
    need = max((n for d in cfg.devices.values() for n in d.paths.values()), default=0)
    if len(cfg.san.portals) < need:
        yield (f"san.portals: san.kind iscsi needs a portal per path: a device has {need} "
               f"path(s), {len(cfg.san.portals)} portal(s) given")
    luns: dict[int, str] = {}
    for name, dev in cfg.devices.items():
        if dev.lun is None:
            yield f"devices.{name}.lun: san.kind iscsi needs the device's LUN"
        elif luns.setdefault(dev.lun, name) != name:
            yield (f"devices.{name}.lun: LUN {dev.lun} is also device {luns[dev.lun]}'s")


def _notify_problems(cfg: ClusterConfig) -> Iterator[str]:
    for k, host in enumerate(cfg.notifications.hosts or []):
        if host not in cfg.hosts:
            yield (f"notifications.hosts[{k}]: {host!r} is not a host of the cluster "
                   f"({', '.join(cfg.hosts)})")


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_config(data: object, source: str = "<memory>") -> ClusterConfig:
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid cluster config ({exc.error_count()} problem(s)):"]
        for err in exc.errors():
            lines.append(f"  {_loc(err['loc'])}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


#: libyaml's safe loader when PyYAML was built with it (the same tags and resolvers as
#: ``yaml.safe_load``, ten times faster: a cluster file of 1,000 pairs took 4 to 12 s)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_config(path: str | Path) -> ClusterConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read cluster config: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_YAML_LOADER)  # the safe loader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: (top level): expected a mapping, got {type(data).__name__}")
    return parse_config(data, str(p))


def is_valid_name(name: str) -> bool:
    return re.fullmatch(NAME_RE, name) is not None
