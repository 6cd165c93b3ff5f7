"""Integration tests of the services as real processes on a real nats-server:
heartbeats (sequence, incarnation, process checks, storage verdict), storage-path
probes with hysteresis, the HTTP endpoints, SIGTERM and the JSON logs, and
``vtlha config check``.

Synchronisation is only ever a poll with a deadline (``LocalCluster.wait_for``) or
waiting for a NATS message with a deadline (``watch``); never a bare sleep."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import nats
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from vtlha import bus
from vtlha.errors import InvalidMessage
from vtlha.messages import Heartbeat, PathHealth, StorageReport, decode
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import DEVICE_BYTES, LocalCluster
from vtlha_lab.natsserver import NatsServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
VTLHA = Path(sys.executable).parent / "vtlha"

START_TIMEOUT = 10.0  # a service process: interpreter, imports, NATS connect
CHANGE_TIMEOUT = 5.0  # a state change the running services must show

M = TypeVar("M", bound=BaseModel)


# ---- helpers ---------------------------------------------------------------------

def watch(url: str, subject: str, model: type[M], until: Callable[[list[M]], bool],
          timeout: float, before: Callable[[], None] | None = None) -> list[M]:
    """Subscribe to ``subject``, then run ``before`` (so nothing it causes is missed),
    then collect decoded messages until ``until(messages)`` holds; fail after
    ``timeout`` seconds. Returns every message collected, in arrival order."""

    async def _run() -> list[M]:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        got: list[M] = []
        invalid: list[str] = []
        done = asyncio.Event()

        async def _cb(msg: Any) -> None:
            if done.is_set():
                return
            try:
                got.append(decode(model, msg.data))
            except InvalidMessage as exc:
                invalid.append(str(exc))
                done.set()
                return
            if until(got):
                done.set()

        try:
            await nc.subscribe(subject, cb=_cb)
            await nc.flush()
            if before is not None:
                before()
            try:
                await asyncio.wait_for(done.wait(), timeout)
            except TimeoutError:
                tail = [m.model_dump() for m in got[-2:]]
                raise AssertionError(
                    f"{subject}: condition not met within {timeout} s after {len(got)} "
                    f"message(s); last: {tail}") from None
        finally:
            await nc.close()
        assert not invalid, f"{subject}: invalid message: {invalid[0]}"
        return got

    return asyncio.run(_run())


def http(port: int, path: str) -> tuple[int, str, bytes]:
    """GET a local endpoint: (status, content type, body); HTTP errors are returned."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=2.0) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()
        finally:
            exc.close()


def wait_ready(lc: LocalCluster, host: str, service: str) -> None:
    port = lc.cfg.port(host, service)
    lc.wait_for(lambda: http(port, "/readyz")[0] == 200, START_TIMEOUT,
                what=f"{host}/{service} /readyz 200")


def kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(5)  # reaped: a zombie would still answer kill(pid, 0)


@contextmanager
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


@contextmanager
def edited_cluster(lc: LocalCluster, nats_url: str,
                   edit: Callable[[dict[str, Any]], None]) -> Iterator[LocalCluster]:
    """The fixture's prepared cluster file (unique name, free ports, temporary state)
    edited in place, as a new LocalCluster that is always stopped."""
    data: dict[str, Any] = yaml.safe_load(lc.config_path.read_text())
    edit(data)
    lc.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    c = LocalCluster(lc.config_path, lc.work_dir, nats_urls=[nats_url])
    try:
        yield c
    finally:
        c.stop()


def paths_of(report: StorageReport, device: str) -> list[PathHealth]:
    return [p for p in report.paths if p.device == device]


def check_named(hb: Heartbeat, name: str) -> Any:
    found = [c for c in hb.checks if c.name == name]
    assert len(found) == 1, f"check {name!r} not exactly once in {hb.checks}"
    return found[0]


def log_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"{path}:{n} is not JSON: {line!r}") from None
        assert isinstance(obj, dict), f"{path}:{n} is not a JSON object: {line!r}"
        out.append(obj)
    return out


@pytest.fixture(autouse=True)
def kv_bucket(request: pytest.FixtureRequest) -> None:
    """The KV bucket, as the arbiter creates it: a node's services wait for it and never
    create it themselves (issue 14), and no arbiter runs in these tests."""
    if "local_cluster" not in request.fixturenames:
        return
    lc: LocalCluster = request.getfixturevalue("local_cluster")

    async def _create() -> None:
        nc = await nats.connect(lc.client_urls(), connect_timeout=2)
        try:
            await bus.ensure_kv(nc.jetstream(timeout=2), Subjects(lc.cfg.cluster), replicas=1)
        finally:
            await nc.close()

    asyncio.run(_create())


# ---- a. heartbeat ----------------------------------------------------------------

def test_heartbeat_sequence_incarnation_and_interval(local_cluster: LocalCluster,
                                                     nats_server: NatsServer) -> None:
    lc, url = local_cluster, nats_server.spec.url
    subject = Subjects(lc.cfg.cluster).hb("node-a")
    lc.create_devices()

    beats = watch(url, subject, Heartbeat, lambda got: len(got) >= 5, START_TIMEOUT,
                  before=lambda: lc.start_service("node-a", "heartbeat"))
    assert len(beats) >= 5
    seqs = [b.seq for b in beats]
    assert all(a < b for a, b in itertools.pairwise(seqs)), seqs
    assert seqs[0] == 0, "subscribed before the start: the first heartbeat must be seen"
    assert len({b.incarnation for b in beats}) == 1
    for b in beats:
        assert b.node == "node-a"
        assert b.cluster == lc.cfg.cluster
        assert b.interval == lc.cfg.timings.heartbeat_interval
        # The example configures none: only the built-in executor checks, which are
        # "starting" (no executor runs here, and the start-up grace has not run out).
        assert [c.name for c in b.checks] == ["executor ip-manager alive",
                                              "executor storage-monitor alive"]
        assert all(c.ok and c.fatal and c.detail.startswith("starting: ")
                   for c in b.checks), b.checks
        assert b.storage is None  # no storage-monitor runs
    old = beats[0].incarnation

    def restart() -> None:
        child = lc.procs.find("node-a", "heartbeat")
        child.signal(signal.SIGKILL)
        child.proc.wait(5)
        lc.start_service("node-a", "heartbeat")

    after = watch(url, subject, Heartbeat,
                  lambda got: sum(b.incarnation != old for b in got) >= 3, START_TIMEOUT,
                  before=restart)
    new = [b for b in after if b.incarnation != old]
    assert len({b.incarnation for b in new}) == 1
    assert new[0].seq == 0, "a new incarnation starts its sequence again"
    assert [b.seq for b in new] == sorted({b.seq for b in new})


# ---- b. heartbeat process checks -------------------------------------------------

def test_heartbeat_carries_process_checks(local_cluster: LocalCluster,
                                          nats_server: NatsServer, tmp_path: Path) -> None:
    url = nats_server.spec.url
    subject = Subjects(local_cluster.cfg.cluster).hb("node-a")
    pidfile = tmp_path / "vtl-daemon.pid"

    def add_checks(data: dict[str, Any]) -> None:
        node = data["pairs"][0]["nodes"][0]
        assert node["name"] == "node-a"
        node["checks"] = [
            {"name": "vtl-daemon", "kind": "pidfile", "path": str(pidfile), "fatal": True},
            {"name": "always-false", "kind": "command", "command": ["false"], "fatal": False},
        ]

    with sleeper() as daemon, edited_cluster(local_cluster, url, add_checks) as c:
        pidfile.write_text(f"{daemon.pid}\n")
        c.create_devices()
        beats = watch(url, subject, Heartbeat, lambda got: len(got) >= 3, START_TIMEOUT,
                      before=lambda: c.start_service("node-a", "heartbeat"))
        for hb in beats:  # checks run once before the first heartbeat
            pid = check_named(hb, "vtl-daemon")
            assert (pid.ok, pid.fatal) == (True, True), pid
            cmd = check_named(hb, "always-false")
            assert (cmd.ok, cmd.fatal) == (False, False), cmd
            assert "exited 1" in cmd.detail

        beats = watch(url, subject, Heartbeat,
                      lambda got: not check_named(got[-1], "vtl-daemon").ok, CHANGE_TIMEOUT,
                      before=lambda: kill_and_reap(daemon))
        dead = check_named(beats[-1], "vtl-daemon")
        assert dead.fatal is True
        assert f"process {daemon.pid}" in dead.detail
        assert "not running" in dead.detail
        assert check_named(beats[-1], "always-false").ok is False

        status = c.status("node-a", "heartbeat")
        assert status is not None
        by_name = {ch["name"]: ch for ch in status["checks"]}
        assert by_name["vtl-daemon"]["ok"] is False


# ---- c. storage-monitor ----------------------------------------------------------

async def _events_stream(lc: LocalCluster) -> None:
    nc = await lc.connect()
    try:
        await bus.ensure_events_stream(nc.jetstream(), Subjects(lc.cfg.cluster), replicas=1,
                                       max_bytes=1 << 20, max_age=3600.0)
    finally:
        await nc.close()


def test_storage_paths_and_heartbeat_verdict(local_cluster: LocalCluster,
                                             nats_server: NatsServer) -> None:
    lc, url = local_cluster, nats_server.spec.url
    subj = Subjects(lc.cfg.cluster)
    devices = sorted(lc.cfg.devices)
    assert len(devices) == 4
    backing = lc.state_root / "san" / "vtl-a0.img"
    lc.create_devices()
    lc.start_san()  # the storage-monitor probes through the SAN target
    asyncio.run(_events_stream(lc))  # the arbiter makes it; none runs here
    lc.start_service("node-a", "heartbeat")

    reports = watch(url, subj.storage("node-a"), StorageReport, lambda got: len(got) >= 1,
                    START_TIMEOUT, before=lambda: lc.start_service("node-a", "storage-monitor"))
    first = reports[0]
    assert first.node == "node-a"
    assert len(first.paths) == 8
    assert sorted((p.device, p.path) for p in first.paths) == [
        (d, i) for d in devices for i in range(2)]
    for p in first.paths:
        assert p.reachable is True, p
        assert p.latency is not None and 0 <= p.latency < lc.cfg.timings.probe_timeout, p
        assert p.error is None, p

    def a0_down(got: list[StorageReport]) -> bool:
        return not any(p.reachable for p in paths_of(got[-1], "vtl-a0"))

    reports = watch(url, subj.storage("node-a"), StorageReport, a0_down, CHANGE_TIMEOUT,
                    before=lambda: os.truncate(backing, 0))
    last = reports[-1]
    for p in paths_of(last, "vtl-a0"):
        assert p.reachable is False
        assert p.latency is None
        assert p.error and "EIO" in p.error, p  # the target's reply to a read past the end
    for p in last.paths:
        if p.device != "vtl-a0":
            assert p.reachable is True and p.latency is not None and p.error is None, p
    assert all(p.reachable for r in reports for p in r.paths if p.device != "vtl-a0")
    # fall=2: each path's first failed probe leaves it reachable
    for i in range(2):
        assert any(p.path == i and p.reachable and p.error
                   for r in reports for p in paths_of(r, "vtl-a0")), f"vtl-a0 path {i}"

    beats = watch(url, subj.hb("node-a"), Heartbeat,
                  lambda got: got[-1].storage is not None and not got[-1].storage.ok,
                  CHANGE_TIMEOUT)
    verdict = beats[-1].storage
    assert verdict is not None
    assert verdict.ok is False
    assert verdict.failed_devices == ["vtl-a0"]
    assert verdict.age is not None and verdict.age < CHANGE_TIMEOUT

    def a0_up(got: list[StorageReport]) -> bool:
        return all(p.reachable for p in paths_of(got[-1], "vtl-a0"))

    reports = watch(url, subj.storage("node-a"), StorageReport, a0_up, CHANGE_TIMEOUT,
                    before=lambda: os.truncate(backing, DEVICE_BYTES))
    for p in reports[-1].paths:
        assert p.reachable is True and p.latency is not None and p.error is None, p
    # rise=2: each path's first good probe leaves it unreachable (no error any more)
    for i in range(2):
        assert any(p.path == i and not p.reachable and p.error is None
                   for r in reports for p in paths_of(r, "vtl-a0")), f"vtl-a0 path {i}"

    beats = watch(url, subj.hb("node-a"), Heartbeat,
                  lambda got: got[-1].storage is not None and got[-1].storage.ok,
                  CHANGE_TIMEOUT)
    assert beats[-1].storage is not None
    assert beats[-1].storage.failed_devices == []

    def kinds(device: str, path: int) -> list[str]:
        return [e.kind for e in lc.events() if e.kind.startswith("storage.")
                and e.node == "node-a" and e.data.get("device") == device
                and e.data.get("path", path) == path]

    for i in range(2):  # each hysteresis change of each path is an event, in order
        ks = lc.wait_for(lambda i=i: (k := kinds("vtl-a0", i)) and k[-1] == "storage.path_up"
                         and k, CHANGE_TIMEOUT, what=f"vtl-a0 path {i}'s path_up event")
        assert "storage.path_down" in ks, ks
        assert ks.index("storage.path_down") < len(ks) - 1
    assert "storage.device_lost" in kinds("vtl-a0", -1)
    assert not [k for d in devices if d != "vtl-a0" for k in kinds(d, 0)]


# ---- d. HTTP endpoints -----------------------------------------------------------

SERVICES = [("node-a", "heartbeat"), ("node-a", "storage-monitor"),
            ("node-a", "ip-manager"), ("witness", "arbiter")]


@pytest.mark.parametrize(("host", "service"), SERVICES, ids=[s for _, s in SERVICES])
def test_http_endpoints(local_cluster: LocalCluster, host: str, service: str) -> None:
    lc = local_cluster
    port = lc.cfg.port(host, service)
    lc.create_devices()
    lc.start_service(host, service)
    wait_ready(lc, host, service)

    code, ctype, body = http(port, "/healthz")
    assert code == 200
    assert ctype.startswith("application/json")
    assert orjson.loads(body)["ok"] is True

    code, _, body = http(port, "/readyz")
    assert code == 200
    assert orjson.loads(body)["ready"] is True

    code, ctype, body = http(port, "/status")
    assert code == 200
    assert ctype.startswith("application/json")
    status = orjson.loads(body)
    assert status["service"] == service
    assert status["node"] == host
    assert status["cluster"] == lc.cfg.cluster
    assert status["nats"]

    code, ctype, body = http(port, "/metrics")
    assert code == 200
    assert ctype.startswith("text/plain")
    text = body.decode()
    assert "vtlha_up 1.0" in text.splitlines()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    up = families["vtlha_up"]
    assert up.type == "gauge"
    assert [s.value for s in up.samples] == [1.0]
    assert "vtlha_invalid_messages" in families

    code, _, _ = http(port, "/no-such-endpoint")
    assert code == 404


# ---- e. SIGTERM and logs ---------------------------------------------------------

LOG_KEYS = {"ts", "level", "service", "node", "msg"}


@pytest.mark.parametrize(("host", "service"), SERVICES, ids=[s for _, s in SERVICES])
def test_sigterm_exits_cleanly_with_json_logs(local_cluster: LocalCluster, host: str,
                                              service: str) -> None:
    lc = local_cluster
    lc.create_devices()
    lc.start_service(host, service)
    wait_ready(lc, host, service)
    child = lc.procs.find(host, service)

    child.signal(signal.SIGTERM)
    rc = child.proc.wait(timeout=5)
    assert rc == 0, f"{service} exited {rc}; log: {child.log_path}"

    lines = log_lines(child.log_path)
    assert lines, "no log lines"
    for obj in lines:
        missing = LOG_KEYS - obj.keys()
        assert not missing, f"log line lacks {sorted(missing)}: {obj}"
        assert isinstance(obj["ts"], float | int)
        assert obj["level"] in ("debug", "info", "warning"), obj
    msgs = [obj["msg"] for obj in lines]
    assert "started" in msgs
    assert "stopped" in msgs
    assert msgs.index("started") < msgs.index("stopped")

    foreign = [o for o in lines if (o["service"], o["node"]) != (service, host)]
    assert not foreign, f"log lines naming another service or node: {foreign}"


# ---- f. vtlha config check -------------------------------------------------------

def run_vtlha(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VTLHA), *args], capture_output=True, text=True, timeout=30,
                          check=False)


def test_config_check_accepts_the_example() -> None:
    r = run_vtlha(["config", "check", str(EXAMPLE)])
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    assert r.stderr == ""


def test_config_check_names_file_and_fields(tmp_path: Path) -> None:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    data["timings"]["heartbeat_interval"] = 0.1
    data["timings"]["dead_after"] = 0.1
    data["pairs"][0]["nodes"][0]["name"] = "Node_A"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(data, sort_keys=False))

    r = run_vtlha(["config", "check", str(broken)])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "OK" not in r.stdout
    assert str(broken) in r.stderr
    assert "timings" in r.stderr
    assert "dead_after" in r.stderr
    assert "pairs[0].nodes[0].name" in r.stderr


def test_config_check_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    r = run_vtlha(["config", "check", str(missing)])
    assert r.returncode == 2
    assert str(missing) in r.stderr
