"""``make demo``: a two-node cluster, node-a crashed, node-b taking over.

As root it runs in the network lab (namespaces, real addresses, a client measuring the
outage); otherwise on loopback, where addresses are only recorded — and it says which.
Everything it starts is stopped on exit, Ctrl-C included."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from vtlha import eventlog
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster, prepare_config
from vtlha_lab.probes import outage, read_timeline

PORT = 7000


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _where(c: LocalCluster, addresses: list[str]) -> str:
    from vtlha_lab.lab import Lab

    if isinstance(c, Lab):
        holders = [h for h in c.cfg.hosts[:-1] if set(addresses) & set(c.floating_on(h))]
        return ", ".join(holders) or "-"
    holders = [h for h in c.cfg.hosts[:-1] if set(addresses) & set(c.recorded_addresses(h))]
    return ", ".join(holders) or "-"


def _table(c: LocalCluster) -> None:
    records = c.kv_groups()
    col = "configured in" if _is_lab(c) else "recorded by"
    _say(f"    {'group':<14} {'home':<8} {'owner':<8} {'epoch':>5}  {'state':<9} "
         f"{'addresses':<20} {col}")
    for g, (home, _k) in c.cfg.groups().items():
        rec = records.get(g)
        addrs = c.cfg.group_addresses(g)
        owner, epoch, state = (rec[0].owner, rec[0].epoch, rec[0].state) if rec else ("-", "-",
                                                                                      "-")
        _say(f"    {g:<14} {home:<8} {owner:<8} {epoch:>5}  {state:<9} "
             f"{', '.join(a.split('/')[0] for a in addrs):<20} {_where(c, addrs)}")


def _is_lab(c: LocalCluster) -> bool:
    from vtlha_lab.lab import Lab

    return isinstance(c, Lab)


def _make_cluster(src: Path, tmp: Path, loopback: bool = False) -> LocalCluster:
    cfg_path = prepare_config(src, tmp)
    if os.geteuid() == 0 and shutil.which("ip") and not loopback:
        from vtlha_lab.lab import Lab

        _say("  mode: NETWORK LAB — running as root: each host in its own network namespace,")
        _say("        veth links on bridges, floating addresses really configured, a client")
        _say("        namespace probing node-a's data address every 5 ms.")
        lab = Lab(cfg_path, tmp)
        _secure(lab)
        return lab
    _say(f"  mode: LOOPBACK — {'asked for' if loopback else 'not root'}: every host's services "
         "on 127.0.0.1 with its own ports;")
    _say("        floating addresses are only RECORDED by the recording IP backend, not")
    _say("        configured. Run as root for the network lab.")
    c = LocalCluster(cfg_path, tmp)
    _secure(c)
    return c


def _secure(c: LocalCluster) -> None:
    """As a deployment runs: `vtlha deploy render`'s server configs and credentials."""
    c.secure()
    _say("  bus:  as deployed — `vtlha deploy render` wrote each nats-server's config and a")
    _say("        least-privilege credential (nkey) per service per host; clients and routes")
    _say(f"        use TLS (a throwaway CA under {c.work_dir / 'tls'}).")


def _start_client(c: LocalCluster, address: str) -> Path | None:
    from vtlha_lab.lab import Lab

    if not isinstance(c, Lab):
        return None
    for n in c.cfg.nodes:
        c.spawn_in(n.name, "serve", [sys.executable, "-m", "vtlha_lab.probes", "serve",
                                     "--port", str(PORT), "--name", n.name])
    timeline = c.work_dir / "client-probe.jsonl"
    c.spawn_in("client", "probe", [sys.executable, "-m", "vtlha_lab.probes", "probe",
                                   "--target", f"{address}:{PORT}", "--out", str(timeline),
                                   "--interval", "0.005", "--duration", "60"])
    return timeline


def _portal(c: LocalCluster, victim: str) -> str:
    group = f"{victim}-data"
    if _is_lab(c):
        return f"{c.cfg.group_addresses(group)[0].split('/')[0]}:{c.cfg.ports.tape}"
    return f"127.0.0.1:{c.cfg.port(victim, 'tape')}"


def _start_tape(c: LocalCluster, victim: str) -> tuple[str, Path, subprocess.Popen[bytes]]:
    """``vtlha-lab tape write`` to the victim's portal (from the client namespace in the lab)."""
    from vtlha_lab.lab import Lab

    portal = _portal(c, victim)
    log = c.work_dir / "tape-acks.jsonl"
    argv = [str(Path(sys.executable).parent / "vtlha-lab"), "tape", "write", portal, "--log",
            str(log), "--interval", "0.01"]
    if isinstance(c, Lab):
        return portal, log, c.spawn_in("client", "tape-writer", argv)
    return portal, log, c.procs.spawn("client", "tape-writer", argv).proc


def _tape_acks(log: Path, node: str) -> int:
    from vtlha_lab.tapeclient import read_acks

    return sum(1 for a in read_acks(log).values() if a.get("node") == node)


def _finish_tape(c: LocalCluster, portal: str, log: Path, proc: subprocess.Popen[bytes],
                 survivor: str) -> str:
    import orjson

    from vtlha_lab.lab import Lab
    from vtlha_lab.tapeclient import read_acks

    c.wait_for(lambda: _tape_acks(log, survivor) >= 20, 30,
               what=f"the tape client's blocks acknowledged by {survivor}")
    proc.terminate()
    proc.wait(10)
    acks = read_acks(log)
    argv = [str(Path(sys.executable).parent / "vtlha-lab"), "tape", "verify", portal, "--log",
            str(log), "--json"]
    if isinstance(c, Lab):
        argv = [*c.prefix("client"), *argv]
    out = subprocess.run(argv, capture_output=True, timeout=120)
    res: dict[str, Any] = (orjson.loads(out.stdout) if out.stdout.strip()
                           else {"bad": ["verify failed: " + out.stderr.decode()[-200:]],
                                 "checked": 0})
    by: dict[str, int] = {}
    for a in acks.values():
        by[str(a.get("node"))] = by.get(str(a.get("node")), 0) + 1
    _say(f"\n  tape client: {len(acks)} numbered blocks acknowledged ("
         + ", ".join(f"{n} by {k}" for k, n in sorted(by.items()))
         + f"); read back through {survivor}: {res['checked']} checked, {len(res['bad'])} bad")
    return f"; tape: {len(acks)} blocks acknowledged, {len(res['bad'])} lost or wrong"


def run_demo(src: Path, work_dir: Path | None, keep: bool, loopback: bool = False) -> int:
    tmp = work_dir or Path(tempfile.mkdtemp(prefix="vtlha-demo-"))

    owner = os.getpid()

    def _term(signum: int, frame: FrameType | None) -> None:
        # pyroute2 forks helper processes for namespace sockets; they inherit this
        # handler and must just exit, not run the demo's clean-up.
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    logging.getLogger("vtlha").setLevel(logging.ERROR)
    # asyncio warns at each close of a TLS connection ("returning true from
    # eof_received() has no effect when using ssl", nats-py's protocol): not for a demo
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    _say("vtl-ha demo")
    c = _make_cluster(src, tmp, loopback)
    _say(f"  work dir: {tmp} (logs in {tmp / 'logs'})")
    try:
        return _run(c)
    except KeyboardInterrupt:
        _say("\n  interrupted")
        return 130
    finally:
        c.stop()
        _say("  stopped every process the demo started" +
             (" and removed the lab's namespaces and uplink" if _is_lab(c) else ""))
        if not keep and work_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(c: LocalCluster) -> int:
    t0 = time.monotonic()
    c.start()
    _say(f"  started a nats-server on each of {', '.join(c.cfg.nats.servers)} (clustered, "
         "JetStream sync_interval: always), the witness's arbiter (the active one), and on "
         "each node heartbeat, ip-manager, storage-monitor and a standby arbiter")
    home = {g: h for g, (h, _) in c.cfg.groups().items()}
    c.wait_for(c.home_held, 40, what="every group held by its home node")
    _say(f"\n  [{time.monotonic() - t0:5.2f} s] every node serves its home groups:")
    _table(c)
    victim = c.cfg.nodes[0].name
    survivor = c.cfg.companion(victim).name
    mine = [g for g, h in home.items() if h == victim]
    address = c.cfg.group_addresses(f"{victim}-data")[0].split("/")[0]
    # The design keeps the stream leaders on the witness (the active arbiter moves them
    # there within a second or two of starting): crash a node only once they are.
    witness = c.cfg.witness.host
    if witness in c.cfg.nats.servers and len(c.cfg.nats.servers) > 1:
        c.wait_for(lambda: c.kv_leader() == witness and c.kv_leader(events=True) == witness,
                   30, interval=0.2, what="the KV and event-stream leaders on the witness")
    timeline = _start_client(c, address)
    c.wait_for(lambda: ((c.status(victim, "storage-monitor") if not _is_lab(c) else
                         c.http_get(victim, "storage-monitor", "/status")) or {})
               .get("groups", {}).get(f"{victim}-data", {}).get("state") == "served", 30,
               what=f"{victim} to serve its data group's storage (the tape data service)")
    portal, tape_log, tape = _start_tape(c, victim)
    c.wait_for(lambda: _tape_acks(tape_log, victim) >= 20, 20,
               what=f"the tape client's blocks acknowledged by {victim}")
    _say(f"\n  tape client -> {portal}: writing numbered blocks, acknowledged by {victim} "
         "(written through the SAN target at the group's epoch)")
    if timeline is not None:
        c.wait_for(lambda: any(e["ok"] and e["who"] == victim
                               for e in read_timeline(str(timeline))), 10,
                   what=f"the client reaching {address} on {victim}")
        _say(f"\n  client -> {address}:{PORT} answered by {victim}")
    t_kill = time.monotonic()
    killed = c.crash(victim)
    how = " and its links set down" if _is_lab(c) else ""
    _say(f"\n  {victim} crashes: SIGKILL {', '.join(killed)}{how}")
    c.wait_for(lambda: all(c.held_by().get(g) == survivor for g in mine), 20,
               interval=0.005, what=f"{survivor} to hold {', '.join(mine)}")
    took = time.monotonic() - t_kill
    _say(f"\n  {survivor} took over {', '.join(mine)} {took * 1000:.0f} ms after the crash "
         f"(heartbeat {c.cfg.timings.heartbeat_interval} s, dead_after "
         f"{c.cfg.timings.dead_after} s):")
    _table(c)
    result = f"failover of {victim} to {survivor}: {took * 1000:.0f} ms crash -> KV record held"
    if timeline is not None:
        from vtlha_lab.lab import Lab

        assert isinstance(c, Lab)
        c.wait_for(lambda: outage(read_timeline(str(timeline)), victim, survivor, t_kill), 10,
                   what=f"the client reaching {address} on {survivor}")
        gap = outage(read_timeline(str(timeline)), victim, survivor, t_kill)
        assert gap is not None
        mac = c.neighbour("client", address)
        _say(f"\n  client -> {address}:{PORT} answered by {survivor} again; client-observed "
             f"outage {gap[2] * 1000:.0f} ms")
        _say(f"  client's ARP entry for {address}: {mac} = {survivor}'s MAC "
             f"{c.mac(survivor)} (gratuitous ARP)" if mac == c.mac(survivor) else
             f"  client's ARP entry for {address}: {mac}")
        result += f"; client outage {gap[2] * 1000:.0f} ms"
    result += _finish_tape(c, portal, tape_log, tape, survivor)
    _say("\n  events (stream " + Subjects(c.cfg.cluster).events_stream + "):")
    for n, e in enumerate(c.events(), 1):
        _say("    " + eventlog.format_event(n, e))
    _say(f"\n  result: {result}")
    return 0
