"""``vtlha status``: per pair, node and group, who owns what and whether it is served,
leases, heartbeats, checks, storage and management paths, the active arbiter, the
pairs' operator state; problems first. ``--json`` prints the same data
(``vtlha.clusterstatus.ClusterStatus``); ``--watch`` keeps refreshing."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import click
from rich.console import Console

from vtlha.cli.common import (
    EXIT_NO_ANSWER,
    EXIT_OK,
    Unreachable,
    _config_opt,
    _connect,
    _load,
    _nats_opt,
)
from vtlha.cli.iscsicmd import _san_status
from vtlha.cli.statusview import render
from vtlha.cli.version import installed
from vtlha.clusterstatus import ClusterStatus
from vtlha.config import ClusterConfig


@click.command(help="Show per pair, node and group: the owner, its epoch, whether it is "
               "served, the lease's age (the node's own report), heartbeat ages, checks, "
               "each device's storage paths, the management path, the active arbiter and "
               "its term, maintenance, held-down nodes and the failback mode; problems "
               "first. With san.kind iscsi, each device's reservation and keys as well "
               "(read from the target; not with --json). Exit 0 when the status was "
               "read (whatever it says: see `ok` in --json), 2 for a bad cluster file, 3 "
               "when NATS cannot be reached or the servers do not know the cluster.")
@_config_opt
@_nats_opt
@click.option("--json", "as_json", is_flag=True,
              help="The same data as one JSON object (one per refresh with --watch).")
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds (Ctrl-C ends).")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.2),
              help="Seconds between refreshes with --watch.")
@click.option("--count", default=None, type=click.IntRange(min=1),
              help="With --watch: stop after this many refreshes.")
@click.option("--listen", default=None, type=click.FloatRange(min=0.05),
              help="Seconds to listen for the nodes' reports at most (default: from the "
                   "timings; it ends early once every node's were heard).")
def status(config_path: str, nats_urls: str | None, as_json: bool, watch: bool,
           interval: float, count: int | None, listen: float | None) -> None:
    cfg = _load(config_path)
    if not watch:
        count = 1
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(_status(cfg, nats_urls, as_json, interval, count, listen)))


def _print(console: Console, st: ClusterStatus, as_json: bool) -> None:
    if as_json:
        click.echo(st.model_dump_json())
    else:
        console.print(render(st))


async def _status(cfg: ClusterConfig, nats_urls: str | None, as_json: bool,
                  interval: float, count: int | None, listen: float | None) -> int:
    from vtlha.statuscollect import Collector, UnknownCluster, listen_window, read_kv, snapshot

    try:
        nc = await _connect(cfg, nats_urls)
    except Unreachable as exc:
        click.echo(f"vtlha status: {exc}", err=True)
        return EXIT_NO_ANSWER
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    version = installed("vtlha")
    collector = Collector(nc, cfg)
    try:
        await collector.start()
        shown = 0
        while count is None or shown < count:
            wait = listen_window(cfg) if listen is None else listen
            try:
                read, _ = await asyncio.gather(read_kv(nc, cfg),
                                               collector.wait_complete(wait if not shown
                                                                       else 0))
            except UnknownCluster as exc:
                click.echo(f"vtlha status: {exc}", err=True)
                return EXIT_NO_ANSWER
            except TimeoutError:
                click.echo(f"vtlha status: the KV of cluster {cfg.cluster} did not answer "
                           "in time", err=True)
                return EXIT_NO_ANSWER
            if count != 1 and console.is_terminal and not as_json:
                console.clear()
            _print(console, snapshot(cfg, read, collector, version), as_json)
            if cfg.san.kind == "iscsi" and not as_json:
                await _san_status(cfg)
            shown += 1
            if count is None or shown < count:
                await asyncio.sleep(interval)  # the refresh period of --watch
    finally:
        await collector.stop()
        await nc.close()
    return EXIT_OK
