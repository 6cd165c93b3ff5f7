"""Round trips of SCSI-3 persistent reservation commands and 4 KiB I/O over iSCSI, as a
vtl-ha service sees them: ``vtlha.iscsi.session.Session`` from asyncio (libiscsi through
ctypes on the session's own thread) against a real tgtd (``vtlha_lab.tgt``) on
127.0.0.1, one LUN of 64 MiB with 4 KiB blocks in a file under /tmp.

Measured, each --runs times (default 2000), median / p99 / max:

  TEST UNIT READY                           (no data: the round trip's floor)
  PR OUT REGISTER AND IGNORE EXISTING KEY   (the same key again: what a re-register costs)
  PR OUT PREEMPT of the session's own key   (one PREEMPT: the takeover's command)
  PR IN READ KEYS, PR IN READ RESERVATION   (what a status read or a verification costs)
  READ(16) 4 KiB, WRITE(16) 4 KiB with FUA  (random block; FUA: on the file before the
                                             answer, as the tape service acknowledges)
  take() between two nodes, alternating     (register + READ RESERVATION + PREEMPT: a
                                             whole takeover of one LUN, --runs / 10 times)

Prints a table and writes JSON to bench/results/iscsi-rtt-<timestamp>.json. Needs root
(tgtd's control socket) and Debian's tgt and libiscsi7 (``make sysdeps``).

    .venv/bin/python bench/iscsi_rtt.py [--runs 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fence_refresh import cpu_pressure, stats_ms  # noqa: E402  (bench/ helpers)

from bench.common import save_results  # noqa: E402
from vtlha.iscsi.reservation import take  # noqa: E402
from vtlha.iscsi.scsi import RESERVATION_TYPE, make_key  # noqa: E402
from vtlha.iscsi.session import Permit, Session, Target, initiator_name  # noqa: E402
from vtlha_lab.ports import free_port  # noqa: E402
from vtlha_lab.tgt import Tgtd, TgtdSpec  # noqa: E402

IQN = "iqn.2026-12.org.vtlha:bench"
LUN_BYTES = 64 << 20
BLOCK = 4096


async def timed(n: int, op: Callable[[int], Awaitable[Any]]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await op(i)
        out.append(time.perf_counter() - t0)
    return out


async def measure(portal: str, runs: int) -> dict[str, dict[str, Any]]:
    target = Target(portal, IQN, 1)
    a = await Session.open(target, initiator_name("bench", "node-a", "data"))
    b = await Session.open(target, initiator_name("bench", "node-b", "data"))
    permit = Permit("bench", 2, time.monotonic() + 3600)
    ka = make_key("bench", "node-a", 1)
    blocks = a.blocks
    data = os.urandom(BLOCK)
    rng = random.Random(1)
    res: dict[str, dict[str, Any]] = {}
    try:
        await take(a, ka, permit)
        for _ in range(50):   # warm up the target's and the thread's paths
            await a.read(rng.randrange(blocks), 1)
        res["TEST UNIT READY"] = stats_ms(await timed(runs, lambda i: a.test_unit_ready()))
        res["PR OUT REGISTER AND IGNORE"] = stats_ms(
            await timed(runs, lambda i: a.register_ignore(ka, permit)))
        res["PR OUT PREEMPT (own key)"] = stats_ms(
            await timed(runs, lambda i: a.preempt(ka, ka, RESERVATION_TYPE, permit)))
        res["PR IN READ KEYS"] = stats_ms(await timed(runs, lambda i: a.read_keys()))
        res["PR IN READ RESERVATION"] = stats_ms(
            await timed(runs, lambda i: a.read_reservation()))
        res["READ(16) 4 KiB"] = stats_ms(
            await timed(runs, lambda i: a.read(rng.randrange(blocks), 1)))
        res["WRITE(16) 4 KiB FUA"] = stats_ms(
            await timed(runs, lambda i: a.write(rng.randrange(blocks), data)))
        epochs = iter(range(3, 3 + runs))

        async def takeover(i: int) -> None:
            epoch = next(epochs)
            s, node = (b, "node-b") if i % 2 == 0 else (a, "node-a")
            p = Permit("bench", epoch, time.monotonic() + 3600)
            await take(s, make_key("bench", node, epoch), p)

        res["take() (takeover of one LUN)"] = stats_ms(await timed(max(10, runs // 10),
                                                                   takeover))
    finally:
        await a.close()
        await b.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: tgtd's control socket is in /var/run/tgtd")
    load0, psi0 = os.getloadavg(), cpu_pressure()
    with tempfile.TemporaryDirectory(prefix="vtlha-iscsi-bench-") as tmp:
        img = Path(tmp) / "lun.img"
        with open(img, "wb") as f:
            f.truncate(LUN_BYTES)
        spec = TgtdSpec(IQN, [f"127.0.0.1:{free_port()}"], {"lun": img}, block_size=BLOCK)
        with Tgtd(spec, Path(tmp) / "tgtd.log"):
            res = asyncio.run(measure(spec.portals[0], args.runs))
    load1, psi1 = os.getloadavg(), cpu_pressure()
    print()
    print("iSCSI round trips through vtlha.iscsi.Session (asyncio -> session thread -> "
          "libiscsi -> tgtd on 127.0.0.1)")
    print(f"{'command':<32} {'runs':>6} {'median ms':>10} {'p99 ms':>9} {'max ms':>9}")
    for name, s in res.items():
        print(f"{name:<32} {s['runs']:>6} {s['median_ms']:>10.3f} {s['p99_ms']:>9.3f} "
              f"{s['max_ms']:>9.3f}")
    print(f"load average {load0[0]:.2f} before, {load1[0]:.2f} after; {os.cpu_count()} CPUs; "
          f"CPU pressure after: {psi1}")
    summary = {"bench": "iscsi-rtt", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "host": platform.node(), "python": platform.python_version(),
               "cpus": os.cpu_count(), "loadavg_before": load0, "loadavg_after": load1,
               "cpu_pressure_before": psi0, "cpu_pressure_after": psi1,
               "block_size": BLOCK, "results": res}
    path = save_results("iscsi-rtt", summary)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
