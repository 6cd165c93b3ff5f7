"""The term: which activation of this arbiter may act, and its announcement.

Becoming active, the arbiter takes the term (the KV revision at which it won the leader
key), announces it to every executor (and the lease holder) of every node, acked and
retried, and only then acts (``is_acting``). It makes no takeover within ``lease_ttl``
of becoming active (``hold_off_left``: an input of the policy)."""

from __future__ import annotations

import asyncio
import time

import nats.errors

from vtlha import bus
from vtlha.errors import InvalidMessage
from vtlha.messages import Command
from vtlha_arbiter.election import ElectionRunner
from vtlha_arbiter.host import Host

EXECUTORS = ("ip-manager", "storage-monitor")
#: who hears a new term: the executors, and the lease holder where it answers commands
ANNOUNCE_TO = (*EXECUTORS, "heartbeat")
ANNOUNCE_RETRY = 0.02  # seconds between attempts of a term announcement that timed out


class Activation:
    """The term this arbiter holds (or last held) and whether it may act on it."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.t = host.config.timings
        self.election: ElectionRunner | None = None
        self.term = 0
        self.active_since: float | None = None  # when this arbiter last became active
        self.announced_term = 0  # the term announced to the executors (0: none yet)
        self.bucket = ""  # the KV bucket's identity (``bus.kv_identity``), read at start

    def is_active(self) -> bool:
        return self.election is not None and self.election.is_active()

    def is_acting(self) -> bool:
        """May decide: active per the election, and this activation's term announced."""
        el = self.election
        return (el is not None and el.is_active() and self.announced_term == el.term
                and el.active_since == self.active_since)

    def token(self) -> tuple[int, float | None]:
        """This activation: (term, when it became active)."""
        return self.term, self.active_since

    def is_acting_as(self, token: tuple[int, float | None]) -> bool:
        """Acting, and still the activation ``token`` names (a move decided by an earlier
        activation is never carried on by a later one: it reconciles instead)."""
        return self.is_acting() and token == (self.term, self.active_since)

    def is_current(self, term: int, since: float) -> bool:
        """Still the activation that began at ``since`` with ``term``."""
        el = self.election
        return el is not None and el.is_active() and el.term == term \
            and el.active_since == since

    def hold_off_until(self) -> float | None:
        """When the hold-off after becoming active ends (monotonic; None: never active)."""
        return None if self.active_since is None else self.active_since + self.t.lease_ttl

    def hold_off_left(self, now: float) -> float:
        """Seconds left of the hold-off after becoming active (0: none)."""
        if self.active_since is None:
            return 0.0
        return max(0.0, self.active_since + self.t.lease_ttl - now)

    def command(self, action: str, group: str, epoch: int,
                wait: float | None = None) -> Command:
        """A command carrying this term (the fencing token with ``epoch`` and the KV
        bucket's identity)."""
        return Command(cluster=self.host.config.cluster, node=self.host.node, term=self.term,
                       epoch=epoch, group=group, action=action, wait=wait,
                       bucket=self.bucket)

    async def announce(self) -> list[str]:
        """Announce ``self.term`` to every executor of every node (DESIGN.md: a new
        active arbiter announces its term, acked and retried, and only then acts). A
        service with no responder is not there; a timeout is retried until lease_ttl has
        passed in total. Returns who did not acknowledge, as node/service."""
        deadline = time.monotonic() + self.t.lease_ttl
        targets = [(n.name, svc) for n in self.host.config.nodes for svc in ANNOUNCE_TO]
        outcomes = await asyncio.gather(*(self._announce_to(node, svc, deadline)
                                          for node, svc in targets))
        by = {f"{node}/{svc}": out for (node, svc), out in zip(targets, outcomes, strict=True)}
        not_acked = sorted(k for k, out in by.items() if out not in ("acked", "absent"))
        (self.host.log.warning if not_acked else self.host.log.info)(
            "term announced", extra={"term": self.term, "outcomes": by, "not_acked": not_acked})
        return not_acked

    async def _announce_to(self, node: str, svc: str, deadline: float) -> str:
        """One executor: 'acked', 'absent' (no responder), 'refused: ...' or 'no ack'."""
        host = self.host
        subject = host.subjects.cmd(node, svc)
        cmd = self.command("term", "", 0)
        while True:
            timeout = min(self.t.command_timeout, max(0.01, deadline - time.monotonic()))
            try:
                ack = await bus.send_command(host.nc, subject, cmd, timeout)
                return "acked" if ack.ok else f"refused: {ack.reason}"
            except nats.errors.NoRespondersError:
                return "absent"
            except (nats.errors.Error, TimeoutError) as exc:
                error = repr(exc)
            except InvalidMessage as exc:
                host.invalid_messages.labels("ack").inc()
                error = str(exc)
            if time.monotonic() >= deadline or host.stopping:
                host.log.info("term not acknowledged", extra={
                    "to": node, "executor": svc, "term": cmd.term, "error": error})
                return "no ack"
            await asyncio.sleep(ANNOUNCE_RETRY)
