"""Unit tests of the cluster file: loading, validation errors, timing rules, lookups.

Every error test asserts the three things a ConfigError must name: the file, the
field (as a dotted path) and the reason.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from vtlha.config import ClusterConfig, is_valid_name, load_config, parse_config
from vtlha.errors import ConfigError, FatalError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"

Data = dict[str, Any]
Mutation = Callable[[Data], None]


def example_data() -> Data:
    data = yaml.safe_load(EXAMPLE.read_text())
    assert isinstance(data, dict)
    return copy.deepcopy(data)


def write(tmp_path: Path, data: object, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return str(exc.value)


def error_for(tmp_path: Path, mutate: Mutation) -> tuple[Path, str]:
    data = example_data()
    mutate(data)
    path = write(tmp_path, data)
    return path, load_error(path)


def assert_names(text: str, path: Path, field: str, reason: str) -> None:
    assert str(path) in text, f"file path missing from: {text}"
    assert field in text, f"field path {field!r} missing from: {text}"
    assert reason in text, f"reason {reason!r} missing from: {text}"


def node(data: Data, pair: int, index: int) -> Data:
    n: Data = data["pairs"][pair]["nodes"][index]
    return n


# ---- the example file --------------------------------------------------------


def test_example_file_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg, ClusterConfig)
    assert cfg.cluster == "demo"
    assert [p.name for p in cfg.pairs] == ["pair-1"]
    assert [n.name for n in cfg.nodes] == ["node-a", "node-b"]
    assert cfg.timings.heartbeat_interval == 0.1
    assert cfg.timings.dead_after == 0.3
    assert cfg.timings.lease_ttl == 0.3
    assert cfg.timings.margin == 0.03
    assert cfg.nats.servers == ["node-a", "node-b", "witness"]
    assert cfg.nats.stream_replicas == 3
    assert set(cfg.devices) == {"vtl-a0", "vtl-a1", "vtl-b0", "vtl-b1"}
    assert cfg.pairs[0].failback == "manual"


def test_example_file_loads_from_str_path() -> None:
    assert load_config(str(EXAMPLE)) == load_config(EXAMPLE)


def test_parse_config_accepts_a_mapping() -> None:
    cfg = parse_config(example_data())
    assert cfg == load_config(EXAMPLE)


def test_config_is_frozen() -> None:
    cfg = load_config(EXAMPLE)
    with pytest.raises(ValueError, match="frozen"):
        cfg.cluster = "other"  # type: ignore[misc]


def test_config_error_is_fatal() -> None:
    assert issubclass(ConfigError, FatalError)


# ---- unreadable files --------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    text = load_error(path)
    assert str(path) in text
    assert "cannot read cluster config" in text
    assert "No such file" in text


def test_directory_instead_of_file(tmp_path: Path) -> None:
    text = load_error(tmp_path)
    assert str(tmp_path) in text
    assert "cannot read cluster config" in text


def test_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("cluster: demo\npairs: [unclosed\n")
    text = load_error(path)
    assert str(path) in text
    assert "not valid YAML" in text
    assert "line" in text  # YAML's own location of the problem


@pytest.mark.parametrize(
    ("body", "got"),
    [("- a\n- b\n", "list"), ("just a string\n", "str"), ("", "NoneType"), ("42\n", "int")],
)
def test_top_level_not_a_mapping(tmp_path: Path, body: str, got: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(body)
    text = load_error(path)
    assert_names(text, path, "(top level)", f"expected a mapping, got {got}")


def test_parse_config_names_the_source() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"cluster": "demo"}, source="inline.yaml")
    text = str(exc.value)
    assert text.startswith("inline.yaml: invalid cluster config")
    assert "nats: Field required" in text
    assert "pairs: Field required" in text


def test_parse_config_default_source() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({})
    assert "<memory>" in str(exc.value)


def test_every_problem_is_listed(tmp_path: Path) -> None:
    def mutate(d: Data) -> None:
        d["cluster"] = "Bad_Name"
        d["timings"]["bogus"] = 1

    path, text = error_for(tmp_path, mutate)
    assert "2 problem(s)" in text
    assert_names(text, path, "cluster:", "should match pattern")
    assert_names(text, path, "timings.bogus:", "Extra inputs are not permitted")


# ---- field errors ------------------------------------------------------------


def _set_cluster(v: str) -> Mutation:
    return lambda d: d.__setitem__("cluster", v)


FIELD_ERRORS: list[tuple[str, Mutation, str, str]] = [
    ("cluster-uppercase", _set_cluster("Demo"), "cluster", "should match pattern"),
    ("cluster-dot", _set_cluster("de.mo"), "cluster", "should match pattern"),
    ("cluster-leading-dash", _set_cluster("-demo"), "cluster", "should match pattern"),
    ("cluster-empty", _set_cluster(""), "cluster", "should match pattern"),
    ("cluster-too-long", _set_cluster("a" * 64), "cluster", "at most 63 characters"),
    (
        "node-name",
        lambda d: node(d, 0, 1).__setitem__("name", "Node_B"),
        "pairs[0].nodes[1].name",
        "should match pattern",
    ),
    (
        "pair-name",
        lambda d: d["pairs"][0].__setitem__("name", "pair 1"),
        "pairs[0].name",
        "should match pattern",
    ),
    (
        "device-name",
        lambda d: node(d, 0, 0)["groups"]["data"].__setitem__("devices", ["VTL"]),
        "pairs[0].nodes[0].groups.data.devices[0]",
        "should match pattern",
    ),
    (
        "unknown-top-level-field",
        lambda d: d.__setitem__("colour", "blue"),
        "colour",
        "Extra inputs are not permitted",
    ),
    (
        "unknown-timing-field",
        lambda d: d["timings"].__setitem__("heartbeat_intervall", 0.1),
        "timings.heartbeat_intervall",
        "Extra inputs are not permitted",
    ),
    (
        "unknown-node-field",
        lambda d: node(d, 0, 1).__setitem__("vip", "1.2.3.4/32"),
        "pairs[0].nodes[1].vip",
        "Extra inputs are not permitted",
    ),
    (
        "missing-nats",
        lambda d: d.pop("nats"),
        "nats",
        "Field required",
    ),
    (
        "one-node-pair",
        lambda d: d["pairs"][0]["nodes"].pop(),
        "pairs[0].nodes",
        "at least 2 items",
    ),
    (
        "bad-failback",
        lambda d: d["pairs"][0].__setitem__("failback", "sometimes"),
        "pairs[0].failback",
        "'manual' or 'auto'",
    ),
    (
        "service-ip-without-prefix",
        lambda d: node(d, 0, 0).__setitem__("service_ip", "198.51.100.1"),
        "pairs[0].nodes[0].service_ip",
        "needs a prefix length",
    ),
    (
        "service-ip-garbage",
        lambda d: node(d, 0, 0).__setitem__("service_ip", "not-an-ip"),
        "pairs[0].nodes[0].service_ip",
        "not an IPv4 address",
    ),
    (
        "floating-address-garbage",
        lambda d: node(d, 0, 1)["groups"]["mgmt"].__setitem__("addresses", ["300.1.1.1/32"]),
        "pairs[0].nodes[1].groups.mgmt.addresses",
        "not an IPv4 address",
    ),
    (
        "bad-gateway",
        lambda d: node(d, 0, 0)["groups"]["mgmt"].__setitem__("gateway", "gw"),
        "pairs[0].nodes[0].groups.mgmt.gateway",
        "Expected 4 octets in 'gw'",
    ),
    (
        "zero-paths",
        lambda d: d["devices"]["vtl-a0"]["paths"].__setitem__("node-a", 0),
        "devices.vtl-a0.paths",
        "needs at least one path",
    ),
    (
        "negative-interval",
        lambda d: d["timings"].__setitem__("heartbeat_interval", -1),
        "timings.heartbeat_interval",
        "greater than 0",
    ),
    (
        "negative-leader-standby-delay",
        lambda d: d["timings"].__setitem__("leader_standby_delay", -0.5),
        "timings.leader_standby_delay",
        "greater than or equal to 0",
    ),
    (
        "san-port",
        lambda d: d["san"].__setitem__("port", 70000),
        "san.port",
        "less than or equal to 65535",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [pytest.param(m, f, r, id=i) for i, m, f, r in FIELD_ERRORS],
)
def test_field_error_names_file_field_and_reason(
    tmp_path: Path, mutate: Mutation, field: str, reason: str
) -> None:
    path, text = error_for(tmp_path, mutate)
    assert_names(text, path, f"{field}:", reason)


@pytest.mark.parametrize(
    ("check", "needs"),
    [
        ({"name": "vtl-daemon", "kind": "pidfile"}, "path"),
        ({"name": "vtl-daemon", "kind": "pidfile", "path": ""}, "path"),
        ({"name": "vtl-port", "kind": "tcp", "host": "127.0.0.1"}, "port"),
        ({"name": "vtl-cmd", "kind": "command"}, "command"),
        ({"name": "vtl-cmd", "kind": "command", "command": []}, "command"),
    ],
)
def test_check_missing_its_kinds_field(tmp_path: Path, check: Data, needs: str) -> None:
    def mutate(d: Data) -> None:
        node(d, 0, 1)["checks"] = [{"name": "ok", "kind": "tcp", "port": 1}, check]

    path, text = error_for(tmp_path, mutate)
    assert_names(
        text, path, "pairs[0].nodes[1].checks[1]:", f"a {check['kind']} check needs '{needs}'"
    )


def test_check_unknown_kind(tmp_path: Path) -> None:
    def mutate(d: Data) -> None:
        node(d, 0, 0)["checks"] = [{"name": "x", "kind": "http", "path": "/"}]

    path, text = error_for(tmp_path, mutate)
    assert_names(text, path, "pairs[0].nodes[0].checks[0].kind:", "'pidfile', 'tcp' or 'command'")


def test_checks_of_every_kind_load(tmp_path: Path) -> None:
    def mutate(d: Data) -> None:
        node(d, 0, 0)["checks"] = [
            {"name": "pid", "kind": "pidfile", "path": "/run/vtl.pid", "fatal": True},
            {"name": "port", "kind": "tcp", "port": 3260},
            {"name": "cmd", "kind": "command", "command": ["true"]},
        ]

    data = example_data()
    mutate(data)
    cfg = load_config(write(tmp_path, data))
    assert [c.kind for c in cfg.node("node-a").checks] == ["pidfile", "tcp", "command"]
    assert cfg.node("node-a").checks[0].fatal is True


# ---- timing rules ------------------------------------------------------------


def _timings(**values: float) -> Mutation:
    return lambda d: d["timings"].update(values)


TIMING_ERRORS: list[tuple[str, Mutation, str]] = [
    (
        "dead-after-below-two-intervals",
        _timings(heartbeat_interval=0.1, dead_after=0.15),
        "dead_after (0.15) must be >= 2 * heartbeat_interval",
    ),
    (
        "lease-shorter-than-dead-after",
        _timings(dead_after=0.3, lease_ttl=0.2),
        "lease_ttl (0.2) must be >= dead_after (0.3)",
    ),
    (
        "margin-equal-to-lease",
        _timings(margin=0.3, lease_ttl=0.3),
        "margin (0.3) must be < lease_ttl (0.3)",
    ),
    (
        "margin-above-lease",
        _timings(margin=1.0, lease_ttl=0.3),
        "margin (1.0) must be < lease_ttl (0.3)",
    ),
    (
        "command-timeout-too-long",
        _timings(command_timeout=0.3),
        "command_timeout (0.3) must be shorter than lease_ttl (0.3)",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "reason"), [pytest.param(m, r, id=i) for i, m, r in TIMING_ERRORS]
)
def test_timing_rule_violation(tmp_path: Path, mutate: Mutation, reason: str) -> None:
    path, text = error_for(tmp_path, mutate)
    assert_names(text, path, "timings:", reason)


def test_timing_rules_hold_for_defaults(tmp_path: Path) -> None:
    data = example_data()
    del data["timings"]
    cfg = load_config(write(tmp_path, data))
    t = cfg.timings
    assert t.dead_after >= 2 * t.heartbeat_interval
    assert t.lease_ttl >= t.dead_after
    assert t.margin < t.lease_ttl


def test_leader_standby_delay_defaults_to_one_second_and_may_be_zero(tmp_path: Path) -> None:
    data = example_data()
    del data["timings"]["leader_standby_delay"]
    assert load_config(write(tmp_path, data)).timings.leader_standby_delay == 1.0
    data["timings"]["leader_standby_delay"] = 0
    assert load_config(write(tmp_path, data)).timings.leader_standby_delay == 0.0


def test_timing_rule_boundaries_are_allowed(tmp_path: Path) -> None:
    data = example_data()
    data["timings"].update(heartbeat_interval=0.25, dead_after=0.5, lease_ttl=0.5, margin=0.0)
    cfg = load_config(write(tmp_path, data))
    assert cfg.timings.dead_after == 2 * cfg.timings.heartbeat_interval
    assert cfg.timings.lease_ttl == cfg.timings.dead_after


# ---- cross-field checks ------------------------------------------------------


def _duplicate_node(d: Data) -> None:
    node(d, 0, 1)["name"] = "node-a"


def _unknown_device(d: Data) -> None:
    node(d, 0, 0)["groups"]["data"]["devices"] = ["vtl-a0", "vtl-zz"]


def _duplicate_address(d: Data) -> None:
    node(d, 0, 1)["groups"]["data"]["addresses"] = ["198.51.100.101/32"]


def _unknown_nats_host(d: Data) -> None:
    d["nats"]["servers"] = ["witness", "node-z"]


def _witness_is_a_node(d: Data) -> None:
    d["witness"]["host"] = "node-b"


def _device_paths_unknown_node(d: Data) -> None:
    d["devices"]["vtl-b1"]["paths"]["node-z"] = 1


# (id, mutation, reason fragment, dotted path of the offending field)
CROSS_ERRORS: list[tuple[str, Mutation, str, str]] = [
    ("duplicate-node-names", _duplicate_node, "node names must be unique",
     "pairs[0].nodes[1].name"),
    ("unknown-device", _unknown_device, "unknown device 'vtl-zz'",
     "pairs[0].nodes[0].groups.data.devices[1]"),
    ("duplicate-floating-address", _duplicate_address,
     "floating addresses must be unique", "pairs[0].nodes[1].groups.data.addresses[0]"),
    ("nats-server-unknown-host", _unknown_nats_host, "'node-z', which is neither a node",
     "nats.servers[1]"),
    ("witness-is-a-node", _witness_is_a_node, "witness host 'node-b' is also a node",
     "witness.host"),
    ("device-paths-unknown-node", _device_paths_unknown_node, "unknown node 'node-z'",
     "devices.vtl-b1.paths"),
]


@pytest.mark.parametrize(
    ("mutate", "reason"), [pytest.param(m, r, id=i) for i, m, r, _ in CROSS_ERRORS]
)
def test_cross_check_names_file_and_reason(tmp_path: Path, mutate: Mutation, reason: str) -> None:
    path, text = error_for(tmp_path, mutate)
    assert str(path) in text
    assert reason in text


@pytest.mark.parametrize(
    ("mutate", "reason", "field"), [pytest.param(m, r, f, id=i) for i, m, r, f in CROSS_ERRORS]
)
def test_cross_check_names_field_path(
    tmp_path: Path, mutate: Mutation, reason: str, field: str
) -> None:
    path, text = error_for(tmp_path, mutate)
    assert_names(text, path, field, reason)


def test_nats_servers_error_names_the_dotted_field(tmp_path: Path) -> None:
    path, text = error_for(tmp_path, _unknown_nats_host)
    assert_names(text, path, "nats.servers", "'node-z', which is neither a node nor the witness")


def test_nodes_with_the_same_reservation_key_tag_are_refused(tmp_path: Path) -> None:
    """docs/storage.md, "Keys": a node's SCSI-3 PR key carries a 3-byte tag of
    SHA-256("<cluster>/<node>"); in cluster c20588298 node-a's and node-b's collide."""
    data = example_data()
    data["cluster"] = "c20588298"
    text = load_error(write(tmp_path, data))
    assert "same SCSI reservation key tag" in text and "'node-a'" in text


def test_duplicate_nodes_across_pairs(tmp_path: Path) -> None:
    data = example_data()
    second = copy.deepcopy(data["pairs"][0])
    second["name"] = "pair-2"
    second["nodes"][0]["groups"] = {}
    second["nodes"][1]["groups"] = {}
    second["nodes"][1]["name"] = "node-c"
    data["pairs"].append(second)
    path = write(tmp_path, data)
    text = load_error(path)
    assert str(path) in text
    assert "node names must be unique" in text
    assert "node-a" in text


# ---- lookups -----------------------------------------------------------------


@pytest.fixture
def cfg() -> ClusterConfig:
    data = example_data()
    data["nats"]["servers"] = ["node-a", "node-b", "witness"]
    return parse_config(data, "test")


def test_hosts_are_nodes_in_file_order_then_witness(cfg: ClusterConfig) -> None:
    assert cfg.hosts == ["node-a", "node-b", "witness"]
    assert [cfg.host_index(h) for h in cfg.hosts] == [0, 1, 2]


def test_node_lookups(cfg: ClusterConfig) -> None:
    assert cfg.node("node-b").name == "node-b"
    assert cfg.has_node("node-a")
    assert not cfg.has_node("witness")
    assert cfg.pair_of("node-b").name == "pair-1"
    with pytest.raises(KeyError):
        cfg.node("node-z")
    with pytest.raises(KeyError):
        cfg.pair_of("witness")


def test_companion(cfg: ClusterConfig) -> None:
    assert cfg.companion("node-a").name == "node-b"
    assert cfg.companion("node-b").name == "node-a"


def test_groups(cfg: ClusterConfig) -> None:
    assert cfg.groups() == {
        "node-a-data": ("node-a", "data"),
        "node-a-mgmt": ("node-a", "mgmt"),
        "node-b-data": ("node-b", "data"),
        "node-b-mgmt": ("node-b", "mgmt"),
    }
    assert cfg.node("node-a").data_group == "node-a-data"
    assert cfg.node("node-a").mgmt_group == "node-a-mgmt"


def test_group_addresses_and_devices(cfg: ClusterConfig) -> None:
    assert cfg.group_addresses("node-a-data") == ["198.51.100.101/32"]
    assert cfg.group_addresses("node-a-mgmt") == ["203.0.113.101/32"]
    assert cfg.group_addresses("node-b-data") == ["198.51.100.102/32"]
    assert cfg.group_addresses("node-b-mgmt") == ["203.0.113.102/32"]
    assert cfg.group_devices("node-b-data") == ["vtl-b0", "vtl-b1"]
    assert cfg.group_devices("node-b-mgmt") == []
    with pytest.raises(KeyError):
        cfg.group_addresses("node-z-data")


@pytest.mark.parametrize(
    ("host", "service", "port"),
    [
        ("node-a", "nats_client", 4222),
        ("node-b", "nats_client", 4322),
        ("witness", "nats_client", 4422),
        ("node-a", "nats_cluster", 6222),
        ("witness", "nats_monitor", 8422),
        ("node-a", "heartbeat", 9101),
        ("node-b", "storage-monitor", 9202),
        ("node-b", "storage_monitor", 9202),
        ("witness", "ip-manager", 9303),
        ("witness", "arbiter", 9304),
    ],
)
def test_port_is_base_plus_100_per_host_index(
    cfg: ClusterConfig, host: str, service: str, port: int
) -> None:
    assert cfg.port(host, service) == port


def test_port_honours_configured_bases(tmp_path: Path) -> None:
    data = example_data()
    data["ports"] = {"nats_client": 14222, "arbiter": 19104}
    cfg = load_config(write(tmp_path, data))
    assert cfg.port("node-b", "nats_client") == 14322
    assert cfg.port("witness", "arbiter") == 19304
    assert cfg.port("witness", "heartbeat") == 9301


def test_nats_urls_own_server_first_then_the_witness(cfg: ClusterConfig) -> None:
    """A node's services fall back on the witness's server before the companion's: on
    the companion's, a fault of the companion would cost them their own groups."""
    a, b, w = "nats://127.0.0.1:4222", "nats://127.0.0.1:4322", "nats://127.0.0.1:4422"
    assert cfg.nats_urls() == [w, a, b]
    assert cfg.nats_urls("node-a") == [a, w, b]
    assert cfg.nats_urls("node-b") == [b, w, a]
    assert cfg.nats_urls("witness") == [w, a, b]
    assert cfg.nats_urls("not-a-server") == [w, a, b]
    assert cfg.nats_urls("node-b", host="10.0.0.1") == [
        "nats://10.0.0.1:4322",
        "nats://10.0.0.1:4422",
        "nats://10.0.0.1:4222",
    ]


def test_nats_urls_of_the_example() -> None:
    assert load_config(EXAMPLE).nats_urls("node-a") == [
        "nats://127.0.0.1:4222", "nats://127.0.0.1:4422", "nats://127.0.0.1:4322"]
    assert load_config(EXAMPLE).nats_urls("witness") == [
        "nats://127.0.0.1:4422", "nats://127.0.0.1:4222", "nats://127.0.0.1:4322"]


def test_state_path(cfg: ClusterConfig) -> None:
    assert cfg.state_path("node-a") == Path("/var/lib/vtlha/node-a")


@pytest.mark.parametrize(
    ("name", "ok"),
    [("demo", True), ("node-a", True), ("0a", True), ("a--b", True), ("", False),
     ("-a", False), ("A", False), ("a.b", False), ("a_b", False), ("a b", False),
     ("a*", False), ("a>", False), ("a\n", False)],
)
def test_is_valid_name(name: str, ok: bool) -> None:
    assert is_valid_name(name) is ok


# ---- san.kind: iscsi ----------------------------------------------------------------

def _iscsi(d: Data) -> None:
    d["san"] = {"kind": "iscsi", "iqn": "iqn.2026-12.org.example:vtl",
                "portals": ["192.0.2.10:3260", "192.0.2.11:3260"]}
    for k, dev in enumerate(d["devices"].values()):
        dev["lun"] = k + 1
    for p in d["pairs"]:
        for n in p["nodes"]:
            n["groups"]["data"]["resources"] = []


def test_san_kind_defaults_to_the_reference_target() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.san.kind == "reference" and cfg.san.portals == [] and cfg.san.iqn is None


def test_san_kind_iscsi_loads(tmp_path: Path) -> None:
    data = example_data()
    _iscsi(data)
    cfg = load_config(write(tmp_path, data))
    assert cfg.san.kind == "iscsi" and cfg.san.portals[1] == "192.0.2.11:3260"
    assert [d.lun for d in cfg.devices.values()] == [1, 2, 3, 4]


def test_san_kind_iscsi_takes_the_builtin_tape_data_service(tmp_path: Path) -> None:
    """The builtin tape data service writes through iSCSI too (the default resource)."""
    data = example_data()
    _iscsi(data)
    node(data, 0, 0)["groups"]["data"].pop("resources")
    cfg = load_config(write(tmp_path, data))
    assert [r.agent for r in cfg.group_resources("node-a-data")] == ["builtin:tape"]


def _then(*edits: Mutation) -> Mutation:
    def go(d: Data) -> None:
        _iscsi(d)
        for e in edits:
            e(d)
    return go


@pytest.mark.parametrize(("mutate", "field", "reason"), [
    (_then(lambda d: d["san"].pop("iqn")), "san.iqn", "needs the target's IQN"),
    (_then(lambda d: d["san"].update(portals=["192.0.2.10:3260"])), "san.portals",
     "a device has 2 path(s), 1 portal(s) given"),
    (_then(lambda d: d["san"].update(portals=["192.0.2.10", "x:1"])), "san.portals",
     "is not \"host:port\""),
    (_then(lambda d: d["devices"]["vtl-a1"].pop("lun")), "devices.vtl-a1.lun",
     "needs the device's LUN"),
    (_then(lambda d: d["devices"]["vtl-b0"].update(lun=1)), "devices.vtl-b0.lun",
     "LUN 1 is also device vtl-a0's"),
    (lambda d: d["san"].update(kind="fc"), "san.kind", "'reference' or 'iscsi'"),
])
def test_san_kind_iscsi_problems_name_the_field(tmp_path: Path, mutate: Mutation, field: str,
                                                reason: str) -> None:
    path, text = error_for(tmp_path, mutate)
    assert_names(text, path, field, reason)
