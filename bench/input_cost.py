"""What one message costs the arbiter, and so what its inputs alone take of a core at
a given estate (issue 20).

Two measurements, each message kind as ``bench/scale.py``'s load generator builds it
(``scale_generator.SimNode``: the project's models, a pair's two data devices with two
paths from each node):

1. **In-process**: the arbiter's own subscription callbacks (``Service.
   subscribe_handler`` around ``_on_heartbeat``, ``_on_storage``, ``_on_mgmt`` of a real
   ``Arbiter`` of a cluster of 100 pairs, not connected) called directly, N messages per
   kind: its envelope check, decode, validation and view, per message. Storage reports
   twice: unchanged from the node's last (the usual case) and each one different.
2. **On the bus**: a real nats-server, a publisher process sending the estate's mix
   (per node and heartbeat interval one heartbeat, and a storage and a management
   report every ``probe_interval``: 2 : 1 : 1 at the example's timings) at a fixed rate,
   and a subscriber process receiving it through nats-py with (a) a callback that does
   nothing — nats-py's own cost, the floor of any handler — and (b) the arbiter's three
   callbacks. CPU time of the subscriber process per message received.

3. **The KV watch of renewals**: a real nats-server with JetStream (file storage), a
   writer process putting group records (the record a lease holder's renewal writes) at
   a fixed rate, and a subscriber process watching ``group.>`` through nats-py's KV
   watcher (a) doing nothing with the entries, (b) as the arbiter does (``records.
   GroupRecords.watch``: decode, ``ClusterView.set_record``). CPU per entry.

From (2b) and (3b): the share of one core the arbiter's inputs take at 10 / 100 / 1,000 /
2,000 pairs (messages a second times CPU per message; renewals: every group renewed every
heartbeat interval, 40 a second a pair — what one KV carries only up to ~160 pairs,
``make bench-kv``), before its decision tick. Prints a table; JSON to
``bench/results/input-cost-<time>.json``.

    .venv/bin/python bench/input_cost.py [--messages 60000] [--rate 12000]
        [--renewals 20000] [--renewal-rate 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "services" / "arbiter"))

from nats.aio.msg import Msg  # noqa: E402
from vtlha_arbiter.main import Arbiter  # noqa: E402

from bench.common import save_results  # noqa: E402
from bench.scale_cluster import cluster_file  # noqa: E402
from bench.scale_generator import Lease, SimNode  # noqa: E402
from vtlha.config import ClusterConfig, load_config  # noqa: E402
from vtlha.subjects import Subjects  # noqa: E402

PAIRS = 100  # the cluster the in-process arbiter and the messages are of
KINDS = ("heartbeat", "storage", "mgmt")
#: messages a node sends per heartbeat interval, by kind (at the example's timings:
#: probe_interval = 2 x heartbeat_interval)
PER_NODE = {"heartbeat": 1.0, "storage": 0.5, "mgmt": 0.5}
GROUPS_PER_NODE = 2  # its data and management groups, each renewed every interval


def _cluster(work: Path) -> ClusterConfig:
    return load_config(cluster_file(PAIRS, work, 4222, 8222))


def _sims(cfg: ClusterConfig) -> list[SimNode]:
    sims = []
    for k, pair in enumerate(cfg.pairs):
        devs = [d for n in pair.nodes for d in n.groups.data.devices]
        for n in pair.nodes:
            sim = SimNode(n.name, pair.name, k, devs, renewed=True,
                          subjects=Subjects(cfg.cluster),
                          interval=cfg.timings.heartbeat_interval)
            sim.owned = {f"{n.name}-data": Lease(1, 1, b""), f"{n.name}-mgmt": Lease(1, 1, b"")}
            sim.rebuild()
            sims.append(sim)
    return sims


def _messages(cfg: ClusterConfig, kind: str, count: int, changing: bool = False
              ) -> list[tuple[str, bytes]]:
    """``count`` messages of ``kind`` round the nodes, as each node sends them."""
    sims = _sims(cfg)
    s = Subjects(cfg.cluster)
    out = []
    for i in range(count):
        sim = sims[i % len(sims)]
        wall = time.time()
        if kind == "heartbeat":
            out.append((s.hb(sim.name), sim.heartbeat(wall)))
        elif kind == "storage":
            if changing:  # one path's latency differs every time
                sim.st_tpl["paths"][0]["latency"] = 0.0001 * (1 + i % 97)
            out.append((s.storage(sim.name), sim.storage(wall)))
        else:
            out.append((s.mgmt(sim.name), sim.mgmt(wall)))
    return out


def _arbiter(cfg: ClusterConfig, state: Path) -> Any:
    return Arbiter(cfg, cfg.witness.host, ["nats://127.0.0.1:1"], state)


def _callbacks(arb: Any) -> dict[str, Any]:
    return {"heartbeat": arb.subscribe_handler("heartbeat", arb._on_heartbeat),
            "storage": arb.subscribe_handler("storage", arb._on_storage),
            "mgmt": arb.subscribe_handler("mgmt", arb._on_mgmt)}


# ---- 1. in-process ------------------------------------------------------------------
async def _in_process(cfg: ClusterConfig, state: Path, count: int) -> dict[str, float]:
    arb = _arbiter(cfg, state)
    cbs = _callbacks(arb)
    rows: dict[str, float] = {}
    for label, kind, changing in (("heartbeat", "heartbeat", False),
                                  ("storage (unchanged)", "storage", False),
                                  ("storage (changed)", "storage", True),
                                  ("mgmt", "mgmt", False)):
        msgs = [Msg(None, subject=subj, data=data)  # type: ignore[arg-type]
                for subj, data in _messages(cfg, kind, count, changing)]
        cb = cbs[kind]
        for m in msgs[:len(cfg.nodes)]:  # every node's first: the view knows them all
            await cb(m)
        before = int(arb.invalid_messages.labels(kind)._value.get())
        t0 = time.process_time()
        for m in msgs:
            await cb(m)
        rows[label] = round(1e6 * (time.process_time() - t0) / len(msgs), 2)
        if int(arb.invalid_messages.labels(kind)._value.get()) != before:
            raise SystemExit(f"{label}: the arbiter refused messages the bench built")
    return rows


# ---- 2. on the bus ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _publish(url: str, work: Path, count: int, rate: float) -> None:
    import nats
    cfg = _cluster(work)
    mix = []
    for kind in KINDS:
        mix += _messages(cfg, kind, int(count * PER_NODE[kind] / sum(PER_NODE.values())))
    mix.sort(key=lambda m: hash(m[1]))  # interleaved
    nc = await nats.connect(url)
    loop = asyncio.get_running_loop()
    t0, sent, batch = loop.time(), 0, 100
    while sent < len(mix):
        for subj, data in mix[sent:sent + batch]:
            await nc.publish(subj, data)
        sent += batch
        await nc.flush()
        await asyncio.sleep(max(0.0, t0 + sent / rate - loop.time()))
    await nc.drain()


async def _subscribe(url: str, work: Path, count: int, handlers: str) -> None:
    import nats
    cfg = _cluster(work)
    got = 0
    done = asyncio.Event()
    cbs: dict[str, Any] = {}
    if handlers == "arbiter":
        cbs = _callbacks(_arbiter(cfg, work / "state"))

    def counted(cb: Any) -> Any:
        async def _cb(msg: Msg) -> None:
            nonlocal got
            if cb is not None:
                await cb(msg)
            got += 1
            if got >= count:
                done.set()
        return _cb

    nc = await nats.connect(url, pending_size=512 * 1024 * 1024)
    s = Subjects(cfg.cluster)
    for kind, subject in (("heartbeat", s.hb("*")), ("storage", s.storage("*")),
                          ("mgmt", s.mgmt("*"))):
        await nc.subscribe(subject, cb=counted(cbs.get(kind)),
                           pending_msgs_limit=10 * count, pending_bytes_limit=-1)
    await nc.flush()
    print("ready", flush=True)
    c0, t0 = time.process_time(), time.monotonic()
    await asyncio.wait_for(done.wait(), 600)
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    print(f"{got} {cpu} {wall}", flush=True)
    await nc.close()


async def _kv_writer(url: str, work: Path, count: int, rate: float) -> None:
    import nats

    from vtlha.messages import GroupRecord, encode
    cfg = _cluster(work)
    groups = sorted(cfg.groups())
    nc = await nats.connect(url)
    kv = await nc.jetstream().key_value("bench")
    bodies = {g: encode(GroupRecord(owner=home, term=1, epoch=1, state="held",
                                    renewed_by=home))
              for g, (home, _) in cfg.groups().items()}
    loop = asyncio.get_running_loop()
    t0, sent, batch = loop.time(), 0, 50
    while sent < count:
        await asyncio.gather(*(kv.put(f"group.{g}", bodies[g]) for g in
                               (groups[(sent + i) % len(groups)] for i in range(batch))))
        sent += batch
        await asyncio.sleep(max(0.0, t0 + sent / rate - loop.time()))
    await nc.close()


async def _kv_watcher(url: str, work: Path, count: int, handlers: str) -> None:
    import nats
    from vtlha_arbiter.view import ClusterView

    from vtlha.messages import GroupRecord, decode
    cfg = _cluster(work)
    view = ClusterView(cfg, started_at=time.monotonic())
    nc = await nats.connect(url)
    kv = await nc.jetstream().key_value("bench")
    watcher = await kv.watch("group.>")
    print("ready", flush=True)
    got = 0
    c0, t0 = 0.0, 0.0
    async for entry in watcher:
        if entry is None or not entry.value or entry.revision is None:
            continue
        if got == 0:
            c0, t0 = time.process_time(), time.monotonic()
        if handlers == "arbiter":  # as records.GroupRecords.watch does
            group = entry.key.removeprefix("group.")
            if group in cfg.groups():
                view.set_record(group, decode(GroupRecord, entry.value), entry.revision,
                                time.monotonic())
        got += 1
        if got >= count:
            break
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    print(f"{got} {cpu} {wall}", flush=True)
    await nc.close()


def _kv_watch(work: Path, count: int, rate: float) -> dict[str, dict[str, float]]:
    import nats
    nats_bin = Path(sys.executable).parent / "nats-server"
    port = _free_port()
    url = f"nats://127.0.0.1:{port}"
    store = work / "js"
    srv = subprocess.Popen([str(nats_bin), "-a", "127.0.0.1", "-p", str(port), "-js",
                            "-sd", str(store)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: dict[str, dict[str, float]] = {}

    async def bucket() -> None:
        for _ in range(50):
            try:
                nc = await nats.connect(url)
                break
            except Exception:
                await asyncio.sleep(0.1)
        from nats.js.api import KeyValueConfig
        await nc.jetstream().create_key_value(KeyValueConfig(bucket="bench", history=1))
        await nc.close()
    try:
        asyncio.run(bucket())
        for handlers in ("none", "arbiter"):
            sub = subprocess.Popen([sys.executable, __file__, "_kvsub", url, str(work),
                                    str(count), handlers], stdout=subprocess.PIPE, text=True)
            assert sub.stdout is not None
            if sub.stdout.readline().strip() != "ready":
                raise SystemExit("the KV watcher did not start")
            subprocess.run([sys.executable, __file__, "_kvpub", url, str(work), str(count),
                            str(rate)], timeout=900, check=True)
            out, _ = sub.communicate(timeout=900)
            got, cpu, wall = out.split()
            n = int(got)
            rows[handlers] = {"entries": n, "us_per_entry": round(1e6 * float(cpu) / n, 2),
                              "received_per_s": round(n / float(wall)),
                              "core_share": round(float(cpu) / float(wall), 3)}
    finally:
        srv.terminate()
        srv.wait(10)
    return rows


def _on_bus(work: Path, count: int, rate: float) -> dict[str, dict[str, float]]:
    nats_bin = Path(sys.executable).parent / "nats-server"
    port = _free_port()
    url = f"nats://127.0.0.1:{port}"
    srv = subprocess.Popen([str(nats_bin), "-a", "127.0.0.1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: dict[str, dict[str, float]] = {}
    try:
        for handlers in ("none", "arbiter"):
            total = sum(int(count * PER_NODE[k] / sum(PER_NODE.values())) for k in KINDS)
            sub = subprocess.Popen([sys.executable, __file__, "_sub", url, str(work),
                                    str(total), handlers], stdout=subprocess.PIPE, text=True)
            assert sub.stdout is not None
            if sub.stdout.readline().strip() != "ready":
                raise SystemExit("the subscriber did not start")
            pub = subprocess.run([sys.executable, __file__, "_pub", url, str(work),
                                  str(count), str(rate)], timeout=900, check=True)
            del pub
            out, _ = sub.communicate(timeout=900)
            got, cpu, wall = out.split()
            n = int(got)
            rows[handlers] = {"messages": n, "us_per_message": round(1e6 * float(cpu) / n, 2),
                              "received_per_s": round(n / float(wall)),
                              "core_share": round(float(cpu) / float(wall), 3)}
    finally:
        srv.terminate()
        srv.wait(10)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_pub":
        asyncio.run(_publish(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]),
                             float(sys.argv[5])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_kvpub":
        asyncio.run(_kv_writer(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]),
                               float(sys.argv[5])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_kvsub":
        asyncio.run(_kv_watcher(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]),
                                sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_sub":
        asyncio.run(_subscribe(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=60000,
                    help="messages per measurement (default 60,000)")
    ap.add_argument("--renewals", type=int, default=20000,
                    help="renewals written for the KV watch measurement (default 20,000)")
    ap.add_argument("--renewal-rate", type=float, default=2000.0,
                    help="renewals a second the writer aims at (default 2,000)")
    ap.add_argument("--rate", type=float, default=12000.0,
                    help="messages a second the publisher sends (default 12,000: 300 "
                    "pairs' worth; the estimate scales per message)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vtlha-input-") as tmp:
        work = Path(tmp)
        cfg = _cluster(work)
        print("in-process ...", file=sys.stderr, flush=True)
        inproc = asyncio.run(_in_process(cfg, work / "state", args.messages // 4))
        print("on the bus ...", file=sys.stderr, flush=True)
        bus = _on_bus(work, args.messages, args.rate)
        print("the KV watch ...", file=sys.stderr, flush=True)
        kvw = _kv_watch(work, args.renewals, args.renewal_rate)
    hb = cfg.timings.heartbeat_interval
    per_pair = 2 * sum(PER_NODE.values()) / hb  # messages a second per pair
    print(f"\nIn-process, the arbiter's callbacks ({PAIRS} pairs), CPU per message:")
    for label, us in inproc.items():
        print(f"  {label:<22} {us:>7.2f} us")
    print(f"\nOn the bus (nats-server, nats-py; the mix 2:1:1 at {args.rate:,.0f}/s):")
    for h, r in bus.items():
        print(f"  handlers {h:<8} {r['us_per_message']:>7.2f} us/message "
              f"({r['received_per_s']:,}/s received, {100 * r['core_share']:.0f} % of a core)")
    for h, r in kvw.items():
        print(f"  KV watch, {h:<8} {r['us_per_entry']:>7.2f} us/renewal "
              f"({r['received_per_s']:,}/s received, {100 * r['core_share']:.0f} % of a core)")
    us = bus["arbiter"]["us_per_message"]
    floor = bus["none"]["us_per_message"]
    kv_us = kvw["arbiter"]["us_per_entry"]
    renewals_per_pair = 2 * GROUPS_PER_NODE / hb
    estate = []
    print(f"\nThe inputs alone at 10 Hz ({per_pair:.0f} messages and {renewals_per_pair:.0f} "
          "renewals a second a pair), share of one core:")
    print(f"  {'pairs':>6} {'messages/s':>11} {'nats-py alone':>14} {'messages':>9} "
          f"{'renewals/s':>11} {'KV watch':>9} {'together':>9}")
    for pairs in (10, 100, 1000, 2000):
        rate, renewals = pairs * per_pair, pairs * renewals_per_pair
        row = {"pairs": pairs, "messages_per_s": rate, "renewals_per_s": renewals,
               "floor_share": round(rate * floor / 1e6, 3),
               "arbiter_share": round(rate * us / 1e6, 3),
               "kv_watch_share": round(renewals * kv_us / 1e6, 3)}
        row["inputs_share"] = round(row["arbiter_share"] + row["kv_watch_share"], 3)
        estate.append(row)
        print(f"  {pairs:>6} {rate:>11,.0f} {100 * row['floor_share']:>13.0f}% "
              f"{100 * row['arbiter_share']:>8.0f}% {renewals:>11,.0f} "
              f"{100 * row['kv_watch_share']:>8.0f}% {100 * row['inputs_share']:>8.0f}%")
    path = save_results("input-cost", {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "load": os.getloadavg()},
        "pairs": PAIRS, "in_process_us": inproc, "bus": bus, "kv_watch": kvw,
        "estate": estate,
        "rate": args.rate, "messages": args.messages})
    print(f"results: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
