"""Fencing tokens on the executor side: the KV bucket they belong to, the highest term
and, per group, the highest epoch an executor has seen and its release floor (the
epoch of the latest release: no lease notice below it makes the executor hold again),
persisted so a restart does not forget them.

A command is accepted only if its term >= the highest term seen and its epoch >= the
highest epoch seen for its group (DESIGN.md "Fencing tokens").

Terms and epochs are KV revisions and counters: a KV bucket lost and recreated starts
them again, lower than the ones persisted here. So the tokens are kept per **bucket
identity** (``vtlha.bus.kv_identity``: the KV stream's creation time, which the server
reports and which changes when the bucket is recreated). A command names its bucket
(``Command.bucket``):
- ``""`` (an arbiter that does not know it, or an older version): checked against the
  tokens of the bucket persisted here, as before — it can never reset anything;
- the persisted bucket: checked as usual;
- another bucket: refused (``bucket_refusal``) unless the executor itself read the KV's
  current identity and it is that bucket; then the executor ``adopt``s it, which starts
  its tokens and floors afresh for that bucket. A command from the old bucket is refused
  from then on."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import orjson


class FencingStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.bucket = ""  # the KV bucket's identity these tokens belong to ("" unknown)
        self.term = 0
        self.epochs: dict[str, int] = {}
        self.floors: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            data = orjson.loads(self.path.read_bytes())
            self.bucket = str(data.get("bucket", ""))
            self.term = int(data.get("term", 0))
            self.epochs = {str(k): int(v) for k, v in data.get("epochs", {}).items()}
            self.floors = {str(k): int(v) for k, v in data.get("floors", {}).items()}

    def is_other_bucket(self, bucket: str) -> bool:
        """True when a command naming ``bucket`` needs the KV's identity read first."""
        return bucket != "" and bucket != self.bucket

    @staticmethod
    def bucket_refusal(bucket: str, current: str | None) -> str:
        return (f"command from KV bucket {bucket!r}, but the bucket is now "
                f"{current!r}" if current else f"command from KV bucket {bucket!r}, which "
                "this executor cannot confirm (the KV's identity could not be read)")

    def adopt(self, bucket: str) -> bool:
        """The KV's current identity is ``bucket`` (read by the executor itself). When
        it is another bucket than the persisted one, start the tokens and floors afresh
        for it (an unknown one, "", is simply named: its tokens are kept). Returns True
        when the tokens were reset."""
        if not bucket or bucket == self.bucket:
            return False
        reset = self.bucket != ""
        self.bucket = bucket
        if reset:
            self.term, self.epochs, self.floors = 0, {}, {}
        self._save()
        return reset

    def refusal(self, term: int, group: str | None, epoch: int | None) -> str | None:
        """Why a command with these tokens must be refused, or None to accept."""
        if term < self.term:
            return f"stale term {term}: highest seen is {self.term}"
        if group is not None and epoch is not None and epoch < self.epochs.get(group, 0):
            return f"stale epoch {epoch} for {group}: highest seen is {self.epochs[group]}"
        return None

    def record(self, term: int, group: str | None = None, epoch: int | None = None,
               release: bool = False) -> None:
        """Remember an accepted command's tokens; a release also raises the group's
        floor to its epoch."""
        changed = term > self.term
        self.term = max(self.term, term)
        if group is not None and epoch is not None and epoch > self.epochs.get(group, 0):
            self.epochs[group] = epoch
            changed = True
        if release and group is not None and epoch is not None \
                and epoch > self.floors.get(group, 0):
            self.floors[group] = epoch
            changed = True
        if changed:
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(orjson.dumps({"bucket": self.bucket, "term": self.term,
                                  "epochs": self.epochs, "floors": self.floors}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
