"""The trials of ``bench/failover.py``, run in turn: per interval one vtl-ha lab (built
again when its baseline is not restored), each trial recorded in the state file and
skipped on a rerun, keepalived's trial after vtl-ha's; stopped cleanly by a pause file,
a time limit, Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.failover_cases import CASES, DEFAULT_TRIALS, OWNER, Case
from bench.failover_keepalived import ka_timings, ka_trial
from bench.failover_measure import headline
from bench.failover_ours import Ours, ours_trial
from bench.failover_state import append_state, key, load_state


class Stopped(Exception):
    """Ctrl-C or SIGTERM: clean up and leave."""


def _raise_stopped(signum: int, _frame: object) -> None:
    if os.getpid() != OWNER:  # a forked helper (pyroute2's, for a namespace): it owns
        signal.signal(signum, signal.SIG_DFL)  # nothing, and dies as it would have
        os.kill(os.getpid(), signum)
        return
    raise Stopped(f"signal {signum}")


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    old = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Runner:
    def __init__(self, args: argparse.Namespace, ka_version: str | None) -> None:
        self.args = args
        self.ka_version = ka_version
        self.done = {key(r) for r in load_state(args.state) if not r.get("error")}
        self.t_start = time.monotonic()
        self.ran = 0

    def stop_reason(self) -> str | None:
        a = self.args
        if a.pause_file and Path(a.pause_file).exists():
            return f"paused: {a.pause_file} exists (rerun to resume)"
        if a.time_limit and time.monotonic() - self.t_start > a.time_limit:
            return f"time limit of {a.time_limit:g} s reached (rerun to resume)"
        return None

    def record(self, interval: float, case: str, system: str, trial: int,
               fn: Callable[[], dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        t = time.monotonic()
        load = os.getloadavg()[0]
        try:
            r = fn()
            err = None
        except (Stopped, KeyboardInterrupt):
            raise
        except Exception as exc:
            r, err = {}, repr(exc)
        rec = {"interval": interval, "case": case, "system": system, "trial": trial,
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load1": load,
               "trial_s": round(time.monotonic() - t, 2), **extra, **r, "error": err}
        rec["outage_s"], rec["outage_arp_s"] = headline(case, r) if not err else (None, None)
        append_state(self.args.state, rec)
        self.ran += 1
        if not err:
            self.done.add(key(rec))
        o = rec["outage_s"]
        print(f"  {interval:g} s {case:<10} {system:<10} #{trial + 1}: "
              + (f"FAILED {err}" if err else
                 f"outage {'-' if o is None else f'{o * 1000:.0f} ms'}, double holders "
                 f"{rec.get('double_holders')}, ended with two {rec.get('ended_two_holders')}")
              + f" ({rec['trial_s']:.0f} s, load {load:.2f})", flush=True)
        return rec

    def interval(self, iv: float) -> str | None:
        a = self.args
        n = a.trials or DEFAULT_TRIALS.get(iv, 10)
        ours = Ours(iv)
        try:
            for name in a.cases:
                case = CASES[name]
                for i in range(n):
                    if (why := self.ours_step(ours, case, i)) is not None:
                        return why
                    if case.keepalived and self.ka_version is not None and \
                            (why := self.ka_step(ours, case, i)) is not None:
                        return why
        finally:
            ours.down(keep=False)
        return None

    def ours_step(self, ours: Ours, case: Case, i: int) -> str | None:
        iv = ours.interval
        if (iv, case.name, "vtl-ha", i) in self.done:
            return None
        if (why := self.stop_reason()) is not None:
            return why
        if ours.lab is None and (why := self.build(ours)) is not None:
            return why
        t = ours.lab.cfg.timings
        extra = {"fall": t.fall, "check_interval_s": t.check_interval,
                 "heartbeat_interval_s": t.heartbeat_interval}
        rec = self.record(iv, case.name, "vtl-ha", i, lambda: ours_trial(ours, case), extra)
        try:
            rec_restore = ours.restore()
        except (Stopped, KeyboardInterrupt):
            raise
        except Exception as exc:
            rec_restore = {"ok": False, "error": repr(exc)}
        if not rec_restore["ok"] or rec.get("error"):
            print(f"    baseline not restored ({rec_restore}): the lab is built again",
                  flush=True)
            ours.down(keep=True)
        return None

    def build(self, ours: Ours) -> str | None:
        """Start vtl-ha's lab (a second attempt after a failed one); a sentence if the
        run cannot go on."""
        for attempt in (1, 2):
            try:
                ours.up()
                return None
            except (Stopped, KeyboardInterrupt):
                raise
            except Exception as exc:
                print(f"  the vtl-ha lab did not start (attempt {attempt}): {exc!r}; files in "
                      f"{ours.work}", flush=True)
                ours.down(keep=True)
        return "the vtl-ha lab did not start twice"

    def ka_step(self, ours: Ours, case: Case, i: int) -> str | None:
        iv = ours.interval
        if (iv, case.name, "keepalived", i) in self.done:
            return None
        if (why := self.stop_reason()) is not None:
            return why
        nice, ttl, dead, margin = ka_timings(iv)
        self.record(iv, case.name, "keepalived", i,
                    lambda: ka_trial(case, iv, nice, ttl, dead, margin),
                    {"keepalived": self.ka_version})
        return None
