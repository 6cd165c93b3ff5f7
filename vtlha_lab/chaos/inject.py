"""Fault injection: one function per fault kind of the table (``faults.FAULTS``).

Each returns an ``Active`` fault: what it hit (``detail``) and how to undo it (``undo``,
called when the fault's duration is over; idempotent, and called again by the baseline
restore). Killed processes are handed to the supervisor, which restarts them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

from vtlha_lab.chaos.supervisor import Supervisor
from vtlha_lab.lab import Lab
from vtlha_lab.tgt import set_online

NODE_KILLABLE = ("heartbeat", "ip-manager", "storage-monitor", "arbiter")
CUT_TABLE = "vtlha_chaos_cut"


@dataclass
class Active:
    kind: str
    detail: dict[str, Any]
    undo: Callable[[], None] = lambda: None
    threads: list[threading.Thread] = field(default_factory=list)


@dataclass
class Ctx:
    lab: Lab
    supervisor: Supervisor
    rng: random.Random

    @property
    def nodes(self) -> list[str]:
        return [n.name for n in self.lab.cfg.nodes]

    def node(self) -> str:
        return self.rng.choice(self.nodes)


def _kill(ctx: Ctx, host: str, service: str) -> None:
    ctx.lab.procs.find(host, service).signal(signal.SIGKILL)
    ctx.supervisor.killed(host, service)


def kill_service(service: str) -> Callable[[Ctx], Active]:
    def run(ctx: Ctx) -> Active:
        host = ctx.node()
        _kill(ctx, host, service)
        return Active(f"kill-{service}", {"host": host, "service": service})
    return run


def kill_active_arbiter(ctx: Ctx) -> Active:
    active = ctx.lab.active_arbiters()
    host = active[0] if active else ctx.lab.cfg.witness.host
    _kill(ctx, host, "arbiter")
    return Active("kill-active-arbiter", {"host": host, "service": "arbiter",
                                          "was_active": bool(active)})


def _netns_pids(ns: str) -> set[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                         timeout=5, check=False).stdout
    return {int(p) for p in out.split()}


def kill_tape_service(ctx: Ctx) -> Active:
    """SIGKILL of the node's serving tape services: the pids in its resources' pid files
    (the storage-monitor's standby, which serves nothing and runs the same command line,
    is left alone)."""
    host = ctx.node()
    killed = []
    ns_pids = _netns_pids(ctx.lab.ns(host))
    for pid_file in sorted((ctx.lab.state_root / host / "resources").glob("*/*/pid")):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().split()[0])
            if (pid in ns_pids and b"vtlha.tape.service"
                    in Path(f"/proc/{pid}/cmdline").read_bytes()):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return Active("kill-tape-service", {"host": host, "pids": killed})


ARM_TIMEOUT = 20.0  # a KV watch right after kill-nats waits for JetStream to come back


async def _arm_kv_watch(lab: Lab, errors: list[str]) -> tuple[Any, Any]:
    """A connection and a watch of the groups' KV keys, retried for ``ARM_TIMEOUT``
    (each failure's repr appended to ``errors``)."""
    deadline = time.monotonic() + ARM_TIMEOUT
    while True:
        nc = None
        try:
            nc = await nats.connect(lab.client_urls(), connect_timeout=2,
                                    allow_reconnect=False)
            kv = await nc.jetstream(timeout=3).key_value(f"ha-{lab.cfg.cluster}")
            return nc, await kv.watch("group.>", include_history=False)
        except Exception as exc:
            errors.append(repr(exc))
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.5)


def kill_arbiter_at_claim(ctx: Ctx) -> Active:
    """Kill a node's heartbeat; the moment the active arbiter claims one of its groups
    (a KV update with state ``acquiring``), SIGKILL that arbiter.

    The watch is armed before anything is killed: JetStream may still be electing its
    leaders after an earlier fault, so arming retries for ``ARM_TIMEOUT``; if it never
    arms, nothing is killed and the injector raises (the runner records the fault as not
    injected instead of checking a fault that did not happen)."""
    lab = ctx.lab
    active = lab.active_arbiters()
    arbiter_host = active[0] if active else lab.cfg.witness.host
    victim = ctx.node()
    detail: dict[str, Any] = {"host": victim, "service": "heartbeat", "arbiter": arbiter_host}
    armed = threading.Event()
    settled = threading.Event()  # armed, or gave up arming
    errors: list[str] = []

    async def watch() -> None:
        # A KV watch (a JetStream consumer) shows only what the stream stored: a claim
        # that lost its compare-and-set is published on the key's subject all the same,
        # and killing the arbiter then tests no half-done takeover (nothing moves).
        try:
            nc, watcher = await _arm_kv_watch(lab, errors)
        except Exception:
            settled.set()
            return
        armed.set()
        settled.set()
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    entry = await watcher.updates(
                        timeout=max(0.01, deadline - time.monotonic()))
                except nats.errors.TimeoutError:
                    break
                if entry is None or not entry.value:
                    continue
                with contextlib.suppress(ValueError):
                    if json.loads(entry.value).get("state") == "acquiring":
                        _kill(ctx, arbiter_host, "arbiter")
                        detail["claim"] = entry.key.rsplit(".", 1)[-1]
                        detail["killed_at"] = time.time()
                        return
        except Exception as exc:  # the watch broke after the heartbeat was killed
            detail["watch_error"] = repr(exc)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    t = threading.Thread(target=lambda: asyncio.run(watch()), name="claim-watch", daemon=True)
    t.start()
    settled.wait(ARM_TIMEOUT + 10)
    if not armed.is_set():
        raise RuntimeError(f"the claim watch never armed in {ARM_TIMEOUT:.0f} s: "
                           f"{errors[-1] if errors else 'no answer'}")
    if len(errors) > 0:
        detail["arm_retries"] = len(errors)
    # the fault begins here, not when arming began (seconds earlier after a kill-nats:
    # the checker measures recovery from this; iteration 4 of the third 200-run was
    # charged 7.7 s of which 7.2 s were arming)
    detail["injected_at"] = time.time()
    _kill(ctx, victim, "heartbeat")
    return Active("kill-arbiter-at-claim", detail, threads=[t])


def _procs_of(ctx: Ctx, host: str) -> list[int]:
    pids = [c.proc.pid for c in ctx.lab.procs.of_host(host)]
    srv = ctx.lab.servers.get(host)
    if srv is not None and srv.proc is not None and srv.proc.poll() is None:
        pids.append(srv.proc.pid)
    return pids


def _signal_groups(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)


def stop_service(ctx: Ctx) -> Active:
    host, service = ctx.node(), ctx.rng.choice(NODE_KILLABLE)
    child = ctx.lab.procs.find(host, service)
    child.signal(signal.SIGSTOP)
    return Active("stop-service", {"host": host, "service": service},
                  undo=lambda: child.signal(signal.SIGCONT))


def stop_node(ctx: Ctx) -> Active:
    host = ctx.node()
    pids = _procs_of(ctx, host)
    _signal_groups(pids, signal.SIGSTOP)
    return Active("stop-node", {"host": host},
                  undo=lambda: _signal_groups(pids, signal.SIGCONT))


def cut_links(ctx: Ctx) -> Active:
    host = ctx.node()
    ctx.lab.set_links(host, up=False)
    return Active("cut-links", {"host": host}, undo=lambda: ctx.lab.set_links(host, up=True))


def _cut(ctx: Ctx, host: str, name: str, rules: list[str]) -> Callable[[], None]:
    table = f"{CUT_TABLE}_{name}"
    body = "\n".join(f"    {r} drop;" for r in rules)
    ctx.lab.nft(host, f"""table inet {table} {{
  chain in {{ type filter hook input priority -300;
{body}
  }}
  chain out {{ type filter hook output priority -300;
{body}
  }}
}}
""")

    def undo() -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            ctx.lab.nft(host, f"delete table inet {table}\n")
    return undo


def cut_witness(ctx: Ctx) -> Active:
    host = ctx.node()
    w = ctx.lab.service_ip(ctx.lab.cfg.witness.host).split("/")[0]
    ports = f"{{ {ctx.lab.cfg.ports.nats_client}, {ctx.lab.cfg.ports.nats_cluster} }}"
    rules = [f"ip daddr {w} tcp dport {ports}", f"ip saddr {w} tcp sport {ports}",
             f"ip daddr {w} tcp sport {ports}", f"ip saddr {w} tcp dport {ports}"]
    return Active("cut-witness", {"host": host}, undo=_cut(ctx, host, "witness", rules))


def _san_ports(ctx: Ctx, host: str) -> list[int]:
    n = max(d.paths.get(host, 0) for d in ctx.lab.cfg.devices.values())
    return [ctx.lab.cfg.san.port + i for i in range(n)]


def _cut_paths(ctx: Ctx, host: str, ports: list[int], kind: str) -> Active:
    san = ctx.lab.san_host()
    plist = "{ " + ", ".join(str(p) for p in ports) + " }"
    rules = [f"ip daddr {san} tcp dport {plist}", f"ip saddr {san} tcp sport {plist}"]
    return Active(kind, {"host": host, "ports": ports}, undo=_cut(ctx, host, "paths", rules))


def cut_path(ctx: Ctx) -> Active:
    host = ctx.node()
    return _cut_paths(ctx, host, [ctx.rng.choice(_san_ports(ctx, host))], "cut-path")


def cut_all_paths(ctx: Ctx) -> Active:
    host = ctx.node()
    return _cut_paths(ctx, host, _san_ports(ctx, host), "cut-all-paths")


def device_fail(ctx: Ctx) -> Active:
    dev = ctx.rng.choice(sorted(ctx.lab.cfg.devices))
    tgtd, lun = ctx.lab.tgtd, ctx.lab.cfg.devices[dev].lun
    if tgtd is not None and lun is not None:  # san.kind iscsi: the LUN's medium goes away
        set_online(tgtd, lun, False)
        return Active("device-fail", {"device": dev, "lun": lun},
                      undo=lambda: set_online(tgtd, lun, True))
    backing = Path(ctx.lab.cfg.devices[dev].backing)
    backing = backing if backing.is_absolute() else ctx.lab.state_root / backing
    size = backing.stat().st_size
    saved = ctx.lab.work_dir / f"{dev}.saved"
    target = ctx.lab.procs.find("san", "san-target")
    # The target is paused while the device's content is saved and the file truncated
    # (and while it is put back), so that no block it acknowledges falls in between:
    # the fault is the device failing, not the device losing acknowledged writes.
    target.signal(signal.SIGSTOP)
    try:
        subprocess.run(["cp", "--sparse=always", str(backing), str(saved)], check=True,
                       timeout=60)
        os.truncate(backing, 0)  # EIO for everyone
    finally:
        target.signal(signal.SIGCONT)

    def undo() -> None:
        if not saved.exists():
            return
        target.signal(signal.SIGSTOP)
        try:
            subprocess.run(["cp", "--sparse=always", str(saved), str(backing)], check=True,
                           timeout=60)
            os.truncate(backing, size)
        finally:
            target.signal(signal.SIGCONT)
        saved.unlink()
    return Active("device-fail", {"device": dev}, undo=undo)


def mgmt_down(ctx: Ctx) -> Active:
    host = ctx.node()
    ctx.lab.set_links(host, up=False, ifnames=("eth1",))
    return Active("mgmt-down", {"host": host},
                  undo=lambda: ctx.lab.set_links(host, up=True, ifnames=("eth1",)))


def flap(ctx: Ctx) -> Active:
    host = ctx.node()

    def run() -> None:
        for _ in range(5):
            ctx.lab.set_links(host, up=False, ifnames=("eth0",))
            time.sleep(0.1)
            ctx.lab.set_links(host, up=True, ifnames=("eth0",))
            time.sleep(0.2)

    t = threading.Thread(target=run, name="flap", daemon=True)
    t.start()
    return Active("flap", {"host": host}, threads=[t],
                  undo=lambda: ctx.lab.set_links(host, up=True, ifnames=("eth0",)))


def kill_nats(ctx: Ctx, leader: bool = False) -> Active:
    hosts = list(ctx.lab.servers)
    host = ctx.lab.kv_leader() if leader else ctx.rng.choice(hosts)
    host = host if host in ctx.lab.servers else ctx.rng.choice(hosts)
    srv = ctx.lab.servers[host]
    srv.kill()

    def undo() -> None:
        if srv.proc is None or srv.proc.poll() is not None:
            srv.start()
    return Active("kill-nats-leader" if leader else "kill-nats", {"host": host}, undo=undo)


def _operator(ctx: Ctx, *args: str) -> str:
    """One operator command through the real CLI (its exit code and last words)."""
    import sys

    argv = [str(Path(sys.executable).parent / "vtlha"), *args, "--yes", "--config",
            str(ctx.lab.config_path), "--nats", ",".join(ctx.lab.client_urls())]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "timed out"
    return f"exit {out.returncode}: {(out.stdout + out.stderr).strip()[-300:]}"


def standby(ctx: Ctx) -> Active:
    """`vtlha standby on` for a node (its groups move to the companion; the command runs
    in a thread: it takes a process start); `standby off` when the fault is undone."""
    host = ctx.node()
    pair = ctx.lab.cfg.pair_of(host).name
    detail: dict[str, Any] = {"host": host}

    def run() -> None:
        detail["on"] = _operator(ctx, "standby", "on", pair, host, "--wait", "0")

    def undo() -> None:
        for t in threads:
            t.join(30)
        detail["off"] = _operator(ctx, "standby", "off", pair, host)

    threads = [threading.Thread(target=run, name="standby", daemon=True)]
    threads[0].start()
    return Active("standby", detail, threads=threads, undo=undo)


def hostile(ctx: Ctx) -> Active:
    from vtlha_lab.chaos.hostile import send_hostile

    sent = asyncio.run(send_hostile(ctx.lab.client_urls(), ctx.lab.cfg.cluster, ctx.nodes))
    return Active("hostile", {"messages": sent})


INJECT: dict[str, Callable[[Ctx], Active]] = {
    "kill-heartbeat": kill_service("heartbeat"),
    "kill-ip-manager": kill_service("ip-manager"),
    "kill-storage-monitor": kill_service("storage-monitor"),
    "kill-arbiter": kill_service("arbiter"),
    "kill-active-arbiter": kill_active_arbiter,
    "kill-arbiter-at-claim": kill_arbiter_at_claim,
    "kill-tape-service": kill_tape_service,
    "stop-service": stop_service,
    "stop-node": stop_node,
    "cut-links": cut_links,
    "cut-witness": cut_witness,
    "kill-nats": kill_nats,
    "kill-nats-leader": lambda ctx: kill_nats(ctx, leader=True),
    "cut-path": cut_path,
    "cut-all-paths": cut_all_paths,
    "device-fail": device_fail,
    "mgmt-down": mgmt_down,
    "flap": flap,
    "standby": standby,
    "hostile": hostile,
}


def heal_everything(lab: Lab) -> None:
    """Links up and every chaos nftables table gone on every node (the baseline)."""
    for n in lab.cfg.nodes:
        lab.set_links(n.name, up=True)
        for name in ("witness", "paths"):
            with contextlib.suppress(subprocess.CalledProcessError):
                lab.nft(n.name, f"delete table inet {CUT_TABLE}_{name}\n")
