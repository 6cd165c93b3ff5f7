"""What recording an event costs the caller (``Outbox.put``, what ``Service.emit`` does:
a file written and renamed, no network, no fsync) and how fast a drain publishes to a
real nats-server (one server, JetStream file storage, ``sync_interval: always``, fsync
of the outbox files before each publish). Prints a table and writes JSON to
bench/results/.

    .venv/bin/python bench/outbox_put.py [--events 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nats  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bench.common import save_results  # noqa: E402
from vtlha import bus  # noqa: E402
from vtlha.messages import Event  # noqa: E402
from vtlha.outbox import Outbox, stream_publisher  # noqa: E402
from vtlha.subjects import Subjects  # noqa: E402
from vtlha_lab.natsserver import NatsServer, NatsServerSpec  # noqa: E402
from vtlha_lab.ports import free_port  # noqa: E402


def _port() -> int:
    return free_port()


def _event(i: int, inputs_kib: int) -> Event:
    return Event(cluster="bench", node="node-a", kind="bench.event", reason=f"event {i}",
                 inputs={"pad": "x" * (inputs_kib * 1024)}, data={"i": i})


async def _run(work: Path, n: int) -> dict[str, Any]:
    spec = NatsServerSpec(name="bench", client_port=_port(), monitor_port=_port(),
                          store_dir=work / "js")
    srv = NatsServer(spec, work / "nats.log")
    srv.start()
    try:
        srv.wait_ready()
        nc = await nats.connect(spec.url)
        js = nc.jetstream(timeout=2.0)
        subj = Subjects("bench")
        await bus.ensure_events_stream(js, subj, 1, 256 * 1024 * 1024, 3600.0)
        out: dict[str, Any] = {}
        for kib in (0, 16):  # a plain event; one carrying a decision's inputs
            box = Outbox(work / f"outbox-{kib}", CollectorRegistry())
            box.load()
            events = [_event(i, kib) for i in range(n)]
            took = []
            for e in events:
                t0 = time.perf_counter()
                box.put(e)
                took.append(time.perf_counter() - t0)
            stop = asyncio.Event()
            stop.set()  # drain what is there and return (one attempt each)
            t0 = time.perf_counter()
            await asyncio.wait_for(box.run(stream_publisher(lambda: js, subj), stop), 300)
            drain = time.perf_counter() - t0
            if box.pending():
                raise RuntimeError(f"{len(box.pending())} events not published")
            took.sort()
            out[f"{kib}KiB"] = {
                "put_us": {"p50": statistics.median(took) * 1e6,
                           "p99": took[int(0.99 * (len(took) - 1))] * 1e6,
                           "max": took[-1] * 1e6},
                "drain_events_per_s": n / drain}
        await nc.close()
        return out
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=2000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vtlha-bench-outbox-"))
    try:
        res = asyncio.run(_run(work, args.events))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"bench": "outbox-put", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": platform.platform(), "load1": os.getloadavg()[0],
               "events": args.events, "results": res}
    print(f"{'event size':<12} {'put p50':>10} {'put p99':>10} {'put max':>10} "
          f"{'drain /s':>10}")
    for size, r in res.items():
        p = r["put_us"]
        print(f"{size:<12} {p['p50']:>7.0f} us {p['p99']:>7.0f} us {p['max']:>7.0f} us "
              f"{r['drain_events_per_s']:>10.0f}")
    print(f"(load average {summary['load1']:.1f}; put is what emit costs the caller)")
    path = save_results("outbox-put", summary)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
