"""ip-manager: carries out address takeover and release on the arbiter's commands.

At start it reconciles: an address it holds whose group its node does not own (by
the KV) is removed (event ``address.reconciled``)."""

from __future__ import annotations

from typing import Any

import click
from nats.js.errors import KeyNotFoundError, NotFoundError

from vtlha import bus
from vtlha.errors import FatalError
from vtlha.executor import Executor
from vtlha.messages import GroupRecord, decode
from vtlha.service import service_command
from vtlha_ip_manager.backend import IpBackend, RecordingBackend


class IpManager(Executor):
    name = "ip-manager"
    http_port_key = "ip_manager"
    cli_options = [click.Option(["--backend"], type=click.Choice(["netlink", "recording"]),
                                default=None, help="IP backend (default: the cluster "
                                "file's ip.backend)")]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        backend = self.options.get("backend") or self.config.ip.backend
        if backend != "recording":
            raise FatalError("the netlink backend is not built yet; use --backend recording")
        self.backend: IpBackend = RecordingBackend(self.state_dir / "addresses.json")
        self.held_groups: dict[str, list[str]] = {}
        self.reconciled = False

    async def start(self) -> None:
        await self.reconcile()
        await self.start_executor()

    async def reconcile(self) -> None:
        """Remove addresses held for groups this node does not own; remember the rest."""
        kv = await bus.ensure_kv(self.js, self.subjects, replicas=self.config.nats.stream_replicas)
        held = await self.backend.held()
        for group in sorted(self.my_groups):
            addrs = [a for a in self.config.group_addresses(group) if a in held]
            if not addrs:
                continue
            owner: str | None = None
            try:
                entry = await kv.get(self.subjects.group_key(group))
                if entry.value:
                    owner = decode(GroupRecord, entry.value).owner
            except (KeyNotFoundError, NotFoundError):
                owner = None
            if owner == self.node:
                self.held_groups[group] = addrs
                continue
            for a in addrs:
                await self.backend.remove(a)
            await self.emit("address.reconciled",
                            f"{self.node} removed {', '.join(addrs)} of {group} at start: "
                            f"the group is owned by {owner or 'nobody'}", group=group,
                            data={"removed": addrs, "owner": owner})
        self.reconciled = True

    async def acquire(self, group: str, epoch: int) -> list[str]:
        want = self.config.group_addresses(group)
        have = await self.backend.held()
        for a in want:
            if a not in have:
                await self.backend.add(a)
        if all(a in have for a in want):
            await self.emit("address.noop", f"{self.node} already holds {group}", group=group,
                            epoch=epoch)
        self.held_groups[group] = want
        return want

    async def release(self, group: str, epoch: int) -> list[str]:
        have = await self.backend.held()
        for a in self.config.group_addresses(group):
            if a in have:
                await self.backend.remove(a)
        self.held_groups.pop(group, None)
        return []

    def is_ready(self) -> bool:
        return self.reconciled

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend.description, "held": self.held_groups,
                "term": self.fencing.term, "epochs": self.fencing.epochs}


main = service_command(IpManager)
