"""One exception root for the project (Patroni's pattern): cycles catch VtlhaError
and go on; FatalError ends the process."""

from __future__ import annotations


class VtlhaError(Exception):
    """Root of every error vtl-ha raises on purpose."""


class FatalError(VtlhaError):
    """The process cannot go on (bad config, refused to run unsafely)."""


class ConfigError(FatalError):
    """A cluster file is missing, unreadable or invalid. The message names the
    file, the field and the reason."""


class InvalidMessage(VtlhaError):
    """A message on the bus failed validation; it is counted, logged and dropped."""
