"""``vtlha config check``: validate a cluster file."""

from __future__ import annotations

import click

from vtlha.cli.common import _load


@click.group(help="Cluster file commands.")
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

