"""``vtlha version``: what is installed."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

import click


def installed(dist: str) -> str:
    try:
        return dist_version(dist)
    except PackageNotFoundError:
        return "not installed"


@click.command(help="Print this program's version, and its Python's and nats-py's.")
def version() -> None:
    click.echo(f"vtlha {installed('vtlha')} (Python {platform.python_version()}, "
               f"nats-py {installed('nats-py')})")
