"""``vtlha deploy render``: nats-server configs, credentials, containers."""

from __future__ import annotations

import sys

import click

from vtlha.cli.common import _load
from vtlha.errors import ConfigError


@click.group(help="Deployment: the nats-server configs, the NATS credentials and "
            "each host's containers.")
def deploy() -> None:
    pass


@deploy.command("render", help="Write each nats-server's config (OUT/nats/<server>.conf), "
                "an nkey per service per host, operator and admin (OUT/creds/<user>.nk, "
                "mode 0600; existing keys are kept unless --rotate), and each host's "
                "containers: OUT/compose/<host>.yaml and OUT/systemd/<host>/*.service.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write to.")
@click.option("--rotate", is_flag=True, help="New keys and route secret for every user.")
@click.option("--store-dir", default=None, type=click.Path(file_okay=False),
              help="JetStream store root: <store-dir>/<server> (default: "
                   "<state_dir>/<server>/nats).")
@click.option("--image", default=None,
              help="The container image (default: localhost/vtlha:<this version>, what "
                   "`make images` builds).")
@click.option("--config-path", default="/etc/vtlha/cluster.yaml", show_default=True,
              help="Where the cluster file is on every host (the containers mount it).")
@click.option("--conf-dir", default="/etc/vtlha", show_default=True,
              help="Where OUT/nats/ is copied to on every host (<conf-dir>/nats/<host>.conf).")
def deploy_render(file: str, out_dir: str, rotate: bool, store_dir: str | None,
                  image: str | None, config_path: str, conf_dir: str) -> None:
    from importlib.metadata import version
    from pathlib import Path

    from vtlha.containers import HostPaths, render_containers
    from vtlha.deploy import render

    cfg = _load(file)
    image = image or f"localhost/vtlha:{version('vtlha')}"
    try:
        r = render(cfg, Path(out_dir), rotate=rotate, source=file,
                   store_root=Path(store_dir) if store_dir else None)
        c = render_containers(cfg, Path(out_dir), image,
                              HostPaths(config_path, conf_dir, store_dir), r.written, file)
    except (ConfigError, OSError, ValueError) as exc:
        click.echo(f"vtlha deploy render: {exc}", err=True)
        sys.exit(2)
    for server, path in r.configs.items():
        click.echo(f"{server}: {path}")
    click.echo(f"credentials: {r.creds_dir} ({len(r.users)} users: {', '.join(r.users)})")
    for host, path in c.compose.items():
        click.echo(f"{host}: {path}, {len(c.units[host])} unit(s) in {path.parent.parent}/"
                   f"systemd/{host}/ (image {image})")
    click.echo(f"{len(r.written)} file(s) written" + (" (keys rotated)" if rotate else "")
               + "; copy each host's <host>-<service>.nk to its nats.credentials_dir, "
               "operator.nk to operators, admin.nk to no host")

