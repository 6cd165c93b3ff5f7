"""A two-node cluster and its witness as containers: the image ``make images`` builds,
run by the compose files ``vtlha deploy render`` writes, with the bus credentials it
writes (root, podman; ``make test-containers``, ``tests/integration/test_containers.py``).

Every container uses the host's network. The cluster file is ``examples/cluster.yaml``
with its ports moved to a free range below the ephemeral one, a cluster name of its own
(so the container names collide with nothing else on the host), no storage devices (the
reference SAN target is lab code, not in the image), the recording IP backend (the
addresses must not move on the host's own interfaces) and a credentials directory:
every service connects as its own NATS user, the servers run the rendered configs; and
TLS for clients and routes (a throwaway CA and a certificate for 127.0.0.1).

``run`` starts everything, waits for every service's and server's ``/healthz``, kills
node-a's heartbeat container (``podman kill``), waits for node-b to own node-a's groups
in the KV, crashes node-a's standby arbiter (SIGKILL of its process) and waits for the
supervisor (compose's ``restart: always``; ``podman kill`` counts as a stop by the user,
which no restart policy undoes) to bring it back healthy, checks the events, and removes
every container whatever happened. It returns the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vtlha.config import ClusterConfig, load_config
from vtlha.containers import IMAGE_UID, Container, HostPaths, host_containers, project_name
from vtlha.containers import render_containers as render_container_files
from vtlha.deploy import render as render_bus
from vtlha.healthz import check
from vtlha.natsauth import SEED_SUFFIX
from vtlha_lab.localcluster import LocalCluster, prepare_config
from vtlha_lab.tlsmaterial import make_tls

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
#: podman settings this kind of machine needs (runc, ulimits; docs/deploy.md)
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
#: podman-compose >= 1.6 (Debian's 1.0.3 adds a network to host-network containers);
#: `make image-deps` installs it here
TOOLS_COMPOSE = ROOT / "build" / "tools" / "bin" / "podman-compose"
#: container timings: slower than the example's 0.1 s. On a 2-core machine at load 15-20
#: (twelve containers and another test run) the example's 0.2 s executor ping timed out
#: and a healthy node was failed over (a fatal "executor ip-manager alive" check).
TIMINGS = {"heartbeat_interval": 0.25, "dead_after": 1.0, "lease_ttl": 1.0, "margin": 0.1,
           "command_timeout": 0.8, "check_interval": 1.0, "probe_interval": 0.5,
           "storage_stale_after": 1.5}


def default_image() -> str:
    from importlib.metadata import version

    return os.environ.get("VTLHA_IMAGE", f"localhost/vtlha:{version('vtlha')}")


def compose_command() -> str | None:
    """podman-compose to use: $VTLHA_PODMAN_COMPOSE, build/tools', or one on PATH."""
    for cand in (os.environ.get("VTLHA_PODMAN_COMPOSE"), str(TOOLS_COMPOSE),
                 shutil.which("podman-compose")):
        if cand and Path(cand).is_file():
            return cand
    return None


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(*args: str, check_rc: bool = True, timeout: float = 120) -> str:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(),
                       timeout=timeout)
    if check_rc and r.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def image_exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], env=podman_env(),
                          capture_output=True, timeout=60).returncode == 0


def not_ready(image: str | None = None) -> str | None:
    """What is missing to run containers here (podman, podman-compose >= 1.6, the
    image), or None. `make test-containers` provides all three: the tests fail on it,
    never skip."""
    if shutil.which("podman") is None:
        return "podman is not installed (make image-deps)"
    if compose_command() is None:
        return "podman-compose >= 1.6 not found (make image-deps)"
    image = image or default_image()
    if not image_exists(image):
        return f"no image {image} (make images)"
    return None


def write_cluster_file(work: Path, tls: bool = True, in_lab: bool = False) -> Path:
    """The container cluster's file under ``work`` (see the module's doc); with ``tls``
    a throwaway CA and a certificate for 127.0.0.1 under ``work/tls``. ``in_lab``: for
    the network lab (``vtlha_lab.containerlab``): the netlink IP backend (addresses move
    in the lab's namespaces), and the credentials and TLS left to ``Lab.secure``."""
    path = prepare_config(EXAMPLE, work, cluster=f"ctr{secrets.token_hex(3)}")
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    raw["timings"].update(TIMINGS)
    raw.pop("devices", None)
    raw.pop("san", None)
    for pair in raw["pairs"]:
        for node in pair["nodes"]:
            node["groups"]["data"]["devices"] = []
    if not in_lab:
        raw["ip"] = {"backend": "recording"}
        raw["nats"]["credentials_dir"] = str(work / "creds")
        if tls:
            raw["nats"]["tls"] = make_tls(work / "tls")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_config(path)  # valid
    return path


@dataclass
class ContainerCluster:
    """Every host's containers from the rendered compose files. ``networks``: host ->
    podman network where it is not the host's (the lab: each host's namespace)."""

    work: Path
    image: str
    compose: str
    tls: bool = True
    networks: dict[str, str] = field(default_factory=dict)
    config_path: Path = field(init=False)
    cfg: ClusterConfig = field(init=False)
    figures: dict[str, Any] = field(default_factory=dict)

    def prepare(self) -> None:
        """The cluster file, the rendered bus configs, credentials, compose files and
        units; the state directories and the files the unprivileged containers read."""
        self.adopt(write_cluster_file(self.work, self.tls))
        out = self.work / "deploy"
        r = render_bus(self.cfg, out, source=str(self.config_path))
        shutil.copytree(out / "creds", self.work / "creds", dirs_exist_ok=True)
        self.render(r.written)

    def adopt(self, config_path: Path) -> None:
        """Run the cluster of ``config_path`` (its bus configs rendered under
        ``work/deploy``)."""
        self.config_path = config_path
        self.cfg = load_config(config_path)

    def paths(self) -> HostPaths:
        return HostPaths(str(self.config_path), str(self.work / "deploy"))

    def render(self, written: list[Path] | None = None) -> None:
        """Every host's compose file and units, its state directory, and the files the
        unprivileged containers (uid 10001) read owned by them."""
        out = self.work / "deploy"
        render_container_files(self.cfg, out, self.image, self.paths(),
                               [] if written is None else written, str(self.config_path),
                               self.networks)
        creds = Path(self.cfg.nats.credentials_dir or self.work / "creds")
        for host in self.cfg.hosts:
            state = self.cfg.state_path(host)
            state.mkdir(parents=True, exist_ok=True)
            os.chown(state, IMAGE_UID, IMAGE_UID)
            for c in self.containers(host):  # what an unprivileged container must read
                if c.user:
                    for path in (creds / f"{host}-{c.service}{SEED_SUFFIX}",
                                 out / "nats" / f"{host}.conf"):
                        if path.exists():
                            os.chown(path, IMAGE_UID, IMAGE_UID)
        if self.cfg.nats.tls:  # the servers (uid 10001) read their key
            os.chown(self.cfg.nats.tls.key, IMAGE_UID, IMAGE_UID)

    def containers(self, host: str | None = None) -> list[Container]:
        hosts = [host] if host else self.cfg.hosts
        return [c for h in hosts for c in host_containers(
            self.cfg, h, self.image, self.paths(), self.networks.get(h, "host"))]

    def compose_file(self, host: str) -> Path:
        return self.work / "deploy" / "compose" / f"{host}.yaml"

    def _compose(self, host: str, *args: str, timeout: float = 180) -> None:
        argv = [self.compose, "-p", project_name(self.cfg.cluster, host), "-f",
                str(self.compose_file(host)), *args]
        log = self.work / f"compose-{host}.log"
        with log.open("a") as f:
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=podman_env(),
                               timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode} (see {log})")

    def up(self) -> None:
        """Every host's containers, the witness first (its arbiter is preferred)."""
        for host in [self.cfg.witness.host, *(n.name for n in self.cfg.nodes)]:
            self._compose(host, "up", "-d")

    def down(self) -> list[str]:
        """Remove every container of the cluster (compose down, then by name whatever
        is left) and return what had to be removed by name."""
        for host in self.cfg.hosts:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._compose(host, "down", "-t", "5", timeout=120)
        left = self.existing()
        for name in left:
            podman("rm", "-f", "-t", "0", name, check_rc=False)
        return left

    def save_logs(self, into: Path) -> None:
        """Every existing container's output (``podman logs``) into ``into/<name>.log``."""
        into.mkdir(parents=True, exist_ok=True)
        for name in self.existing():
            with (into / f"{name}.log").open("wb") as f:
                subprocess.run(["podman", "logs", name], stdout=f, stderr=subprocess.STDOUT,
                               env=podman_env(), timeout=60, check=False)

    def existing(self) -> list[str]:
        """The cluster's containers that exist now (running or not)."""
        return [c.name for c in self.containers()
                if subprocess.run(["podman", "container", "exists", c.name],
                                  env=podman_env(), timeout=60).returncode == 0]

    def unhealthy(self, healthy: Callable[[Container], bool] | None = None) -> list[str]:
        """The containers whose /healthz does not answer 200 now (asked from here, or
        by ``healthy``: the lab asks inside each host's namespace)."""
        def _from_here(c: Container) -> bool:
            return check(c.health_url or "", timeout=1.0)[0]

        probe = healthy or _from_here
        return [c.name for c in self.containers() if c.health_url and not probe(c)]

    def wait_healthy(self, timeout: float,
                     healthy: Callable[[Container], bool] | None = None) -> float:
        t0 = time.monotonic()
        while True:
            bad = self.unhealthy(healthy)
            if not bad:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"not healthy after {timeout} s: {', '.join(bad)}")
            time.sleep(0.2)

    def inspect(self, name: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(podman("inspect", name))
        return data[0]

    def exec(self, name: str, *argv: str) -> tuple[int, str]:
        r = subprocess.run(["podman", "exec", name, *argv], capture_output=True, text=True,
                           env=podman_env(), timeout=60)
        return r.returncode, r.stdout.strip()

    def service_pids(self, name: str) -> list[int]:
        """The host pids of container ``name``'s service: the children of its init
        (tini); the init itself when it has none."""
        init = int(self.inspect(name)["State"]["Pid"])
        children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
        return [int(p) for p in children] or [init]

    def privileges(self, host: str) -> dict[str, Any]:
        """What ``host``'s containers really run with: each one's uid, its effective
        capabilities beyond podman's default set, whether it sees the host's processes
        (PID 1 is not its own init), the nice value its service process runs at (read
        from here), and whether the lab package is importable."""
        out: dict[str, Any] = {}
        for c in self.containers(host):
            caps = self.inspect(c.name).get("EffectiveCaps") or []
            out[c.service] = {
                "uid": self.exec(c.name, "id", "-u")[1],
                "net_caps": sorted(x for x in caps if x.startswith("CAP_NET_")
                                   and x != "CAP_NET_BIND_SERVICE"),
                "sys_nice": "CAP_SYS_NICE" in caps,
                "host_pids": self.exec(c.name, "cat", "/proc/1/comm")[1] != "tini",
                "nice": sorted({os.getpriority(os.PRIO_PROCESS, p)
                                for p in self.service_pids(c.name)}),
            }
        probe = "import importlib.util as u, sys; sys.exit(u.find_spec('vtlha_lab') is None)"
        c0 = self.containers(host)[0]
        out["lab_importable"] = self.exec(c0.name, "python3", "-c", probe)[0] == 0
        return {"privileges": out}

    def crash(self, name: str) -> None:
        """SIGKILL the service process of container ``name`` (the child of its init,
        tini) from the host: the container exits as if the service crashed."""
        for pid in self.service_pids(name):
            os.kill(pid, signal.SIGKILL)

    def processes(self, name: str) -> list[int]:
        """Every process of container ``name``: its init and all their descendants."""
        out, todo = [], [int(self.inspect(name)["State"]["Pid"])]
        while todo:
            pid = todo.pop()
            out.append(pid)
            with contextlib.suppress(OSError):  # gone meanwhile
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(p) for p in (task / "children").read_text().split()]
        return out

    def kill_host(self, host: str) -> tuple[list[str], float]:
        """Every container of ``host`` dies at once, as in a crash of its HA stack, and
        stays down: each one's processes are stopped from here (SIGSTOP: all within
        microseconds), then ``podman kill`` (a stop by the user: no restart policy brings
        them back), then every process SIGKILLed. (``podman kill`` signals a container's
        init only, which takes the other processes along only in a PID namespace of its
        own: the heartbeat's service, in the host's, outlives it until podman's clean-up
        kills the rest of its cgroup, seconds later.) Returns the containers killed and
        the moment (monotonic) they stopped."""
        names = [c.name for c in self.containers(host)]
        pids = [p for n in names for p in self.processes(n)]
        stopped = time.monotonic()
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            if sig == signal.SIGKILL:
                podman("kill", *names)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        return names, stopped

    def client(self) -> LocalCluster:
        """The lab's client helpers (KV, events) on this cluster, as the operator."""
        return LocalCluster(self.config_path, self.work)


def run(work: Path, image: str | None = None, compose: str | None = None,
        healthy_timeout: float = 120.0, failover_timeout: float = 30.0,
        tls: bool = True) -> dict[str, Any]:
    """Start the cluster, kill node-a's heartbeat, check node-b takes over, tear down.
    Returns the figures; raises on any failure (after removing everything)."""
    compose = compose or compose_command()
    if compose is None:
        raise RuntimeError("podman-compose >= 1.6 not found: run `make image-deps`")
    cc = ContainerCluster(work, image or default_image(), compose, tls)
    cc.prepare()
    f = cc.figures
    try:
        t0 = time.monotonic()
        cc.up()
        f["compose_up_s"] = round(time.monotonic() - t0, 2)
        cc.wait_healthy(healthy_timeout)
        f["start_to_healthy_s"] = round(time.monotonic() - t0, 2)
        lab = cc.client()
        lab.wait_for(lab.home_held, timeout=60, what="every group held by its home node")
        f["start_to_home_held_s"] = round(time.monotonic() - t0, 2)
        st = lab.status("node-a", "heartbeat")
        f["node_a_heartbeat_nats_auth"] = st["nats_auth"] if st else None
        f.update(cc.privileges("node-a"))
        for c in cc.containers():  # the image's health check runs inside the container
            r = subprocess.run(["podman", "healthcheck", "run", c.name], env=podman_env(),
                               capture_output=True, text=True, timeout=60)
            if c.health_url and r.returncode != 0:
                raise RuntimeError(f"podman healthcheck run {c.name}: {r.stdout}{r.stderr}")
        victim = next(c for c in cc.containers("node-a") if c.service == "heartbeat")
        t_kill = time.monotonic()
        podman("kill", victim.name)
        lab.wait_for(lambda: all(lab.held_by().get(g) == "node-b"
                                 for g in ("node-a-data", "node-a-mgmt")),
                     timeout=failover_timeout, interval=0.05,
                     what="node-b holding node-a's groups")
        f["kill_to_takeover_s"] = round(time.monotonic() - t_kill, 2)

        # The supervisor: `podman kill` counts as stopped by the user (no restart), a
        # crash does not. Crash node-a's standby arbiter (SIGKILL of its process from
        # the host): its restart policy brings it back.
        crashed = next(c for c in cc.containers("node-a") if c.service == "arbiter")
        before = int(cc.inspect(crashed.name).get("RestartCount", 0))
        t_crash = time.monotonic()
        cc.crash(crashed.name)

        def _restarted() -> bool:
            s = cc.inspect(crashed.name)
            return (int(s.get("RestartCount", 0)) > before and s["State"]["Running"]
                    and check(crashed.health_url or "", timeout=1.0)[0])

        lab.wait_for(_restarted, timeout=60, interval=0.2,
                     what=f"{crashed.name} restarted by its restart policy and healthy")
        f["crash_to_restarted_healthy_s"] = round(time.monotonic() - t_crash, 2)
        f["killed_with_podman_kill_state"] = cc.inspect(victim.name)["State"]["Status"]
        kinds = {(e.kind, e.group) for e in lab.events()}
        for want in (("node.down", None), ("failover.completed", "node-a-data")):
            if not any(k == want[0] and (want[1] is None or g == want[1]) for k, g in kinds):
                raise RuntimeError(f"no {want[0]} event{' for ' + want[1] if want[1] else ''}"
                                   f" in the stream: {sorted(map(str, kinds))}")
        f["owners_after"] = lab.held_by()
        f["cluster"] = cc.cfg.cluster
        return f
    finally:
        f["removed_by_name"] = cc.down()
        f["left_behind"] = cc.existing()
