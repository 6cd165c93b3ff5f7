"""The rendered systemd units under a real systemd (root, podman; ``make
test-containers``, ``tests/integration/test_systemd_units.py``).

This machine has no systemd as PID 1, so the units run in a container that has one: the
systemd host image (``make systemd-host-image``: Debian bookworm with systemd, podman
and runc from an mmdebstrap tarball, built offline like the runtime image) started with
``podman run --systemd=always --privileged``, in a network namespace of its own. Inside
it, the units ``vtlha deploy render`` wrote for every host of the container cluster
(``vtlha_lab.containers``: the recording IP backend, bus credentials, TLS) are copied to
``/etc/systemd/system`` and started with ``systemctl``; their ``podman run`` (nested)
runs the runtime image, loaded into the inner podman's store (a directory under the
work directory: overlay is not stacked on overlay). The work directory is mounted at
the same path inside, so the units' mounts find the files they name, and the inner
podman reads ``deploy/podman/containers.conf`` as its system configuration (what this
kind of machine needs: runc, ulimits).

From here: ``systemctl`` and the inner ``podman`` through ``podman exec``; each
service's ``/healthz`` and the KV from inside the namespace.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns

from vtlha.containers import Container
from vtlha.healthz import check
from vtlha_lab import netns as ns_util
from vtlha_lab.containers import CONTAINERS_CONF, ContainerCluster, podman

T = TypeVar("T")

HOST_IMAGE = os.environ.get("VTLHA_SYSTEMD_HOST_IMAGE",
                            "localhost/vtlha-systemd-host:bookworm")
PREFIX = "vtlha-sd-"


class SystemdHost:
    """The container cluster's units in one systemd container (see the module's doc)."""

    def __init__(self, work: Path, image: str, host_image: str = HOST_IMAGE) -> None:
        self.work = work
        self.host_image = host_image
        self.id = secrets.token_hex(3)
        self.name = f"{PREFIX}{self.id}"  # the systemd container and its namespace
        self.ctr = ContainerCluster(work, image, compose="")
        self.store = work / "inner-storage"

    # ---- set-up --------------------------------------------------------------
    def start(self, boot_timeout: float = 120) -> None:
        """Render, create the namespace, boot systemd, load the runtime image inside."""
        self.ctr.prepare()
        netns.create(self.name)
        with IPRoute(netns=self.name, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        self.store.mkdir()
        image_tar = self.work / "image.tar"
        podman("save", "-q", "-o", str(image_tar), self.ctr.image, timeout=300)
        # The host's cgroup tree at its own place: on cgroup v1 (this host) the nested
        # runc otherwise looks for the container's cgroups where podman's private
        # /sys/fs/cgroup does not have them ("error mounting cgroup ... no such file")
        podman("run", "-d", "--name", self.name, "--systemd=always", "--privileged",
               "--network", f"ns:{ns_util.NETNS_RUN_DIR}/{self.name}",
               "--volume", "/sys/fs/cgroup:/sys/fs/cgroup",
               "--volume", f"{self.work}:{self.work}",
               "--volume", f"{self.store}:/var/lib/containers",
               "--volume", f"{CONTAINERS_CONF}:/etc/containers/containers.conf:ro",
               self.host_image, "/sbin/init")
        # (asked too early, systemctl finds no bus yet)
        state = self.wait_for(lambda: self.run("systemctl", "is-system-running", "--wait",
                                               timeout=boot_timeout, check_rc=False).strip(),
                              boot_timeout, "systemd to boot")
        if state not in ("running", "degraded"):
            raise RuntimeError(f"systemd in {self.name} is {state!r}")
        self.run("podman", "load", "-q", "-i", str(image_tar), timeout=300)
        image_tar.unlink()
        units = sorted(p for d in (self.work / "deploy" / "systemd").iterdir()
                       for p in d.glob("*.service"))
        self.run("cp", *map(str, units), "/etc/systemd/system/")
        self.run("systemctl", "daemon-reload")

    def run(self, *argv: str, timeout: float = 120, check_rc: bool = True) -> str:
        """A command inside the systemd container; its stdout."""
        r = subprocess.run(["podman", "exec", self.name, *argv], capture_output=True,
                           text=True, timeout=timeout,
                           env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
        if check_rc and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.name}: exit {r.returncode}: "
                               f"{r.stdout.strip()} {r.stderr.strip()}")
        return r.stdout

    # ---- the units -----------------------------------------------------------
    def unit(self, c: Container) -> str:
        return f"{c.name}.service"

    def start_units(self, timeout: float = 300) -> None:
        """The witness's units first (its arbiter is the preferred one), then the
        nodes'; ``systemctl start`` returns once each container is up (Type=notify)."""
        cfg = self.ctr.cfg
        for host in [cfg.witness.host, *(n.name for n in cfg.nodes)]:
            self.run("systemctl", "start", *(self.unit(c) for c in self.ctr.containers(host)),
                     timeout=timeout)

    def show(self, c: Container, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", self.unit(c), "-p", ",".join(props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def inner_running(self) -> list[str]:
        """The names of the containers the inner podman runs."""
        return self.run("podman", "ps", "--format", "{{.Names}}").split()

    def crash(self, c: Container) -> None:
        """SIGKILL container ``c``'s service (the child of its init, tini) from inside
        it: the container exits as if the service crashed (and the exec with it: its
        exit status says nothing)."""
        self.run("podman", "exec", c.name, "sh", "-c",
                 "kill -KILL $(cat /proc/1/task/1/children)", check_rc=False)

    # ---- inside the namespace -------------------------------------------------
    def in_ns(self, fn: Any, timeout: float = 30) -> Any:
        return ns_util.in_netns(self.name, fn, timeout=timeout)

    def healthy(self, c: Container) -> bool:
        return bool(self.in_ns(lambda: check(c.health_url or "", timeout=1.0)[0]))

    def wait_healthy(self, timeout: float) -> float:
        return self.ctr.wait_healthy(timeout, self.healthy)

    def held_by(self) -> dict[str, str]:
        """group -> owner from the KV (as the operator, inside the namespace)."""
        lab = self.ctr.client()
        return dict(self.in_ns(lab.held_by))

    def wait_for(self, predicate: Any, timeout: float, what: str,
                 interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, TimeoutError, RuntimeError):
                value = predicate()
                if value:
                    return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(interval)

    # ---- tear-down -------------------------------------------------------------
    def stop(self) -> list[str]:
        """Remove the systemd container (and with it everything it ran) and the
        namespace. Returns what is left (nothing)."""
        podman("rm", "-f", "-t", "0", self.name, check_rc=False, timeout=120)
        with contextlib.suppress(OSError):
            if ns_util.exists(self.name):
                netns.remove(self.name)
        left = [self.name] if subprocess.run(
            ["podman", "container", "exists", self.name], timeout=60,
            env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}).returncode == 0 else []
        return left + ([self.name + " (netns)"] if ns_util.exists(self.name) else [])
