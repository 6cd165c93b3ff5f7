"""Replay seeds: ``python -m tests.unit.sim SEED [SEED ...] [--recreate]`` prints each
history's outcome and, for a failing one, its faults and last events.

The long run: ``python -m tests.unit.sim --many N [--start S]`` checks N seeds from S
(default 100000) with the shipped classes, prints progress every 1,000 seeds and the
slowest recovery against the bound, and exits 1 on the first violation.

Recreated buckets: ``python -m tests.unit.sim --many N --recreate [--start S]`` runs the
first N histories from S (default 0) of ``draw(seed, recreate=True)`` that recreate the
bucket (the others are skipped), and prints every failing seed and how many failed."""

from __future__ import annotations

import sys
import time

from .faults import draw
from .runner import run
from .timings import Timings


def many(n: int, start: int) -> int:
    t0 = time.process_time()
    worst: tuple[float, int] = (0.0, start)
    for i, seed in enumerate(range(start, start + n), 1):
        r = run(seed)
        if r.violation is not None:
            print(r.report())
            return 1
        worst = max(worst, (r.served_after or 0.0, seed))
        if i % 1000 == 0 or i == n:
            print(f"{i}/{n} seeds ok ({time.process_time() - t0:.0f} s CPU); slowest "
                  f"recovery {worst[0]:.2f} s (seed {worst[1]}), bound "
                  f"{Timings().liveness_bound():.2f} s", flush=True)
    return 0


def many_recreated(n: int, start: int) -> int:
    t0 = time.process_time()
    seed, ran, failed = start, 0, []
    while ran < n:
        plan = draw(seed, recreate=True)
        if any(f.kind == "recreate" for f in plan.faults):
            ran += 1
            r = run(seed, plan=plan)
            if r.violation is not None:
                failed.append(seed)
                print(f"seed {seed}: {r.violation}", flush=True)
        seed += 1
    print(f"{ran} histories with a recreated bucket (seeds {start}-{seed - 1}): "
          f"{len(failed)} failed {failed} ({time.process_time() - t0:.0f} s CPU)")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if "--many" in argv:
        n = int(argv[argv.index("--many") + 1])
        if "--recreate" in argv:
            start = int(argv[argv.index("--start") + 1]) if "--start" in argv else 0
            return many_recreated(n, start)
        start = int(argv[argv.index("--start") + 1]) if "--start" in argv else 100000
        return many(n, start)
    recreate = "--recreate" in argv
    failed = 0
    for arg in (a for a in argv if not a.startswith("--")):
        seed = int(arg)
        r = run(seed, plan=draw(seed, recreate=recreate))
        if r.violation is None:
            print(f"seed {seed}: ok, every group served {r.served_after:.2f} s after the "
                  f"heal ({r.events} events)")
        else:
            failed += 1
            print(r.report())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
