"""Who a process is on the bus: its NATS credential and TLS settings.

A service on host H connects as the user ``H-<service>`` (``vtlha deploy render`` writes
one nkey per service per host, and the server's permissions for it); the CLI as
``operator`` (or ``admin``). The credential comes from the cluster file
(``nats.credentials_dir``/<user>.nk) or from the environment, which wins:

    VTLHA_NATS_NKEY_SEED_FILE   an nkey seed file (the whole file is the seed)
    VTLHA_NATS_CREDS            a .creds file (JWT + seed; decentralised auth)
    VTLHA_NATS_USER             the user name (default: <host>-<service>); it sets the
                                reply prefix _INBOX.<user> the permissions allow
    VTLHA_NATS_CA               the CA file that signs the servers' certificates
    VTLHA_NATS_CERT, _KEY       a client certificate, when the servers ask for one

Nothing here reads a seed into a string that is logged or shown: ``describe()`` names
the user, the file and whether TLS is on, never what the file holds.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtlha.config import ClusterConfig
from vtlha.errors import ConfigError
from vtlha.subjects import Subjects

ENV_SEED = "VTLHA_NATS_NKEY_SEED_FILE"
ENV_CREDS = "VTLHA_NATS_CREDS"
ENV_USER = "VTLHA_NATS_USER"
ENV_CA = "VTLHA_NATS_CA"
ENV_CERT = "VTLHA_NATS_CERT"
ENV_KEY = "VTLHA_NATS_KEY"

#: the file name of a user's nkey seed in a credentials directory
SEED_SUFFIX = ".nk"


def service_user(host: str, service: str) -> str:
    """The NATS user of ``service`` on ``host``."""
    return f"{host}-{service}"


def seed_path(credentials_dir: str | Path, user: str) -> Path:
    return Path(credentials_dir) / f"{user}{SEED_SUFFIX}"


@dataclass(frozen=True)
class ClientAuth:
    """How one client authenticates; ``NONE`` connects as today's lab does."""

    user: str | None = None
    seed_file: str | None = None
    creds_file: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @property
    def has_credential(self) -> bool:
        return bool(self.seed_file or self.creds_file)

    @property
    def uses_tls(self) -> bool:
        return bool(self.ca or self.cert)

    def check(self) -> None:
        """Every named file readable (a clear error now rather than a refused connect
        later); raises ConfigError naming the file and what it is for."""
        for what, path in (("nkey seed", self.seed_file), ("credentials", self.creds_file),
                           ("CA", self.ca), ("client certificate", self.cert),
                           ("client key", self.key)):
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(f"NATS {what} file {path} is not readable"
                                  + (f" (user {self.user})" if self.user else ""))
        if bool(self.cert) != bool(self.key):
            raise ConfigError(f"a NATS client certificate needs both {ENV_CERT} and {ENV_KEY}")

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.uses_tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert and self.key:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for nats-py's ``connect``."""
        opts: dict[str, Any] = {}
        if self.seed_file:
            opts["nkeys_seed"] = self.seed_file
        if self.creds_file:
            opts["user_credentials"] = self.creds_file
        if self.user and self.has_credential:
            opts["inbox_prefix"] = Subjects.inbox_prefix(self.user)
        ctx = self.ssl_context()
        if ctx is not None:
            opts["tls"] = ctx
        return opts

    def describe(self) -> dict[str, object]:
        """What may be shown (status pages, logs): never a secret."""
        return {"user": self.user if self.has_credential else None,
                "credential": self.seed_file or self.creds_file, "tls": self.uses_tls}


NONE = ClientAuth()


def client_auth(cfg: ClusterConfig, user: str,
                env: Mapping[str, str] | None = None) -> ClientAuth:
    """The credential and TLS settings of ``user`` from the environment, else from the
    cluster file; ``NONE``-like (no credential) when neither gives one."""
    env = os.environ if env is None else env
    user = env.get(ENV_USER) or user
    seed = env.get(ENV_SEED)
    creds = env.get(ENV_CREDS)
    if not seed and not creds and cfg.nats.credentials_dir:
        seed = str(seed_path(cfg.nats.credentials_dir, user))
    tls = cfg.nats.tls
    auth = ClientAuth(user=user, seed_file=seed or None, creds_file=creds or None,
                      ca=env.get(ENV_CA) or (tls.ca if tls else None),
                      cert=env.get(ENV_CERT) or None, key=env.get(ENV_KEY) or None)
    auth.check()
    return auth
