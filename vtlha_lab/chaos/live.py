"""The runner's live view of the observer's output and the tape clients' logs (read
incrementally), to know when the cluster has recovered. The checker does not use it:
it reads the whole history afterwards."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class Tail:
    """New complete JSON lines of a growing file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


class LiveView:
    def __init__(self, observer_out: Path, tape_logs: dict[str, Path]) -> None:
        self.obs = Tail(observer_out)
        self.tapes = {g: Tail(p) for g, p in tape_logs.items()}
        self.arp: dict[str, list[str]] = {}
        self.last_ack: dict[str, tuple[float, str]] = {}  # group -> (wall time, node)

    def update(self) -> None:
        for rec in self.obs.read():
            if rec.get("type") == "arp":
                self.arp[rec["addr"]] = rec["nodes"]
        for g, tail in self.tapes.items():
            for rec in tail.read():
                if "block" in rec:
                    self.last_ack[g] = (float(rec["t"]), str(rec.get("node")))

    def answered_once(self, addresses: list[str]) -> bool:
        return all(len(self.arp.get(a, [])) == 1 for a in addresses)

    def acking(self, groups: list[str], within: float = 1.0) -> bool:
        now = time.time()
        return all(g in self.last_ack and now - self.last_ack[g][0] < within for g in groups)

    def home(self, homes: dict[str, str], addr_group: dict[str, str],
             data_groups: list[str], within: float = 1.0) -> bool:
        """Every address answered by its group's home only, every data group acked by
        its home within the last ``within`` seconds."""
        now = time.time()
        return (all(self.arp.get(a) == [homes[g]] for a, g in addr_group.items())
                and all(g in self.last_ack and self.last_ack[g][1] == homes[g]
                        and now - self.last_ack[g][0] < within for g in data_groups))
