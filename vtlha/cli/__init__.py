"""``vtlha``: the operator's command line.

    vtlha config check FILE      validate a cluster file
    vtlha status [--watch] [--json]   per pair, node and group: owner, served, leases,
                                 heartbeats, checks, paths; the active arbiter; problems first
    vtlha events --config FILE   the event stream (--follow to keep watching)
    vtlha switchover GROUP       operator requests to the active arbiter: a planned move,
    vtlha failback PAIR          every group of a pair home again,
    vtlha maintenance on|off PAIR  automatic failover suspended / resumed,
    vtlha clear-hold PAIR NODE   a held-down node may be given groups again
    vtlha standby on|off PAIR NODE  a node's groups moved away and kept away / back
    vtlha failback-mode auto|manual PAIR  the pair's failback mode at run time
    vtlha explain EVENT          re-run the policy on an event's inputs
    vtlha deploy render FILE --out DIR   nats-server configs, NATS credentials,
                                 each host's compose file and systemd units
    vtlha iscsi keys URL         a LUN's SCSI-3 registrations and reservation, decoded
    vtlha version                this program's version (and its Python's, nats-py's)

The lab, the demo, the reference SAN target and the tape client are ``vtlha-lab``
(package ``vtlha_lab``), which this package never imports.
"""

from __future__ import annotations

import sys

import click

from vtlha.cli.common import EXIT_USAGE, _config_opt, _load, _nats_opt
from vtlha.cli.configcmd import config
from vtlha.cli.defaults import default_map, defaults_path, load_defaults
from vtlha.cli.deploycmd import deploy
from vtlha.cli.events import events
from vtlha.cli.explain import explain, replay
from vtlha.cli.iscsicmd import iscsi
from vtlha.cli.requests import (
    cleanup,
    clear_hold,
    failback,
    failback_mode,
    maintenance,
    standby,
    switchover,
)
from vtlha.cli.status import status
from vtlha.cli.version import version
from vtlha.errors import ConfigError

__all__ = ["_config_opt", "_load", "_nats_opt", "main", "replay"]


@click.group(help="vtl-ha: high availability for pairs of VTL appliances, over NATS. "
             "--config, --nats and --creds also come from the environment (VTLHA_CONFIG, "
             "VTLHA_NATS, VTLHA_CREDS) or from ~/.config/vtlha/cli.yaml (docs/operations.md).")
@click.version_option(package_name="vtlha", prog_name="vtlha")
@click.pass_context
def main(ctx: click.Context) -> None:
    try:
        settings = load_defaults(defaults_path())
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_USAGE)
    if settings:
        ctx.default_map = default_map(main, settings)


for _command in (config, deploy, iscsi, status, events, switchover, failback, maintenance,
                 clear_hold, standby, failback_mode, cleanup, explain, version):
    main.add_command(_command)
