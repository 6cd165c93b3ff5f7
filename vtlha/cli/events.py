"""``vtlha events``: print the event stream, or follow it; from an event number or from
a while ago, of the kinds asked for."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import re
import sys
import time
from typing import Any

import click

from vtlha.cli.common import (
    EXIT_NO_ANSWER,
    EXIT_OK,
    Unreachable,
    _config_opt,
    _connect,
    _load,
    _nats_opt,
)
from vtlha.config import ClusterConfig

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_since(value: str) -> int | float:
    """An event number (``42``: an int) or a duration (``10m``, ``1h30m``, ``90s``,
    ``2d``: seconds as a float). Raises ValueError for anything else."""
    value = value.strip()
    if value.isdigit():
        if int(value) < 1:
            raise ValueError("an event number starts at 1")
        return int(value)
    parts = _PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"{value!r} is neither an event number nor a duration such as "
                         "30s, 10m, 1h30m, 2d")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def matches(kind: str, patterns: tuple[str, ...]) -> bool:
    """``kind`` matches one of the shell-style ``patterns`` (all when there are none)."""
    return not patterns or any(fnmatch.fnmatchcase(kind, p) for p in patterns)


class _Since(click.ParamType):  # type: ignore[type-arg]
    name = "N|DURATION"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int | float:
        if isinstance(value, int | float):
            return value
        try:
            return parse_since(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command(help="Print the event stream (docs/events.md lists the kinds); --follow "
               "keeps watching. Exit 0, 2 for a bad cluster file, 3 when NATS cannot be "
               "reached or the stream cannot be read.")
@_config_opt
@_nats_opt
@click.option("--since", default="1", show_default=True, type=_Since(),
              help="The first event: its number, or a duration (30s, 10m, 1h30m, 2d): the "
                   "events stored since then (resolved to a number first).")
@click.option("--kind", "kinds", multiple=True, metavar="PATTERN",
              help="Only events of this kind; shell-style patterns ('failover.*'); may be "
                   "repeated.")
@click.option("--follow", is_flag=True, help="Keep printing new events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events(config_path: str, nats_urls: str | None, since: int | float,
           kinds: tuple[str, ...], follow: bool, as_json: bool) -> None:
    cfg = _load(config_path)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(_events(cfg, nats_urls, since, kinds, follow, as_json)))


async def _events(cfg: ClusterConfig, nats_urls: str | None, since: int | float,
                  kinds: tuple[str, ...], follow: bool, as_json: bool) -> int:
    import nats.errors
    from nats.js.errors import APIError, NotFoundError

    from vtlha import eventlog
    from vtlha.errors import InvalidMessage
    from vtlha.messages import encode
    from vtlha.subjects import Subjects

    try:
        nc = await _connect(cfg, nats_urls)
    except Unreachable as exc:
        click.echo(f"vtlha events: {exc}", err=True)
        return EXIT_NO_ANSWER
    subj = Subjects(cfg.cluster)
    js = nc.jetstream()

    def show(seq: int, e: Any) -> None:
        if not matches(e.kind, kinds):
            return
        if as_json:
            click.echo(b'{"seq":%d,' % seq + encode(e)[1:])
        else:
            click.echo(eventlog.format_event(seq, e))

    try:
        try:
            await asyncio.wait_for(js.stream_info(subj.events_stream), 5.0)
        except NotFoundError:
            click.echo(f"vtlha events: cluster {cfg.cluster} is unknown on these servers: no "
                       f"event stream {subj.events_stream} (has it ever run there?)", err=True)
            return EXIT_NO_ANSWER
        first = since if isinstance(since, int) \
            else await eventlog.seq_since(nc, subj, time.time() - since)
        if follow:
            async for seq, e in eventlog.follow(js, subj, first):
                show(seq, e)
        else:
            for seq, e in await eventlog.read(js, subj, first):
                show(seq, e)
    except (APIError, InvalidMessage, nats.errors.Error, TimeoutError) as exc:
        click.echo(f"vtlha events: cannot read {subj.events_stream}: "
                   f"{str(exc) or type(exc).__name__}", err=True)
        return EXIT_NO_ANSWER
    finally:
        await nc.close()
    return EXIT_OK
