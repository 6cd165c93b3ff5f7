"""Operator requests to the active arbiter: ``switchover``, ``failback``,
``maintenance``, ``clear-hold``, ``standby``, ``failback-mode``, ``cleanup``; each waits
for and prints the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import click

from vtlha.cli.common import (
    EXIT_NO_ANSWER,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    Unreachable,
    _config_opt,
    _connect,
    _load,
    _nats_opt,
)
from vtlha.config import ClusterConfig

_OPERATOR_EXITS = ("Exit 0 when done, 1 when refused or failed (the reason is printed), "
                   "2 for a bad cluster file or a request not confirmed, 3 when no active "
                   "arbiter answered or the "
                   "move did not finish within --wait.")
_wait_opt = click.option("--wait", "wait_s", default=60.0, show_default=True,
                         type=click.FloatRange(min=0),
                         help="Seconds to wait for the move to complete (0: do not wait).")
_timeout_opt = click.option("--timeout", default=5.0, show_default=True,
                            type=click.FloatRange(min=0.1),
                            help="Seconds to wait for the active arbiter's answer.")


def _operator() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:128]


def _request(cfg: ClusterConfig, nats_urls: str | None, verb: str, fields: dict[str, Any],
             timeout: float, wait_s: float) -> None:
    """Send one operator request, print the answer, follow a granted move to its end,
    and exit with the code the answer deserves."""
    import socket

    from vtlha.messages import AdminRequest

    req = AdminRequest(cluster=cfg.cluster, node=socket.gethostname()[:64], verb=verb,
                       operator=_operator(), **fields)
    sys.exit(asyncio.run(_ask(cfg, nats_urls, req, timeout, wait_s)))


async def _ask(cfg: ClusterConfig, nats_urls: str | None, req: Any, timeout: float,
               wait_s: float) -> int:
    import nats.errors

    from vtlha.errors import InvalidMessage
    from vtlha.messages import AdminReply, decode, encode
    from vtlha.subjects import Subjects

    subj = Subjects(cfg.cluster)
    try:
        nc = await _connect(cfg, nats_urls)
    except Unreachable as exc:
        click.echo(f"vtlha {req.verb}: {exc}", err=True)
        return EXIT_NO_ANSWER
    try:
        # Follow a granted move from the stream's end as it is now: its events come after.
        start = await _stream_end(nc, subj) + 1
        try:
            raw = await nc.request(subj.admin(req.verb), encode(req), timeout=timeout)
            reply = decode(AdminReply, raw.data)
        except nats.errors.NoRespondersError:
            click.echo(f"vtlha {req.verb}: no active arbiter answers on "
                       f"{subj.admin(req.verb)} (is the cluster up? `vtlha status`)", err=True)
            return EXIT_NO_ANSWER
        except (nats.errors.TimeoutError, TimeoutError):
            click.echo(f"vtlha {req.verb}: no answer from the active arbiter within "
                       f"{timeout} s", err=True)
            return EXIT_NO_ANSWER
        except InvalidMessage as exc:
            click.echo(f"vtlha {req.verb}: unreadable answer: {exc}", err=True)
            return EXIT_NO_ANSWER
        if not reply.ok:
            click.echo(reply.status, err=True)
            for d in reply.details:
                click.echo(f"  {d}", err=True)
            return EXIT_REFUSED
        click.echo(reply.status)
        for d in reply.details:
            click.echo(f"  {d}")
        if reply.restarted and wait_s > 0:
            return await _follow_restarts(nc, subj, req.group, reply.restarted, wait_s, start)
        if not reply.takeovers or wait_s <= 0:
            return EXIT_OK
        return await _follow_moves(nc, subj, reply, wait_s, start)
    finally:
        await nc.close()


async def _stream_end(nc: Any, subj: Any) -> int:
    """The event stream's last sequence now (0 when it cannot be read)."""
    try:
        info = await asyncio.wait_for(nc.jetstream().stream_info(subj.events_stream), 2.0)
        return int(info.state.last_seq)
    except Exception:
        return 0


async def _follow_moves(nc: Any, subj: Any, reply: Any, wait_s: float, since: int) -> int:
    """Wait for ``<kind>.completed`` or ``<kind>.failed`` of every move the reply
    started (same group and epoch), printing each; the events come from the stream, from
    ``since`` (the stream's end before the request) on."""
    from vtlha import eventlog

    todo = {(t.group, t.epoch): t for t in reply.takeovers}
    failed = False
    try:
        async with asyncio.timeout(wait_s), contextlib.aclosing(
                eventlog.follow(nc.jetstream(), subj, since)) as stream:
            async for seq, e in stream:
                t = todo.get((e.group or "", e.epoch or 0))
                if t is None or e.kind not in (f"{t.kind}.completed", f"{t.kind}.failed"):
                    continue
                failed |= e.kind.endswith(".failed")
                click.echo(f"#{seq} {e.kind}: {e.reason}", err=e.kind.endswith(".failed"))
                del todo[(t.group, t.epoch)]
                if not todo:
                    break
    except TimeoutError:
        click.echo(f"not finished within {wait_s} s: "
                   f"{', '.join(g for g, _ in sorted(todo))} (see `vtlha events`)", err=True)
        return EXIT_NO_ANSWER
    return EXIT_REFUSED if failed else EXIT_OK


@click.command(help="Move a group to the companion of the node that serves it now (a "
              "planned move), through the active arbiter; refused with the reason when the "
              "companion could not serve it (not alive, held down, a fatal check failing, "
              "its management path failed, or it does not reach every device). Allowed in "
              "maintenance. Waits until the move completes. " + _OPERATOR_EXITS)
@click.argument("group")
@_config_opt
@_nats_opt
@_timeout_opt
@_wait_opt
def switchover(group: str, config_path: str, nats_urls: str | None, timeout: float,
               wait_s: float) -> None:
    cfg = _load(config_path)
    _request(cfg, nats_urls, "switchover", {"group": group}, timeout, wait_s)


@click.command(help="Move every group of PAIR that is away from its home node back home "
              "(all or none: refused with each group's reason if one cannot go). Waits "
              "until the moves complete. " + _OPERATOR_EXITS)
@click.argument("pair")
@_config_opt
@_nats_opt
@_timeout_opt
@_wait_opt
def failback(pair: str, config_path: str, nats_urls: str | None, timeout: float,
             wait_s: float) -> None:
    cfg = _load(config_path)
    _request(cfg, nats_urls, "failback", {"pair": pair}, timeout, wait_s)


@click.command(help="Maintenance of PAIR: `on` suspends every automatic move of its groups "
              "(health is still reported and events published; operator moves still "
              "work); `off` resumes them, and the arbiter decides again at once. "
              + _OPERATOR_EXITS)
@click.argument("state", type=click.Choice(["on", "off"]))
@click.argument("pair")
@_config_opt
@_nats_opt
@_timeout_opt
def maintenance(state: str, pair: str, config_path: str, nats_urls: str | None,
                timeout: float) -> None:
    cfg = _load(config_path)
    _request(cfg, nats_urls, "maintenance", {"pair": pair, "on": state == "on"}, timeout, 0)


async def _follow_restarts(nc: Any, subj: Any, group: str, nodes: list[str], wait_s: float,
                           since: int) -> int:
    """A cleanup's restarts: wait for ``storage.served`` (done) or
    ``storage.start_failed`` (failed again) of ``group`` from each of ``nodes``."""
    from vtlha import eventlog

    todo = set(nodes)
    failed = False
    try:
        async with asyncio.timeout(wait_s), contextlib.aclosing(
                eventlog.follow(nc.jetstream(), subj, since)) as stream:
            async for seq, e in stream:
                if e.group != group or e.kind not in ("storage.served", "storage.start_failed"):
                    continue
                node = e.new or e.node
                if node not in todo:
                    continue
                failed |= e.kind == "storage.start_failed"
                click.echo(f"#{seq} {e.kind}: {e.reason}", err=e.kind == "storage.start_failed")
                todo.discard(node)
                if not todo:
                    break
    except TimeoutError:
        click.echo(f"{group} not served again within {wait_s} s on {', '.join(sorted(todo))} "
                   "(see `vtlha events`)", err=True)
        return EXIT_NO_ANSWER
    return EXIT_REFUSED if failed else EXIT_OK


@click.command("clear-hold", help="Let NODE of PAIR be given groups automatically again "
              "after it was held down for failing too often (flap_max failures within "
              "flap_window); its failures are forgotten. For a node not held down, forget "
              "its recorded failures (its flap count starts again); refused when there is "
              "nothing to forget. " + _OPERATOR_EXITS)
@click.argument("pair")
@click.argument("node")
@_config_opt
@_nats_opt
@_timeout_opt
def clear_hold(pair: str, node: str, config_path: str, nats_urls: str | None,
               timeout: float) -> None:
    cfg = _load(config_path)
    _request(cfg, nats_urls, "clear-hold", {"pair": pair, "target_node": node}, timeout, 0)



_yes_opt = click.option("--yes", "-y", is_flag=True,
                        help="Do it without asking (needed where there is no terminal).")


def _confirm(yes: bool, what: str) -> None:
    """Ask before a disruptive request; without a terminal, --yes is needed."""
    if yes:
        return
    if not sys.stdin.isatty():
        click.echo(f"{what}: not confirmed (no terminal to ask; pass --yes)", err=True)
        sys.exit(EXIT_USAGE)
    if not click.confirm(f"{what}?", default=False):
        click.echo("not done", err=True)
        sys.exit(EXIT_REFUSED)


@click.command(help="Standby of NODE of PAIR (Pacemaker's `node standby`): `on` moves every "
               "group it serves to its companion now (all or none: refused with each "
               "group's reason if one cannot go) and gives it no group until `off`; `off` "
               "lets it be given groups again (they come home by the pair's failback mode). "
               "While a node is in standby and its companion fails, nothing takes over. "
               "Asks first unless --yes. Waits until the moves complete. " + _OPERATOR_EXITS)
@click.argument("state", type=click.Choice(["on", "off"]))
@click.argument("pair")
@click.argument("node")
@_yes_opt
@_config_opt
@_nats_opt
@_timeout_opt
@_wait_opt
def standby(state: str, pair: str, node: str, yes: bool, config_path: str,
            nats_urls: str | None, timeout: float, wait_s: float) -> None:
    cfg = _load(config_path)
    _confirm(yes, f"standby {state} {pair} {node}" + (
        " (its groups move to its companion)" if state == "on" else ""))
    _request(cfg, nats_urls, "standby", {"pair": pair, "target_node": node,
                                         "on": state == "on"}, timeout, wait_s)


@click.command("failback-mode", help="Set PAIR's failback mode at run time: `auto` (a group "
               "away from home goes back once its home has been healthy for "
               "failback_hold_time) or `manual` (it stays until `vtlha failback`). Kept in "
               "the cluster's state over the cluster file's `failback`. Asks first unless "
               "--yes. " + _OPERATOR_EXITS)
@click.argument("mode", type=click.Choice(["auto", "manual"]))
@click.argument("pair")
@_yes_opt
@_config_opt
@_nats_opt
@_timeout_opt
def failback_mode(mode: str, pair: str, yes: bool, config_path: str, nats_urls: str | None,
                  timeout: float) -> None:
    cfg = _load(config_path)
    _confirm(yes, f"failback-mode {mode} {pair}")
    _request(cfg, nats_urls, "failback-mode", {"pair": pair, "mode": mode}, timeout, 0)


@click.command(help="Clean up data GROUP (Pacemaker's `resource cleanup`): its resources' "
               "failures are forgotten on both nodes of its pair (or on --node), and the "
               "node that holds it and reports it `failed` (a resource that failed "
               "migration_threshold times, or a reservation not taken) starts it again; "
               "each node's answer is printed and the restart is followed to `storage."
               "served`. Refused for a management group, an unknown node or during a "
               "takeover of the group. Asks first unless --yes. " + _OPERATOR_EXITS)
@click.argument("group")
@click.option("--node", default=None, metavar="NODE",
              help="Only on this node of the group's pair (default: both).")
@_yes_opt
@_config_opt
@_nats_opt
@_timeout_opt
@_wait_opt
def cleanup(group: str, node: str | None, yes: bool, config_path: str,
            nats_urls: str | None, timeout: float, wait_s: float) -> None:
    cfg = _load(config_path)
    _confirm(yes, f"cleanup {group}" + (f" on {node}" if node else "")
             + " (a failed group is started again)")
    fields: dict[str, Any] = {"group": group}
    if node is not None:
        fields["target_node"] = node
    _request(cfg, nats_urls, "cleanup", fields, timeout, wait_s)
