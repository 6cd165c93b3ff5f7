"""``vtlha-lab chaos run|check|report|docs``."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import click

from vtlha_lab.chaos import faults as ft


@click.group(help="The chaos suite: seeded faults over the network lab (root), an "
             "observer that trusts no service, a checker over the history, a report.")
def chaos() -> None:
    pass


def _kinds(faults: str | None) -> list[str]:
    if not faults:
        return [f.kind for f in ft.FAULTS]
    kinds = [k.strip() for k in faults.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ft.BY_KIND]
    if unknown:
        raise click.BadParameter(f"unknown fault kind(s) {unknown}; known: "
                                 + ", ".join(ft.BY_KIND), param_hint="--faults")
    return kinds


def _finish(history: Path, report: Path | None, pictures: Path | None,
            elapsed: float | None = None, fail_on: str = "any") -> None:
    from vtlha_lab.chaos.checker import check
    from vtlha_lab.chaos.report import print_summary, write_report

    records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    result = check(records)
    if report is not None:
        write_report(result, records, report, pictures or pictures_dir(report),
                     elapsed=elapsed)
        click.echo(f"report: {report}")
    print_summary(result)
    if fail_on == "safety" and result.safe and not result.ok:
        click.echo("--fail-on safety: no safety violation; the availability violations "
                   "above are reported, not failed on")
        sys.exit(0)
    sys.exit(0 if result.ok else 1)


_fail_on_opt = click.option(
    "--fail-on", type=click.Choice(["any", "safety"]), default="any", show_default=True,
    help="`safety`: exit 1 only on a safety violation (double answer, lost or wrong "
    "block, fenced writer, epoch going back); the availability classes are still "
    "reported.")


def pictures_dir(report: Path) -> Path:
    """Where a report's timelines go: ``chaos/`` beside ``chaos-report.md``, a folder
    named after any other report (each report clears its own folder's pictures)."""
    return report.parent / ("chaos" if report.stem == "chaos-report" else report.stem)


@chaos.command("run", help="Run K iterations of faults drawn from SEED over a fresh network "
               "lab (root), write the history, check it, and exit 1 on any violation "
               "(printing the seed and the command that replays the run).")
@click.option("--seed", type=int, required=True)
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Default: one per fault kind (each kind once, in a seeded order).")
@click.option("--faults", default=None, help="Comma-separated fault kinds (default: all).")
@click.option("--config", "config_path", default="examples/cluster.yaml", show_default=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--history", default=None, type=click.Path(dir_okay=False),
              help="History file (default: history.jsonl in the work directory).")
@click.option("--report", default=None, type=click.Path(dir_okay=False),
              help="Write a markdown report here (pictures in a chaos/ folder beside it).")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False))
@click.option("--time-limit", default=None, type=click.FloatRange(min=0),
              help="Minutes: start no new iteration after this (the run is still checked "
              "and reported; the report says how many iterations ran).")
@_fail_on_opt
@click.option("--san", "san_kind", type=click.Choice(["config", "iscsi"]), default="config",
              show_default=True, help="`iscsi`: run the cluster file's devices as LUNs of "
              "a real iSCSI target (tgtd in the witness's namespace, a portal per path) "
              "instead of the SAN its file names.")
def run(seed: int, iterations: int | None, faults: str | None, config_path: str,
        history: str | None, report: str | None, work_dir: str | None,
        time_limit: float | None, san_kind: str, fail_on: str) -> None:
    from vtlha_lab.chaos.runner import RunOptions
    from vtlha_lab.chaos.runner import run as run_

    if os.geteuid() != 0:
        raise click.ClickException("the chaos suite runs over the network lab: it needs root")
    kinds = _kinds(faults)
    iterations = iterations or len(kinds)
    wd = Path(work_dir or tempfile.mkdtemp(prefix="vtlha-chaos-"))
    hist = Path(history) if history else wd / "history.jsonl"
    command = (f"vtlha-lab chaos run --seed {seed} --iterations {iterations}"
               + (f" --faults {faults}" if faults else "")
               + (f" --config {config_path}" if config_path != "examples/cluster.yaml" else "")
               + (" --san iscsi" if san_kind == "iscsi" else ""))
    opts = RunOptions(seed=seed, iterations=iterations, faults=kinds,
                      config=Path(config_path), work_dir=wd, history=hist,
                      report=Path(report) if report else None, command=command,
                      time_limit=time_limit * 60 if time_limit else None,
                      iscsi=san_kind == "iscsi")
    t0 = time.monotonic()
    n = run_(opts)
    elapsed = time.monotonic() - t0
    click.echo(f"history: {hist} ({n} records, {elapsed:.0f} s); work directory {wd}")
    rep = Path(report) if report else None
    _finish(hist, rep, pictures_dir(rep) if rep else None, elapsed, fail_on)


@chaos.command("check", help="Check a history file; exit 1 on any violation.")
@click.argument("history", type=click.Path(exists=True, dir_okay=False))
@click.option("--report", default=None, type=click.Path(dir_okay=False))
@_fail_on_opt
def check_cmd(history: str, report: str | None, fail_on: str) -> None:
    rep = Path(report) if report else None
    _finish(Path(history), rep, pictures_dir(rep) if rep else None, fail_on=fail_on)


@chaos.command("docs", help="Regenerate the fault rows of docs/policy.md and the bounds in "
               "docs/safety.md from the fault table (--check: exit 1 if they differ).")
@click.option("--docs", "docs_dir", default="docs", show_default=True,
              type=click.Path(file_okay=False, exists=True))
@click.option("--check", "only_check", is_flag=True)
def docs(docs_dir: str, only_check: bool) -> None:
    from vtlha_lab.chaos.docs import update

    changed = update(Path(docs_dir), write=not only_check)
    for p in changed:
        click.echo(f"{'differs' if only_check else 'updated'}: {p}")
    if only_check and changed:
        sys.exit(1)
