"""``vtlha``: the operator's command line.

    vtlha config check FILE      validate a cluster file
    vtlha status --config FILE   who owns what (from the KV), the active arbiter
    vtlha events --config FILE   the event stream (--follow to keep watching)
    vtlha switchover GROUP       operator requests to the active arbiter: a planned move,
    vtlha failback PAIR          every group of a pair home again,
    vtlha maintenance on|off PAIR  automatic failover suspended / resumed,
    vtlha clear-hold PAIR NODE   a held-down node may be given groups again
    vtlha explain EVENT          re-run the policy on an event's inputs

The lab, the demo, the reference SAN target and the tape client are ``vtlha-lab``
(package ``vtlha_lab``), which this package never imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import click

from vtlha.config import ClusterConfig, load_config
from vtlha.errors import ConfigError


def _load(path: str) -> ClusterConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)


@click.group(help="vtl-ha: high availability for pairs of VTL appliances, over NATS.")
def main() -> None:
    pass


@main.group(help="Cluster file commands.")
def config() -> None:
    pass


@config.command("check", help="Validate a cluster file; exit 0 when valid, 2 otherwise.")
@click.argument("file", type=click.Path(dir_okay=False))
def config_check(file: str) -> None:
    cfg = _load(file)
    t = cfg.timings
    groups = cfg.groups()
    click.echo(f"{file}: OK: cluster {cfg.cluster}: {len(cfg.pairs)} pair(s), "
               f"{len(cfg.nodes)} node(s), {len(groups)} group(s), {len(cfg.devices)} device(s)")
    click.echo(f"  timings: heartbeat {t.heartbeat_interval} s, dead after {t.dead_after} s, "
               f"lease {t.lease_ttl} s (margin {t.margin} s), leader {t.leader_ttl} s")
    click.echo(f"  nats: {', '.join(cfg.nats.servers)} (replicas {cfg.nats.stream_replicas})")
    for g, (home, kind) in groups.items():
        click.echo(f"  {g}: home {home}, {kind}, addresses "
                   f"{', '.join(cfg.group_addresses(g)) or '-'}"
                   + (f", devices {', '.join(cfg.group_devices(g))}" if kind == "data" else ""))


_nats_opt = click.option("--nats", "nats_urls", default=None,
                         help="Comma-separated NATS URLs (default: from the cluster file).")
_config_opt = click.option("--config", "config_path", required=True,
                           type=click.Path(dir_okay=False), help="The cluster file.")


async def _connect(cfg: ClusterConfig, nats_urls: str | None) -> Any:
    import logging

    from vtlha import bus

    logging.getLogger("vtlha.bus").setLevel(logging.ERROR)  # not "disconnected" at close

    urls = nats_urls.split(",") if nats_urls else cfg.nats_urls()
    return await bus.connect(urls, name="vtlha-cli", connect_deadline=5.0)


@main.command(help="Show who owns each group (from the KV) and the active arbiter.")
@_config_opt
@_nats_opt
def status(config_path: str, nats_urls: str | None) -> None:
    cfg = _load(config_path)
    asyncio.run(_status(cfg, nats_urls))


async def _status(cfg: ClusterConfig, nats_urls: str | None) -> None:
    from nats.js.errors import NotFoundError

    from vtlha.errors import InvalidMessage
    from vtlha.messages import LeaderRecord, PairRecord, decode
    from vtlha.ownership import read_groups
    from vtlha.subjects import Subjects

    nc = await _connect(cfg, nats_urls)
    try:
        subj = Subjects(cfg.cluster)
        kv = await nc.jetstream().key_value(subj.kv_bucket)
        try:
            e = await kv.get(subj.LEADER_KEY)
            leader = decode(LeaderRecord, e.value)
            click.echo(f"active arbiter: {leader.node} (term {leader.term or e.revision})")
        except NotFoundError:
            click.echo("active arbiter: none")
        click.echo(f"{'group':<16} {'home':<10} {'owner':<10} {'epoch':>5}  state")
        records = await read_groups(nc.jetstream(), subj, cfg.groups())
        for g, (home, _kind) in cfg.groups().items():
            if g in records:
                r = records[g][0]
                click.echo(f"{g:<16} {home:<10} {r.owner:<10} {r.epoch:>5}  {r.state}")
            else:
                click.echo(f"{g:<16} {home:<10} {'-':<10} {'-':>5}  unassigned")
        for p in cfg.pairs:
            try:
                rec = decode(PairRecord, (await kv.get(subj.pair_key(p.name))).value or b"")
            except (NotFoundError, InvalidMessage):
                rec = PairRecord(failback=p.failback)
            click.echo(f"pair {p.name}: failback {rec.failback}, maintenance "
                       f"{'on' if rec.maintenance else 'off'}, held down: "
                       f"{', '.join(rec.hold) or '-'}")
    finally:
        await nc.close()


@main.command(help="Print the event stream; --follow keeps watching.")
@_config_opt
@_nats_opt
@click.option("--since", default=1, show_default=True, help="First event number.")
@click.option("--follow", is_flag=True, help="Keep printing new events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events(config_path: str, nats_urls: str | None, since: int, follow: bool,
           as_json: bool) -> None:
    cfg = _load(config_path)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_events(cfg, nats_urls, since, follow, as_json))


async def _events(cfg: ClusterConfig, nats_urls: str | None, since: int, follow: bool,
                  as_json: bool) -> None:
    from vtlha import eventlog
    from vtlha.messages import encode
    from vtlha.subjects import Subjects

    nc = await _connect(cfg, nats_urls)
    subj = Subjects(cfg.cluster)
    js = nc.jetstream()

    def show(seq: int, e: Any) -> None:
        if as_json:
            click.echo(b'{"seq":%d,' % seq + encode(e)[1:])
        else:
            click.echo(eventlog.format_event(seq, e))

    try:
        if follow:
            async for seq, e in eventlog.follow(js, subj, since):
                show(seq, e)
        else:
            for seq, e in await eventlog.read(js, subj, since):
                show(seq, e)
    finally:
        await nc.close()


# ---- operator requests -----------------------------------------------------------

#: exit codes of the operator commands
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3
_OPERATOR_EXITS = ("Exit 0 when done, 1 when refused or failed (the reason is printed), "
                   "2 for a bad cluster file, 3 when no active arbiter answered or the "
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
    except Exception as exc:
        click.echo(f"vtlha {req.verb}: cannot reach NATS: {exc!r}", err=True)
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
            return EXIT_REFUSED
        click.echo(reply.status)
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


@main.command(help="Move a group to the companion of the node that serves it now (a "
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


@main.command(help="Move every group of PAIR that is away from its home node back home "
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


@main.command(help="Maintenance of PAIR: `on` suspends every automatic move of its groups "
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


@main.command("clear-hold", help="Let NODE of PAIR be given groups automatically again "
              "after it was held down for failing too often (flap_max failures within "
              "flap_window); its failures are forgotten. " + _OPERATOR_EXITS)
@click.argument("pair")
@click.argument("node")
@_config_opt
@_nats_opt
@_timeout_opt
def clear_hold(pair: str, node: str, config_path: str, nats_urls: str | None,
               timeout: float) -> None:
    cfg = _load(config_path)
    _request(cfg, nats_urls, "clear-hold", {"pair": pair, "target_node": node}, timeout, 0)


@main.command(help="Re-run the pure policy on the inputs an event carries (event number "
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
    except Exception as exc:
        click.echo(f"vtlha explain: cannot reach NATS: {exc!r}", err=True)
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


if __name__ == "__main__":
    main()
