"""SIGKILL comparison, side by side in one run: vtl-ha's kernel fence vs keepalived.

A process that is SIGKILLed cannot remove the address it added. keepalived has no fence:
its killed master keeps the VIP configured on an up link, so it keeps answering while
the backup takes over. vtl-ha's ip-manager refreshes an nftables fence only on valid lease
notices, so a killed ip-manager's node stops answering within lease_ttl although the
address stays configured. "Answering" is DESIGN.md's definition (configured on an up
link AND, where a fence table exists, in its held set), polled from inside each node's
namespace by ``vtlha_lab.observer`` (the same observer for both systems; keepalived's nodes
have no fence table, so configured = answering), and cross-checked from the client's
namespace: an ARP request for the address (which nodes reply) and a TCP connect through
each node's MAC (a permanent neighbour entry): a reply or a RST is an answer, silence is
not.

  vtl-ha  (a Lab of examples/cluster.yaml in network namespaces, one per trial)
    ip-manager   SIGKILL node-a's ip-manager alone; after --leases leases: configured?
                 answering? Then (the heartbeat-stop step) SIGKILL node-a's heartbeat:
                 failover time = heartbeat kill -> node-b answers.
    whole node   SIGKILL every process of node-a, links up (Lab.crash(cut_links=False)):
                 failover time = kill -> node-b answers.
  keepalived (its own lab: two nodes and a client on a bridge in a switch namespace,
              VRRPv3, VIP 198.51.100.101/32 on eth0, one trial per lab)
    SIGKILL      SIGKILL the master's keepalived (its process group: parent and VRRP
                 child) at each --advert-int: failover time = kill -> backup holds the
                 VIP; then configured on both? answering on both?

keepalived is installed with apt-get when it is missing (root, Debian), and the script
says so. Every wait is bounded, and the whole run is bounded by --max-seconds (the
keepalived processes are killed and every namespace removed, also on error).

    .venv/bin/python bench/keepalived_compare.py [--trials 3] [--advert-int 0.1 1]  (root)

Prints a table and writes JSON to bench/results/keepalived-compare-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import save_results  # noqa: E402
from vtlha.fence import TABLE, parse_held  # noqa: E402
from vtlha_lab.lab import Lab, OverlapObserver  # noqa: E402
from vtlha_lab.netns import socket_in  # noqa: E402
from vtlha_lab.probes import arp_responders as _arp_responders  # noqa: E402

EXAMPLE = ROOT / "examples" / "cluster.yaml"
PORT = 7000
VIP = "198.51.100.101"  # node-a's data address in examples/cluster.yaml; keepalived's VIP
NODES = ("node-a", "node-b")


class BenchTimeout(Exception):
    pass


# ---- helpers shared by both labs -------------------------------------------------


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
            timeout: float = 0.3) -> str:
    """Connect to ip:port from ``ns`` with the neighbour entry for ``ip`` pinned to
    ``mac``: 'served <name>' or 'refused (RST)' (both: that node answers) or 'no answer'."""
    sh("ip", "-n", ns, "neigh", "replace", ip, "lladdr", mac, "dev", "eth0", "nud",
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
        sh("ip", "-n", ns, "neigh", "del", ip, "dev", "eth0", check=False)


def answers(tcp: str) -> bool:
    return tcp != "no answer"


def client_view(client_ns: str, client_ip: str, macs: dict[str, str]) -> dict[str, Any]:
    """Who answers for the VIP as seen from the client: ARP and TCP per node."""
    arp = arp_responders(client_ns, client_ip)
    by_mac = {m: n for n, m in macs.items()}
    tcp = {n: tcp_via(client_ns, m) for n, m in macs.items()}
    return {"arp_replies_from": sorted(by_mac.get(m, m) for m in arp), "tcp": tcp}


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


# ---- vtl-ha ----------------------------------------------------------------------


def ours_trial(case: str, work: Path, leases: int) -> dict[str, Any]:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["state_dir"] = str(work / "state")
    raw["cluster"] = "bench-kacmp"
    cfg = work / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    lab = Lab(cfg, work)
    try:
        t_start = time.monotonic()
        lab.start()
        a_ns, b_ns, c_ns = lab.ns("node-a"), lab.ns("node-b"), lab.ns("client")
        lab.wait_for(lambda: lab.home_held() and configured(a_ns) and fenced(a_ns), 60,
                     what="node-a serving (configured and fenced in) its data address")
        for n in NODES:
            lab.spawn_in(n, "serve", [sys.executable, "-m", "vtlha_lab.probes", "serve",
                                      "--port", str(PORT), "--name", n])
        macs = {n: lab.mac(n) for n in NODES}
        client_ip = next(a for a in lab.addresses("client")
                         if a.startswith("198.51.100.")).split("/")[0]
        wait_for(lambda: tcp_via(c_ns, macs["node-a"]) == "served node-a", 10,
                 "the client served by node-a", interval=0.05)
        ready_s = time.monotonic() - t_start
        ttl = lab.cfg.timings.lease_ttl
        r: dict[str, Any] = {"lab_ready_s": ready_s, "lease_ttl_s": ttl}
        r["before"] = client_view(c_ns, client_ip, macs)
        with OverlapObserver(lab) as obs:
            t0 = time.monotonic()
            if case == "ip-manager":
                lab.procs.find("node-a", "ip-manager").signal(signal.SIGKILL)
            else:
                r["killed"] = lab.crash("node-a", cut_links=False)
            time.sleep(leases * ttl)
            r["after_s"] = time.monotonic() - t0
            r["a_configured"] = configured(a_ns)
            r["a_fenced"] = bool(fenced(a_ns))
            r["during"] = client_view(c_ns, client_ip, macs)
            r["a_answering"] = (r["a_configured"] and r["a_fenced"]) or \
                "node-a" in r["during"]["arp_replies_from"] or \
                answers(r["during"]["tcp"]["node-a"])
            if case == "ip-manager":
                # the backstop: the address's kernel lifetime (valid_lft) runs out
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda: not configured(a_ns), 6, "the backstop", 0.02)
                r["a_address_gone_s"] = (None if configured(a_ns)
                                         else time.monotonic() - t0)
                t1 = time.monotonic()
                lab.procs.find("node-a", "heartbeat").signal(signal.SIGKILL)
            else:
                t1 = t0
            wait_for(lambda: configured(b_ns) and fenced(b_ns), 30,
                     "node-b answering for node-a's address", 0.01)
            if case != "ip-manager":
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda: not configured(a_ns), 6, "the backstop", 0.02)
                r["a_address_gone_s"] = (None if configured(a_ns)
                                         else time.monotonic() - t0)
            time.sleep(2 * ttl)
            r["after_failover"] = client_view(c_ns, client_ip, macs)
        holders = obs.holders.get(f"{VIP}/32", [])
        a_stop = first_change(holders, t0, lambda who: "node-a" not in who)
        b_start = first_change(holders, t1, lambda who: "node-b" in who)
        r |= {"observer_samples": obs.samples, "observer_max_gap_s": obs.max_gap,
              "overlaps": obs.overlaps, "both_answering": bool(obs.overlaps),
              "a_stopped_answering_s": None if a_stop is None else a_stop - t0,
              "failover_s": None if b_start is None else b_start - t1,
              "failover_from": "heartbeat SIGKILL" if case == "ip-manager" else "crash"}
        # Never two answering in any client check either.
        r["both_answering"] |= any(
            len(v["arp_replies_from"]) > 1 or sum(map(answers, v["tcp"].values())) > 1
            for v in (r["before"], r["during"], r["after_failover"]))
        return r
    finally:
        lab.stop()


# ---- keepalived --------------------------------------------------------------------


def ensure_keepalived() -> str:
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

    def __init__(self, work: Path) -> None:
        self.work = work
        lab_id = secrets.token_hex(3)
        self.ns = {h: f"kacmp-{lab_id}-{h}" for h in ("sw", *NODES, "client")}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ka: dict[str, subprocess.Popen[bytes]] = {}

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
        return p

    def start_keepalived(self, host: str, advert: float, master: bool) -> None:
        conf = self.work / f"{host}.conf"
        conf.write_text(KA_CONF.format(name=host.replace("-", "_"),
                                       state="MASTER" if master else "BACKUP",
                                       prio=150 if master else 100, advert=advert, vip=VIP))
        self.ka[host] = self.spawn(host, "keepalived", [
            "keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp",
            "--use-file", str(conf), "--pid", str(self.work / f"{host}.pid"),
            "--vrrp_pid", str(self.work / f"{host}-vrrp.pid")])

    def kill_keepalived(self, host: str) -> None:
        """SIGKILL the whole keepalived of a node (parent and VRRP child, one group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.ka[host].pid, signal.SIGKILL)
        self.ka[host].wait(5)

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


@contextlib.contextmanager
def observer(nodes: dict[str, str], address: str, out: Path,
             interval: float = 0.01) -> Iterator[dict[str, Any]]:
    """``vtlha_lab.observer`` over these namespaces (what OverlapObserver does for a Lab)."""
    argv = [sys.executable, "-m", "vtlha_lab.observer", "--out", str(out), "--interval",
            str(interval), "--address", address]
    for n, ns in nodes.items():
        argv += ["--node", f"{n}={ns}"]
    proc = subprocess.Popen(argv)
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


def keepalived_trial(advert: float, work: Path) -> dict[str, Any]:
    lab = KaLab(work)
    try:
        t_start = time.monotonic()
        lab.build()
        a_ns, b_ns, c_ns = lab.ns["node-a"], lab.ns["node-b"], lab.ns["client"]
        for n in NODES:
            lab.spawn(n, "serve", [sys.executable, "-m", "vtlha_lab.probes", "serve",
                                   "--port", str(PORT), "--name", n])
        lab.start_keepalived("node-a", advert, master=True)
        wait_for(lambda: configured(a_ns), 20, "node-a (keepalived master) holding the VIP",
                 0.02)
        lab.start_keepalived("node-b", advert, master=False)
        settle = max(1.5, 5 * advert)  # node-b hears adverts and stays backup
        time.sleep(settle)
        if configured(b_ns) or not configured(a_ns):
            raise RuntimeError("keepalived did not settle with node-a master, node-b backup")
        macs = {n: mac_of(lab.ns[n]) for n in NODES}
        client_ip = KaLab.ADDR["client"].split("/")[0]
        wait_for(lambda: tcp_via(c_ns, macs["node-a"]) == "served node-a", 10,
                 "the client served by node-a", interval=0.05)
        r: dict[str, Any] = {"lab_ready_s": time.monotonic() - t_start, "advert_int_s": advert}
        r["before"] = client_view(c_ns, client_ip, macs)
        with observer({n: lab.ns[n] for n in NODES}, f"{VIP}/32",
                      work / "observer.json") as obs:
            t0 = time.monotonic()
            lab.kill_keepalived("node-a")
            wait_for(lambda: configured(b_ns), 10 + 5 * advert,
                     "node-b (keepalived backup) holding the VIP", 0.002)
            t_b = time.monotonic()
            time.sleep(max(1.0, 3 * advert))  # a few adverts later: settled
            r["after_s"] = time.monotonic() - t0
            r["a_configured"] = configured(a_ns)
            r["b_configured"] = configured(b_ns)
            r["during"] = client_view(c_ns, client_ip, macs)
            r["a_answering"] = r["a_configured"] or \
                "node-a" in r["during"]["arp_replies_from"] or \
                answers(r["during"]["tcp"]["node-a"])
        holders = obs["history"].get(f"{VIP}/32", [])
        b_start = first_change(holders, t0, lambda who: "node-b" in who)
        r |= {"observer_samples": obs["samples"], "observer_max_gap_s": obs["max_gap"],
              "overlaps": obs["overlaps"], "overlap_s": overlap_s(obs["overlaps"]),
              "failover_s": None if b_start is None else b_start - t0,
              "failover_polled_s": t_b - t0,
              "both_answering": bool(obs["overlaps"]) or any(
                  len(v["arp_replies_from"]) > 1
                  or sum(map(answers, v["tcp"].values())) > 1
                  for v in (r["before"], r["during"]))}
        logs = (work / "node-b-keepalived.log").read_text(errors="replace")
        r["backup_log_master"] = "Entering MASTER STATE" in logs
        return r
    finally:
        lab.teardown()


# ---- the run -------------------------------------------------------------------------


def run_trials(label: str, n: int, fn: Callable[[Path], dict[str, Any]],
               deadline: float, out: list[dict[str, Any]]) -> None:
    """Up to ``n`` trials, each in a fresh work directory; results appended to ``out``
    as they come (a BenchTimeout leaves the finished ones there)."""
    for i in range(n):
        if time.monotonic() > deadline:
            print(f"  {label}: out of time, {n - i} trial(s) skipped", flush=True)
            break
        work = Path(tempfile.mkdtemp(prefix="vtlha-kacmp-"))
        t = time.monotonic()
        try:
            r = fn(work)
        except BenchTimeout:
            print(f"  {label} trial {i + 1}: stopped (--max-seconds); files in {work}",
                  flush=True)
            raise
        except Exception as exc:
            print(f"  {label} trial {i + 1}/{n}: FAILED: {exc!r}; files in {work}", flush=True)
            out.append({"error": repr(exc), "work_dir": str(work)})
            continue
        r["trial_s"] = time.monotonic() - t
        shutil.rmtree(work, ignore_errors=True)
        fo = r.get("failover_s")
        print(f"  {label} trial {i + 1}/{n}: left configured={r['a_configured']}, "
              f"killed node answering={r['a_answering']}, both answering="
              f"{r['both_answering']}, failover "
              f"{'-' if fo is None else f'{fo * 1000:.0f} ms'} ({r['trial_s']:.0f} s)",
              flush=True)
        out.append(r)


def yes_count(rows: list[dict[str, Any]], key: str) -> str:
    ok = [r for r in rows if "error" not in r]
    k = sum(bool(r[key]) for r in ok)
    word = "yes" if k == len(ok) and ok else "no" if k == 0 else "mixed"
    return f"{word} {k}/{len(ok)}"


def ms_summary(xs: list[float | None]) -> dict[str, Any] | None:
    v = [x for x in xs if x is not None]
    if not v:
        return None
    return {"p50_ms": statistics.median(v) * 1000, "min_ms": min(v) * 1000,
            "max_ms": max(v) * 1000, "all_ms": [x * 1000 for x in v]}


def fmt_ms(s: dict[str, Any] | None) -> str:
    if s is None:
        return "-"
    return f"{s['p50_ms']:.0f} ms ({s['min_ms']:.0f}-{s['max_ms']:.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3, help="trials per row (default 3)")
    ap.add_argument("--advert-int", type=float, nargs="+", default=[0.1, 1.0],
                    help="keepalived advert_int values (default 0.1 1)")
    ap.add_argument("--leases", type=int, default=3,
                    help="vtl-ha: leases to wait after the kill before looking (default 3)")
    ap.add_argument("--no-whole-node", action="store_true",
                    help="skip vtl-ha's whole-node SIGKILL case")
    ap.add_argument("--max-seconds", type=int, default=1800,
                    help="the whole run stops (cleaning up) after this long (default 1800)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("keepalived_compare.py needs root (network namespaces, nftables, keepalived)")
    t_run = time.monotonic()
    ka_version = ensure_keepalived()

    def _alarm(*_: object) -> None:
        signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
        signal.alarm(120)  # cleanup itself must not hang either
        raise BenchTimeout(f"--max-seconds {args.max_seconds} reached")

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.max_seconds)
    deadline = t_run + args.max_seconds * 0.8  # start no trial after this
    load0 = os.getloadavg()
    rows: list[tuple[str, str, str, list[dict[str, Any]]]] = []

    def row(system: str, case: str, what: str, label: str,
            fn: Callable[[Path], dict[str, Any]]) -> None:
        rs: list[dict[str, Any]] = []
        rows.append((system, case, what, rs))
        run_trials(label, args.trials, fn, deadline, rs)

    stopped = None
    try:
        print(f"vtl-ha: SIGKILL node-a's ip-manager ({args.trials} trials)", flush=True)
        row("vtl-ha", "ip-manager SIGKILL", "heartbeat kill -> companion answers",
            "vtl-ha ip-manager", lambda w: ours_trial("ip-manager", w, args.leases))
        if not args.no_whole_node:
            print(f"vtl-ha: SIGKILL every process of node-a, links up ({args.trials} trials)",
                  flush=True)
            row("vtl-ha", "whole node SIGKILL", "kill -> companion answers",
                "vtl-ha whole node", lambda w: ours_trial("crash", w, args.leases))
        print(f"keepalived ({ka_version}): SIGKILL the master's keepalived", flush=True)
        for adv in args.advert_int:
            row("keepalived", f"SIGKILL, advert_int {adv:g} s", "kill -> backup holds VIP",
                f"keepalived advert_int {adv:g}", lambda w, a=adv: keepalived_trial(a, w))
    except BenchTimeout as exc:
        stopped = str(exc)
        print(f"STOPPED: {stopped}; the table below has the trials that finished",
              flush=True)
    finally:
        signal.alarm(0)
    elapsed = time.monotonic() - t_run

    head = (f"{'system':<11} {'case':<26} {'trials':>6}  {'left configured':<16} "
            f"{'killed answers':<15} {'both answering':<15} {'failover p50 (min-max)':<24} "
            f"measured")
    print()
    print(head)
    print("-" * len(head))
    table = []
    for system, case, what, rs in rows:
        ok = [r for r in rs if "error" not in r]
        fo = ms_summary([r.get("failover_s") for r in ok])
        entry = {"system": system, "case": case, "trials": len(ok),
                 "failed_trials": len(rs) - len(ok),
                 "address_left_configured_on_killed_node": yes_count(rs, "a_configured"),
                 "killed_node_still_answering": yes_count(rs, "a_answering"),
                 "both_answering_at_any_instant": yes_count(rs, "both_answering"),
                 "failover": fo, "failover_measured": what, "runs": rs}
        table.append(entry)
        failed = f"+{len(rs) - len(ok)}F" if len(rs) > len(ok) else ""
        print(f"{system:<11} {case:<26} {str(len(ok)) + failed:>6}  "
              f"{entry['address_left_configured_on_killed_node']:<16} "
              f"{entry['killed_node_still_answering']:<15} "
              f"{entry['both_answering_at_any_instant']:<15} {fmt_ms(fo):<24} {what}")
    print()
    print("details (p50 over trials)")
    for e in table:
        ok = [r for r in e["runs"] if "error" not in r]
        if not ok:
            continue
        parts = [f"observer {statistics.median(r['observer_samples'] for r in ok):.0f} "
                 f"samples, longest gap "
                 f"{max(r['observer_max_gap_s'] for r in ok) * 1000:.0f} ms"]
        if e["system"] == "vtl-ha":
            stop = ms_summary([r["a_stopped_answering_s"] for r in ok])
            gone = ms_summary([r.get("a_address_gone_s") for r in ok])
            parts.append(f"node-a stopped answering {fmt_ms(stop)} after the kill "
                         f"(lease_ttl {ok[0]['lease_ttl_s'] * 1000:.0f} ms)")
            parts.append(f"backstop removed the address {fmt_ms(gone)} after the kill")
        else:
            parts.append(f"overlap {statistics.median(r['overlap_s'] for r in ok):.2f} s "
                         f"(observed until the end of each trial; it does not end)")
        d = ok[0]["during"]
        parts.append(f"client {ok[0]['after_s']:.1f} s after the kill: ARP replies from "
                     f"{d['arp_replies_from'] or 'nobody'}, TCP via node-a's MAC: "
                     f"{d['tcp']['node-a']}, via node-b's: {d['tcp']['node-b']}")
        print(f"  {e['system']} / {e['case']}: " + "; ".join(parts))
    load1 = os.getloadavg()
    print(f"\n{elapsed:.0f} s in all; load average {load0[0]:.2f} before, {load1[0]:.2f} "
          f"after, {os.cpu_count()} CPUs")

    summary = {"bench": "keepalived-compare",
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": platform.platform(), "cpus": os.cpu_count(),
               "keepalived": ka_version, "loadavg_before": load0, "loadavg_after": load1,
               "elapsed_s": elapsed, "args": vars(args), "stopped": stopped,
               "answering": "configured on an up link and, where the node has a fence, in "
                            "its held set (vtlha_lab.observer); cross-checked by ARP and TCP "
                            "per MAC from the client namespace",
               "rows": table}
    path = save_results("keepalived-compare", summary)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
