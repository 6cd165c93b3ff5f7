"""Who may act from the dashboard: a token per operator, sent in the ``Authorization``
header (``Bearer <token>``), never in a cookie, so another site's page cannot make a
signed-in browser act (no CSRF). Each operator is mapped to the NATS user of the
deployment whose credential the dashboard acts with (``operator``, or ``admin``): the
servers' permissions for that user still apply to whatever the dashboard sends for them.

The operators file (YAML) holds no token, only its SHA-256 (tokens are 256 random
bits: a salted slow hash adds nothing against guessing)::

    operators:
      alice: {token_sha256: 5f0c..., nats_user: operator}

``python -m vtlha_dashboard.auth NAME`` makes a token, prints it once and the line to add.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vtlha.deploy import ADMIN, OPERATOR
from vtlha.errors import ConfigError

#: the deployment's NATS users that may send operator requests (``vtlha.deploy``)
ACTING_USERS = (OPERATOR, ADMIN)
_HEX = frozenset("0123456789abcdef")
_SCHEME = "bearer"
#: a token's length in characters at most (anything longer is not ours)
TOKEN_MAX = 256


@dataclass(frozen=True)
class Operator:
    name: str
    nats_user: str
    token_sha256: str  # lowercase hex


class AuthError(Exception):
    """Refused: ``status`` is the HTTP status (401 no or unknown token), the message
    says what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def parse_operators(raw: Any, source: str) -> dict[str, Operator]:
    """The operators of a loaded file; ConfigError naming the file and the field."""
    if not isinstance(raw, dict) or not isinstance(raw.get("operators"), dict):
        raise ConfigError(f"{source}: needs a mapping 'operators: {{NAME: {{token_sha256: "
                          "..., nats_user: operator}}}}'")
    out: dict[str, Operator] = {}
    hashes: dict[str, str] = {}
    for name, entry in raw["operators"].items():
        where = f"{source}: operators.{name}"
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ConfigError(f"{where}: an operator's name is 1 to 64 characters")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: needs token_sha256 and nats_user")
        digest = entry.get("token_sha256")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            raise ConfigError(f"{where}.token_sha256: 64 lowercase hex digits (the SHA-256 "
                              "of the token; `python -m vtlha_dashboard.auth NAME`)")
        user = entry.get("nats_user", OPERATOR)
        if user not in ACTING_USERS:
            raise ConfigError(f"{where}.nats_user: one of {', '.join(ACTING_USERS)} (the "
                              f"deployment's users that may send operator requests), not "
                              f"{user!r}")
        if unknown := set(entry) - {"token_sha256", "nats_user"}:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        if digest in hashes:
            raise ConfigError(f"{where}: the same token as operators.{hashes[digest]}")
        hashes[digest] = name
        out[name] = Operator(name=name, nats_user=user, token_sha256=digest)
    return out


def load_operators(path: str | Path) -> dict[str, Operator]:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the operators file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not YAML ({exc})") from None
    return parse_operators(raw, str(p))


def authenticate(header: str | None, operators: dict[str, Operator]) -> Operator:
    """The operator whose token ``header`` (``Authorization``) carries; AuthError 401
    otherwise. Every known token's hash is compared in constant time, all of them each
    time (no early exit that would time which one came close)."""
    if not operators:
        raise AuthError(403, "this dashboard is read-only: it was started without "
                             "--operators")
    if not header:
        raise AuthError(401, "sign in: this action needs an operator's token")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != _SCHEME or not token:
        raise AuthError(401, "the Authorization header must be 'Bearer <token>'")
    if len(token) > TOKEN_MAX:
        raise AuthError(401, "unknown token")
    digest = token_hash(token).encode()
    found: Operator | None = None
    for op in operators.values():
        if hmac.compare_digest(digest, op.token_sha256.encode()):
            found = op
    if found is None:
        raise AuthError(401, "unknown token")
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m vtlha_dashboard.auth NAME [NATS_USER]``: a new token for NAME."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2 or (len(args) == 2 and args[1] not in ACTING_USERS):
        print(f"usage: python -m vtlha_dashboard.auth NAME [{'|'.join(ACTING_USERS)}]",
              file=sys.stderr)
        return 2
    name, user = args[0], args[1] if len(args) == 2 else OPERATOR
    token = new_token()
    print(f"token for {name} (give it to them; it is not stored): {token}")
    print("add to the operators file, under operators:")
    print(f"  {name}: {{token_sha256: {token_hash(token)}, nats_user: {user}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
