"""The executor side of commands, shared by ip-manager and storage-monitor.

Subscribes to ``ha.<cluster>.cmd.<node>.<service>``, validates each command (schema,
cluster, group of this node's pair, fencing tokens), carries it out and replies with
an Ack. Commands are handled one at a time, in arrival order, so an acquire and a
release of one group never interleave."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter

from vtlha.errors import InvalidMessage
from vtlha.fencing import FencingStore
from vtlha.messages import Ack, Command, decode, encode
from vtlha.service import Service


class Executor(Service):
    """Subclasses implement ``acquire(group)`` and ``release(group)`` and return the
    addresses/devices now held for that group (for the Ack's ``held``)."""

    async def acquire(self, group: str, epoch: int) -> list[str]:
        raise NotImplementedError

    async def release(self, group: str, epoch: int) -> list[str]:
        raise NotImplementedError

    #: the command being carried out (for hooks that need more than group and epoch)
    command: Command | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fencing = FencingStore(self.state_dir / f"fencing-{self.name}.json")
        self.commands = Counter("vtlha_commands_total", "Commands received, by action and result",
                                ["action", "result"], registry=self.registry)
        self._cmd_lock = asyncio.Lock()
        self._cmd_sub: Subscription | None = None
        pair = self.config.pair_of(self.node) if self.config.has_node(self.node) else None
        self.my_groups = (
            {g for n in pair.nodes for g in (n.data_group, n.mgmt_group)} if pair else set()
        )

    async def start_executor(self) -> None:
        self._cmd_sub = await self.nc.subscribe(
            self.subjects.cmd(self.node, self.name),
            cb=self.subscribe_handler("command", self._on_command),
        )

    async def stop(self) -> None:
        if self._cmd_sub is not None:
            await self._cmd_sub.unsubscribe()

    async def _on_command(self, msg: Msg) -> None:
        try:
            cmd = decode(Command, msg.data)
            if cmd.cluster != self.config.cluster:
                raise InvalidMessage(f"Command: cluster {cmd.cluster!r} is not ours")
            if cmd.action != "term" and cmd.group not in self.my_groups:
                raise InvalidMessage(f"Command: group {cmd.group!r} is not of this node's pair")
        except InvalidMessage as exc:
            self.commands.labels("invalid", "refused").inc()
            if msg.reply:
                await msg.respond(encode(self._ack(False, str(exc), 0, 0, "")))
            raise
        async with self._cmd_lock:
            ack = await self._handle(cmd)
        if msg.reply:
            await msg.respond(encode(ack))

    async def _handle(self, cmd: Command) -> Ack:
        group = None if cmd.action == "term" else cmd.group
        refusal = self.fencing.refusal(cmd.term, group, cmd.epoch)
        if refusal is not None:
            self.commands.labels(cmd.action, "refused").inc()
            self.log.warning("command refused", extra={"action": cmd.action, "group": cmd.group,
                                                       "term": cmd.term, "epoch": cmd.epoch,
                                                       "reason": refusal})
            self.emit_soon("command.refused", f"{self.name} on {self.node} refused "
                            f"{cmd.action} {cmd.group}: {refusal}", group=cmd.group,
                            term=cmd.term, epoch=cmd.epoch, data={"sender": cmd.node})
            return self._ack(False, refusal, cmd.term, cmd.epoch, cmd.group)
        self.fencing.record(cmd.term, group, cmd.epoch)
        self.command = cmd
        if cmd.action == "term":
            held: list[str] = []
        elif cmd.action == "acquire":
            held = await self.acquire(cmd.group, cmd.epoch)
        else:
            held = await self.release(cmd.group, cmd.epoch)
        self.commands.labels(cmd.action, "ok").inc()
        self.log.info("command done", extra={"action": cmd.action, "group": cmd.group,
                                             "term": cmd.term, "epoch": cmd.epoch, "held": held})
        return self._ack(True, f"{cmd.action} done", cmd.term, cmd.epoch, cmd.group, held)

    def _ack(self, ok: bool, reason: str, term: int, epoch: int, group: str,
             held: list[str] | None = None) -> Ack:
        return Ack(cluster=self.config.cluster, node=self.node, ok=ok, reason=reason, term=term,
                   epoch=epoch, group=group, service=self.name, held=held or [])
