"""The chaos report: a markdown page a person wants to read, with a timeline picture
(matplotlib, Agg) for every iteration that has a violation."""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vtlha_lab.chaos.checker import Iteration, Result, Violation, parse

MAX_PICTURES = 12
COLOURS = {"node-a": "#4c78a8", "node-b": "#f58518", "double": "#d62728", "none": "#dddddd"}


def p99(values: Sequence[float]) -> float:
    """Nearest-rank 99th percentile (the worst value for fewer than 100 samples)."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def _fmt(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.2f}"


def _row_kind(it: Iteration) -> str:
    if not it.kinds:
        return "(not injected)"
    return it.kinds[0] if len(it.kinds) == 1 else "double"


def kind_rows(result: Result) -> list[str]:
    per: dict[str, list[Iteration]] = defaultdict(list)
    for it in result.iterations:
        per[_row_kind(it)].append(it)
    bad: Counter[str] = Counter()
    for v in result.violations:
        if v.iteration is not None and v.iteration < len(result.iterations):
            bad[_row_kind(result.iterations[v.iteration])] += 1
    rows = ["| fault | iterations | address unavailable p99 / worst (s) | data unavailable "
            "p99 / worst (s) | back home p99 / worst (s) | violations |",
            "|---|---:|---:|---:|---:|---:|"]
    for kind in sorted(per):
        its = per[kind]
        ua = [i.unavailable for i in its]
        ud = [i.data_unavailable for i in its]
        bh = [i.baseline_waited for i in its]
        rows.append(f"| `{kind}` | {len(its)} | {_fmt(p99(ua))} / {_fmt(max(ua))} | "
                    f"{_fmt(p99(ud))} / {_fmt(max(ud))} | {_fmt(p99(bh))} / {_fmt(max(bh))} | "
                    f"{bad[kind]} |")
    return rows


def class_rows(result: Result) -> list[str]:
    by: dict[str, list[Violation]] = defaultdict(list)
    for v in result.violations:
        by[v.cls].append(v)
    rows = ["| violation class | count | first example |", "|---|---:|---|"]
    for cls in sorted(by):
        v = by[cls][0]
        where = f"iteration {v.iteration}" if v.iteration is not None else "end of run"
        rows.append(f"| `{cls}` | {len(by[cls])} | {where}: {v.detail[:140]} |")
    return rows


def timeline(records: Sequence[Mapping[str, Any]], it: Iteration, end: float,
             path: Path) -> None:
    """Which node answered each address (and acknowledged each data group's blocks)
    over the iteration; the fault shaded, events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = parse(records)
    t0, t1 = it.start - 1.0, max(it.baseline_end or it.check, it.check) + 1.0
    rows = sorted(h.arp) + [f"{g} blocks" for g in sorted(h.acks)]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 2.2), dpi=72)
    for y, addr in enumerate(sorted(h.arp)):
        seq = h.arp[addr]
        for i, (t, nodes) in enumerate(seq):
            te = seq[i + 1][0] if i + 1 < len(seq) else end
            if te < t0 or t > t1:
                continue
            key = "double" if len(nodes) > 1 else (nodes[0] if nodes else "none")
            ax.barh(y, min(te, t1) - max(t, t0), left=max(t, t0) - it.start, height=0.6,
                    color=COLOURS.get(key, "#54a24b"))
    for j, g in enumerate(sorted(h.acks)):
        y = len(h.arp) + j
        for a in h.acks[g]:
            t = float(a["t"])
            if t0 <= t <= t1:
                ax.plot([t - it.start], [y], "|", color=COLOURS.get(str(a.get("node")), "k"),
                        markersize=8)
    top = len(rows)
    ax.barh(top, max((it.end or it.start) - it.start, 0.05), left=0, height=0.6,
            color="#d62728")
    if it.baseline_end:
        ax.barh(top, it.baseline_end - it.check, left=it.check - it.start, height=0.6,
                color="#9ecae9")
    rows.append("fault (red) / back home (blue)")
    for e in h.events:
        t = float(e["t"])
        if t0 <= t <= t1 and e["kind"].split(".")[0] in ("failover", "failback", "node",
                                                         "arbiter", "storage", "check"):
            ax.axvline(t - it.start, color="#555555", lw=0.6, ls=":")
            ax.text(t - it.start, len(rows) + 0.9, e["kind"], rotation=90, fontsize=6,
                    va="top", ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("seconds from the fault's start", fontsize=8)
    ax.set_title(f"iteration {it.index}: {' + '.join(it.kinds)}  (blue node-a, orange node-b, "
                 "red both, grey nobody)", fontsize=8)
    ax.set_xlim(t0 - it.start, t1 - it.start)
    ax.set_ylim(-0.7, len(rows) + 1.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(result: Result, records: Sequence[Mapping[str, Any]], path: Path,
                 pictures: Path, elapsed: float | None = None) -> None:
    run = next((r for r in records if r.get("type") == "run"), {})
    end = max((float(r.get("t", 0)) for r in records), default=0.0)
    timings = run.get("timings", {})
    loads = [i.load for i in result.iterations if i.load is not None]
    if elapsed is None and run:
        elapsed = end - float(run.get("t", end))
    planned = run.get("iterations")
    ran = len(result.iterations)
    lines = [
        "# Chaos report", "",
        "Generated by `vtlha-lab chaos` (`vtlha_lab/chaos/`); the fault table and its bounds "
        "are in `docs/policy.md` (\"Faults the chaos suite injects\").", "",
        f"- **seed** {result.seed}, **iterations** {ran}"
        + (f" of {planned} planned (the run's time limit stopped it)"
           if planned and planned > ran else "")
        + (f", **took** {elapsed / 60:.1f} min" if elapsed else ""),
        f"- **replay**: `{result.command}`",
        "- **SAN**: " + ("a real iSCSI target (tgtd in the witness's namespace, SCSI-3 "
                         "persistent reservations)" if run.get("san") == "iscsi"
                         or "--san iscsi" in result.command
                         else "the reference target (`vtlha_lab/santarget.py`)"),
        "- **verdict**: " + ("no violation" if result.ok
                             else f"{len(result.violations)} violation(s)"),
    ]
    skipped = [(i.index, k) for i in result.iterations for k in i.not_injected]
    if skipped:
        lines.append("- **not injected** (the injector failed, a harness fault; nothing "
                     "was expected of these): "
                     + ", ".join(f"iteration {i} `{k}`" for i, k in skipped))
    if loads:
        lines.append(f"- machine load (1-min average at each fault) {min(loads):.1f} to "
                     f"{max(loads):.1f} on {os.cpu_count()} cores")
    lines += ["- timings: " + ", ".join(f"`{k}` {v}" for k, v in timings.items()), "",
              "## Violations by class", ""]
    lines += class_rows(result) if result.violations else ["None."]
    lines += ["", "## Per fault kind", "",
              "Unavailability is the longest span in the iteration's window (fault start to "
              "its check) in which an address had no ARP answer (address) or a data group's "
              "tape client had no block acknowledged for more than 0.3 s (data); \"back home\" "
              "is the baseline restore (restarts, `vtlha clear-hold`, `vtlha failback`).", ""]
    lines += kind_rows(result)
    lines += ["", "## Violations", ""]
    pictures.mkdir(parents=True, exist_ok=True)
    for old in pictures.glob("iteration-*.png"):  # a previous report's
        old.unlink()
    by_it: dict[int | None, list[Violation]] = defaultdict(list)
    for v in result.violations:
        by_it[v.iteration].append(v)
    drawn = 0
    for key in sorted(by_it, key=lambda k: -1 if k is None else k):
        vs = by_it[key]
        if key is None:
            lines.append("### End of run")
        else:
            it = result.iterations[key]
            lines.append(f"### Iteration {key}: {' + '.join(it.kinds)}")
            if it.detail:
                lines.append(f"Fault: `{it.detail}`")
        lines.append("")
        lines += [f"- `{v.cls}`: {v.detail}" for v in vs[:12]]
        if len(vs) > 12:
            lines.append(f"- … and {len(vs) - 12} more")
        if key is not None and drawn < MAX_PICTURES:
            png = pictures / f"iteration-{key:03d}.png"
            timeline(records, result.iterations[key], end, png)
            rel = os.path.relpath(png, path.parent)
            lines += ["", f"![iteration {key}]({rel})"]
            drawn += 1
        lines.append("")
    if drawn == MAX_PICTURES:
        lines.append(f"(Pictures for the first {MAX_PICTURES} iterations with violations "
                     "only; `vtlha-lab chaos check HISTORY --report F` redraws them.)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def print_summary(result: Result) -> None:
    counts = Counter(v.cls for v in result.violations)
    for itn in result.iterations:
        for k in itn.not_injected:
            print(f"NOT INJECTED (it {itn.index}): {k} (the injector failed; see the "
                  "history's info records)")
    for v in result.violations[:40]:
        it = "end" if v.iteration is None else f"it {v.iteration}"
        print(f"VIOLATION {v.cls} ({it}): {v.detail}")
    if len(result.violations) > 40:
        print(f"... {len(result.violations) - 40} more")
    if result.ok:
        print(f"OK: {len(result.iterations)} iterations, no violation (seed {result.seed})")
    else:
        print("FAILED: " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
              + f" (seed {result.seed})")
        print(f"replay: {result.command}")
