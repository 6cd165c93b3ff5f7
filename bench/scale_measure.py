"""The numbers of ``bench/scale.py``: quantiles, a process's CPU time and RSS from
``/proc``, the arbiter's metrics page scanned and its histograms' quantiles, the
detection and claim latencies of the silences summarised."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of xs; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def cpu_seconds(pid: int) -> float | None:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(f[11]) + int(f[12])) / TICK


def rss_mb(pid: int) -> float | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return None


def parse_metrics(text: str, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{metric name: {label string: value}} for the named metrics (a plain scan: the
    arbiter's page has a few lines per node and group)."""
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for line in text.splitlines():
        if not line.startswith(names):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        if name in out:
            with contextlib.suppress(ValueError):
                out[name][labels.rstrip("}")] = float(value)
    return out


def histogram_quantile(q: float, before: dict[str, float], after: dict[str, float]
                       ) -> float | None:
    """Prometheus' histogram_quantile over the buckets' increase between two scrapes."""
    buckets = []
    for labels, v in after.items():
        le = labels.split('le="')[1].split('"')[0]
        bound = math.inf if le == "+Inf" else float(le)
        buckets.append((bound, v - before.get(labels, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank, lo, below = q * total, 0.0, 0.0
    for bound, cum in buckets:
        if cum >= rank:
            if math.isinf(bound):
                return lo
            span = cum - below
            return lo + (bound - lo) * ((rank - below) / span if span else 1.0)
        lo, below = bound, cum
    return lo


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    down = [r["down_s"] for r in rows if r["down_s"] is not None]
    claim = [r["claim_s"] for r in rows if r["claim_s"] is not None]
    return {"detected": len(down), "down_p50_s": pct(down, 0.5), "down_p99_s": pct(down, 0.99),
            "down_max_s": max(down, default=None),
            "claimed": len(claim), "claim_p50_s": pct(claim, 0.5),
            "claim_p99_s": pct(claim, 0.99), "claim_max_s": max(claim, default=None)}
