"""``vtlha deploy render``: each nats-server's config and every service's credential.

Pure functions build the permissions (from ``vtlha.subjects``, the one place subjects are
named) and the config text; ``render`` writes them:

    OUT/nats/<server>.conf     one per server of ``nats.servers`` (mode 0600: it holds the
                               route secret)
    OUT/creds/<user>.nk        an nkey seed per service per host, ``operator``, ``admin``
                               (mode 0600, never printed)
    OUT/creds/<user>.pub       its public key
    OUT/creds/routes.secret    the password the servers' routes authenticate with (0600)

Re-running keeps every existing key and secret (idempotent); ``rotate`` makes new ones.
The user of a service on a host is ``<host>-<service>`` (``vtlha.natsauth``).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nkeys

from vtlha.config import ClusterConfig
from vtlha.errors import ConfigError
from vtlha.natsauth import SEED_SUFFIX, service_user
from vtlha.subjects import Subjects

ACCOUNT = "VTLHA"
OPERATOR = "operator"
ADMIN = "admin"
#: the web dashboard's own connection: it reads, and acts only as a signed-in operator's
#: user (``services/dashboard``)
DASHBOARD = "dashboard"
ROUTE_USER = "route"
ROUTE_SECRET = "routes.secret"
#: the services that carry out commands and answer the heartbeat's pings
EXECUTORS = ("ip-manager", "storage-monitor")
#: what each executor publishes its reports on
REPORTS = {"ip-manager": "mgmt", "storage-monitor": "storage"}


@dataclass(frozen=True)
class Permissions:
    """One user's rights: subjects it may publish to and subscribe to, and whether it
    may answer requests it received (``allow_responses``: replies only to those)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responses: bool = False
    publish_deny: tuple[str, ...] = ()

    def may_publish(self, subject: str) -> bool:
        return (any(matches(p, subject) for p in self.publish)
                and not any(matches(p, subject) for p in self.publish_deny))

    def may_subscribe(self, subject: str) -> bool:
        return any(matches(p, subject) for p in self.subscribe)


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more at the end. A wildcard
    in ``subject`` matches only the same wildcard in ``pattern`` (a permission for
    ``a.*`` covers subscribing to ``a.*``, not ``a.>``)."""
    pt, st = pattern.split("."), subject.split(".")
    for i, p in enumerate(pt):
        if p == ">":
            return len(st) > i
        if i >= len(st):
            return False
        if p == "*":
            if st[i] == ">":
                return False
            continue
        if p != st[i]:
            return False
    return len(pt) == len(st)


def host_services(cfg: ClusterConfig) -> dict[str, tuple[str, ...]]:
    """host -> the services that run there: all four on a node, the arbiter on the
    witness, a notifier on each of ``notifications.hosts`` (when targets are set)."""
    return {h: cfg.host_services(h) for h in cfg.hosts}


def users(cfg: ClusterConfig) -> dict[str, Permissions]:
    """Every NATS user of the cluster and its permissions: a user per service per host,
    then ``operator``, ``admin`` and ``dashboard``."""
    out = {service_user(h, svc): permissions(cfg, h, svc)
           for h, svcs in host_services(cfg).items() for svc in svcs}
    out[OPERATOR] = operator_permissions(cfg)
    out[ADMIN] = admin_permissions(cfg)
    out[DASHBOARD] = dashboard_permissions(cfg)
    return out


# ---- the pieces of JetStream each client uses ---------------------------------------
def _stream_read(stream: str) -> list[str]:
    """Read a stream: its info, one message by sequence or last-by-subject (leader's
    MSG.GET and the direct get, in both subject forms)."""
    api = Subjects.js_api
    return [api("STREAM", "INFO", stream), api("STREAM", "MSG", "GET", stream),
            api("DIRECT", "GET", stream), api("DIRECT", "GET", stream, ">")]


def _stream_consume(stream: str) -> list[str]:
    """Ordered push consumers (a KV watch, following the event stream): create one, ask
    for its info (nats-py does, after creating a watch), answer its flow control."""
    api = Subjects.js_api
    return [api("CONSUMER", "CREATE", stream), api("CONSUMER", "CREATE", stream, ">"),
            api("CONSUMER", "INFO", stream, "*"), f"$JS.FC.{stream}.>"]


def _inbox(user: str) -> str:
    return f"{Subjects.inbox_prefix(user)}.>"


def permissions(cfg: ClusterConfig, host: str, service: str) -> Permissions:
    """The rights of ``service`` on ``host``: exactly what its protocol steps need."""
    s = Subjects(cfg.cluster)
    user = service_user(host, service)
    common_pub = [s.events_all, *_stream_read(s.kv_stream)]  # outbox; KV reads, identity
    if service == "arbiter":
        return _arbiter(cfg, s, user, common_pub)
    if service == "heartbeat":
        return _heartbeat(cfg, s, host, user, common_pub)
    if service == "notifier":
        return _notifier(cfg, s, user, common_pub)
    if service in EXECUTORS:
        report = getattr(s, REPORTS[service])(host)
        return Permissions(
            publish=(report, *common_pub),
            subscribe=(s.cmd(host, service), s.ping(host, service), s.lease(host),
                       _inbox(user)),
            responses=True)  # acks of commands, pongs
    raise ValueError(f"no permissions for unknown service {service!r}")


def _heartbeat(cfg: ClusterConfig, s: Subjects, node: str, user: str,
               common_pub: list[str]) -> Permissions:
    """The node's lease holder: its own heartbeat and lease notices; promise requests to
    its companion (answers on its own subject); compare-and-set of its pair's group
    keys (the companion's too: it renews them after a takeover) and its probe key;
    pings to its own executors."""
    companion = cfg.companion(node).name
    pair = cfg.pair_of(node)
    groups = [g for n in pair.nodes for g in (n.data_group, n.mgmt_group)]
    return Permissions(
        publish=(s.hb(node), s.lease(node), s.promise(companion),
                 *(s.ping(node, x) for x in EXECUTORS),
                 *(s.kv_subject(Subjects.group_key(g)) for g in groups),
                 s.kv_subject(Subjects.probe_key(node)),
                 *common_pub, *_stream_consume(s.kv_stream)),
        subscribe=(s.storage(node), s.promise(node), s.cmd(node, "heartbeat"),
                   s.ping(node, "heartbeat"), _inbox(user)),
        responses=True)


def _arbiter(cfg: ClusterConfig, s: Subjects, user: str,
             common_pub: list[str]) -> Permissions:
    """Every arbiter (any may become active): reads every health subject, commands every
    executor, writes the ownership, pair, event-state and leader keys, creates the KV
    bucket and the event stream at start and whenever either is missing (never deletes
    them), keeps their leaders on the witness, answers operator requests and
    hand-backs."""
    api = Subjects.js_api
    kv, ev = s.kv_stream, s.events_stream
    return Permissions(
        publish=(s.cmd("*", "*"), s.handback,
                 s.kv_subject("group.>"), s.kv_subject("pair.>"), s.kv_subject("events.>"),
                 s.kv_subject(Subjects.LEADER_KEY),
                 *common_pub, *_stream_consume(kv), *_stream_read(ev),
                 api("STREAM", "CREATE", kv), api("STREAM", "CREATE", ev),
                 api("STREAM", "UPDATE", ev),
                 api("STREAM", "LEADER", "STEPDOWN", kv), api("STREAM", "LEADER", "STEPDOWN", ev)),
        subscribe=(*_health(s), s.admin("*"), s.handback,
                   _inbox(user)),
        responses=True)


def _notifier(cfg: ClusterConfig, s: Subjects, user: str,
              common_pub: list[str]) -> Permissions:
    """A notifier: creates, pulls from and acknowledges on its targets' durable
    consumers of the event stream (``notify-<target>``), nothing else of it; publishes
    no input of the protocol."""
    api = Subjects.js_api
    ev = s.events_stream
    per_target = [subject for t in cfg.notifications.targets for name in [f"notify-{t.name}"]
                  for subject in (api("CONSUMER", "CREATE", ev, name, ">"),
                                  api("CONSUMER", "INFO", ev, name),
                                  api("CONSUMER", "MSG", "NEXT", ev, name),
                                  f"$JS.ACK.{ev}.{name}.>")]
    return Permissions(publish=(*common_pub, api("STREAM", "INFO", ev), *per_target),
                       subscribe=(_inbox(user),))


def operator_permissions(cfg: ClusterConfig) -> Permissions:
    """The ``vtlha`` CLI of an operator: admin requests to the active arbiter; reads the
    KV and the event stream, listens to the nodes' health reports (``vtlha status``).
    Publishes no input of the protocol, writes nothing."""
    s = Subjects(cfg.cluster)
    return Permissions(
        publish=(s.admin("*"), *_stream_read(s.kv_stream), *_stream_read(s.events_stream),
                 *_stream_consume(s.events_stream), Subjects.js_api("STREAM", "NAMES")),
        subscribe=(*_health(s), _inbox(OPERATOR)))


def dashboard_permissions(cfg: ClusterConfig) -> Permissions:
    """The web dashboard's own connection: what ``vtlha status`` and ``vtlha events``
    read, and no operator request (those go out on the signed-in operator's user)."""
    s = Subjects(cfg.cluster)
    return Permissions(
        publish=(*_stream_read(s.kv_stream), *_stream_read(s.events_stream),
                 *_stream_consume(s.events_stream), Subjects.js_api("STREAM", "NAMES")),
        subscribe=(*_health(s), _inbox(DASHBOARD)))


def _health(s: Subjects) -> tuple[str, ...]:
    """Every node's heartbeat, storage and management-path reports (read-only)."""
    return (s.hb("*"), s.storage("*"), s.mgmt("*"))


def admin_permissions(cfg: ClusterConfig) -> Permissions:
    """Disaster recovery: the whole JetStream API of the account (create, delete, purge
    the KV bucket and the event stream) and the KV keys; no input of the protocol."""
    s = Subjects(cfg.cluster)
    return Permissions(
        publish=(Subjects.js_api(">"), s.kv_subject(">"), "$JS.FC.>", s.admin("*")),
        subscribe=(*_health(s), _inbox(ADMIN)))


# ---- credentials ---------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """What the servers' configs need: every user's public key and the route secret."""

    public_keys: dict[str, str]
    route_secret: str = field(repr=False)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (never readable by others,
    not even for a moment)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _public_key(seed: bytes, path: Path) -> str:
    try:
        public = str(nkeys.from_seed(seed).public_key.decode())
    except (nkeys.NkeysError, ValueError) as exc:
        raise ConfigError(f"{path}: not an nkey seed ({type(exc).__name__})") from None
    if not public.startswith("U"):
        raise ConfigError(f"{path}: not a user nkey seed")
    return public


def ensure_credentials(creds_dir: Path, names: Iterable[str],
                       rotate: bool = False) -> tuple[Credentials, list[Path]]:
    """An nkey per user in ``creds_dir`` (kept when it exists, new with ``rotate``) and
    the route secret. Returns the credentials and the files written."""
    creds_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(creds_dir, 0o700)
    written: list[Path] = []
    public: dict[str, str] = {}
    for user in names:
        path = creds_dir / f"{user}{SEED_SUFFIX}"
        if path.exists() and not rotate:
            seed = path.read_bytes().strip()
        else:
            seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
            _write_private(path, seed + b"\n")
            written.append(path)
        public[user] = _public_key(seed, path)
        pub = creds_dir / f"{user}.pub"
        if not pub.exists() or pub.read_text().strip() != public[user]:
            pub.write_text(public[user] + "\n")
            written.append(pub)
    secret_path = creds_dir / ROUTE_SECRET
    if secret_path.exists() and not rotate:
        secret = secret_path.read_text().strip()
    else:
        secret = secrets.token_urlsafe(32)
        _write_private(secret_path, secret.encode() + b"\n")
        written.append(secret_path)
    return Credentials(public, secret), written


def read_credentials(creds_dir: Path, names: Iterable[str]) -> Credentials:
    """The credentials ``ensure_credentials`` wrote (the lab starts servers with them)."""
    public = {}
    for user in names:
        path = creds_dir / f"{user}{SEED_SUFFIX}"
        public[user] = _public_key(path.read_bytes().strip(), path)
    return Credentials(public, (creds_dir / ROUTE_SECRET).read_text().strip())


# ---- the server config ---------------------------------------------------------------
def _q(text: str) -> str:
    return json.dumps(text)


def _list(items: Iterable[str], indent: str) -> str:
    inner = f",\n{indent}  ".join(_q(i) for i in items)
    return f"[\n{indent}  {inner}\n{indent}]"


def _user_block(user: str, public_key: str, p: Permissions, indent: str) -> list[str]:
    i2 = indent + "  "
    lines = [f"{indent}# {user}", f"{indent}{{", f"{i2}nkey: {_q(public_key)}",
             f"{i2}permissions: {{",
             f"{i2}  publish: {{ allow: {_list(p.publish, i2 + '  ')}"
             + (f", deny: {_list(p.publish_deny, i2 + '  ')}" if p.publish_deny else "")
             + " }",
             f"{i2}  subscribe: {{ allow: {_list(p.subscribe, i2 + '  ')} }}"]
    if p.responses:
        lines.append(f"{i2}  allow_responses: true")
    lines += [f"{i2}}}", f"{indent}}}"]
    return lines


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_server_config(cfg: ClusterConfig, server: str, creds: Credentials,
                         store_dir: Path, source: str = "", bind: str | None = None) -> str:
    """The config of ``server``'s nats-server: listen addresses, JetStream (fsync every
    write), tags for leader placement, TLS when the cluster file gives it, routes to
    every server with the route secret, and the account with every user. ``bind``: the
    address to listen on when it is not the one the server is reached at (the network
    lab's servers listen on every address of their namespace)."""
    at = cfg.nats_listen(server)
    host = bind or at.host
    tls = cfg.nats.tls
    out = [f"# vtl-ha: the nats-server of {server}; rendered by `vtlha deploy render`"
           + (f" from {source}" if source else ""),
           "# holds the route secret: keep it mode 0600",
           f"server_name: {_q(server)}",
           f"listen: {_q(_addr(host, at.client_port))}"]
    if at.monitor_port is not None:
        out.append(f"http: {_q(_addr(host, at.monitor_port))}")
    out += [f"server_tags: [{_q('host:' + server)}"
            + (f", {_q('witness')}" if server == cfg.witness.host else "") + "]",
            "max_payload: 1MB",
            "jetstream {",
            f"  store_dir: {_q(str(store_dir))}",
            "  sync_interval: always",
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}"]
    if tls is not None:
        out += ["tls {", f"  cert_file: {_q(tls.cert_for(server))}",
                f"  key_file: {_q(tls.key_for(server))}", f"  ca_file: {_q(tls.ca)}",
                f"  timeout: {tls.timeout}", "}"]
    if len(cfg.nats.servers) > 1:
        out += _cluster_block(cfg, server, creds, host)
    out += ["accounts {", f"  {ACCOUNT} {{", "    jetstream: enabled", "    users: ["]
    for user, perms in users(cfg).items():
        out += _user_block(user, creds.public_keys[user], perms, "      ")
    out += ["    ]", "  }", "}"]
    return "\n".join(out) + "\n"


def _cluster_block(cfg: ClusterConfig, server: str, creds: Credentials,
                   host: str) -> list[str]:
    at = cfg.nats_listen(server)
    tls = cfg.nats.tls
    routes = [f"nats-route://{ROUTE_USER}:{creds.route_secret}@"
              f"{_addr(cfg.nats_listen(s).host, cfg.nats_listen(s).cluster_port)}"
              for s in cfg.nats.servers]
    out = ["cluster {", f"  name: {_q('vtlha-' + cfg.cluster)}",
           f"  listen: {_q(_addr(host, at.cluster_port))}",
           "  authorization {", f"    user: {_q(ROUTE_USER)}",
           f"    password: {_q(creds.route_secret)}", "    timeout: 2", "  }"]
    if tls is not None:  # mutual TLS between the servers
        out += ["  tls {", f"    cert_file: {_q(tls.cert_for(server))}",
                f"    key_file: {_q(tls.key_for(server))}", f"    ca_file: {_q(tls.ca)}",
                "    verify: true", f"    timeout: {tls.timeout}", "  }"]
    # A route to a server cut off is found dead in 2-3 s and made anew at once after the
    # heal (docs/safety.md, "A node rejoining after a long cut"; defaults: 2 min pings,
    # 10 s write deadline)
    out += ['  ping_interval: "1s"', "  ping_max: 2", '  write_deadline: "2s"',
            f"  routes: {_list(routes, '  ')}", "}"]
    return out


@dataclass(frozen=True)
class Rendered:
    configs: dict[str, Path]
    creds_dir: Path
    written: list[Path]
    users: list[str]


def render(cfg: ClusterConfig, out: Path, rotate: bool = False, source: str = "",
           store_root: Path | None = None) -> Rendered:
    """Write every server's config and every credential under ``out`` (see the module's
    doc). A server's JetStream store is ``<state_dir>/<server>/nats`` unless
    ``store_root`` says ``<store_root>/<server>``."""
    names = list(users(cfg))
    creds_dir = out / "creds"
    creds, written = ensure_credentials(creds_dir, names, rotate)
    (out / "nats").mkdir(parents=True, exist_ok=True)
    configs = {}
    for server in cfg.nats.servers:
        store = store_root / server if store_root else cfg.state_path(server) / "nats"
        path = out / "nats" / f"{server}.conf"
        text = render_server_config(cfg, server, creds, store, source)
        if not path.exists() or path.read_text() != text:
            _write_private(path, text.encode())
            written.append(path)
        configs[server] = path
    return Rendered(configs, creds_dir, written, names)
