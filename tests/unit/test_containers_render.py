"""What runs in containers (``vtlha.containers``): each host's containers, its compose
file and units from `vtlha deploy render`; the runtime image's distribution without the
lab. Running them is tests/integration/test_containers.py (``make test-containers``)."""

from __future__ import annotations

import ast
import importlib.util
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from vtlha.cli import main
from vtlha.config import parse_config
from vtlha.containers import (
    HostPaths,
    host_containers,
    podman_run_args,
    render_compose,
    render_unit,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
IMAGE = "localhost/vtlha:test"


def raw(**nats: Any) -> dict[str, Any]:
    out: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    out["nats"].update(nats)
    return out


def by_service(cfg: Any, host: str, paths: HostPaths | None = None) -> dict[str, Any]:
    return {c.service: c for c in host_containers(cfg, host, IMAGE, paths or HostPaths())}


def test_a_node_runs_its_server_and_four_services_the_witness_its_server_and_arbiter() -> None:
    cfg = parse_config(raw(credentials_dir="/etc/vtlha/creds"))
    assert list(by_service(cfg, "node-a")) == ["nats", "heartbeat", "storage-monitor",
                                               "ip-manager", "arbiter"]
    assert list(by_service(cfg, "witness")) == ["nats", "arbiter"]
    c = by_service(cfg, "node-b")["heartbeat"]
    assert c.name == "vtlha-demo-node-b-heartbeat"
    assert c.command == ("vtlha-heartbeat", "--config", "/etc/vtlha/cluster.yaml",
                         "--node", "node-b")
    assert c.health_url == f"http://127.0.0.1:{cfg.port('node-b', 'heartbeat')}/healthz"
    assert by_service(cfg, "node-a")["nats"].command == (  # at the services' priority
        "python3", "-m", "vtlha.priority", "-10", "nats-server", "-c",
        "/etc/vtlha/nats/node-a.conf")


def test_privileges_are_what_each_service_needs_and_no_more() -> None:
    cfg = parse_config(raw(credentials_dir="/etc/vtlha/creds"))
    cs = by_service(cfg, "node-a")
    assert {s for s, c in cs.items() if c.user is None} == {"ip-manager", "storage-monitor"}
    assert cs["heartbeat"].user == "10001:10001" == cs["nats"].user == cs["arbiter"].user
    assert cs["ip-manager"].cap_add == ("NET_ADMIN", "NET_RAW", "SYS_NICE")
    # scheduling.nice -10 (the default): every container may raise its priority
    assert {s: c.cap_add for s, c in cs.items() if s != "ip-manager"} == {
        s: ("SYS_NICE",) for s in ("nats", "heartbeat", "storage-monitor", "arbiter")}
    assert [s for s, c in cs.items() if "NET_RAW" not in c.cap_drop] == ["ip-manager"]
    assert [s for s, c in cs.items() if c.pid_host] == ["heartbeat"]  # process checks


def test_a_priority_at_or_below_the_default_needs_no_capability_and_no_nice() -> None:
    data = raw()
    data["scheduling"] = {"nice": 0}
    cs = by_service(parse_config(data), "node-a")
    assert [s for s, c in cs.items() if c.cap_add] == ["ip-manager"]
    assert cs["ip-manager"].cap_add == ("NET_ADMIN", "NET_RAW")
    assert cs["nats"].command == ("nats-server", "-c", "/etc/vtlha/nats/node-a.conf")


def test_a_namespace_network_reaches_compose_and_units() -> None:
    cfg = parse_config(raw())
    cs = host_containers(cfg, "node-a", IMAGE, network="ns:/run/netns/lab-node-a")
    assert {c.network for c in cs} == {"ns:/run/netns/lab-node-a"}
    doc = yaml.safe_load(render_compose("node-a", cs))
    assert {s["network_mode"] for s in doc["services"].values()} == {"ns:/run/netns/lab-node-a"}
    assert ["--network", "ns:/run/netns/lab-node-a"] in podman_run_args(cs[0])


def test_each_service_mounts_its_own_credential_only() -> None:
    cfg = parse_config(raw(credentials_dir="/etc/vtlha/creds"))
    for host in cfg.hosts:
        for c in host_containers(cfg, host, IMAGE):
            seeds = [m.path for m in c.mounts if m.path.endswith(".nk")]
            want = [] if c.service == "nats" else [f"/etc/vtlha/creds/{host}-{c.service}.nk"]
            assert seeds == want, c.name
            writable = [m.path for m in c.mounts if m.writable]
            assert writable == [f"/var/lib/vtlha/{host}"], c.name


def test_tls_files_servers_get_their_key_clients_the_ca() -> None:
    tls = {"ca": "/etc/vtlha/tls/ca.pem", "cert": "/etc/vtlha/tls/{host}.pem",
           "key": "/etc/vtlha/tls/{host}.key"}
    cfg = parse_config(raw(tls=tls))
    cs = by_service(cfg, "node-a")
    assert {m.path for m in cs["nats"].mounts} >= {
        "/etc/vtlha/tls/ca.pem", "/etc/vtlha/tls/node-a.pem", "/etc/vtlha/tls/node-a.key"}
    paths = {m.path for m in cs["heartbeat"].mounts}
    assert "/etc/vtlha/tls/ca.pem" in paths and not any(p.endswith(".key") for p in paths)


def test_process_checks_see_the_pid_files_directory_and_a_relative_path_is_refused() -> None:
    data = raw()
    data["pairs"][0]["nodes"][0]["checks"] = [
        {"name": "vtl", "kind": "pidfile", "path": "/run/vtl/vtl.pid", "fatal": True}]
    cfg = parse_config(data)
    assert "/run/vtl" in {m.path for m in by_service(cfg, "node-a")["heartbeat"].mounts}
    with pytest.raises(ValueError, match=r"--config-path: 'cluster\.yaml' is not an absolute"):
        host_containers(cfg, "node-a", IMAGE, HostPaths(config="cluster.yaml"))


def test_the_servers_health_check_follows_listen_and_needs_a_monitoring_port() -> None:
    listen = {"node-a": {"host": "198.51.100.1", "monitor_port": 8222},
              "node-b": {"host": "198.51.100.2"}, "witness": {"host": "0.0.0.0",
                                                              "monitor_port": 8222}}
    cfg = parse_config(raw(listen=listen))
    assert by_service(cfg, "node-a")["nats"].health_url == "http://198.51.100.1:8222/healthz"
    assert by_service(cfg, "node-b")["nats"].health_url is None
    assert by_service(cfg, "witness")["nats"].health_url == "http://127.0.0.1:8222/healthz"


def test_store_dir_is_mounted_for_the_server() -> None:
    cfg = parse_config(raw())
    nats = by_service(cfg, "witness", HostPaths(store_root="/srv/js"))["nats"]
    assert [m.path for m in nats.mounts if m.writable] == ["/srv/js/witness"]


def test_unit_runs_the_container_under_systemd_with_the_same_options() -> None:
    cfg = parse_config(raw(credentials_dir="/etc/vtlha/creds"))
    cs = host_containers(cfg, "node-a", IMAGE)
    ipm = next(c for c in cs if c.service == "ip-manager")
    unit = render_unit(ipm, cs)
    assert "Restart=always" in unit and "Type=notify" in unit
    assert "After=network-online.target vtlha-demo-node-a-nats.service" in unit
    assert "--cap-add NET_ADMIN" in unit and "--name vtlha-demo-node-a-ip-manager" in unit
    assert "--cap-add SYS_NICE" in unit and "--network host" in unit
    assert ("--health-cmd 'python3 -m vtlha.healthz "
            f"http://127.0.0.1:{cfg.port('node-a', 'ip-manager')}/healthz'") in unit
    assert podman_run_args(ipm)[-2:] == [[IMAGE], list(ipm.command)]


def test_render_writes_compose_and_units_for_every_host(tmp_path: Path) -> None:
    src = tmp_path / "cluster.yaml"
    src.write_text(yaml.safe_dump(raw(credentials_dir="/etc/vtlha/creds")))
    args = ["deploy", "render", str(src), "--out", str(tmp_path / "out"), "--image", IMAGE]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for host, services in (("node-a", 5), ("witness", 2)):
        doc = yaml.safe_load((tmp_path / "out" / "compose" / f"{host}.yaml").read_text())
        assert len(doc["services"]) == services
        for spec in doc["services"].values():
            assert spec["network_mode"] == "host" and spec["restart"] == "always"
            assert "SYS_NICE" in spec["cap_add"]
            assert spec["image"] == IMAGE
            assert spec["healthcheck"]["test"][:4] == ["CMD", "python3", "-m", "vtlha.healthz"]
        units = sorted(p.name for p in (tmp_path / "out" / "systemd" / host).iterdir())
        assert len(units) == services and all(u.startswith(f"vtlha-demo-{host}-")
                                              for u in units)
    again = CliRunner().invoke(main, args)
    assert "0 file(s) written" in again.output  # idempotent


# ---- the image's distribution ----------------------------------------------------------
def _runtime_project() -> Any:
    spec = importlib.util.spec_from_file_location(
        "runtime_project", ROOT / "deploy" / "image" / "runtime_project.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_runtime_never_imports_the_lab() -> None:
    found = []
    for top in [ROOT / "vtlha", *(ROOT / "services").glob("*/vtlha_*")]:
        for path in top.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path}: {n}" for n in names if n.split(".")[0] == "vtlha_lab"]
    assert found == []


def test_the_image_wheel_leaves_the_lab_out_and_pins_every_dependency(tmp_path: Path) -> None:
    rp = _runtime_project()
    rp.stage(tmp_path / "src")
    staged = tomllib.loads((tmp_path / "src" / "pyproject.toml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = staged["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert "vtlha_lab" not in packages and "vtlha" in packages
    assert not (tmp_path / "src" / "vtlha_lab").exists()
    assert "vtlha-lab" not in staged["project"]["scripts"]
    assert staged["project"]["dependencies"] == project["project"]["dependencies"]
    assert "optional-dependencies" not in staged["project"]
    lock = (ROOT / "deploy" / "image" / "requirements.lock").read_text().splitlines()
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in lock
              if "==" in line}
    for dep in project["project"]["dependencies"]:
        name = dep.split("=")[0].split(">")[0].split("<")[0].lower().replace("_", "-")
        assert name in pinned, dep
