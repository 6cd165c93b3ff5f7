"""``make demo``: a local two-node cluster, node-a killed, node-b taking over.

Loopback mode for now (the network lab, with addresses that really move, comes with
the lab); it says so. Everything it starts is stopped on exit, Ctrl-C included."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import FrameType

from vtlha import bus, eventlog
from vtlha.localcluster import LocalCluster, prepare_config
from vtlha.subjects import Subjects


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _table(c: LocalCluster) -> None:
    st = c.status(c.cfg.witness.host, "arbiter") or {}
    groups = st.get("groups", {})
    _say(f"    {'group':<14} {'home':<8} {'owner':<8} {'epoch':>5}  state     recorded addresses")
    for g, (home, _k) in c.cfg.groups().items():
        rec = groups.get(g, {})
        owner = rec.get("owner", "-")
        addrs = [a for a in c.cfg.group_addresses(g) if a in c.recorded_addresses(owner)] \
            if owner != "-" else []
        _say(f"    {g:<14} {home:<8} {owner:<8} {rec.get('epoch', '-'):>5}  "
             f"{rec.get('state', '-'):<9} {', '.join(addrs) or '-'}")


async def _events(c: LocalCluster) -> list[str]:
    nc = await bus.connect(c.nats_urls(c.cfg.witness.host), name="vtlha-demo")
    try:
        evs = await eventlog.read(nc.jetstream(), Subjects(c.cfg.cluster))
    finally:
        await nc.close()
    return [eventlog.format_event(seq, e) for seq, e in evs]


def run_demo(src: Path, work_dir: Path | None, keep: bool) -> int:
    tmp = work_dir or Path(tempfile.mkdtemp(prefix="vtlha-demo-"))
    cfg_path = prepare_config(src, tmp)

    def _term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    logging.getLogger("vtlha").setLevel(logging.ERROR)
    c = LocalCluster(cfg_path, tmp)
    root = os.geteuid() == 0
    _say("vtl-ha demo")
    _say("  mode: LOOPBACK — every host's services on 127.0.0.1 with its own ports; floating")
    _say("        addresses are only RECORDED by the recording IP backend, not configured.")
    if root:
        _say("        (running as root: the network-namespace lab is not built yet, so loopback)")
    _say(f"  work dir: {tmp} (logs in {tmp / 'logs'})")
    try:
        t0 = time.monotonic()
        c.start()
        _say(f"  started nats-server (JetStream, sync_interval: always) on "
             f"{', '.join(c.nats_urls(c.cfg.witness.host))}, the witness's arbiter, and "
             f"{', '.join(c.cfg.hosts[:-1])} with heartbeat, ip-manager, storage-monitor each")
        c.wait_for(lambda: all(c.owners().get(g) == h for g, (h, _) in c.cfg.groups().items()),
                   30, what="every group held by its home node")
        _say(f"\n  [{time.monotonic() - t0:5.2f} s] every node serves its home groups:")
        _table(c)
        victim = c.cfg.nodes[0].name
        survivor = c.cfg.companion(victim).name
        mine = [g for g, (h, _) in c.cfg.groups().items() if h == victim]
        _say(f"\n  SIGKILL every process of {victim} "
             f"({', '.join(ch.service for ch in c.procs.of_host(victim))})")
        t_kill = time.monotonic()
        c.procs.kill_host(victim)
        c.wait_for(lambda: all(c.owners().get(g) == survivor for g in mine), 15,
                   interval=0.005, what=f"{survivor} to hold {', '.join(mine)}")
        took = time.monotonic() - t_kill
        _say(f"\n  {survivor} took over {', '.join(mine)} {took * 1000:.0f} ms after the kill "
             f"(dead_after {c.cfg.timings.dead_after} s, heartbeat "
             f"{c.cfg.timings.heartbeat_interval} s):")
        _table(c)
        _say("\n  events (stream " + Subjects(c.cfg.cluster).events_stream + "):")
        for line in asyncio.run(_events(c)):
            _say("    " + line)
        _say(f"\n  result: failover of {victim} to {survivor} in {took * 1000:.0f} ms "
             f"(kill to takeover recorded in the KV, seen from the arbiter's status)")
        return 0
    except KeyboardInterrupt:
        _say("\n  interrupted")
        return 130
    finally:
        c.stop()
        _say("  stopped every process the demo started")
        if not keep and work_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
