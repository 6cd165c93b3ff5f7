"""What every ``vtlha`` command shares: loading the cluster file, the ``--config`` and
``--nats`` options, the operator's NATS connection, and the exit codes."""

from __future__ import annotations

import sys
from typing import Any

import click

from vtlha.config import ClusterConfig, load_config
from vtlha.errors import ConfigError

#: exit codes of the commands that talk to the cluster
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3


def _load(path: str) -> ClusterConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)



#: where the defaults come from, beside the command line (which wins over both)
ENV_CONFIG, ENV_NATS, ENV_CREDS = "VTLHA_CONFIG", "VTLHA_NATS", "VTLHA_CREDS"
#: the per-user defaults file (``vtlha.cli.defaults``)
_FILE_NOTE = "or the per-user file ~/.config/vtlha/cli.yaml"
_CREDS_KEY = "vtlha.creds"  # where --creds is kept for ``_connect`` (click's ctx.meta)


def _keep_creds(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[_CREDS_KEY] = value


def _nats_opt(f: Any) -> Any:
    """``--nats`` and ``--creds`` (the latter reaches ``_connect`` through click's
    context, not as an argument)."""
    f = click.option("--creds", default=None, expose_value=False, envvar=ENV_CREDS,
                     callback=_keep_creds, type=click.Path(dir_okay=False),
                     help="The operator's NATS credential: an nkey seed file (.nk) or a "
                          f".creds file (env {ENV_CREDS}, {_FILE_NOTE}; default: "
                          "<nats.credentials_dir>/operator.nk of the cluster file).")(f)
    return click.option("--nats", "nats_urls", default=None, envvar=ENV_NATS,
                        help="Comma-separated NATS URLs (env VTLHA_NATS, "
                             f"{_FILE_NOTE}; default: from the cluster file).")(f)


_config_opt = click.option("--config", "config_path", required=True, envvar=ENV_CONFIG,
                           type=click.Path(dir_okay=False),
                           help=f"The cluster file (env {ENV_CONFIG}, {_FILE_NOTE}).")


class Unreachable(Exception):
    """No NATS server of the list answered."""


def _auth_env() -> dict[str, str]:
    """The environment ``client_auth`` reads, with ``--creds`` (or VTLHA_CREDS) as the
    seed or .creds file."""
    import os

    from vtlha.natsauth import ENV_CREDS as NATS_CREDS
    from vtlha.natsauth import ENV_SEED

    env = dict(os.environ)
    ctx = click.get_current_context(silent=True)
    creds = ctx.find_root().meta.get(_CREDS_KEY) if ctx is not None else None
    if creds:
        env.pop(NATS_CREDS, None)
        env.pop(ENV_SEED, None)
        env[NATS_CREDS if str(creds).endswith(".creds") else ENV_SEED] = str(creds)
    return env


async def _connect(cfg: ClusterConfig, nats_urls: str | None,
                   deadline: float = 5.0) -> Any:
    """The operator's connection; raises Unreachable (one line) when no server of the
    list answers within ``deadline`` seconds."""
    import asyncio
    import logging

    import nats.errors

    from vtlha import bus

    logging.getLogger("vtlha.bus").setLevel(logging.CRITICAL)  # no "disconnected" at close

    from vtlha.deploy import OPERATOR
    from vtlha.natsauth import client_auth

    urls = [u.strip() for u in nats_urls.split(",") if u.strip()] if nats_urls \
        else cfg.nats_urls()
    try:  # the operator's credential (VTLHA_NATS_USER=admin for the admin's)
        auth = client_auth(cfg, OPERATOR, env=_auth_env())
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_USAGE)
    try:  # (nats-py retries a first connect forever when reconnects are allowed)
        return await asyncio.wait_for(
            bus.connect(urls, name="vtlha-cli", connect_deadline=deadline, auth=auth), deadline)
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        why = "no server answered" if isinstance(exc, TimeoutError) \
            else str(exc) or type(exc).__name__
        raise Unreachable(f"cannot reach NATS at {', '.join(urls)} within {deadline:g} s "
                          f"({why})") from None
