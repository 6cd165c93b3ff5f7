"""The hold rule handed from the storage-monitor to its node's data service: a small
file (``permit.json`` in the group's resource directory) that says until when the data
service may register and reserve for the group at an epoch (``docs/storage.md``, "Who
holds the reservation").

The storage-monitor writes it from its executor's lease-notice gate
(:meth:`vtlha.iscsi.session.Permit.from_gate`) when it starts holding the group and at
every renewal, and revokes it (writes ``valid_until`` 0) before it stops the group's
resources. ``valid_until`` is CLOCK_MONOTONIC, one clock for every process of a host.
Written atomically (a temporary file renamed over it), read at each use: a data
service whose storage-monitor died or lost the lease finds it run out within the
lease, and then registers nothing and acknowledges nothing."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import orjson

from vtlha.iscsi.session import Permit

FILE_NAME = "permit.json"


def write_permit(path: Path, group: str, epoch: int, valid_until: float) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(orjson.dumps({"group": group, "epoch": epoch,
                                  "valid_until": valid_until}))
    os.replace(tmp, path)


def revoke_permit(path: Path, group: str, epoch: int) -> None:
    """Nothing is permitted any more (a reader sees a permit that ran out)."""
    with contextlib.suppress(FileNotFoundError):
        if path.exists():
            write_permit(path, group, epoch, 0.0)


def read_permit(path: Path, group: str, epoch: int) -> Permit | None:
    """The permit in ``path`` when it is for ``group`` at ``epoch`` (whether or not it
    has run out: ``Permit.check`` says); None when absent, unreadable or for another
    group or epoch."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("group") != group or data.get("epoch") != epoch:
        return None
    until = data.get("valid_until")
    if not isinstance(until, (int, float)) or isinstance(until, bool):
        return None
    return Permit(group, epoch, float(until))
