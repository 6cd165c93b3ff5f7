"""vtl-ha's side of ``bench/failover.py``: its network lab at one heartbeat interval
(built, looked into, brought back to the baseline between trials), each case's fault
injected into it, the tape client of the ``data`` case, and one measured trial."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.common import scale_timings
from bench.failover_cases import (
    BIN,
    FAILBACK_HOLD,
    LOG,
    MGMT_VIP,
    OWNER,
    TAPE_INTERVAL,
    TAPE_RECONNECT,
    A,
    B,
    Case,
)
from bench.failover_measure import (
    Probes,
    answered_from,
    bounds,
    fault_time,
    finish_measures,
    probe_argvs,
    random_phase,
    terminate,
    wait_answered_by,
    wait_takeover,
)
from bench.labkit import (
    EXAMPLE,
    NODES,
    PORT,
    VIP,
    client_view,
    configured,
    fenced,
    two_answering,
    wait_for,
)
from vtlha.priority import raise_priority
from vtlha_lab.tapeclient import read_acks


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

    def tape_log(self, node: str, group: str) -> Path:
        """The log of the built-in tape service of ``group`` on ``node``."""
        assert self.work is not None
        return self.work / "state" / node / "resources" / group / "tape" / "tape.log"

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
    if case in ("crash", "data", "data-reconnect"):
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


def start_tape(o: Ours, work: Path, connect_timeout: float | None = None
               ) -> tuple[subprocess.Popen[bytes], Path]:
    lab = o.lab
    ip = lab.cfg.group_addresses(f"{A}-data")[0].split("/")[0]
    log = work / "tape.jsonl"
    argv = [str(BIN / "vtlha-lab"), "tape", "write", f"{ip}:{lab.cfg.ports.tape}",
            "--log", str(log), "--interval", str(TAPE_INTERVAL)]
    if connect_timeout is not None:
        argv += ["--connect-timeout", str(connect_timeout)]
    proc = lab.spawn_in("client", "tape", argv)
    wait_for(lambda: any(a.get("node") == A for a in read_acks(log).values()), 30,
             "the tape client's first block acknowledged by node-a", 0.05)
    return proc, log


def tape_measures(log: Path, t0_wall: float, service_log: Path | None = None
                  ) -> dict[str, Any]:
    """The tape client's longest gap between acknowledged blocks around the fault, and
    what it is made of: when node-b's tape service said it was ready (its log), and how
    long the connect that the first block node-b acknowledged came on took (a SYN
    nobody answered waits for TCP's retransmission)."""
    acks = sorted(read_acks(log).values(), key=lambda a: float(a["t"]))
    times = [float(a["t"]) for a in acks]
    seq = [t for t in times if t < t0_wall][-1:] + [t for t in times if t >= t0_wall]
    gaps = [b - a for a, b in itertools.pairwise(seq)]
    first_b = next((a for a in acks if a.get("node") == B and float(a["t"]) >= t0_wall),
                   None)
    wait = None
    if first_b is not None and first_b.get("connected") and first_b.get("opened"):
        wait = float(first_b["connected"]) - float(first_b["opened"])
    ready = service_ready(service_log, t0_wall) if service_log is not None else None
    return {"acks": len(acks), "ack_longest_gap_s": max(gaps, default=None),
            "ack_from_fault_s": None if first_b is None else float(first_b["t"]) - t0_wall,
            "ack_connect_wait_s": wait,
            "service_ready_s": None if ready is None else ready - t0_wall}


def service_ready(service_log: Path, since: float) -> float | None:
    """When a tape service said ``tape service ready`` in ``service_log`` (JSON lines,
    ``vtlha.log``) at or after ``since`` (wall time), the first time."""
    try:
        lines = service_log.read_bytes().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if (isinstance(entry, dict) and entry.get("msg") == "tape service ready"
                and isinstance(entry.get("ts"), int | float) and entry["ts"] >= since):
            return float(entry["ts"])
    return None


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
            if case.name.startswith("data"):
                tape = start_tape(o, work, TAPE_RECONNECT if case.name == "data-reconnect"
                                  else None)
            random_phase(r, max(t.check_interval, t.heartbeat_interval))
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
            terminate([tape[0]])
    r |= finish_measures(case.name, probes, t0, t_end)
    if tape is not None:
        r |= tape_measures(tape[1], t0_wall, o.tape_log(B, f"{A}-data"))
    r |= {"observer_samples": obs.samples, "observer_max_gap_s": obs.max_gap,
          "overlaps": obs.overlaps, "overlaps_observed": obs.observed,
          "double_holders": bool(obs.overlaps) or r["arp_double_s"] > 0
          or two_answering(r["end"]),
          "ended_two_holders": two_answering(r["end"])}
    shutil.rmtree(work, ignore_errors=True)
    return r
