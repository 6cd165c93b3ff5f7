"""The output of ``bench/scale.py``: the table per size (with the issue's target and how
the arbiter's CPU grows with the pairs) and the plot of its CPU and the detection
latency against pairs (``docs/img/scale.png``)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def table(rows: list[dict[str, Any]], target: float, interval: float) -> None:
    print()
    print(f"{'pairs':>6} {'nodes':>6} {'gen':>4} {'renewed':>8} {'arb CPU':>8} {'RSS MB':>7} "
          f"{'lag p99':>8} {'hb pub':>7} {'hb ok':>6} {'detect p50':>11} {'p99':>8} "
          f"{'claim p99':>10} {'found':>6} {'false':>6} {'active':>7} {'load':>5}")
    for r in rows:
        if "exited" in r["startup"]:
            ex = r["startup"]["exited"]
            print(f"{r['pairs']:>6} {r['nodes']:>6} {r['generators']:>4} {r['renewed_nodes']:>8}"
                  f"  the arbiter EXITED {ex.get('failed_after_s') or ex['after_s']} s into its "
                  f"start: {ex['error']}, waiting for {ex.get('waiting_for')} "
                  f"({(ex['cpu_share'] or 0) * 100:.0f} % of a core until then)")
            continue
        st, si = r["steady"], r["silence"]
        kept = st["hb_validated_per_s"] / st["hb_published_per_s"] \
            if st["hb_published_per_s"] else 0.0
        pub = st["hb_published_per_s"] * interval / r["nodes"]  # of the heartbeats due
        print(f"{r['pairs']:>6} {r['nodes']:>6} {r['generators']:>4} {r['renewed_nodes']:>8} "
              f"{st['arbiter_cpu'] * 100:>7.0f}% {st['arbiter_rss_mb']:>7.1f} "
              f"{fmt_s(st['lag_p99_s']):>8} {pub * 100:>6.0f}% {kept * 100:>5.0f}% "
              f"{fmt_s(si['down_p50_s']):>11} {fmt_s(si['down_p99_s']):>8} "
              f"{fmt_s(si['claim_p99_s']):>10} "
              f"{si['detected']:>3}/{len(si['silences']):<2} {si['false_downs']:>6} "
              f"{acting(st):>7} {st['load_1min']:>5.1f}")
    print("(hb pub: heartbeats the generator published, of those due; hb ok: of those, "
          "the ones the arbiter validated)")
    print(f"\ntarget (issue 20): 1,000 pairs at 10 Hz, detection p99 <= {fmt_s(target)} "
          f"((k+1) x heartbeat_interval), arbiter <= 50 % of one core, cost linear or better")
    steady = [(r["pairs"], r["steady"]["arbiter_cpu"]) for r in rows if "steady" in r]
    for (n1, c1), (n2, c2) in itertools.pairwise(steady):
        if c1 > 0 and c2 > 0:
            print(f"  CPU {n1} -> {n2} pairs: x{c2 / c1:.1f} for x{n2 / n1:.0f} pairs "
                  f"(exponent {math.log(c2 / c1) / math.log(n2 / n1):.2f}; 1 = linear; "
                  f"flattens once the arbiter's one core is saturated)")


def acting(st: dict[str, Any]) -> str:
    """Whether the arbiter was active through the steady window."""
    a, b = st.get("active_at_start"), st.get("active_at_end")
    if a is None:
        return "?"
    return "yes" if a and b else "no" if not a and not b else "lost" if a else "gained"


def plot(rows: list[dict[str, Any]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if "steady" in r]
    died = [r for r in rows if "exited" in r["startup"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
    a1.plot([r["pairs"] for r in ran], [r["steady"]["arbiter_cpu"] * 100 for r in ran], "o-",
            label="steady (no silences)")
    a1.plot([r["pairs"] for r in ran], [r["silence"]["arbiter_cpu"] * 100 for r in ran], "s--",
            label="during the silences")
    if died:
        a1.plot([r["pairs"] for r in died],
                [(r["startup"]["exited"]["cpu_share"] or 0) * 100 for r in died], "rx", ms=10,
                label="start failed: the arbiter exited")
    a1.axhline(50, color="red", ls=":", label="target: <= 50 % at 1,000 pairs")
    a1.set_xscale("log")
    a1.set_ylim(0, 110)
    a1.set_xlabel("pairs (2 nodes each), 10 Hz heartbeats")
    a1.set_ylabel("arbiter CPU, % of one core")
    a1.set_title("Arbiter CPU")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    for key, style, label in (("down_p50_s", "o-", "detection p50 (node.down)"),
                              ("down_p99_s", "o--", "detection p99 (node.down)"),
                              ("claim_p99_s", "s:", "claim in the KV, p99")):
        pts = [(r["pairs"], r["silence"][key]) for r in ran if r["silence"][key] is not None]
        if pts:
            a2.plot([p for p, _ in pts], [v for _, v in pts], style, label=label)
    for k, r in enumerate(rows):
        if "exited" in r["startup"] or not r["silence"]["detected"]:
            why = "the arbiter\nexited at start" if "exited" in r["startup"] else \
                "no silence\ndetected"
            y = target * (1.2 + 0.5 * (k % 2))
            a2.annotate(f"{r['pairs']} pairs:\n{why}", (r["pairs"], y), fontsize=7,
                        ha="center", color="darkred")
    for r in ran:
        if not r["steady"].get("active_at_start", True):
            y = r["steady"]["arbiter_cpu"] * 100 + 6
            a1.annotate("not active\n(never acted)", (r["pairs"], y), fontsize=7, ha="center",
                        color="darkred")
    top = max([r["silence"][k] or 0.0 for r in ran for k in ("down_p99_s", "claim_p99_s")]
              + [target * 2.2])
    a2.axhline(target, color="red", ls=":", label=f"target p99: {target:g} s")
    a2.set_xscale("log")
    a2.set_xlim(min(r["pairs"] for r in rows) / 1.5, max(r["pairs"] for r in rows) * 1.5)
    a2.set_ylim(0, top * 1.1)
    a2.set_xlabel("pairs (2 nodes each), 10 Hz heartbeats")
    a2.set_ylabel("seconds from the last heartbeat")
    a2.set_title("Detection latency of a silent node")
    a2.legend(fontsize=8, loc="lower left")
    a2.grid(alpha=0.3, which="both")
    fig.suptitle("One arbiter facing N pairs (bench/scale.py: the real arbiter, one "
                 "nats-server, simulated nodes)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")
