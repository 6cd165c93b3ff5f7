"""The network lab with every host's parts in containers (root, podman; ``make
test-containers``, ``tests/integration/test_containers_lab.py``).

The lab's namespaces, bridges, veths and uplink are built as for ``Lab``; then, instead
of processes under ``ip netns exec``, each host runs the image's containers from the
compose files ``vtlha deploy render`` writes, each container joined to its host's
namespace (``network_mode: ns:/run/netns/<namespace>``). So the ip-manager moves the
floating addresses with its netlink backend and applies the nftables fence from inside
its container, in its node's namespace, as it would on a real host; the client
namespace sees them move (ARP, TCP) exactly as in the lab's other tests.

The cluster file is ``examples/cluster.yaml`` with the container timings of
``vtlha_lab.containers`` (0.25 s heartbeats, 1 s leases), no storage devices (the
reference SAN target is lab code, not in the image), the netlink IP backend, and the
bus as deployed: ``Lab.secure``'s rendered credentials and TLS. The nats-servers listen
on every address of their namespace (the test and the CLI reach the witness's through
the uplink), with their JetStream store in the host's state directory.

``stop`` removes every container before the namespaces: a container left running
would keep its namespace alive and its restart policy would bring it back.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import orjson

from vtlha import deploy
from vtlha.containers import Container
from vtlha_lab import netns as ns_util
from vtlha_lab.containers import ContainerCluster, write_cluster_file
from vtlha_lab.lab import Lab


class ContainerLab(Lab):
    """A network lab whose hosts run in containers (see the module's doc)."""

    def __init__(self, work_dir: Path, image: str, compose: str, tls: bool = True,
                 lab_id: str | None = None) -> None:
        super().__init__(write_cluster_file(work_dir, in_lab=True), work_dir, lab_id)
        self.secure(tls)  # `vtlha deploy render`: credentials, server configs, TLS
        self.ctr = ContainerCluster(
            work_dir, image, compose, tls,
            networks={h: f"ns:{ns_util.NETNS_RUN_DIR}/{self.ns(h)}" for h in self.cfg.hosts})
        self.ctr.adopt(self.config_path)
        #: containers ``stop`` had to remove by name (compose down left them)
        self.removed_by_name: list[str] = []
        #: host -> when ``crash`` stopped its containers (monotonic)
        self.crashed_at: dict[str, float] = {}

    def _server_configs(self) -> None:
        """Each server's rendered config, listening on every address of its namespace
        (its service address, loopback, the witness's uplink), its store in the host's
        state directory (what the container mounts)."""
        creds = deploy.read_credentials(Path(self.cfg.nats.credentials_dir or ""),
                                        deploy.users(self.cfg))
        out = self.work_dir / "deploy" / "nats"  # (``secure()`` writes credentials only)
        out.mkdir(parents=True, exist_ok=True)
        for host in self.cfg.nats.servers:
            text = deploy.render_server_config(
                self.cfg, host, creds, self.cfg.state_path(host) / "nats",
                str(self.config_path), bind="0.0.0.0")
            (out / f"{host}.conf").write_text(text)

    def start(self) -> None:
        """The network, then every host's containers: the witness first (its arbiter is
        the preferred one), then the nodes."""
        self.record.save()
        self.build_network()
        self._server_configs()
        self.ctr.render()
        self.ctr.up()

    def healthy(self, c: Container) -> bool:
        """Container ``c``'s /healthz answers 200, asked inside its host's namespace."""
        url = urllib.parse.urlsplit(c.health_url or "")
        try:
            status, _ = ns_util.http_get(self.ns(c.host), url.hostname or "127.0.0.1",
                                         url.port or 80, url.path, timeout=1.0)
        except (OSError, ValueError, IndexError):
            return False
        return status == 200

    def wait_healthy(self, timeout: float) -> float:
        """Every container's /healthz answering; returns how long it took."""
        return self.ctr.wait_healthy(timeout, self.healthy)

    def http_get(self, host: str, service: str, path: str, timeout: float = 1.0) -> Any:
        """A service's HTTP API inside its host's namespace, on the port the cluster
        file gives it (the containers take no --http-port)."""
        port = self.cfg.port(host, service)
        status, body = ns_util.http_get(self.ns(host), "127.0.0.1", port, path, timeout)
        if status >= 500 and path == "/status":
            raise OSError(f"{host}/{service} answered {status}")
        return orjson.loads(body)

    def crash(self, host: str, cut_links: bool = False) -> list[str]:
        """The host's HA stack dies: every one of its containers at once, for good
        (``ContainerCluster.kill_host``). Its links stay up unless ``cut_links``: whatever
        the appliance still serves there must be stopped by the fence. ``crashed_at``
        holds the moment it died."""
        killed, self.crashed_at[host] = self.ctr.kill_host(host)
        if cut_links:
            self.set_links(host, up=False)
        return killed

    def stop(self) -> None:
        if os.getpid() != self.owner_pid:
            return  # a forked helper (pyroute2 forks for namespace sockets) owns nothing
        try:
            # the namespaces must go whatever podman does
            with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
                self.ctr.save_logs(self.work_dir / "logs")
                self.removed_by_name = self.ctr.down()
        finally:
            super().stop()

    def left_behind(self) -> list[str]:
        """The lab's containers that still exist."""
        return self.ctr.existing()
