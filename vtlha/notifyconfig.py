"""The ``notifications:`` section of the cluster file, and which events go where.

A **target** is an executable (``type: exec``, keepalived's notify scripts) or an HTTP
webhook (``type: webhook``), called with the event as JSON for every event whose kind
matches one of its ``events`` globs (``failover.*``, ``*.failed``, ``node.down``; the
shell's ``*``, ``?`` and ``[...]``, matched against the whole kind, ``*`` crossing dots).
Each call has a ``timeout`` and is tried up to ``attempts`` times with exponential
backoff. The notifier service (``services/notifier``) carries them out, off the failover
path; ``docs/notifications.md`` is the operator's page.

Pure: no I/O. Errors name the field (``vtlha.config`` reports them with their path)."""

from __future__ import annotations

import string
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

NAME_RE = r"^[a-z0-9][a-z0-9-]*$"
#: an event-kind glob: the characters of kinds and the shell's wildcards
KIND_GLOB_RE = r"^[a-z0-9_.*?!\[\]-]+$"
KindGlob = Annotated[str, StringConstraints(pattern=KIND_GLOB_RE, max_length=100)]
TargetName = Annotated[str, StringConstraints(pattern=NAME_RE, max_length=40)]

#: what a command's arguments may name as ``{field}`` (docs/notifications.md)
PLACEHOLDERS = ("kind", "id", "seq", "cluster", "pair", "group", "old", "new", "term",
                "epoch", "node", "reason", "target", "attempt")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Target(_Model):
    name: TargetName = Field(description="the target's name: its metrics label, its "
                             "JetStream consumer (notify-<name>) and its log lines")
    events: list[KindGlob] = Field(min_length=1, description="event-kind globs; an event "
                                   "whose kind matches any of them is sent")
    timeout: float = Field(10.0, gt=0, le=3600, description="seconds one attempt may take; "
                           "a script still running then is killed (its process group)")
    attempts: int = Field(3, ge=1, le=100, description="tries in all (1: no retry)")
    backoff: float = Field(1.0, ge=0, le=600, description="seconds before the second "
                           "attempt, doubling after each (exponential backoff)")
    max_backoff: float = Field(60.0, ge=0, le=3600, description="the longest wait between "
                               "two attempts")
    max_concurrent: int = Field(4, ge=1, le=64, description="deliveries of this target "
                                "running at once (events in flight for it)")

    def wants(self, kind: str) -> bool:
        return kind_matches(self.events, kind)

    def longest_delivery(self) -> float:
        """An upper bound, in seconds, of one event's delivery to this target (every
        attempt timing out, every backoff at its longest)."""
        waits = sum(min(self.max_backoff, self.backoff * 2.0 ** k)
                    for k in range(self.attempts - 1))
        return float(self.attempts * self.timeout + waits)


class ExecTarget(_Target):
    """An executable run once per event and attempt, without a shell: ``command`` (each
    argument may contain ``{field}`` placeholders), the event's JSON on stdin, the
    ``VTLHA_*`` variables in its environment; exit 0 is success."""

    type: Literal["exec"]
    command: list[str] = Field(min_length=1, description="argv; the first is an absolute "
                               "path; {kind}, {group}, ... are replaced (docs/notifications.md)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment "
                                "variables (the rest is PATH, LANG and VTLHA_*)")

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str]) -> list[str]:
        if not v[0].startswith("/") or "{" in v[0]:
            raise ValueError(f"command[0] must be an absolute path (no placeholder), "
                             f"got {v[0]!r}")
        for k, arg in enumerate(v[1:], start=1):
            problem = placeholder_problem(arg)
            if problem:
                raise ValueError(f"command[{k}]: {problem}")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not key or not (key[0].isalpha() or key[0] == "_") \
                    or not all(c.isalnum() or c == "_" for c in key):
                raise ValueError(f"env: {key!r} is not a variable name")
            if key.startswith("VTLHA_"):
                raise ValueError(f"env: {key!r}: VTLHA_* variables are the event's")
        return v


class WebhookTarget(_Target):
    """An HTTP(S) URL that gets one POST per event and attempt, the event's JSON as the
    body; a 2xx answer is success, 408, 429 and 5xx (and no answer) are retried, any
    other answer is a failure at once."""

    type: Literal["webhook"]
    url: str = Field(description="http:// or https:// URL")
    headers: dict[str, str] = Field(default_factory=dict, description="extra request "
                                    "headers (e.g. Authorization)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {v!r}")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not key or any(c in key for c in " :\r\n\t") or any(c in value for c in "\r\n"):
                raise ValueError(f"headers: {key!r} is not a valid header")
        return v


Target = Annotated[ExecTarget | WebhookTarget, Field(discriminator="type")]


class Notifications(_Model):
    hosts: list[Annotated[str, StringConstraints(pattern=NAME_RE, max_length=63)]] | None = \
        Field(None, description="hosts that run a notifier (default: the witness); several "
              "share each target's durable consumer, each event goes to one of them")
    ack_wait: float = Field(30.0, ge=1, le=3600, description="seconds a notifier may be "
                            "silent about an event in delivery before JetStream gives it to "
                            "another (it reports progress every ack_wait / 3)")
    targets: list[Target] = Field(default_factory=list)

    @field_validator("targets", mode="before")
    @classmethod
    def _typed(cls, v: object) -> object:
        for k, item in enumerate(v if isinstance(v, list) else []):
            if isinstance(item, dict) and item.get("type") not in ("exec", "webhook"):
                raise ValueError(f"targets[{k}].type: must be exec or webhook, got "
                                 f"{item.get('type')!r}")
        return v

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[ExecTarget | WebhookTarget]) -> list[ExecTarget | WebhookTarget]:
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"target names must be unique, {dup[0]!r} is repeated")
        return v

    def for_kind(self, kind: str) -> list[ExecTarget | WebhookTarget]:
        return [t for t in self.targets if t.wants(kind)]


def kind_matches(patterns: list[str], kind: str) -> bool:
    """True when ``kind`` matches one of the globs (case-sensitive, whole kind)."""
    return any(fnmatchcase(kind, p) for p in patterns)


def placeholder_problem(arg: str) -> str | None:
    """What is wrong with the ``{field}`` placeholders of one argument, or None."""
    try:
        parsed = list(string.Formatter().parse(arg))
    except ValueError as exc:
        return f"{arg!r}: {exc} (write a literal brace as {{{{ or }}}})"
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            return (f"{arg!r}: unknown placeholder {{{name}}} (known: "
                    f"{', '.join(PLACEHOLDERS)})")
        if spec or conv:
            return f"{arg!r}: placeholder {{{name}}} takes no format or conversion"
    return None


def render_argv(command: list[str], fields: dict[str, Any]) -> list[str]:
    """``command`` with each ``{field}`` replaced (an absent field is the empty string)."""
    values = {k: "" if fields.get(k) is None else str(fields[k]) for k in PLACEHOLDERS}
    return [command[0], *(arg.format_map(values) for arg in command[1:])]
