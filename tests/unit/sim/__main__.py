"""Replay seeds: ``python -m tests.unit.sim SEED [SEED ...] [--recreate]`` prints each
history's outcome and, for a failing one, its faults and last events."""

from __future__ import annotations

import sys

from .faults import draw
from .runner import run


def main(argv: list[str]) -> int:
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
