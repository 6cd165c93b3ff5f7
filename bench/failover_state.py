"""The resumable state file of ``bench/failover.py``: one JSON line per finished trial,
appended and synced as each trial ends, read back to skip the trials done."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def key(rec: dict[str, Any]) -> tuple[float, str, str, int]:
    return (float(rec["interval"]), str(rec["case"]), str(rec["system"]), int(rec["trial"]))


def load_state(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and "case" in rec:
                    out.append(rec)
    return out


def append_state(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
