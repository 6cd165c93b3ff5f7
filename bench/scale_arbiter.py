"""The arbiter under test in ``bench/scale.py``, from outside: its log scanned as it grows,
why its start failed and which ticks overran (from its log), and its run under cProfile
(``scale.py _arbiter_profiled``, for ``--profile``) with the profile printed."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import orjson


class LogScan:
    """Looks for a line in a growing log file, reading only what was added."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.tail = b""

    def has(self, needle: str) -> bool:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return False
        self.offset += len(data)
        chunk, self.tail = self.tail + data, data[-len(needle):]
        return needle.encode() in chunk


def start_failure(path: Path) -> dict[str, Any]:
    """Why the arbiter's start failed, from its log: the error, the innermost frame of
    vtl-ha's own code it came from, what its start was waiting for (``bus.retry_js``)
    and how often it had retried that."""
    error, where, what, retries = None, None, None, 0
    first, failed = None, None
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if first is None and line.startswith("{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    first = float(orjson.loads(line).get("ts"))
            if '"jetstream not ready, retrying"' not in line and '"start failed"' not in line:
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                rec = orjson.loads(line)
                if rec.get("msg") == "jetstream not ready, retrying":
                    retries, what = retries + 1, rec.get("what")
                    continue
                error, failed = rec.get("error"), rec.get("ts")
                frames = [ln.strip() for ln in str(rec.get("exc", "")).splitlines()
                          if ln.strip().startswith("File ") and "vtlha" in ln
                          and "site-packages" not in ln and "bounded.py" not in ln]
                if frames:
                    f = frames[-1].split('"')
                    where = f"{Path(f[1]).name}{f[2].replace(', line ', ':').split(',')[0]}" \
                        f" in {frames[-1].rsplit(' in ', 1)[-1]}"
    return {"error": f"{error} at {where}" if where else error, "waiting_for": what,
            "jetstream_retries": retries,
            "failed_after_s": round(failed - first, 1) if first and failed else None}


def log_summary(path: Path) -> dict[str, Any]:
    """The arbiter's own warnings about itself: ticks that overran (by loop) and the
    worst overrun."""
    overruns: dict[str, int] = {}
    worst = 0.0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if '"tick overran"' not in line:
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                rec = orjson.loads(line)
                overruns[rec.get("loop", "?")] = overruns.get(rec.get("loop", "?"), 0) + 1
                worst = max(worst, float(rec.get("late_s", 0.0)))
    return {"tick_overruns": overruns, "worst_overrun_s": worst}


def print_profile(path: Path) -> None:
    import io
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumulative").print_stats(40)
    text = buf.getvalue()
    path.with_suffix(".txt").write_text(text)
    print(f"  profile: {path} (top functions: {path.with_suffix('.txt')})")
    print("\n".join(text.splitlines()[:60]))


def arbiter_profiled(argv: list[str]) -> None:
    """The real arbiter's entry point under cProfile (``--profile``); the profile is
    written when it exits (SIGTERM)."""
    import cProfile

    out, rest = argv[0], argv[1:]
    from vtlha_arbiter.main import main as arbiter_main

    prof = cProfile.Profile()
    prof.enable()
    try:
        arbiter_main(rest)
    except SystemExit:
        pass
    finally:
        prof.disable()
        prof.dump_stats(out)
