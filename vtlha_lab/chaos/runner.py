"""The chaos runner: a network lab, a tape client per data group, the observer, and
faults drawn from a seed; between faults the baseline is restored and measured. At the
end every acknowledged block is read back, the event stream is read, everything is
merged into one history file (JSON lines), and the checker and the report run on it.

One seed and one list of fault kinds give one sequence of faults (the replay command is
printed and recorded); the timing of the real processes is not replayed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import yaml

from vtlha import eventlog
from vtlha.priority import raise_priority
from vtlha.subjects import Subjects
from vtlha_lab.chaos import faults as ft
from vtlha_lab.chaos.inject import INJECT, Active, Ctx, heal_everything
from vtlha_lab.chaos.live import LiveView
from vtlha_lab.chaos.supervisor import Supervisor
from vtlha_lab.lab import Lab
from vtlha_lab.localcluster import NODE_SERVICES
from vtlha_lab.tgt import use_iscsi

LOG = logging.getLogger("vtlha_lab.chaos")
BIN = Path(sys.executable).parent
DEVICE_SIZE = 256 * 1024 * 1024  # sparse; 65,536 blocks of 4 KiB per device
QUIET = 1.0  # after recovery, watch this long for needless moves before the check
FAILBACK_HOLD = 2.0  # s: the chaos cluster's failback_hold_time (see prepare)
MIN_WAIT_CAP = 15.0  # an iteration watches at least min(its bound, this) before its check


@dataclass
class RunOptions:
    seed: int
    iterations: int
    faults: list[str]
    config: Path
    work_dir: Path
    history: Path
    report: Path | None = None
    pictures: Path | None = None
    tape_interval: float = 0.05
    observer_interval: float = 0.015
    command: str = ""
    time_limit: float | None = None  # seconds: no new iteration starts after this
    iscsi: bool = False  # the devices as LUNs of the lab's tgtd (vtlha_lab.tgt.use_iscsi)


def plan(seed: int, iterations: int, kinds: list[str]) -> list[tuple[str, ...]]:
    """The faults of each iteration: every kind once in a seeded order, then random
    kinds; ``double`` becomes two single kinds drawn from the seed."""
    rng = random.Random(seed)
    first = list(kinds)
    rng.shuffle(first)
    seq = first[:iterations] + [rng.choice(kinds) for _ in range(iterations - len(first))]
    out: list[tuple[str, ...]] = []
    for k in seq:
        if k == "double":
            a, b = rng.sample(ft.SINGLE_KINDS, 2)
            out.append((a, b))
        else:
            out.append((k,))
    return out


def replay_command(opts: RunOptions) -> str:
    return opts.command or (
        f"vtlha-lab chaos run --seed {opts.seed} --iterations {opts.iterations} "
        f"--faults {','.join(opts.faults)}" + (" --san iscsi" if opts.iscsi else ""))


class Recorder:
    def __init__(self, path: Path) -> None:
        self.f = open(path, "a")  # noqa: SIM115 - closed by close()
        self.lock = threading.Lock()

    def __call__(self, rec: dict[str, Any]) -> None:
        rec = {"t": time.time(), **rec}
        with self.lock:
            self.f.write(json.dumps(rec, default=str) + "\n")
            self.f.flush()

    def close(self) -> None:
        self.f.close()


@dataclass
class Cluster:
    """The lab and what the runner knows about its groups."""

    lab: Lab
    homes: dict[str, str] = field(default_factory=dict)
    addr_group: dict[str, str] = field(default_factory=dict)
    data_groups: list[str] = field(default_factory=list)
    portals: dict[str, str] = field(default_factory=dict)
    pair: str = ""

    @classmethod
    def of(cls, lab: Lab) -> Cluster:
        c = cls(lab, pair=lab.cfg.pairs[0].name)
        for g, (home, _) in lab.cfg.groups().items():
            c.homes[g] = home
            for a in lab.cfg.group_addresses(g):
                c.addr_group[a.split("/")[0]] = g
            if g.endswith("-data"):
                c.data_groups.append(g)
                ip = lab.cfg.group_addresses(g)[0].split("/")[0]
                c.portals[g] = f"{ip}:{lab.cfg.ports.tape}"
        return c

    def timings(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.lab.cfg.timings.model_dump().items()
                if isinstance(v, int | float)}


def prepare(opts: RunOptions) -> Path:
    raw = yaml.safe_load(opts.config.read_text())
    raw["state_dir"] = str(opts.work_dir / "state")
    raw["cluster"] = f"chaos{opts.seed % 100000}"
    for pair in raw.get("pairs", []):
        # Every baseline moves groups home; with the default 30 s hold a management-path
        # or storage fault right after it would wait out the hold (the policy's rule)
        # and the iteration would test nothing. The runner waits this hold out instead.
        pair["failback_hold_time"] = FAILBACK_HOLD
    if opts.iscsi:
        use_iscsi(raw)
    opts.work_dir.mkdir(parents=True, exist_ok=True)
    cfg = opts.work_dir / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg


def create_devices(lab: Lab) -> None:
    for dev in lab.cfg.devices.values():
        p = Path(dev.backing)
        p = p if p.is_absolute() else lab.state_root / p
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(DEVICE_SIZE)


def start_observer(c: Cluster, out: Path, interval: float) -> subprocess.Popen[bytes]:
    lab = c.lab
    argv = [*lab.prefix("client"), sys.executable, "-m", "vtlha_lab.chaos.observer",
            "--out", str(out), "--interval", str(interval)]
    if lab.cfg.san.kind == "iscsi":  # read through PR IN by the prwatch process instead
        lab.procs.spawn("client", "chaos-prwatch", [
            *lab.prefix("client"), sys.executable, "-m", "vtlha_lab.chaos.prwatch",
            "--config", str(lab.config_path), "--out", str(out.with_name("prwatch.jsonl"))])
    else:  # the reference target's persisted reservations
        argv += ["--reservations", str(lab.state_root / "san" / "reservations.json")]
    for n in lab.cfg.nodes:
        argv += ["--mac", f"{n.name}={lab.mac(n.name, 'eth0')},{lab.mac(n.name, 'eth1')}",
                 "--node", f"{n.name}={lab.ns(n.name)}"]
    mgmt_net = lab.cfg.nodes[0].mgmt_ip
    for addr, g in c.addr_group.items():
        ifname = "eth1" if g.endswith("-mgmt") and mgmt_net else "eth0"
        argv += ["--address", f"{addr}={ifname}"]
    proc = lab.procs.spawn("client", "chaos-observer", argv).proc
    # at the services' priority: its own scheduling delays must not read as outages
    raise_priority(lab.cfg.scheduling.nice, LOG, proc.pid)
    return proc


def start_writers(c: Cluster, interval: float) -> dict[str, Path]:
    logs = {}
    for g, portal in c.portals.items():
        log = c.lab.work_dir / f"tape-{g}.jsonl"
        c.lab.procs.spawn("client", f"tape-{g}", [
            *c.lab.prefix("client"), str(BIN / "vtlha-lab"), "tape", "write", portal,
            "--log", str(log), "--interval", str(interval)])
        logs[g] = log
    return logs


def wait_until(pred: Any, timeout: float, interval: float = 0.05) -> float | None:
    """Poll ``pred`` until true; the time it took, or None after ``timeout``."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 >= timeout:
            return None
        time.sleep(interval)


class Runner:
    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed ^ 0x5EED)
        self.runner_log = opts.work_dir / "runner.jsonl"
        self.moved_home = False
        self.observer_log = opts.work_dir / "observer.jsonl"

    # ---- operator actions through the real CLI ----------------------------------
    def vtlha(self, *args: str, timeout: float = 30) -> int:
        c = self.cluster
        argv = [str(BIN / "vtlha"), *args, "--config", str(c.lab.config_path),
                "--nats", ",".join(c.lab.client_urls())]
        self.record({"type": "invoke", "process": "operator", "f": " ".join(args)})
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.record({"type": "info", "process": "operator", "f": " ".join(args),
                         "value": "timed out"})
            return -1
        self.record({"type": "ok" if out.returncode == 0 else "fail", "process": "operator",
                     "f": " ".join(args), "exit": out.returncode,
                     "value": (out.stdout + out.stderr).strip()[-400:]})
        return out.returncode

    def pair_hold(self) -> list[str]:
        """Nodes held down or with failures recorded: the baseline forgets both, so one
        iteration's failures do not hold a node down in a later one (flap protection
        counts failures over flap_window, an hour, far longer than an iteration)."""
        return self.pair_record_nodes(("hold", "failures"))

    def pair_standby(self) -> list[str]:
        """Nodes left in standby (a `standby off` that found no active arbiter)."""
        return self.pair_record_nodes(("standby",))

    def pair_record_nodes(self, fields: tuple[str, ...]) -> list[str]:
        async def get() -> list[str]:
            nc = await nats.connect(self.cluster.lab.client_urls(), connect_timeout=2,
                                    allow_reconnect=False)
            try:
                kv = await nc.jetstream(timeout=2).key_value(f"ha-{self.cluster.lab.cfg.cluster}")
                e = await kv.get(f"pair.{self.cluster.pair}")
                rec = json.loads(e.value or b"{}")
                out = {n for f in fields if f != "failures" for n in rec.get(f, [])}
                if "failures" in fields:
                    out |= {n for n, ts in rec.get("failures", {}).items() if ts}
                return sorted(out)
            finally:
                await nc.close()
        try:
            return asyncio.run(get())
        except Exception:
            return []

    def owners(self) -> dict[str, dict[str, Any]]:
        try:
            return {g: {"owner": r.owner, "epoch": r.epoch, "state": r.state}
                    for g, (r, _) in self.cluster.lab.kv_groups().items()}
        except Exception as exc:
            return {"error": {"owner": repr(exc)}}

    # ---- the baseline -------------------------------------------------------------
    def at_home(self) -> bool:
        c = self.cluster
        self.live.update()
        return self.live.home(c.homes, c.addr_group, c.data_groups)

    def on_own_servers(self) -> bool:
        """Every service's NATS connection back on its own node's server (``/nats``):
        after a nats-server's restart the services move home on their own a few seconds
        later (``vtlha.homeserver``), and a move left for the next fault's window would
        be charged to that fault (chaos iteration 77 was iteration 76's move home)."""
        lab = self.cluster.lab
        for c in lab.procs.children:
            if c.service not in NODE_SERVICES or not c.alive:
                continue
            try:
                st = lab.http_get(c.host, c.service, "/nats", timeout=0.5)
            except Exception:
                return False
            if "home" in st and st.get("server") != st["home"]:
                return False
        return True

    def restore(self, it: int, actives: list[Active]) -> None:
        t0 = time.monotonic()
        self.record({"type": "baseline", "phase": "start", "iteration": it})
        for a in actives:
            for t in a.threads:
                t.join(20)
            try:
                a.undo()
            except Exception as exc:
                self.record({"type": "info", "process": "runner", "value": f"undo: {exc!r}"})
        heal_everything(self.cluster.lab)
        started = self.supervisor.restart_all_now()
        bound = ft.evaluate(ft.BASELINE_BOUND, self.cluster.timings())
        last_try = 0.0
        ok = False
        while time.monotonic() - t0 < 3 * bound:
            if self.at_home() and self.on_own_servers():
                ok = True
                break
            if time.monotonic() - last_try > 2.0:
                self.operator_actions()
                last_try = time.monotonic()
            time.sleep(0.1)
        waited = round(time.monotonic() - t0, 3)
        self.forget_failures()
        if self.moved_home:  # let the hold after a move pass before the next fault
            time.sleep(FAILBACK_HOLD)
            self.moved_home = False
        self.record({"type": "baseline", "phase": "end", "iteration": it, "ok": ok,
                     "waited": waited, "bound": bound, "restarted": started})

    def forget_failures(self) -> None:
        """Whatever the restore needed, no failure outlives its iteration."""
        for node in self.pair_hold():
            self.vtlha("clear-hold", self.cluster.pair, node)

    def operator_actions(self) -> None:
        c = self.cluster
        for node in self.pair_standby():
            self.vtlha("standby", "off", c.pair, node, "--yes")
        for node in self.pair_hold():
            self.vtlha("clear-hold", c.pair, node)
        owners = self.owners()
        if any(o.get("owner") != c.homes.get(g) for g, o in owners.items() if g in c.homes):
            self.moved_home |= self.vtlha("failback", c.pair, "--wait", "20") == 0

    # ---- one iteration -------------------------------------------------------------
    def iteration(self, it: int, kinds: tuple[str, ...]) -> None:
        timings = self.cluster.timings()
        exp = ft.expectation(kinds, timings)
        dur = max(ft.duration(k, timings) for k in kinds)
        ctx = Ctx(self.cluster.lab, self.supervisor, self.rng)
        self.record({"type": "fault", "phase": "start", "iteration": it, "kinds": list(kinds),
                     "load": os.getloadavg()[0]})
        actives: list[Active] = []
        injected: list[str] = []
        for k in kinds:
            try:
                actives.append(INJECT[k](ctx))
                injected.append(k)
            except Exception as exc:
                self.record({"type": "info", "process": "runner", "iteration": it,
                             "value": f"inject {k}: {exc!r}"})
        self.record({"type": "fault", "phase": "injected", "iteration": it,
                     "kinds": injected, "planned": list(kinds),
                     "detail": [a.detail for a in actives]})
        time.sleep(dur)  # the fault lasts this long (a fixed duration, not a wait for state)
        for a in actives:
            for t in a.threads:
                t.join(20)
            try:
                a.undo()
            except Exception as exc:
                self.record({"type": "info", "process": "runner", "value": f"undo: {exc!r}"})
        self.record({"type": "fault", "phase": "end", "iteration": it, "kinds": list(kinds),
                     "detail": [a.detail for a in actives]})
        c = self.cluster
        bound = max(exp.address_bound, exp.data_bound, exp.window)
        started = time.monotonic() - dur

        def recovered() -> bool:
            self.live.update()
            return (time.monotonic() - started >= min(bound, MIN_WAIT_CAP)
                    and self.live.answered_once(list(c.addr_group))
                    and self.live.acking(c.data_groups))

        wait_until(recovered, max(0.0, bound + 2.0 - dur))
        time.sleep(QUIET)  # watch for needless moves after recovery
        self.record({"type": "check", "iteration": it, "owners": self.owners()})
        self.restore(it, actives)

    # ---- the run -------------------------------------------------------------------
    def run(self) -> int:
        opts = self.opts
        cfg_path = prepare(opts)
        lab = Lab(cfg_path, opts.work_dir)
        self.cluster = Cluster.of(lab)
        self.record = Recorder(self.runner_log)
        plan_ = plan(opts.seed, opts.iterations, opts.faults)
        try:
            lab.record.save()
            lab.build_network()
            create_devices(lab)
            lab.start_nats()
            lab.start_san()
            lab.start_services()
            lab.wait_for(lab.home_held, 90, what="every group held at home")
            obs = start_observer(self.cluster, self.observer_log, opts.observer_interval)
            logs = start_writers(self.cluster, opts.tape_interval)
            self.live = LiveView(self.observer_log, logs)
            self.supervisor = Supervisor(lab, self.rng, self.record)
            self.record({"type": "run", "phase": "start", "seed": opts.seed,
                         "iterations": opts.iterations, "faults": opts.faults,
                         "command": replay_command(opts), "san": lab.cfg.san.kind,
                         "timings": {**self.cluster.timings(),
                                     "failback_hold_time": FAILBACK_HOLD},
                         "constants": {k: v for k, (v, _) in ft.CONSTANTS.items()},
                         "homes": self.cluster.homes, "addresses": self.cluster.addr_group,
                         "data_groups": self.cluster.data_groups,
                         "devices": {g: lab.cfg.group_devices(g)
                                     for g in self.cluster.data_groups},
                         "plan": [list(p) for p in plan_]})
            if wait_until(self.at_home, 60) is None:
                self.record({"type": "info", "process": "runner",
                             "value": "not served at home before the first fault"})
            t_start = time.monotonic()
            for it, kinds in enumerate(plan_):
                if opts.time_limit and time.monotonic() - t_start > opts.time_limit:
                    self.record({"type": "info", "process": "runner",
                                 "value": f"time limit: stopped after {it} of {len(plan_)} "
                                          "iterations"})
                    print(f"time limit reached after {it} iterations", flush=True)
                    break
                print(f"[{it + 1}/{len(plan_)}] {'+'.join(kinds)}", flush=True)
                self.iteration(it, kinds)
            self.finish(logs, obs)
        finally:
            sup = getattr(self, "supervisor", None)
            if sup is not None:
                sup.close()
            self.record.close()
            lab.stop()
        return self.merge()

    def finish(self, logs: dict[str, Path], obs: subprocess.Popen[bytes]) -> None:
        lab = self.cluster.lab
        for g in logs:
            child = lab.procs.find("client", f"tape-{g}")
            child.signal(signal.SIGTERM)
            child.proc.wait(10)
        verifiers = {g: subprocess.Popen(  # every group's blocks read back at once
            [*lab.prefix("client"), str(BIN / "vtlha-lab"), "tape", "verify",
             self.cluster.portals[g], "--log", str(log), "--json", "--deadline", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for g, log in logs.items()}
        for g, proc in verifiers.items():
            try:
                stdout, stderr = proc.communicate(timeout=1800)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            try:
                res = json.loads(stdout)
            except ValueError:
                res = {"error": (stdout + stderr)[-500:]}
            self.record({"type": "verify", "group": g, "exit": proc.returncode, **res})
        obs.send_signal(signal.SIGTERM)
        obs.wait(10)
        with contextlib.suppress(KeyError):
            pr = lab.procs.find("client", "chaos-prwatch")
            pr.signal(signal.SIGTERM)
            pr.proc.wait(10)
        for seq, e in self.read_events():
            self.record({"type": "event", "t": e.sent_at, "seq": seq, "kind": e.kind,
                         "node": e.node, "group": e.group, "old": e.old, "new": e.new,
                         "epoch": e.epoch, "term": e.term, "reason": e.reason[:300],
                         "rule": (e.data or {}).get("rule"),
                         "started": (e.data or {}).get("started")})

    def read_events(self) -> list[tuple[int, Any]]:
        lab = self.cluster.lab

        async def go() -> list[tuple[int, Any]]:
            nc = await nats.connect(lab.client_urls(), connect_timeout=5,
                                    allow_reconnect=False)
            try:
                return await eventlog.read(nc.jetstream(timeout=5), Subjects(lab.cfg.cluster))
            finally:
                await nc.close()
        return asyncio.run(go())

    def merge(self) -> int:
        """One history file: the runner's records, the observer's and the tape clients'
        acknowledgements, ordered by time."""
        recs: list[dict[str, Any]] = []
        prwatch = self.observer_log.with_name("prwatch.jsonl")
        for p in (self.runner_log, self.observer_log, prwatch):
            for line in p.read_text().splitlines() if p.exists() else []:
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    continue
        for g in self.cluster.data_groups:
            log = self.cluster.lab.work_dir / f"tape-{g}.jsonl"
            for line in log.read_text().splitlines() if log.exists() else []:
                try:
                    a = json.loads(line)
                except ValueError:
                    continue
                if "block" in a:
                    recs.append({"type": "ack", "t": a["t"], "sent": a.get("sent"), "group": g,
                                 "block": a["block"], "node": a.get("node"),
                                 "epoch": a.get("epoch")})
        recs.sort(key=lambda r: float(r.get("t", 0)))
        with open(self.opts.history, "w") as f:
            for r in recs:
                f.write(json.dumps(r, default=str) + "\n")
        return len(recs)


def run(opts: RunOptions) -> int:
    """Run, then return the number of history records written."""
    return Runner(opts).run()
