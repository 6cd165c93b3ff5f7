"""What the lab benchmarks share (``keepalived_compare.py``, ``failover.py``): keepalived in
a namespace lab of its own, and the checks made from inside namespaces and from the
client's namespace.

keepalived's lab (``KaLab``): two nodes and a client on one bridge in a switch namespace,
the addresses of ``examples/cluster.yaml``'s data network (node-a 198.51.100.1, node-b
.2, the client .200, the VIP 198.51.100.101/32 on ``eth0``: node-a's data address),
VRRPv3 with node-a the master (priority 150) and node-b the backup (100).

"Answering" is DESIGN.md's definition: configured on an up link AND, where a fence table
exists, in its held set (keepalived's nodes have none, so configured = answering), polled
from inside each node's namespace by ``vtlha_lab.observer`` (``observer`` here, or
``vtlha_lab.lab.OverlapObserver`` for a ``Lab``), and cross-checked from the client's
namespace (``client_view``): an ARP request for the address (which nodes reply) and a
TCP connect through each node's MAC (a permanent neighbour entry): a reply or a RST is an
answer, silence is not. Every wait is bounded."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vtlha.fence import TABLE, parse_held  # noqa: E402
from vtlha.priority import raise_priority  # noqa: E402
from vtlha_lab.netns import socket_in  # noqa: E402
from vtlha_lab.probes import arp_responders as _arp_responders  # noqa: E402

LOG = logging.getLogger("bench.labkit")
EXAMPLE = ROOT / "examples" / "cluster.yaml"
PORT = 7000  # the TCP responder (``vtlha_lab.probes serve``) on every node
VIP = "198.51.100.101"  # node-a's data address in examples/cluster.yaml; keepalived's VIP
NODES = ("node-a", "node-b")


# ---- checks from inside a namespace and from the client ------------------------------


def sh(*argv: str, timeout: float = 10, check: bool = True) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                       check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def wait_for(pred: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
        except OSError:
            v = None
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def configured(ns: str, addr: str = VIP) -> bool:
    """The address is configured in the namespace (any link)."""
    return f" {addr}/" in sh("ip", "-n", ns, "-o", "-4", "addr", "show")


def fenced(ns: str, addr: str = VIP) -> bool | None:
    """The address is in the node's fence held set (None: the node has no fence)."""
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "set", "inet", TABLE,
                        "held"], capture_output=True, text=True, timeout=10, check=False)
    return addr in parse_held(r.stdout) if r.returncode == 0 else None


def mac_of(ns: str, ifname: str = "eth0") -> str:
    out = sh("ip", "-n", ns, "-o", "link", "show", ifname).split()
    return out[out.index("link/ether") + 1]


def arp_responders(ns: str, src_ip: str, target: str = VIP, ifname: str = "eth0",
                   wait: float = 0.3) -> set[str]:
    return _arp_responders(ns, src_ip, target, ifname, wait)


def tcp_via(ns: str, mac: str, ip: str = VIP, port: int = PORT,
            timeout: float = 0.3, ifname: str = "eth0") -> str:
    """Connect to ip:port from ``ns`` with the neighbour entry for ``ip`` pinned to
    ``mac``: 'served <name>' or 'refused (RST)' (both: that node answers) or 'no answer'."""
    sh("ip", "-n", ns, "neigh", "replace", ip, "lladdr", mac, "dev", ifname, "nud",
       "permanent")
    try:
        s = socket_in(ns)
        try:
            s.settimeout(timeout)
            s.connect((ip, port))
            return f"served {s.recv(64).decode().strip()}"
        except ConnectionRefusedError:
            return "refused (RST)"
        except OSError:
            return "no answer"
        finally:
            s.close()
    finally:
        sh("ip", "-n", ns, "neigh", "del", ip, "dev", ifname, check=False)


def answers(tcp: str) -> bool:
    return tcp != "no answer"


def client_view(client_ns: str, client_ip: str, macs: dict[str, str], addr: str = VIP,
                ifname: str = "eth0") -> dict[str, Any]:
    """Who answers for ``addr`` as seen from the client: ARP and TCP per node (``macs``:
    node -> its MAC on that network)."""
    arp = arp_responders(client_ns, client_ip, addr, ifname)
    by_mac = {m: n for n, m in macs.items()}
    tcp = {n: tcp_via(client_ns, m, addr, ifname=ifname) for n, m in macs.items()}
    return {"arp_replies_from": sorted(by_mac.get(m, m) for m in arp), "tcp": tcp}


def two_answering(view: dict[str, Any]) -> bool:
    """A ``client_view`` in which two nodes answered (ARP replies or TCP through MACs)."""
    return len(view["arp_replies_from"]) > 1 or sum(map(answers, view["tcp"].values())) > 1


def first_change(holders: list[Any], since: float,
                 test: Callable[[set[str]], bool]) -> float | None:
    """From the observer's history of one address ((time, "node,node") at each change):
    the first time at or after ``since`` at which ``test(answering nodes)`` holds."""
    def who(h: Any) -> set[str]:
        return set(filter(None, str(h[1]).split(",")))

    before = [h for h in holders if float(h[0]) <= since]
    if before and test(who(before[-1])):
        return since
    for h in holders:
        if float(h[0]) > since and test(who(h)):
            return float(h[0])
    return None


def overlap_s(overlaps: list[Any]) -> float:
    return sum(float(o[1]) - float(o[0]) for o in overlaps)


@contextlib.contextmanager
def observer(nodes: dict[str, str], address: str, out: Path, interval: float = 0.01,
             nice: int | None = None) -> Iterator[dict[str, Any]]:
    """``vtlha_lab.observer`` over these namespaces (what OverlapObserver does for a Lab;
    with ``nice``, at that priority as OverlapObserver runs it)."""
    argv = [sys.executable, "-m", "vtlha_lab.observer", "--out", str(out), "--interval",
            str(interval), "--address", address]
    for n, ns in nodes.items():
        argv += ["--node", f"{n}={ns}"]
    proc = subprocess.Popen(argv)
    if nice is not None:
        raise_priority(nice, LOG, proc.pid)
    result: dict[str, Any] = {}
    try:
        ready = Path(str(out) + ".ready")
        deadline = time.monotonic() + 15
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the observer did not start polling")
            time.sleep(0.01)
        yield result
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        result.update(json.loads(out.read_text()))
        if result.get("errors"):
            raise RuntimeError(f"the observer failed: {result['errors']}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# ---- keepalived ----------------------------------------------------------------------


def ensure_keepalived() -> str:
    """keepalived's version line; installs the Debian package first when it is missing
    (root and apt-get), and says so."""
    if shutil.which("keepalived") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            sys.exit("keepalived is not installed and cannot be installed here (needs root "
                     "and apt-get): apt-get install -y keepalived")
        print("keepalived is missing: installing it (apt-get install -y keepalived)",
              flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "keepalived"], env=env,
                           timeout=600, check=False)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600, check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "keepalived"], env=env,
                           timeout=600, check=True)
    out = subprocess.run(["keepalived", "--version"], capture_output=True, text=True,
                         timeout=10, check=False)
    return (out.stdout + out.stderr).splitlines()[0].strip()


KA_CONF = """global_defs {{
  router_id {name}
  vrrp_version 3
}}
vrrp_instance VI_1 {{
  state {state}
  interface eth0
  virtual_router_id 51
  priority {prio}
  advert_int {advert}
  virtual_ipaddress {{
    {vip}/32 dev eth0
  }}
}}
"""


class KaLab:
    """Two keepalived nodes and a client on a bridge in a switch namespace."""

    ADDR = {"node-a": "198.51.100.1/24", "node-b": "198.51.100.2/24",
            "client": "198.51.100.200/24"}

    def __init__(self, work: Path, prefix: str = "kacmp") -> None:
        self.work = work
        lab_id = secrets.token_hex(3)
        self.ns = {h: f"{prefix}-{lab_id}-{h}" for h in ("sw", *NODES, "client")}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ka: dict[str, subprocess.Popen[bytes]] = {}
        #: host -> its processes (keepalived and what the benchmark runs there)
        self.of_host: dict[str, list[subprocess.Popen[bytes]]] = {}

    def build(self) -> None:
        for name in self.ns.values():
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sw = self.ns["sw"]
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for i, h in enumerate((*NODES, "client")):
            sh("ip", "-n", sw, "link", "add", f"p{i}", "type", "veth", "peer", "name",
               "eth0", "netns", self.ns[h])
            sh("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", self.ns[h], "addr", "add", self.ADDR[h], "dev", "eth0")
            sh("ip", "-n", self.ns[h], "link", "set", "eth0", "up")

    def spawn(self, host: str, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{host}-{name}.log", "ab")  # noqa: SIM115 - the child's
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[host], *argv], stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(p)
        self.of_host.setdefault(host, []).append(p)
        return p

    def start_keepalived(self, host: str, advert: float, master: bool,
                         nice: int | None = None) -> None:
        """keepalived on ``host``; with ``nice``, at that scheduling priority (the one
        vtl-ha's services run at, ``scheduling.nice``), set before it starts so that its
        VRRP child inherits it."""
        conf = self.work / f"{host}.conf"
        conf.write_text(KA_CONF.format(name=host.replace("-", "_"),
                                       state="MASTER" if master else "BACKUP",
                                       prio=150 if master else 100, advert=advert, vip=VIP))
        prefix = [] if nice is None else [sys.executable, "-m", "vtlha.priority", str(nice)]
        self.ka[host] = self.spawn(host, "keepalived", [
            *prefix, "keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp",
            "--use-file", str(conf), "--pid", str(self.work / f"{host}.pid"),
            "--vrrp_pid", str(self.work / f"{host}-vrrp.pid")])

    def kill_keepalived(self, host: str) -> None:
        """SIGKILL the whole keepalived of a node (parent and VRRP child, one group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.ka[host].pid, signal.SIGKILL)
        self.ka[host].wait(5)

    def signal_host(self, host: str, sig: int) -> None:
        """``sig`` to every process group the lab started on ``host``."""
        for p in self.of_host.get(host, []):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        if sig == signal.SIGKILL:
            for p in self.of_host.get(host, []):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)

    def set_link(self, host: str, up: bool) -> None:
        sh("ip", "-n", self.ns[host], "link", "set", "eth0", "up" if up else "down")

    def teardown(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        for name in self.ns.values():  # anything still inside (started by this lab)
            if os.path.exists(f"/run/netns/{name}"):
                for pid in sh("ip", "netns", "pids", name, check=False).split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
        for name in self.ns.values():
            deadline = time.monotonic() + 5
            while os.path.exists(f"/run/netns/{name}") and time.monotonic() < deadline:
                sh("ip", "netns", "del", name, check=False)
                if os.path.exists(f"/run/netns/{name}"):
                    time.sleep(0.05)
            if os.path.exists(f"/run/netns/{name}"):
                print(f"WARNING: namespace {name} could not be removed", file=sys.stderr)
