"""Client-observed failover outage in the network lab, vtl-ha beside keepalived (issue 20).

vtl-ha runs as ``vtlha_lab.lab.Lab`` of ``examples/cluster.yaml`` (its timings at a
heartbeat interval of 0.1 s; at 1 s every timing the example scales with it is scaled by
the same factor: ``bench.common.scale_timings``), node-a with one fatal process check (a
pid file). keepalived (Debian package, installed with apt-get when missing) runs in its
own namespace lab of the same shape (``bench.labkit.KaLab``: node-a master, node-b backup,
a client, one bridge) with the same address (node-a's data address 198.51.100.101) and
``advert_int`` equal to the heartbeat interval, at the services' scheduling priority. Both
are measured the same way in the same run, trial by trial in turn, from the client's
namespace: a TCP probe (``vtlha_lab.probes probe``: a connect every 5 ms, 50 ms timeout,
to a responder on every node that answers with its name) and an ARP probe (``vtlha_lab.
probes arp``: a round of requests every 10 ms); a per-node observer of what each kernel
answers for (DESIGN.md's definition) counts double holders, and right before the fault is
undone the client asks each node by its MAC (ARP and TCP) whether it still answers.

Cases (every fault hits node-a, the owner; node-b must take over):

    links       node-a's links (data and management) down        keepalived: eth0 down
    crash       every process of node-a SIGKILLed, links up        keepalived and responder
                (the fence must stop it answering)                 SIGKILLed
    frozen      every process of node-a SIGSTOPped, its            keepalived and responder
                nats-server too                                    SIGSTOPped
    fatal       node-a's fatal process check fails (its pid file   -
                removed); measured from the removal
    mgmt        node-a's management link down (the management      -
                address moves; probed on the management network)
    switchover  `vtlha switchover node-a-data` (planned)           -
    data        node-a crashes while the lab's tape client writes  -
                to its data portal: the longest gap between two
                acknowledged blocks
    split       node-a and node-b cut from each other (nftables),  the same cut
                the client and the witness reach both: nothing
                may answer twice (keepalived's partition)

The outage of a trial: ``links``, ``crash``, ``frozen``, ``fatal``, ``mgmt``: from the fault
to the first answer from node-b (TCP: a connection served by node-b; ARP: a round node-b
answered); ``switchover``: from the last answer from node-a to the first from node-b;
``data``: the longest gap between acknowledged blocks around the fault; ``split``: the
longest gap between two answers (TCP) or without an ARP answer. Per case and system:
p50/p90/p99/max, the ratio vtl-ha / keepalived, trials with two nodes answering at any
instant, and trials that ended (right before the fault was undone) with two holders.

Between trials the fault is undone and the baseline restored as the chaos suite does it
(links up, SIGCONT, dead processes started again, `vtlha clear-hold`, `vtlha failback`
until every group is served at home); one lab per interval, built again when a restore
fails. keepalived's lab is built for each trial (seconds).

Resumable: every finished trial is appended to a JSON-lines state file
(``--state``, default ``bench/results/failover-state.jsonl``); a rerun skips the trials
in it, and the table, the JSON (``bench/results/failover-<time>.json``) and the plot
(``docs/img/failover-outage.png``) cover every trial in it. Every wait is bounded;
namespaces and processes are removed on error, Ctrl-C and SIGTERM.

    .venv/bin/python bench/failover.py [--intervals 0.1 1] [--cases crash,links]
        [--trials N] [--state FILE] [--time-limit S] [--pause-file F] [--summary-only]

Needs root (network namespaces, nftables, keepalived): `sudo make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, save_results, scale_timings  # noqa: E402
from bench.labkit import (  # noqa: E402
    EXAMPLE,
    NODES,
    PORT,
    VIP,
    KaLab,
    client_view,
    configured,
    ensure_keepalived,
    fenced,
    mac_of,
    observer,
    tcp_via,
    two_answering,
    wait_for,
)
from vtlha.priority import raise_priority  # noqa: E402
from vtlha_lab.chaos.live import Tail  # noqa: E402
from vtlha_lab.probes import read_arp, read_timeline  # noqa: E402
from vtlha_lab.tapeclient import read_acks  # noqa: E402

LOG = logging.getLogger("bench.failover")
BIN = Path(sys.executable).parent
A, B = NODES
MGMT_VIP = "203.0.113.101"  # node-a's management address in examples/cluster.yaml
FAILBACK_HOLD = 2.0  # s: the pair's failback_hold_time here, as in the chaos suite
DEFAULT_TRIALS = {0.1: 30, 1.0: 10}
STATE = RESULTS / "failover-state.jsonl"
PLOT = ROOT / "docs" / "img" / "failover-outage.png"
TCP_INTERVAL, TCP_TIMEOUT, ARP_INTERVAL = 0.005, 0.05, 0.01
TAPE_INTERVAL = 0.02
EXIT_PAUSED = 75
OWNER = os.getpid()  # this process; pyroute2 forks helpers that must own nothing


@dataclass(frozen=True)
class Case:
    name: str
    does: str
    measured: str
    keepalived: bool = False
    mgmt: bool = False  # probed on the management network (node-a's management address)


CASES = {c.name: c for c in (
    Case("links", "node-a's links down", "fault -> node-b answers", keepalived=True),
    Case("crash", "every process of node-a SIGKILLed, links up", "fault -> node-b answers",
         keepalived=True),
    Case("frozen", "every process of node-a SIGSTOPped (nats-server too)",
         "fault -> node-b answers", keepalived=True),
    Case("fatal", "node-a's fatal check fails (pid file removed)",
         "check failing -> node-b answers"),
    Case("mgmt", "node-a's management link down", "fault -> node-b answers (mgmt address)",
         mgmt=True),
    Case("switchover", "`vtlha switchover node-a-data`", "last node-a -> first node-b answer"),
    Case("data", "node-a crashes under the tape client", "longest gap between acked blocks"),
    Case("split", "node-a and node-b cut from each other", "longest gap in the answers",
         keepalived=True),
)}


class Stopped(Exception):
    """Ctrl-C or SIGTERM: clean up and leave."""


# ---- what both systems share: probes, the measurement ---------------------------------


@dataclass
class Probes:
    """The client's TCP and ARP probes of one trial (processes in the client's namespace)."""

    tcp: Path
    arp: Path
    procs: list[subprocess.Popen[bytes]]

    def stop_tcp(self) -> None:
        _terminate(self.procs[:1])

    def stop(self) -> None:
        _terminate(self.procs)


def _terminate(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def probe_argvs(work: Path, addr: str, ifname: str, macs: dict[str, str],
                duration: float) -> tuple[list[str], list[str], Path, Path]:
    tcp, arp = work / "tcp.jsonl", work / "arp.jsonl"
    py = [sys.executable, "-m", "vtlha_lab.probes"]
    tcp_argv = [*py, "probe", "--target", f"{addr}:{PORT}", "--out", str(tcp), "--interval",
                str(TCP_INTERVAL), "--timeout", str(TCP_TIMEOUT), "--duration", str(duration)]
    arp_argv = [*py, "arp", "--target", addr, "--ifname", ifname, "--out", str(arp),
                "--interval", str(ARP_INTERVAL), "--duration", str(duration)]
    for n, m in macs.items():
        arp_argv += ["--mac", f"{n}={m}"]
    return tcp_argv, arp_argv, tcp, arp


def wait_answered_by(p: Probes, node: str, timeout: float = 15.0) -> None:
    """Both probes see ``node`` answering (the trial's starting point)."""
    tcp, arp = Tail(p.tcp), Tail(p.arp)
    seen = {"tcp": False, "arp": False}

    def ok() -> bool:
        for e in tcp.read():
            seen["tcp"] = bool(e.get("ok") and e.get("who") == node)
        for e in arp.read():
            if e.get("type") == "arp":
                seen["arp"] = e.get("nodes") == [node]
        return seen["tcp"] and seen["arp"]
    wait_for(ok, timeout, f"the client's probes answered by {node}", 0.02)


def answered_from(path: Path, since: float, test: Callable[[dict[str, Any]], bool]
                  ) -> Callable[[], bool]:
    """A check, read incrementally: has a line of the JSON-lines file ``path`` with a
    time ``t`` at or after ``since`` passed ``test``?"""
    tail, seen = Tail(path), [False]

    def check() -> bool:
        for e in tail.read():
            if not seen[0] and float(e.get("t", 0)) >= since and test(e):
                seen[0] = True
        return seen[0]
    return check


def wait_takeover(p: Probes, node: str, since: float, timeout: float,
                  also: Callable[[], bool] = lambda: True) -> float | None:
    """Until the TCP probe is served by ``node`` at or after ``since`` (and ``also``);
    the time it took, None after ``timeout``."""
    served = answered_from(p.tcp, since, lambda e: bool(e.get("ok") and e.get("who") == node))
    try:
        wait_for(lambda: served() and also(), timeout, f"{node} answering", 0.02)
    except TimeoutError:
        return None
    return time.monotonic() - since


def tcp_measures(tl: list[dict[str, Any]], t0: float, old: str, new: str) -> dict[str, Any]:
    """From the TCP probe's timeline: first answer from ``new`` at or after ``t0``, the
    last from ``old`` before it, and the longest gap between two answers from ``t0`` on."""
    ok = [(float(e["t"]), e["who"]) for e in tl if e["ok"]]
    first_new = next((t for t, w in ok if w == new and t >= t0), None)
    last_old = max((t for t, w in ok if w == old and (first_new is None or t < first_new)),
                   default=None)
    times = [t for t, _ in ok]
    before = [t for t in times if t < t0]
    after = [t for t in times if t >= t0]
    seq = before[-1:] + after
    gaps = [b - a for a, b in itertools.pairwise(seq)]
    r: dict[str, Any] = {
        "tcp_attempts": len(tl), "tcp_from_fault_s": None if first_new is None
        else first_new - t0,
        "tcp_gap_s": None if first_new is None
        else first_new - (last_old if last_old is not None else t0),
        "tcp_longest_gap_s": max(gaps, default=None)}
    return r


def arp_measures(changes: list[tuple[float, frozenset[str]]], t0: float, end: float,
                 old: str, new: str) -> dict[str, Any]:
    """From the ARP probe's changes (round time, nodes answering): when ``new`` first
    answered from ``t0`` on, how long nobody answered before that, how long two nodes
    answered at once, and the longest time without an answer."""
    spans = [(t, changes[i + 1][0] if i + 1 < len(changes) else end, who)
             for i, (t, who) in enumerate(changes)]
    first_new = None
    for t, te, who in spans:
        if new in who and te > t0:
            first_new = max(t, t0)
            break
    last_old_end = max((te for t, te, who in spans
                        if old in who and (first_new is None or t < first_new)), default=None)
    double = [(max(t, t0), te) for t, te, who in spans if len(who) > 1 and te > t0]
    nobody = [te - max(t, t0) for t, te, who in spans if not who and te > t0]
    return {"arp_changes": len(changes),
            "arp_from_fault_s": None if first_new is None else first_new - t0,
            "arp_gap_s": None if first_new is None
            else max(0.0, first_new - (last_old_end if last_old_end is not None else t0)),
            "arp_nobody_longest_s": max(nobody, default=0.0),
            "arp_double_s": sum(te - t for t, te in double)}


def headline(case: str, m: dict[str, Any]) -> tuple[float | None, float | None]:
    """The case's outage, by TCP (the tape client's longest gap for ``data``) and by ARP."""
    if case == "switchover":
        return m.get("tcp_gap_s"), m.get("arp_gap_s")
    if case == "split":
        return m.get("tcp_longest_gap_s"), m.get("arp_nobody_longest_s")
    if case == "data":
        return m.get("ack_longest_gap_s"), m.get("arp_from_fault_s")
    return m.get("tcp_from_fault_s"), m.get("arp_from_fault_s")


def finish_measures(case: str, p: Probes, t0: float, end: float) -> dict[str, Any]:
    old, new = A, B
    m = tcp_measures(read_timeline(str(p.tcp)), t0, old, new)
    m |= arp_measures(read_arp(p.arp), t0, end, old, new)
    return m


#: faults in effect only once the call that makes them returns (a link set down, an
#: nftables table written: what the client sees changes then); a signal takes effect
#: when it is sent, the start of the call (the rest is reaping)
EFFECT_ON_RETURN = ("links", "mgmt", "split")


def fault_time(case: str, r: dict[str, Any], t_call: float, wall_call: float
               ) -> tuple[float, float]:
    """The fault's time (monotonic, wall) from the injection call's start (the call has
    just returned); the call's duration goes to ``r['inject_s']``."""
    now, wall = time.monotonic(), time.time()
    r["inject_s"] = now - t_call
    return (now, wall) if case in EFFECT_ON_RETURN else (t_call, wall_call)


def bounds(interval: float, lease_ttl: float, dead_after: float, margin: float
           ) -> tuple[float, float]:
    """(how long to wait for a takeover at most, how long to watch after it and after
    the fault is undone)."""
    return 15.0 + 10 * (dead_after + lease_ttl + margin), max(1.0, 3 * interval)


# ---- vtl-ha ------------------------------------------------------------------------


def lab_config(work: Path, interval: float) -> Path:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["state_dir"] = str(work / "state")
    raw["cluster"] = "bench-failover"
    scale_timings(raw, interval / float(raw["timings"]["heartbeat_interval"]))
    for pair in raw["pairs"]:
        # every baseline moves groups home; the chaos suite's hold after a move
        pair["failback_hold_time"] = FAILBACK_HOLD
        for node in pair["nodes"]:
            if node["name"] == A:
                node["checks"] = [{"name": "vtl-daemon", "kind": "pidfile",
                                   "path": str(work / "vtl.pid"), "fatal": True}]
    cfg = work / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg


class Ours:
    """vtl-ha's lab at one heartbeat interval, reused from trial to trial."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.lab: Any = None
        self.work: Path | None = None
        self.builds = 0

    @property
    def pidfile(self) -> Path:
        assert self.work is not None
        return self.work / "vtl.pid"

    def up(self) -> None:
        from vtlha_lab.lab import Lab

        self.work = Path(tempfile.mkdtemp(prefix="vtlha-bench-failover-"))
        self.pidfile.write_text(str(os.getpid()))  # the "VTL daemon" node-a checks
        self.lab = Lab(lab_config(self.work, self.interval), self.work)
        self.builds += 1
        t = time.monotonic()
        print(f"  vtl-ha lab at {self.interval:g} s: starting ({self.work})", flush=True)
        self.lab.start()
        self.lab.wait_for(self.at_home, 120, interval=0.2, what="every group served at home")
        self.leaders_on_witness(60)
        self.ensure_responders()
        print(f"  vtl-ha lab ready in {time.monotonic() - t:.0f} s", flush=True)

    def down(self, keep: bool = False) -> None:
        if os.getpid() != OWNER:
            return  # a forked helper (pyroute2's) owns nothing
        if self.lab is not None:
            self.lab.stop()
            self.lab = None
        if self.work is not None and not keep:
            shutil.rmtree(self.work, ignore_errors=True)
        self.work = None

    # ---- looking in ------------------------------------------------------------------
    def leaders_on_witness(self, timeout: float) -> bool:
        """The KV's and the event stream's raft leaders on the witness (DESIGN.md: a node
        crash must not wait for an election); False if not within ``timeout``."""
        lab = self.lab
        try:
            lab.wait_for(lambda: lab.kv_leader() == "witness" and lab.kv_leader(events=True)
                         == "witness", timeout, interval=0.5, what="the leaders on the witness")
        except TimeoutError:
            return False
        return True

    def served(self, node: str, group: str) -> bool:
        try:
            st = self.lab.http_get(node, "storage-monitor", "/status")
        except (OSError, ValueError):
            return False
        return bool(st.get("groups", {}).get(group, {}).get("state") == "served")

    def at_home(self) -> bool:
        """Every group held (KV) and answered (address configured and in the fence) by its
        home only, node-a's storage served by node-a."""
        lab = self.lab
        if not lab.home_held():
            return False
        for node, other in ((A, B), (B, A)):
            mine = {a for g in (f"{node}-data", f"{node}-mgmt")
                    for a in lab.cfg.group_addresses(g)}
            if not mine <= set(lab.floating_on(node)) or mine & set(lab.floating_on(other)):
                return False
            if not {a.split("/")[0] for a in mine} <= set(lab.fenced(node)):
                return False
        return self.served(A, f"{A}-data")

    def ensure_responders(self) -> None:
        for n in NODES:
            try:
                alive = self.lab.procs.find(n, "serve").alive
            except KeyError:
                alive = False
            if not alive:
                self.lab.spawn_in(n, "serve", [sys.executable, "-m", "vtlha_lab.probes",
                                               "serve", "--port", str(PORT), "--name", n])

    # ---- the operator ------------------------------------------------------------------
    def vtlha(self, *args: str, timeout: float = 60) -> int:
        lab = self.lab
        argv = [str(BIN / "vtlha"), *args, "--config", str(lab.config_path), "--nats",
                ",".join(lab.client_urls())]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  check=False).returncode
        except subprocess.TimeoutExpired:
            return -1

    def pair_nodes(self) -> list[str]:
        """Nodes of the pair held down, in standby or with failures recorded."""
        import nats

        lab = self.lab

        async def get() -> dict[str, Any]:
            nc = await nats.connect(lab.client_urls(), connect_timeout=2,
                                    allow_reconnect=False)
            try:
                kv = await nc.jetstream(timeout=2).key_value(f"ha-{lab.cfg.cluster}")
                e = await kv.get(f"pair.{lab.cfg.pairs[0].name}")
                rec: dict[str, Any] = json.loads(e.value or b"{}")
                return rec
            finally:
                await nc.close()
        try:
            rec = asyncio.run(asyncio.wait_for(get(), 10))
        except Exception:
            return []
        out = set(rec.get("hold", [])) | set(rec.get("standby", []))
        out |= {n for n, ts in rec.get("failures", {}).items() if ts}
        return sorted(out)

    # ---- the baseline ------------------------------------------------------------------
    def heal(self) -> list[str]:
        """Undo whatever a fault left: links up, cuts removed, everything continued, the
        pid file back, dead processes started again. Returns what was started."""
        lab = self.lab
        for n in NODES:
            lab.set_links(n, up=True)
            with contextlib.suppress(subprocess.CalledProcessError):
                lab.heal_path(n)
        for pid in self.node_pids(A) + self.node_pids(B):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGCONT)
        self.pidfile.write_text(str(os.getpid()))
        started = []
        for host, srv in lab.servers.items():
            if srv.proc is None or srv.proc.poll() is not None:
                srv.start()
                lab.wait_nats(host, streams=False)
                started.append(f"{host}/nats-server")
        latest = {(c.host, c.service): c.alive for c in lab.procs.children
                  if c.host in lab.cfg.hosts and c.service != "serve"}
        for (host, service), alive in sorted(latest.items()):
            if not alive:
                lab.start_service(host, service)
                started.append(f"{host}/{service}")
        self.ensure_responders()
        return started

    def node_pids(self, host: str) -> list[int]:
        pids = [c.proc.pid for c in self.lab.procs.of_host(host)]
        srv = self.lab.servers.get(host)
        if srv is not None and srv.proc is not None and srv.proc.poll() is None:
            pids.append(srv.proc.pid)
        return pids

    def restore(self) -> dict[str, Any]:
        """Back to the baseline (the chaos suite's): heal, then `vtlha clear-hold` and
        `vtlha failback` (retried every 2 s) until every group is served at home; then
        no failure recorded, and the hold after a move waited out."""
        from vtlha_lab.chaos import faults as ft

        t0 = time.monotonic()
        started = self.heal()
        t = self.lab.cfg.timings
        timings = {k: float(v) for k, v in t.model_dump().items() if isinstance(v, int | float)}
        bound = 3 * ft.evaluate(ft.BASELINE_BOUND, timings)
        pair = self.lab.cfg.pairs[0].name
        moved, ok, last = False, False, 0.0
        while time.monotonic() - t0 < bound:
            if self.at_home():
                ok = True
                break
            if time.monotonic() - last > 2.0:
                for n in self.pair_nodes():
                    self.vtlha("clear-hold", pair, n)
                if self.lab.held_by() != {g: h for g, (h, _) in self.lab.cfg.groups().items()}:
                    moved |= self.vtlha("failback", pair, "--wait", "20") == 0
                last = time.monotonic()
            time.sleep(0.2)
        for n in self.pair_nodes():
            self.vtlha("clear-hold", pair, n)
        leaders = ok and self.leaders_on_witness(30)
        if moved:
            time.sleep(FAILBACK_HOLD)
        return {"ok": ok, "leaders_on_witness": leaders, "restarted": started,
                "waited_s": round(time.monotonic() - t0, 2)}


def ours_inject(o: Ours, case: str, detail: dict[str, Any]) -> Callable[[], object]:
    """Start the fault; returns its undo."""
    lab = o.lab
    if case == "links":
        lab.set_links(A, up=False)
        return lambda: lab.set_links(A, up=True)
    if case in ("crash", "data"):
        detail["killed"] = lab.crash(A, cut_links=False)
        return o.heal
    if case == "frozen":
        pids = o.node_pids(A)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGSTOP)

        def cont() -> None:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGCONT)
        return cont
    if case == "fatal":
        o.pidfile.unlink()
        return lambda: o.pidfile.write_text(str(os.getpid()))
    if case == "mgmt":
        lab.set_links(A, up=False, ifnames=("eth1",))
        return lambda: lab.set_links(A, up=True, ifnames=("eth1",))
    if case == "switchover":
        argv = [str(BIN / "vtlha"), "switchover", f"{A}-data", "--config",
                str(lab.config_path), "--nats", ",".join(lab.client_urls())]
        cli = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def done() -> None:
            try:
                out, _ = cli.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                cli.kill()
                out, _ = cli.communicate()
            detail["cli"] = f"exit {cli.returncode}: {out.decode(errors='replace')[-300:]}"
        return done
    if case == "split":
        lab.cut_path(A, B)
        return lambda: lab.heal_path(A)
    raise ValueError(case)


def start_tape(o: Ours, work: Path) -> tuple[subprocess.Popen[bytes], Path]:
    lab = o.lab
    ip = lab.cfg.group_addresses(f"{A}-data")[0].split("/")[0]
    log = work / "tape.jsonl"
    proc = lab.spawn_in("client", "tape", [str(BIN / "vtlha-lab"), "tape", "write",
                                           f"{ip}:{lab.cfg.ports.tape}", "--log", str(log),
                                           "--interval", str(TAPE_INTERVAL)])
    wait_for(lambda: any(a.get("node") == A for a in read_acks(log).values()), 30,
             "the tape client's first block acknowledged by node-a", 0.05)
    return proc, log


def tape_measures(log: Path, t0_wall: float) -> dict[str, Any]:
    acks = sorted(read_acks(log).values(), key=lambda a: float(a["t"]))
    times = [float(a["t"]) for a in acks]
    seq = [t for t in times if t < t0_wall][-1:] + [t for t in times if t >= t0_wall]
    gaps = [b - a for a, b in itertools.pairwise(seq)]
    first_b = next((float(a["t"]) for a in acks if a.get("node") == B
                    and float(a["t"]) >= t0_wall), None)
    return {"acks": len(acks), "ack_longest_gap_s": max(gaps, default=None),
            "ack_from_fault_s": None if first_b is None else first_b - t0_wall}


def spawn_probes(o: Ours, case: Case, work: Path, duration: float) -> Probes:
    lab = o.lab
    ifname = "eth1" if case.mgmt else "eth0"
    addr = MGMT_VIP if case.mgmt else VIP
    macs = {n: lab.mac(n, ifname) for n in NODES}
    tcp_argv, arp_argv, tcp, arp = probe_argvs(work, addr, ifname, macs, duration)
    procs = [lab.spawn_in("client", "tcp-probe", tcp_argv),
             lab.spawn_in("client", "arp-probe", arp_argv)]
    for p in procs:  # at the services' priority, as the lab's observers
        raise_priority(lab.cfg.scheduling.nice, LOG, p.pid)
    return Probes(tcp, arp, procs)


def ours_end_view(o: Ours, case: Case) -> dict[str, Any]:
    lab = o.lab
    ifname = "eth1" if case.mgmt else "eth0"
    addr = MGMT_VIP if case.mgmt else VIP
    client_ip = next(a for a in lab.addresses("client")
                     if a.startswith(addr.rsplit(".", 1)[0] + ".")).split("/")[0]
    macs = {n: lab.mac(n, ifname) for n in NODES}
    view = client_view(lab.ns("client"), client_ip, macs, addr, ifname)
    view["configured"] = [n for n in NODES if configured(lab.ns(n), addr)]
    view["fenced_in"] = [n for n in NODES if fenced(lab.ns(n), addr)]
    return view


def ours_trial(o: Ours, case: Case) -> dict[str, Any]:
    from vtlha_lab.lab import OverlapObserver

    lab = o.lab
    t = lab.cfg.timings
    bound, hold = bounds(o.interval, t.lease_ttl, t.dead_after, t.margin)
    work = Path(tempfile.mkdtemp(prefix=f"{case.name}-", dir=o.work))
    o.ensure_responders()
    r: dict[str, Any] = {"lease_ttl_s": t.lease_ttl, "dead_after_s": t.dead_after}
    probes = spawn_probes(o, case, work, bound + 4 * hold + 30)
    tape: tuple[subprocess.Popen[bytes], Path] | None = None
    try:
        with OverlapObserver(lab) as obs:
            wait_answered_by(probes, A)
            if case.name == "data":
                tape = start_tape(o, work)
            t0, t0_wall = time.monotonic(), time.time()
            undo = ours_inject(o, case.name, r)
            t0, t0_wall = fault_time(case.name, r, t0, t0_wall)
            if case.name == "split":
                time.sleep(1 + 6 * o.interval)
                r["took_s"] = None
            else:
                also = (answered_from(tape[1], t0_wall, lambda a: a.get("node") == B)
                        if tape is not None else (lambda: True))
                r["took_s"] = wait_takeover(probes, B, t0, bound, also)
            time.sleep(hold)
            probes.stop_tcp()
            t_end = time.monotonic()
            r["end"] = ours_end_view(o, case)
            undo()
            time.sleep(hold)
        probes.stop()
    finally:
        probes.stop()
        if tape is not None:
            _terminate([tape[0]])
    r |= finish_measures(case.name, probes, t0, t_end)
    if tape is not None:
        r |= tape_measures(tape[1], t0_wall)
    r |= {"observer_samples": obs.samples, "observer_max_gap_s": obs.max_gap,
          "overlaps": obs.overlaps,
          "double_holders": bool(obs.overlaps) or r["arp_double_s"] > 0
          or two_answering(r["end"]),
          "ended_two_holders": two_answering(r["end"])}
    shutil.rmtree(work, ignore_errors=True)
    return r


# ---- keepalived --------------------------------------------------------------------


def ka_split(lab: KaLab, cut: bool) -> None:
    """node-a and node-b drop what comes from each other (VRRP adverts included); the
    client reaches both."""
    for me, peer in ((A, B), (B, A)):
        peer_ip = KaLab.ADDR[peer].split("/")[0]
        script = (f"table inet bench_split {{\n  chain in {{ type filter hook input priority "
                  f"-300;\n    ip saddr {peer_ip} drop;\n  }}\n}}\n" if cut
                  else "delete table inet bench_split\n")
        subprocess.run(["ip", "netns", "exec", lab.ns[me], "nft", "-f", "-"],
                       input=script.encode(), check=cut, timeout=10, capture_output=True)


def ka_inject(lab: KaLab, case: str, interval: float, nice: int) -> Callable[[], object]:
    if case == "links":
        lab.set_link(A, up=False)
        return lambda: lab.set_link(A, up=True)
    if case == "crash":
        lab.signal_host(A, signal.SIGKILL)

        def restart() -> None:  # node-a comes back: its responder and keepalived
            ka_responder(lab, A)
            lab.start_keepalived(A, interval, master=True, nice=nice)
        return restart
    if case == "frozen":
        lab.signal_host(A, signal.SIGSTOP)
        return lambda: lab.signal_host(A, signal.SIGCONT)
    if case == "split":
        ka_split(lab, True)
        return lambda: ka_split(lab, False)
    raise ValueError(case)


def ka_responder(lab: KaLab, host: str) -> None:
    lab.spawn(host, "serve", [sys.executable, "-m", "vtlha_lab.probes", "serve", "--port",
                              str(PORT), "--name", host])


def ka_up(lab: KaLab, interval: float, nice: int) -> dict[str, str]:
    lab.build()
    for n in NODES:
        ka_responder(lab, n)
    lab.start_keepalived(A, interval, master=True, nice=nice)
    wait_for(lambda: configured(lab.ns[A]), 20, "node-a (keepalived master) holding the VIP",
             0.02)
    lab.start_keepalived(B, interval, master=False, nice=nice)
    time.sleep(max(1.5, 5 * interval))  # node-b hears adverts and stays backup
    if configured(lab.ns[B]) or not configured(lab.ns[A]):
        raise RuntimeError("keepalived did not settle with node-a master, node-b backup")
    macs = {n: mac_of(lab.ns[n]) for n in NODES}
    wait_for(lambda: tcp_via(lab.ns["client"], macs[A]) == "served node-a", 10,
             "the client served by node-a", interval=0.05)
    return macs


def ka_timings(interval: float) -> tuple[int, float, float, float]:
    """What keepalived's trials take from vtl-ha's cluster file at ``interval``: the same
    bounds on waiting, and the services' scheduling priority: (nice, lease_ttl, dead_after,
    margin)."""
    from vtlha.config import load_config

    work = Path(tempfile.mkdtemp(prefix="vtlha-bench-cfg-"))
    try:
        cfg = load_config(lab_config(work, interval))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t = cfg.timings
    return cfg.scheduling.nice, t.lease_ttl, t.dead_after, t.margin


def ka_trial(case: Case, interval: float, nice: int, lease_ttl: float, dead_after: float,
             margin: float) -> dict[str, Any]:
    """One keepalived trial in a lab of its own, measured as vtl-ha's."""
    work = Path(tempfile.mkdtemp(prefix=f"vtlha-bench-ka-{case.name}-"))
    lab = KaLab(work, prefix="kafo")
    bound, hold = bounds(interval, lease_ttl, dead_after, margin)
    r: dict[str, Any] = {"advert_int_s": interval}
    try:
        macs = ka_up(lab, interval, nice)
        tcp_argv, arp_argv, tcp, arp = probe_argvs(work, VIP, "eth0", macs,
                                                   bound + 4 * hold + 30)
        probes = Probes(tcp, arp, [lab.spawn("client", "tcp-probe", tcp_argv),
                                   lab.spawn("client", "arp-probe", arp_argv)])
        for p in probes.procs:
            raise_priority(nice, LOG, p.pid)
        with observer({n: lab.ns[n] for n in NODES}, f"{VIP}/32", work / "obs.json",
                      nice=nice) as obs:
            wait_answered_by(probes, A)
            t0 = time.monotonic()
            undo = ka_inject(lab, case.name, interval, nice)
            t0, _ = fault_time(case.name, r, t0, time.time())
            if case.name == "split":
                time.sleep(1 + 6 * interval)
                r["took_s"] = None
            else:
                r["took_s"] = wait_takeover(probes, B, t0, bound)
            time.sleep(hold)
            probes.stop_tcp()
            t_end = time.monotonic()
            client_ip = KaLab.ADDR["client"].split("/")[0]
            r["end"] = client_view(lab.ns["client"], client_ip, macs)
            r["end"]["configured"] = [n for n in NODES if configured(lab.ns[n])]
            undo()
            time.sleep(hold)
        probes.stop()
        r |= finish_measures(case.name, probes, t0, t_end)
        r |= {"observer_samples": obs["samples"], "observer_max_gap_s": obs["max_gap"],
              "overlaps": obs["overlaps"],
              "double_holders": bool(obs["overlaps"]) or r["arp_double_s"] > 0
              or two_answering(r["end"]),
              "ended_two_holders": two_answering(r["end"])}
        shutil.rmtree(work, ignore_errors=True)
        return r
    finally:
        lab.teardown()


# ---- the state file, the summary ------------------------------------------------------


def key(rec: dict[str, Any]) -> tuple[float, str, str, int]:
    return (float(rec["interval"]), str(rec["case"]), str(rec["system"]), int(rec["trial"]))


def load_state(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and "case" in rec:
                    out.append(rec)
    return out


def append_state(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"n": len(xs), "p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99),
            "max": max(xs)}


def summarize(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (interval, case, system): the outage's distribution (TCP, ARP), double
    holders, trials that failed."""
    rows = []
    groups: dict[tuple[float, str, str], list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault((float(r["interval"]), r["case"], r["system"]), []).append(r)
    order = list(CASES)
    for (iv, case, system), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], order.index(kv[0][1]) if kv[0][1] in order else 99, kv[0][2] != "vtl-ha")):
        ok = [r for r in rs if not r.get("error")]
        tcp = [r["outage_s"] for r in ok if r.get("outage_s") is not None]
        arp = [r["outage_arp_s"] for r in ok if r.get("outage_arp_s") is not None]
        rows.append({"interval": iv, "case": case, "system": system, "trials": len(ok),
                     "failed": len(rs) - len(ok),
                     "no_outage_measured": len(ok) - len(tcp),
                     "outage": stats(tcp), "outage_arp": stats(arp),
                     "double_holders": sum(bool(r.get("double_holders")) for r in ok),
                     "ended_two_holders": sum(bool(r.get("ended_two_holders")) for r in ok),
                     "load1_mean": sum(r.get("load1", 0) for r in rs) / len(rs)})
    return rows


def ratios(rows: list[dict[str, Any]]) -> None:
    """vtl-ha / keepalived, p50 and p99, on each vtl-ha row that has a keepalived row."""
    ka = {(r["interval"], r["case"]): r for r in rows if r["system"] == "keepalived"}
    for r in rows:
        k = ka.get((r["interval"], r["case"]))
        if r["system"] != "vtl-ha" or k is None or not r["outage"] or not k["outage"]:
            continue
        r["ratio"] = {q: (r["outage"][q] / k["outage"][q] if k["outage"][q] else None)
                      for q in ("p50", "p99")}


def targets(rows: list[dict[str, Any]], recs: list[dict[str, Any]]) -> list[str]:
    """Issue 20's targets at 0.1 s, where we stand (sentences)."""
    out = []
    by = {(r["interval"], r["case"], r["system"]): r for r in rows}
    for case in ("links", "crash"):
        ours, ka = by.get((0.1, case, "vtl-ha")), by.get((0.1, case, "keepalived"))
        if ours and ka and ours["outage"] and ka["outage"]:
            met = ours["outage"]["p99"] <= ka["outage"]["p99"] and not ours["double_holders"]
            out.append(f"{case} at 0.1 s: vtl-ha p99 {ours['outage']['p99']:.3f} s vs "
                       f"keepalived p99 {ka['outage']['p99']:.3f} s, vtl-ha double holders "
                       f"{ours['double_holders']}/{ours['trials']}: "
                       f"{'met' if met else 'NOT met'}")
    fatal = by.get((0.1, "fatal", "vtl-ha"))
    t = next((r for r in recs if r.get("case") == "fatal" and r.get("interval") == 0.1
              and "fall" in r), None)
    if fatal and fatal["outage"] and t:
        limit = 0.25 + t["fall"] * t["check_interval_s"]
        out.append(f"fatal at 0.1 s: p99 {fatal['outage']['p99']:.3f} s vs target "
                   f"{limit:.2f} s (0.25 + fall x check_interval): "
                   f"{'met' if fatal['outage']['p99'] <= limit else 'NOT met'}")
    data = by.get((0.1, "data", "vtl-ha"))
    if data and data["outage"]:
        out.append(f"data path at 0.1 s: longest gap between acknowledged blocks, max "
                   f"{data['outage']['max']:.3f} s (p99 {data['outage']['p99']:.3f} s) vs "
                   f"target 1 s: {'met' if data['outage']['max'] <= 1.0 else 'NOT met'}")
    return out


def fmt(s: dict[str, float] | None, q: str) -> str:
    return "-" if s is None else f"{s[q] * 1000:.0f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'int':>4} {'case':<11} {'system':<10} {'n':>3} {'fail':>4} "
            f"{'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}  {'ARP p50':>7} {'ARP p99':>7} "
            f"{'ratio p50/p99':>13} {'double':>6} {'ended 2':>7}")
    print(head)
    print(f"{'s':>4} {'':<11} {'':<10} {'':>3} {'':>4} {'ms':>6} {'ms':>6} {'ms':>6} "
          f"{'ms':>6}  {'ms':>7} {'ms':>7}")
    print("-" * len(head))
    for r in rows:
        ratio = r.get("ratio")
        rt = "-" if not ratio else "/".join("-" if ratio[q] is None else f"{ratio[q]:.2f}"
                                          for q in ("p50", "p99"))
        o, a = r["outage"], r["outage_arp"]
        print(f"{r['interval']:>4g} {r['case']:<11} {r['system']:<10} {r['trials']:>3} "
              f"{r['failed'] + r['no_outage_measured']:>4} {fmt(o, 'p50'):>6} "
              f"{fmt(o, 'p90'):>6} {fmt(o, 'p99'):>6} {fmt(o, 'max'):>6}  "
              f"{fmt(a, 'p50'):>7} {fmt(a, 'p99'):>7} {rt:>13} {r['double_holders']:>6} "
              f"{r['ended_two_holders']:>7}")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown (for BENCHMARKS.md): seconds, vtl-ha's row above
    keepalived's."""
    out = ["| interval | case | system | n | p50 | p90 | p99 | max | ARP p50 / p99 "
           "| ratio p50 / p99 | two answering (any instant) | ended with two |",
           "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def sec(st: dict[str, float] | None, q: str) -> str:
        return "-" if st is None else f"{st[q]:.3f}"

    for r in rows:
        ratio = r.get("ratio")
        rt = "-" if not ratio else " / ".join("-" if ratio[q] is None else f"{ratio[q]:.2f}"
                                              for q in ("p50", "p99"))
        o, a = r["outage"], r["outage_arp"]
        n = f"{r['trials']}" + (f" (+{r['failed']} failed)" if r["failed"] else "") + (
            f" ({r['no_outage_measured']} no takeover)" if r["no_outage_measured"] else "")
        out.append(f"| {r['interval']:g} s | {r['case']} | {r['system']} | {n} | "
                   f"{sec(o, 'p50')} | {sec(o, 'p90')} | {sec(o, 'p99')} | {sec(o, 'max')} | "
                   f"{sec(a, 'p50')} / {sec(a, 'p99')} | {rt} | {r['double_holders']} | "
                   f"{r['ended_two_holders']} |")
    return "\n".join(out)


def plot(recs: list[dict[str, Any]], path: Path) -> None:
    """Per interval, per case: vtl-ha's outages beside keepalived's (box and points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    intervals = sorted({float(r["interval"]) for r in recs if not r.get("error")})
    if not intervals:
        return
    fig, axes = plt.subplots(len(intervals), 1, figsize=(11, 4.2 * len(intervals)), dpi=90,
                             squeeze=False)
    colours = {"vtl-ha": "#1f77b4", "keepalived": "#ff7f0e"}
    for ax, iv in zip(axes[:, 0], intervals, strict=True):
        cases = [c for c in CASES if any(r["case"] == c and float(r["interval"]) == iv
                                         for r in recs)]
        labelled: set[str] = set()
        for i, case in enumerate(cases):
            for j, system in enumerate(("vtl-ha", "keepalived")):
                mine = [r for r in recs if r["case"] == case and r["system"] == system
                        and float(r["interval"]) == iv and not r.get("error")]
                xs = [max(float(r["outage_s"]), 1e-3) for r in mine
                      if r.get("outage_s") is not None]
                if not xs:
                    continue
                two = sum(bool(r.get("double_holders")) for r in mine)
                ax.text(i + (j - 0.5) * 0.36, 0.98, f"2 holders\n{two}/{len(mine)}",
                        transform=ax.get_xaxis_transform(), ha="center", va="top",
                        fontsize=6, color="#d62728" if two else "#555555")
                x = i + (j - 0.5) * 0.36
                ax.boxplot([xs], positions=[x], widths=0.3, showfliers=False,
                           medianprops={"color": colours[system]})
                jitter = [x + 0.1 * (((k * 7919) % 11) / 10 - 0.5) for k in range(len(xs))]
                ax.scatter(jitter, xs, s=10, alpha=0.6, color=colours[system],
                           label=None if system in labelled else system)
                labelled.add(system)
        ax.set_xticks(range(len(cases)), [f"{c}\n({CASES[c].measured})" for c in cases],
                      fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 3)  # room for the counts
        ax.set_ylabel("outage (s, log)")
        ax.set_title(f"heartbeat interval / advert_int {iv:g} s")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Client-observed failover outage (TCP probe from the client namespace); "
                 "'2 holders': trials in which two nodes answered at some instant",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(state: Path, plot_path: Path, run: dict[str, Any], markdown: bool = False) -> None:
    recs = load_state(state)
    rows = summarize(recs)
    ratios(rows)
    print()
    print_table(rows)
    print("\noutage by TCP (ms; `data`: the tape client's longest gap between acknowledged "
          "blocks); fail: trials that failed or measured no takeover; double: trials with "
          "two nodes answering at any instant; ended 2: trials that ended with two holders")
    tg = targets(rows, recs)
    for line in tg:
        print("target: " + line)
    if markdown:
        print("\n" + markdown_table(rows))
    if recs:
        plot(recs, plot_path)
        shown = plot_path.relative_to(ROOT) if plot_path.is_relative_to(ROOT) else plot_path
        print(f"plot: {shown}")
    summary = {"bench": "failover-lab", **run, "rows": rows, "targets": tg,
               "trials": recs}
    path = save_results("failover", summary)
    print(f"wrote {path.relative_to(ROOT)} ({len(recs)} trials from {state})")


# ---- the run -----------------------------------------------------------------------


def _raise_stopped(signum: int, _frame: object) -> None:
    if os.getpid() != OWNER:  # a forked helper (pyroute2's, for a namespace): it owns
        signal.signal(signum, signal.SIG_DFL)  # nothing, and dies as it would have
        os.kill(os.getpid(), signum)
        return
    raise Stopped(f"signal {signum}")


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    old = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Runner:
    def __init__(self, args: argparse.Namespace, ka_version: str | None) -> None:
        self.args = args
        self.ka_version = ka_version
        self.done = {key(r) for r in load_state(args.state) if not r.get("error")}
        self.t_start = time.monotonic()
        self.ran = 0

    def stop_reason(self) -> str | None:
        a = self.args
        if a.pause_file and Path(a.pause_file).exists():
            return f"paused: {a.pause_file} exists (rerun to resume)"
        if a.time_limit and time.monotonic() - self.t_start > a.time_limit:
            return f"time limit of {a.time_limit:g} s reached (rerun to resume)"
        return None

    def record(self, interval: float, case: str, system: str, trial: int,
               fn: Callable[[], dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        t = time.monotonic()
        load = os.getloadavg()[0]
        try:
            r = fn()
            err = None
        except (Stopped, KeyboardInterrupt):
            raise
        except Exception as exc:
            r, err = {}, repr(exc)
        rec = {"interval": interval, "case": case, "system": system, "trial": trial,
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load1": load,
               "trial_s": round(time.monotonic() - t, 2), **extra, **r, "error": err}
        rec["outage_s"], rec["outage_arp_s"] = headline(case, r) if not err else (None, None)
        append_state(self.args.state, rec)
        self.ran += 1
        if not err:
            self.done.add(key(rec))
        o = rec["outage_s"]
        print(f"  {interval:g} s {case:<10} {system:<10} #{trial + 1}: "
              + (f"FAILED {err}" if err else
                 f"outage {'-' if o is None else f'{o * 1000:.0f} ms'}, double holders "
                 f"{rec.get('double_holders')}, ended with two {rec.get('ended_two_holders')}")
              + f" ({rec['trial_s']:.0f} s, load {load:.2f})", flush=True)
        return rec

    def interval(self, iv: float) -> str | None:
        a = self.args
        n = a.trials or DEFAULT_TRIALS.get(iv, 10)
        ours = Ours(iv)
        try:
            for name in a.cases:
                case = CASES[name]
                for i in range(n):
                    if (why := self.ours_step(ours, case, i)) is not None:
                        return why
                    if case.keepalived and self.ka_version is not None and \
                            (why := self.ka_step(ours, case, i)) is not None:
                        return why
        finally:
            ours.down(keep=False)
        return None

    def ours_step(self, ours: Ours, case: Case, i: int) -> str | None:
        iv = ours.interval
        if (iv, case.name, "vtl-ha", i) in self.done:
            return None
        if (why := self.stop_reason()) is not None:
            return why
        if ours.lab is None and (why := self.build(ours)) is not None:
            return why
        t = ours.lab.cfg.timings
        extra = {"fall": t.fall, "check_interval_s": t.check_interval,
                 "heartbeat_interval_s": t.heartbeat_interval}
        rec = self.record(iv, case.name, "vtl-ha", i, lambda: ours_trial(ours, case), extra)
        try:
            rec_restore = ours.restore()
        except (Stopped, KeyboardInterrupt):
            raise
        except Exception as exc:
            rec_restore = {"ok": False, "error": repr(exc)}
        if not rec_restore["ok"] or rec.get("error"):
            print(f"    baseline not restored ({rec_restore}): the lab is built again",
                  flush=True)
            ours.down(keep=True)
        return None

    def build(self, ours: Ours) -> str | None:
        """Start vtl-ha's lab (a second attempt after a failed one); a sentence if the
        run cannot go on."""
        for attempt in (1, 2):
            try:
                ours.up()
                return None
            except (Stopped, KeyboardInterrupt):
                raise
            except Exception as exc:
                print(f"  the vtl-ha lab did not start (attempt {attempt}): {exc!r}; files in "
                      f"{ours.work}", flush=True)
                ours.down(keep=True)
        return "the vtl-ha lab did not start twice"

    def ka_step(self, ours: Ours, case: Case, i: int) -> str | None:
        iv = ours.interval
        if (iv, case.name, "keepalived", i) in self.done:
            return None
        if (why := self.stop_reason()) is not None:
            return why
        nice, ttl, dead, margin = ka_timings(iv)
        self.record(iv, case.name, "keepalived", i,
                    lambda: ka_trial(case, iv, nice, ttl, dead, margin),
                    {"keepalived": self.ka_version})
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--intervals", type=float, nargs="+", default=[0.1, 1.0],
                    help="heartbeat intervals / advert_int, s (default 0.1 1)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated, of {','.join(CASES)} (default all)")
    ap.add_argument("--trials", type=int, default=None,
                    help="trials per case and system (default 30 at 0.1 s, 10 at 1 s)")
    ap.add_argument("--state", type=Path, default=STATE,
                    help=f"the JSON-lines state file (default {STATE.relative_to(ROOT)})")
    ap.add_argument("--plot", type=Path, default=PLOT,
                    help=f"the PNG written (default {PLOT.relative_to(ROOT)})")
    ap.add_argument("--no-keepalived", action="store_true", help="vtl-ha's trials only")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="start no trial after this many seconds (rerun to resume)")
    ap.add_argument("--pause-file", default=None,
                    help="stop cleanly before the next trial while this file exists (a "
                         "shared machine's quiet time; rerun to resume); exit code 75")
    ap.add_argument("--summary-only", action="store_true",
                    help="run nothing: the table, JSON and plot from the state file")
    ap.add_argument("--markdown", action="store_true",
                    help="with --summary-only: the table as Markdown too (BENCHMARKS.md)")
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}: choose from {','.join(CASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "machine": platform.platform(), "cpus": os.cpu_count(),
                           "loadavg_before": os.getloadavg(),
                           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if args.summary_only:
        report(args.state, args.plot, run, markdown=args.markdown)
        return 0
    if os.geteuid() != 0:
        print("bench/failover.py needs root: it builds network namespaces, moves addresses, "
              "installs nftables fences and runs keepalived. Run it as root (e.g. `sudo make "
              "bench`); `--summary-only` reports an existing state file without root.",
              file=sys.stderr)
        return 2
    ka_version = None if args.no_keepalived else ensure_keepalived()
    run["keepalived"] = ka_version
    runner = Runner(args, ka_version)
    why = None
    with stoppable():
        try:
            for iv in args.intervals:
                why = runner.interval(iv)
                if why:
                    break
        except (Stopped, KeyboardInterrupt) as exc:
            why = f"stopped ({exc!s}); every lab removed; rerun to resume"
    run |= {"loadavg_after": os.getloadavg(), "trials_this_run": runner.ran,
            "elapsed_s": round(time.monotonic() - runner.t_start), "stopped": why}
    print(f"\n{runner.ran} trials this run in {run['elapsed_s']} s; load average "
          f"{run['loadavg_before'][0]:.2f} before, {run['loadavg_after'][0]:.2f} after"
          + (f"; {why}" if why else ""))
    report(args.state, args.plot, run)
    return EXIT_PAUSED if why and why.startswith("paused") else (1 if why else 0)


if __name__ == "__main__":
    sys.exit(main())
