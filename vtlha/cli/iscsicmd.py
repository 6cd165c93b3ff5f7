"""``vtlha iscsi keys``: a LUN's SCSI-3 registrations and reservation, decoded;
and the same for every device of a cluster (``vtlha status`` with san.kind iscsi)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from vtlha.cli.common import _load
from vtlha.config import ClusterConfig


@click.group(help="SCSI-3 persistent reservations over iSCSI (docs/storage.md).")
def iscsi() -> None:
    pass


@iscsi.command("keys", help="Read a LUN's registered keys and its reservation (PR IN READ "
               "KEYS, READ RESERVATION; read-only: nothing is registered) and say whose each "
               "key is. URL: iscsi://HOST:PORT/IQN/LUN.")
@click.argument("url")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Cluster file: names the nodes the keys belong to.")
@click.option("--timeout", default=2.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds for the login and each command.")
def iscsi_keys(url: str, config_path: str | None, timeout: float) -> None:
    from vtlha.iscsi.scsi import IscsiError, PrType, describe_key, node_tag, parse_url
    from vtlha.iscsi.session import Target, initiator_name

    try:
        portal, iqn, lun = parse_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from None
    cfg = _load(config_path) if config_path else None
    names = {node_tag(cfg.cluster, n.name): n.name for n in cfg.nodes} if cfg else {}
    who = initiator_name(cfg.cluster if cfg else "cli", "operator", "keys")

    async def read() -> None:
        keys, res = await _read_pr(Target(portal, iqn, lun), who, timeout)
        click.echo(f"{url}: PR generation {keys.generation}, {len(keys.keys)} registered "
                   "key(s)")
        for k in keys.keys:
            click.echo(f"  {describe_key(k, names)}")
        if res.key is None:
            click.echo("reservation: none")
        else:
            try:
                pr_type = PrType(res.type).name.replace("_", " ").lower()
            except ValueError:
                pr_type = f"type {res.type}"
            click.echo(f"reservation: {describe_key(res.key, names)}, {pr_type}")

    try:
        asyncio.run(read())
    except (IscsiError, OSError) as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)


async def _read_pr(target: Any, who: str, timeout: float) -> tuple[Any, Any]:
    """READ KEYS and READ RESERVATION of one LUN through a session that registers
    nothing (closed afterwards)."""
    from vtlha.iscsi.session import Session

    s = await Session.open(target, who, timeout)
    try:
        return await s.read_keys(), await s.read_reservation()
    finally:
        await s.close()


async def _san_status(cfg: ClusterConfig, timeout: float = 2.0) -> None:
    """``san.kind: iscsi``: each device's READ KEYS / READ RESERVATION, read now from
    the target through the first portal that answers (nothing registered)."""
    from vtlha.iscsi.scsi import IscsiError, describe_key, node_tag
    from vtlha.iscsi.session import Target, initiator_name

    names = {node_tag(cfg.cluster, n.name): n.name for n in cfg.nodes}
    who = initiator_name(cfg.cluster, "operator", "status")
    assert cfg.san.iqn is not None
    for dev, d in cfg.devices.items():
        assert d.lun is not None
        errors = []
        for portal in cfg.san.portals:
            try:
                keys, res = await _read_pr(Target(portal, cfg.san.iqn, d.lun), who, timeout)
            except IscsiError as exc:
                errors.append(f"{portal}: {exc}")
                continue
            held = "none" if res.key is None else describe_key(res.key, names)
            click.echo(f"device {dev} (LUN {d.lun}): reservation {held}; keys: "
                       f"{', '.join(describe_key(k, names) for k in keys.keys) or '-'}")
            break
        else:
            click.echo(f"device {dev} (LUN {d.lun}): unreadable ({'; '.join(errors)})")
