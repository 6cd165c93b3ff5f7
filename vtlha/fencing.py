"""Fencing tokens on the executor side: the highest term and, per group, the highest
epoch an executor has seen, persisted so a restart does not forget them.

A command is accepted only if its term >= the highest term seen and its epoch >= the
highest epoch seen for its group (DESIGN.md "Fencing tokens")."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import orjson


class FencingStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.term = 0
        self.epochs: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            data = orjson.loads(self.path.read_bytes())
            self.term = int(data.get("term", 0))
            self.epochs = {str(k): int(v) for k, v in data.get("epochs", {}).items()}

    def refusal(self, term: int, group: str | None, epoch: int | None) -> str | None:
        """Why a command with these tokens must be refused, or None to accept."""
        if term < self.term:
            return f"stale term {term}: highest seen is {self.term}"
        if group is not None and epoch is not None and epoch < self.epochs.get(group, 0):
            return f"stale epoch {epoch} for {group}: highest seen is {self.epochs[group]}"
        return None

    def record(self, term: int, group: str | None = None, epoch: int | None = None) -> None:
        changed = term > self.term
        self.term = max(self.term, term)
        if group is not None and epoch is not None and epoch > self.epochs.get(group, 0):
            self.epochs[group] = epoch
            changed = True
        if changed:
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(orjson.dumps({"term": self.term, "epochs": self.epochs}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
