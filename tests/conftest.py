"""Shared fixtures: a real nats-server per test module, local clusters per test."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from vtlha_lab.localcluster import LocalCluster, prepare_config
from vtlha_lab.ports import free_port

if TYPE_CHECKING:
    from vtlha_lab.lab import Lab as LabT
from vtlha_lab.natsserver import NatsServer, NatsServerSpec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cluster.yaml"
IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, nftables, loop devices)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def _free_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One real nats-server (JetStream, sync_interval: always) for the whole module;
    each test uses its own cluster name, hence its own subjects, KV bucket and stream."""
    d = tmp_path_factory.mktemp("nats")
    spec = NatsServerSpec(name="test", client_port=_free_port(), monitor_port=_free_port(),
                          store_dir=d / "jetstream")
    srv = NatsServer(spec, d / "nats-server.log")
    srv.start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def cluster_name(request: pytest.FixtureRequest) -> str:
    """A cluster name per test (tests of a module share a nats-server): the test's name,
    cut to 40 characters with a digest of the whole name when longer, so that
    parametrized tests with long names do not share one."""
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")
    if len(name) > 40:
        digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:6]
        name = f"{name[:33].strip('-')}-{digest}"
    return name or "t"


@pytest.fixture
def local_cluster(request: pytest.FixtureRequest, nats_server: NatsServer,
                  tmp_path: Path) -> Iterator[LocalCluster]:
    """A not-yet-started local cluster on the module's nats-server; always stopped."""
    cfg = prepare_config(EXAMPLE, tmp_path, cluster=cluster_name(request), single_server=True)
    c = LocalCluster(cfg, tmp_path, nats_urls=[nats_server.spec.url])
    try:
        yield c
    finally:
        c.stop()
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            print(f"logs kept in {tmp_path / 'logs'}")
        else:
            shutil.rmtree(tmp_path / "state", ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def lab_hygiene() -> Iterator[None]:
    """After the whole suite, no namespace, veth, bridge or uplink of any lab remains."""
    if not IS_ROOT:
        yield
        return
    from vtlha_lab.lab import leftovers

    yield
    left = leftovers(only_created_here=True)
    assert not left, f"lab pieces left behind after the test suite: {left}"


def lab_config(request: pytest.FixtureRequest, tmp_path: Path,
               edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """The example cluster file for a lab under ``tmp_path`` (its own state directory,
    a cluster name per test), changed by ``edit`` first."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["cluster"] = cluster_name(request)
    if edit is not None:
        edit(raw)
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg


def torn_down_lab(request: pytest.FixtureRequest, tmp_path: Path,
                  edit: Callable[[dict[str, Any]], None] | None = None) -> Iterator[LabT]:
    """For a fixture: a network lab (not yet started) for the example cluster changed by
    ``edit``; always torn down."""
    from vtlha_lab.lab import Lab

    the_lab = Lab(lab_config(request, tmp_path, edit), tmp_path)
    try:
        yield the_lab
    finally:
        the_lab.stop()


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LabT]:
    """A network lab (not yet started) for the example cluster; always torn down."""
    yield from torn_down_lab(request, tmp_path)


@pytest.fixture
def secured_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LabT]:
    """A network lab run as a deployment runs: `vtlha deploy render`'s server configs,
    a least-privilege credential per service per host, TLS for clients and routes
    (``Lab.secure``); not yet started; always torn down."""
    from vtlha_lab.lab import Lab

    the_lab = Lab(lab_config(request, tmp_path), tmp_path)
    try:
        the_lab.secure()
        yield the_lab
    finally:
        the_lab.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)  # type: ignore[attr-defined]
    return rep
