"""The summary of ``bench/failover.py``'s trials: per interval, case and system the
outage's distribution, the ratio vtl-ha / keepalived, double holders and issue 20's
targets; printed as a table (Markdown too), plotted (``docs/img/failover-outage.png``)
and written as JSON (``bench/results/failover-<time>.json``)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from bench.common import save_results
from bench.failover_cases import CASES, ROOT
from bench.failover_state import load_state


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"n": len(xs), "p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99),
            "max": max(xs)}


def summarize(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (interval, case, system): the outage's distribution (TCP, ARP), double
    holders, trials that failed."""
    rows = []
    groups: dict[tuple[float, str, str], list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault((float(r["interval"]), r["case"], r["system"]), []).append(r)
    order = list(CASES)
    for (iv, case, system), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], order.index(kv[0][1]) if kv[0][1] in order else 99, kv[0][2] != "vtl-ha")):
        ok = [r for r in rs if not r.get("error")]
        tcp = [r["outage_s"] for r in ok if r.get("outage_s") is not None]
        arp = [r["outage_arp_s"] for r in ok if r.get("outage_arp_s") is not None]
        rows.append({"interval": iv, "case": case, "system": system, "trials": len(ok),
                     "failed": len(rs) - len(ok),
                     "no_outage_measured": len(ok) - len(tcp),
                     "outage": stats(tcp), "outage_arp": stats(arp),
                     "double_holders": sum(bool(r.get("double_holders")) for r in ok),
                     # of those, the ones the observer's polls saw (not merely could not
                     # exclude within a gap between two polls), or the client saw
                     "double_seen": sum(bool(r.get("double_holders")) and (
                         bool(r.get("overlaps_observed")) or r.get("arp_double_s", 0) > 0
                         or bool(r.get("ended_two_holders"))
                         or "overlaps_observed" not in r) for r in ok),
                     "ended_two_holders": sum(bool(r.get("ended_two_holders")) for r in ok),
                     "load1_mean": sum(r.get("load1", 0) for r in rs) / len(rs)})
    return rows


def ratios(rows: list[dict[str, Any]]) -> None:
    """vtl-ha / keepalived, p50 and p99, on each vtl-ha row that has a keepalived row."""
    ka = {(r["interval"], r["case"]): r for r in rows if r["system"] == "keepalived"}
    for r in rows:
        k = ka.get((r["interval"], r["case"]))
        if r["system"] != "vtl-ha" or k is None or not r["outage"] or not k["outage"]:
            continue
        r["ratio"] = {q: (r["outage"][q] / k["outage"][q] if k["outage"][q] else None)
                      for q in ("p50", "p99")}


def targets(rows: list[dict[str, Any]], recs: list[dict[str, Any]]) -> list[str]:
    """Issue 20's targets at 0.1 s, where we stand (sentences)."""
    out = []
    by = {(r["interval"], r["case"], r["system"]): r for r in rows}
    for case in ("links", "crash"):
        ours, ka = by.get((0.1, case, "vtl-ha")), by.get((0.1, case, "keepalived"))
        if ours and ka and ours["outage"] and ka["outage"]:
            met = ours["outage"]["p99"] <= ka["outage"]["p99"] and not ours["double_holders"]
            out.append(f"{case} at 0.1 s: vtl-ha p99 {ours['outage']['p99']:.3f} s vs "
                       f"keepalived p99 {ka['outage']['p99']:.3f} s, vtl-ha double holders "
                       f"{ours['double_holders']}/{ours['trials']}: "
                       f"{'met' if met else 'NOT met'}")
    fatal = by.get((0.1, "fatal", "vtl-ha"))
    t = next((r for r in recs if r.get("case") == "fatal" and r.get("interval") == 0.1
              and "fall" in r), None)
    if fatal and fatal["outage"] and t:
        limit = 0.25 + t["fall"] * t["check_interval_s"]
        out.append(f"fatal at 0.1 s: p99 {fatal['outage']['p99']:.3f} s vs target "
                   f"{limit:.2f} s (0.25 + fall x check_interval): "
                   f"{'met' if fatal['outage']['p99'] <= limit else 'NOT met'}")
    data = by.get((0.1, "data", "vtl-ha"))
    if data and data["outage"]:
        out.append(f"data path at 0.1 s: longest gap between acknowledged blocks, max "
                   f"{data['outage']['max']:.3f} s (p99 {data['outage']['p99']:.3f} s) vs "
                   f"target 1 s: {'met' if data['outage']['max'] <= 1.0 else 'NOT met'}")
    out += [line for case in ("data", "data-reconnect")
            if (line := data_parts(case, recs))]
    return out


def data_parts(case: str, recs: list[dict[str, Any]]) -> str | None:
    """What a data case's gap is made of at 0.1 s: node-b's tape service ready after the
    fault, and the connect the client's first block served by node-b came on."""
    rs = [r for r in recs if r.get("case") == case and r.get("interval") == 0.1
          and r.get("system") == "vtl-ha" and not r.get("error")]
    ready = stats([r["service_ready_s"] for r in rs if r.get("service_ready_s") is not None])
    wait = stats([r["ack_connect_wait_s"] for r in rs
                  if r.get("ack_connect_wait_s") is not None])
    if ready is None or wait is None:
        return None
    return (f"{case} at 0.1 s: node-b's tape service ready {ready['p50']:.3f} / "
            f"{ready['p99']:.3f} s after the fault (p50 / p99); the connect of the first "
            f"block node-b acknowledged took {wait['p50']:.3f} / {wait['max']:.3f} s "
            f"(p50 / max)")


def fmt(s: dict[str, float] | None, q: str) -> str:
    return "-" if s is None else f"{s[q] * 1000:.0f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'int':>4} {'case':<11} {'system':<10} {'n':>3} {'fail':>4} "
            f"{'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}  {'ARP p50':>7} {'ARP p99':>7} "
            f"{'ratio p50/p99':>13} {'double':>6} {'ended 2':>7}")
    print(head)
    print(f"{'s':>4} {'':<11} {'':<10} {'':>3} {'':>4} {'ms':>6} {'ms':>6} {'ms':>6} "
          f"{'ms':>6}  {'ms':>7} {'ms':>7}")
    print("-" * len(head))
    for r in rows:
        ratio = r.get("ratio")
        rt = "-" if not ratio else "/".join("-" if ratio[q] is None else f"{ratio[q]:.2f}"
                                          for q in ("p50", "p99"))
        o, a = r["outage"], r["outage_arp"]
        print(f"{r['interval']:>4g} {r['case']:<11} {r['system']:<10} {r['trials']:>3} "
              f"{r['failed'] + r['no_outage_measured']:>4} {fmt(o, 'p50'):>6} "
              f"{fmt(o, 'p90'):>6} {fmt(o, 'p99'):>6} {fmt(o, 'max'):>6}  "
              f"{fmt(a, 'p50'):>7} {fmt(a, 'p99'):>7} {rt:>13} {r['double_holders']:>6} "
              f"{r['ended_two_holders']:>7}")
    for r in rows:
        unseen = r["double_holders"] - r.get("double_seen", r["double_holders"])
        if unseen:
            print(f"{r['interval']:g} s {r['case']} {r['system']}: {unseen} of the "
                  f"{r['double_holders']} double-holder trial(s) only within a gap between "
                  "two polls of the observer (no poll saw both nodes answering)")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown (for BENCHMARKS.md): seconds, vtl-ha's row above
    keepalived's."""
    out = ["| interval | case | system | n | p50 | p90 | p99 | max | ARP p50 / p99 "
           "| ratio p50 / p99 | two answering (any instant) | ended with two |",
           "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def sec(st: dict[str, float] | None, q: str) -> str:
        return "-" if st is None else f"{st[q]:.3f}"

    for r in rows:
        ratio = r.get("ratio")
        rt = "-" if not ratio else " / ".join("-" if ratio[q] is None else f"{ratio[q]:.2f}"
                                              for q in ("p50", "p99"))
        o, a = r["outage"], r["outage_arp"]
        n = f"{r['trials']}" + (f" (+{r['failed']} failed)" if r["failed"] else "") + (
            f" ({r['no_outage_measured']} no takeover)" if r["no_outage_measured"] else "")
        out.append(f"| {r['interval']:g} s | {r['case']} | {r['system']} | {n} | "
                   f"{sec(o, 'p50')} | {sec(o, 'p90')} | {sec(o, 'p99')} | {sec(o, 'max')} | "
                   f"{sec(a, 'p50')} / {sec(a, 'p99')} | {rt} | {r['double_holders']} | "
                   f"{r['ended_two_holders']} |")
    return "\n".join(out)


def plot(recs: list[dict[str, Any]], path: Path) -> None:
    """Per interval, per case: vtl-ha's outages beside keepalived's (box and points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    intervals = sorted({float(r["interval"]) for r in recs if not r.get("error")})
    if not intervals:
        return
    fig, axes = plt.subplots(len(intervals), 1, figsize=(11, 4.2 * len(intervals)), dpi=90,
                             squeeze=False)
    colours = {"vtl-ha": "#1f77b4", "keepalived": "#ff7f0e"}
    for ax, iv in zip(axes[:, 0], intervals, strict=True):
        cases = [c for c in CASES if any(r["case"] == c and float(r["interval"]) == iv
                                         for r in recs)]
        labelled: set[str] = set()
        for i, case in enumerate(cases):
            for j, system in enumerate(("vtl-ha", "keepalived")):
                mine = [r for r in recs if r["case"] == case and r["system"] == system
                        and float(r["interval"]) == iv and not r.get("error")]
                xs = [max(float(r["outage_s"]), 1e-3) for r in mine
                      if r.get("outage_s") is not None]
                if not xs:
                    continue
                two = sum(bool(r.get("double_holders")) for r in mine)
                ax.text(i + (j - 0.5) * 0.36, 0.98, f"2 holders\n{two}/{len(mine)}",
                        transform=ax.get_xaxis_transform(), ha="center", va="top",
                        fontsize=6, color="#d62728" if two else "#555555")
                x = i + (j - 0.5) * 0.36
                ax.boxplot([xs], positions=[x], widths=0.3, showfliers=False,
                           medianprops={"color": colours[system]})
                jitter = [x + 0.1 * (((k * 7919) % 11) / 10 - 0.5) for k in range(len(xs))]
                ax.scatter(jitter, xs, s=10, alpha=0.6, color=colours[system],
                           label=None if system in labelled else system)
                labelled.add(system)
        ax.set_xticks(range(len(cases)),
                      [f"{c}\n" + "\n".join(textwrap.wrap(f"({CASES[c].measured})", 24))
                       for c in cases], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 3)  # room for the counts
        ax.set_ylabel("outage (s, log)")
        ax.set_title(f"heartbeat interval / advert_int {iv:g} s")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Client-observed failover outage (TCP probe from the client namespace); "
                 "'2 holders': trials in which two nodes answered at some instant",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(state: Path, plot_path: Path, run: dict[str, Any], markdown: bool = False) -> None:
    recs = load_state(state)
    rows = summarize(recs)
    ratios(rows)
    print()
    print_table(rows)
    print("\noutage by TCP (ms; `data`: the tape client's longest gap between acknowledged "
          "blocks); fail: trials that failed or measured no takeover; double: trials with "
          "two nodes answering at any instant; ended 2: trials that ended with two holders")
    tg = targets(rows, recs)
    for line in tg:
        print("target: " + line)
    if markdown:
        print("\n" + markdown_table(rows))
    if recs:
        plot(recs, plot_path)
        shown = plot_path.relative_to(ROOT) if plot_path.is_relative_to(ROOT) else plot_path
        print(f"plot: {shown}")
    summary = {"bench": "failover-lab", **run, "rows": rows, "targets": tg,
               "trials": recs}
    path = save_results("failover", summary)
    print(f"wrote {path.relative_to(ROOT)} ({len(recs)} trials from {state})")
