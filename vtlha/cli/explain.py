"""``vtlha explain``: re-run the pure policy on the inputs an event carries."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from vtlha.cli.common import (
    EXIT_NO_ANSWER,
    EXIT_OK,
    EXIT_REFUSED,
    Unreachable,
    _config_opt,
    _connect,
    _load,
    _nats_opt,
)
from vtlha.config import ClusterConfig


@click.command(help="Re-run the pure policy on the inputs an event carries (event number "
              "EVENT, as `vtlha events` shows it) and print the sentence it gives; say "
              "whether it is the event's recorded reason. Exit 0 when it matches, 1 when it "
              "differs or the event carries no decision inputs, 2 for a bad cluster file, "
              "3 when the event cannot be read.")
@click.argument("event", type=click.IntRange(min=1))
@_config_opt
@_nats_opt
@click.option("--all", "show_all", is_flag=True,
              help="Print every action of that decision, not only the event's own.")
def explain(event: int, config_path: str, nats_urls: str | None, show_all: bool) -> None:
    cfg = _load(config_path)
    sys.exit(asyncio.run(_explain(cfg, nats_urls, event, show_all)))


def replay(inputs: dict[str, Any]) -> list[str]:
    """The status sentence of every action the recorded decision gives again (the
    policy's own sentence when it gives none)."""
    from vtlha import policy

    snap = policy.Snapshot.from_inputs(inputs["snapshot"])
    now = float(inputs["now"])
    request = inputs.get("request")
    if request is not None:
        result = policy.answer(snap, request, now)
        if isinstance(result, policy.Refusal):
            return [result.status]
        return [a.status for a in result]
    return policy.decide(snap, now).sentences


async def _explain(cfg: ClusterConfig, nats_urls: str | None, seq: int,
                   show_all: bool) -> int:
    import nats.errors
    from nats.js.errors import APIError

    from vtlha.errors import InvalidMessage
    from vtlha.messages import Event, decode
    from vtlha.subjects import Subjects

    subj = Subjects(cfg.cluster)
    try:
        nc = await _connect(cfg, nats_urls)
    except Unreachable as exc:
        click.echo(f"vtlha explain: {exc}", err=True)
        return EXIT_NO_ANSWER
    try:
        raw = await asyncio.wait_for(nc.jetstream().get_msg(subj.events_stream, seq), 5.0)
        e = decode(Event, raw.data or b"")
    except (APIError, nats.errors.Error, TimeoutError, InvalidMessage) as exc:
        click.echo(f"vtlha explain: event #{seq} cannot be read from "
                   f"{subj.events_stream}: {exc!r}", err=True)
        return EXIT_NO_ANSWER
    finally:
        await nc.close()
    if "snapshot" not in e.inputs or "now" not in e.inputs:
        click.echo(f"event #{seq} ({e.kind}) carries no decision inputs: nothing to explain "
                   f"(its reason: {e.reason})", err=True)
        return EXIT_REFUSED
    sentences = replay(e.inputs)
    own = [s for s in sentences if s == e.reason]
    click.echo(own[0] if own else "; ".join(sentences))
    if show_all:
        for s in sentences:
            click.echo(f"  - {s}")
    who = f"operator {e.data['operator']}" if "operator" in e.data else f"{e.node}'s arbiter"
    click.echo(f"  event #{seq} {e.kind}, decided by {who} (term {e.term}); re-run from "
               f"the inputs it carries ({len(sentences)} action(s) in that decision)")
    if own:
        click.echo("  the replay matches the recorded reason")
        return EXIT_OK
    click.echo(f"  the replay DIFFERS from the recorded reason: {e.reason}", err=True)
    return EXIT_REFUSED

