"""The per-user defaults file of ``vtlha``: the cluster file, the NATS URLs and the
credential, so that an operator need not pass ``--config``, ``--nats`` and ``--creds``
every time. Looked for at ``$VTLHA_CLI_CONFIG``, else
``$XDG_CONFIG_HOME/vtlha/cli.yaml``, else ``~/.config/vtlha/cli.yaml``::

    config: /etc/vtlha/cluster.yaml       # --config  (env VTLHA_CONFIG)
    nats: nats://10.0.0.1:4222,nats://10.0.0.2:4222   # --nats (env VTLHA_NATS)
    creds: ~/.config/vtlha/operator.nk    # --creds   (env VTLHA_CREDS)

A relative path counts from the file's folder; ``~`` is expanded. The command line
wins over the environment, which wins over this file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import yaml

from vtlha.errors import ConfigError

ENV_FILE = "VTLHA_CLI_CONFIG"
#: the keys of the file, each the name of the option it is the default of (``--KEY``)
KEYS = ("config", "nats", "creds")
_PATHS = ("config", "creds")


def defaults_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(ENV_FILE):
        return Path(env[ENV_FILE])
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "vtlha" / "cli.yaml"


def load_defaults(path: Path) -> dict[str, str]:
    """The file's settings by parameter name; {} when it does not exist. Raises
    ConfigError naming the file for anything else wrong with it."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the vtlha defaults file: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the vtlha defaults file must be a mapping of "
                          f"{', '.join(KEYS)}")
    out: dict[str, str] = {}
    for key, value in raw.items():
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(KEYS)})")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: {key} must be a non-empty string")
        if key in _PATHS:
            value = str(path.parent / Path(value).expanduser())
        out[key] = value
    return out


def default_map(command: click.Command, settings: Mapping[str, str]) -> dict[str, Any]:
    """click's ``default_map`` giving each setting to every (sub)command that has its
    option (``--config`` for ``config``, and so on)."""
    out: dict[str, Any] = {}
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            inner = default_map(sub, settings)
            if inner:
                out[name] = inner
    for p in command.params:
        for key, value in settings.items():
            if f"--{key}" in p.opts and p.name:
                out[p.name] = value
    return out
