"""The mover: the moves in flight (takeovers, assignments, resumes) carried out over the
KV and the executors' commands.

A takeover runs as DESIGN.md's three steps: **claim** (compare-and-set of the group key
to the new owner with epoch + 1, against the revision the arbiter last saw),
**release** (the old owner's executors are told to release; they ack only once it is
gone), **acquire** (once every executor of the old owner acked, or the old owner's
lease has run out as the arbiter can bound it)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import nats.errors
from prometheus_client import Counter, Histogram

from vtlha import bus, policy
from vtlha.errors import InvalidMessage
from vtlha.eventstate import StartedMove, outcome
from vtlha.messages import Ack, GroupRecord
from vtlha.policy import Assign, Resume, Takeover
from vtlha.protocol import takeover
from vtlha_arbiter.host import Host
from vtlha_arbiter.pairstate import PairState
from vtlha_arbiter.records import GroupRecords
from vtlha_arbiter.term import EXECUTORS, Activation
from vtlha_arbiter.view import ClusterView

ACQUIRE_DEADLINE = 10.0  # seconds an acquire is retried before the policy resumes it
CLAIM_RETRIES = 3  # an operator's claim retried when the key changed by renewals only


@dataclass(frozen=True)
class Claimed:
    """A takeover whose claim succeeded: the epoch written, when it was decided, the
    event family and the id of its ``<kind>.started`` event (None: not recorded)."""

    epoch: int
    t0: float
    kind: str
    started: str | None


class Mover:
    def __init__(self, host: Host, view: ClusterView, records: GroupRecords,
                 activation: Activation) -> None:
        self.host = host
        self.t = host.config.timings
        self.view = view
        self.records = records
        self.act = activation
        self.pairs: PairState | None = None
        self.in_flight: set[str] = set()
        #: group -> the move whose ``<kind>.started`` went out and whose end did not yet
        #: (kept in the KV by ``eventbook``: a new active arbiter ends it)
        self.started: dict[str, StartedMove] = {}
        self.ending: set[str] = set()  # groups whose adopted move is being ended
        self.takeovers = Counter("vtlha_takeovers_total", "Takeovers, by result", ["result"],
                                 registry=host.registry)
        self.takeover_seconds = Histogram(
            "vtlha_takeover_duration_seconds", "From the decision to the acquire ack",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=host.registry)

    @property
    def term(self) -> int:
        return self.act.term

    # ---- starting a move -------------------------------------------------------------
    def start(self, action: Takeover | Assign | Resume, inputs: dict[str, Any]) -> None:
        """Carry out a move the policy decided, in the background; the group is in flight
        until it is held or given up."""
        self.in_flight.add(action.group)
        if isinstance(action, Takeover):
            coro = self._takeover(action, inputs)
            name = "takeover"
        elif isinstance(action, Assign):
            coro = self._assign(action, inputs)
            name = "assign"
        else:
            coro = self._resume(action, inputs)
            name = "resume"
        self.host.spawn(coro, f"{name}-{action.group}", critical=False)

    async def operator_takeover(self, a: Takeover, inputs: dict[str, Any],
                                who: dict[str, Any]) -> Claimed | None:
        """An operator's move: claim now (the reply says the epoch), finish in the
        background. None: the claim lost."""
        self.in_flight.add(a.group)
        try:
            claimed = await self.claim(a, inputs, data=who, renewals_ok=True)
        except BaseException:
            self.in_flight.discard(a.group)
            raise
        if claimed is None:
            self.in_flight.discard(a.group)
            return None
        self.host.spawn(self.finish_takeover(a, claimed), f"takeover-{a.group}",
                        critical=False)
        return claimed

    # ---- takeover: claim -> release -> acquire ------------------------------
    def _record(self, owner: str, epoch: int, state: str) -> GroupRecord:
        return GroupRecord(owner=owner, term=self.term, epoch=epoch, state=state,
                           renewed_by=self.host.node)

    async def _takeover(self, a: Takeover, inputs: dict[str, Any]) -> None:
        """Claim -> release -> acquire (DESIGN.md "Safety"), as the policy decided. The
        group is in flight (added by the caller) until it is held or given up."""
        try:
            claimed = await self.claim(a, inputs)
        except BaseException:
            self.in_flight.discard(a.group)
            raise
        if claimed is None:
            self.in_flight.discard(a.group)
            return
        await self.finish_takeover(a, claimed)

    def _common(self, a: Takeover, epoch: int) -> dict[str, Any]:
        return {"pair": a.pair, "group": a.group, "old": a.old, "new": a.new,
                "term": self.term, "epoch": epoch}

    async def claim(self, a: Takeover, inputs: dict[str, Any],
                    data: dict[str, Any] | None = None,
                    renewals_ok: bool = False) -> Claimed | None:
        """Step 1: compare-and-set the group to the new owner at epoch + 1 against the
        revision the decision saw; publish ``<kind>.started`` (failover, failback or
        switchover: ``policy.event_kind``). A move for the old owner's own fault counts
        as one of its failures (``PairRecord.failures``). None: the claim lost.

        With ``renewals_ok`` (an operator's request: its owner is alive and renews every
        heartbeat interval) a conflict is retried against the fresh revision when the
        key changed only by renewals: same owner, same epoch, held."""
        t0 = time.monotonic()
        epoch = takeover.claim_epoch(a.epoch)
        rec = self._record(a.new, epoch, "acquiring")
        last = a.revision
        rev = await self.records.cas(a.group, rec, last)
        for _ in range(CLAIM_RETRIES if renewals_ok else 0):
            if rev is not None:
                break
            await self.records.read(a.group)
            cur = self.view.records.get(a.group)
            if cur is None or cur[1] == last or (cur[0].owner, cur[0].epoch, cur[0].state) \
                    != (a.old, a.epoch, "held"):
                break  # not known newer, or really changed: decide again
            last = cur[1]
            rev = await self.records.cas(a.group, rec, last)
        if rev is None:
            self.takeovers.labels("claim_lost").inc()
            return None
        if a.rule in policy.FAULT_RULES and self.pairs is not None:
            self.host.spawn(self._record_failure(a.pair, a.old), f"failure-{a.group}",
                            critical=False)
        kind = policy.event_kind(a.rule)
        started = await self.host.emit(f"{kind}.started", a.status, inputs=inputs,
                                       data={"rule": a.rule.value, **(data or {})},
                                       **self._common(a, epoch))
        if started is not None:
            self.started[a.group] = StartedMove(id=started, kind=kind, group=a.group,
                                                pair=a.pair, old=a.old, new=a.new,
                                                epoch=epoch, term=self.term)
        return Claimed(epoch, t0, kind, started)

    async def _end(self, kind: str, reason: str, **fields: Any) -> None:
        """Publish ``<family>.completed`` / ``<family>.failed`` (``kind``) and forget the
        started move it ends (the group's, at that epoch or older)."""
        await self.host.emit(kind, reason, **fields)
        m = self.started.get(fields["group"])
        if m is not None and m.epoch <= fields["epoch"]:
            del self.started[m.group]

    async def end_adopted(self, m: StartedMove) -> None:
        """A move another active arbiter started and did not end: watch the group until
        it is held by the new owner at the move's epoch (``.completed``), moved again or
        its new owner went down (``.failed``), or the bound passes (``.failed``). The
        policy decides about the group meanwhile (a half-done acquisition is resumed)."""
        if m.group in self.ending:
            return
        self.ending.add(m.group)
        try:
            await self._end_adopted(m)
        finally:
            self.ending.discard(m.group)

    async def _end_adopted(self, m: StartedMove) -> None:
        bound = 2 * (self.t.lease_ttl + self.t.margin) + 2 * ACQUIRE_DEADLINE
        deadline = time.monotonic() + bound
        next_read = 0.0
        got = None
        while got is None and time.monotonic() < deadline and not self.host.stopping:
            if time.monotonic() >= next_read:
                next_read = time.monotonic() + self.t.heartbeat_interval
                await self.records.read(m.group)
            rec = self.view.records.get(m.group)
            got = outcome(m, rec[0] if rec else None, self.view.is_gone(m.new))
            if got is None:
                await asyncio.sleep(0.01)
        if self.host.stopping:
            return
        result, why = got or ("failed", f"not held by {m.new} within {bound:.0f} s")
        if result == "completed":
            problem = await self._wait_served(m.group, m.new, m.epoch)
            if problem is not None:
                result, why = "failed", f"{why} but does not serve its storage: {problem}"
        if not self.act.is_acting() or self.started.get(m.group) != m:
            return  # lapsed (the next active arbiter ends it), or ended meanwhile
        kind = f"{m.kind}.completed" if result == "completed" else f"{m.kind}.failed"
        await self._end(kind, f"{why}; started under term {m.term}, ended by the arbiter "
                        f"on {self.host.node}", pair=m.pair, group=m.group, old=m.old,
                        new=m.new, term=self.term, epoch=m.epoch,
                        data={"started": m.id, "adopted": True, "started_term": m.term})

    async def _record_failure(self, pair: str, node: str) -> None:
        assert self.pairs is not None
        await self.pairs.record_failure(pair, node, time.time())

    async def _notify(self, a: Takeover, epoch: int) -> None:
        """The manual's "tells the companion that it is assuming primary responsibility":
        the release commands to the old owner's executors are that notice."""
        await self.host.emit("failover.notify", f"{a.new} tells {a.old} that it is assuming "
                             f"primary responsibility for {a.group} (epoch {epoch}): {a.old}'s "
                             f"executors are asked to release it",
                             data={"rule": a.rule.value,
                                   "executors": list(self.executors_of(a.group))},
                             **self._common(a, epoch))

    async def finish_takeover(self, a: Takeover, c: Claimed) -> None:
        """Steps 2 and 3 after a successful claim; the group leaves in_flight when done."""
        epoch, kind = c.epoch, c.kind
        common = self._common(a, epoch)
        ref = {"rule": a.rule.value, "started": c.started}
        try:
            # Release and acquire go out together: the acquire carries the safe wait (what
            # may remain of the old owner's lease); if every executor of the old owner
            # acknowledges the release first, a second acquire opens the gate at once.
            if not self.act.is_acting():
                self.takeovers.labels("not_active").inc()
                return  # lost the leader key since deciding: the new active arbiter decides
            wait = self._lease_left(a.group)
            release = asyncio.ensure_future(self._release_all(a.old, a.group, epoch))
            notify = (asyncio.ensure_future(self._notify(a, epoch))
                      if self.view.is_alive(a.old, time.monotonic()) else None)
            acquired = await self._acquire_all(a.new, a.group, epoch, wait)
            released = await release
            if notify is not None:
                await notify
            if released and acquired and self._lease_left(a.group) > 0:
                acquired = await self._acquire_all(a.new, a.group, epoch, 0.0, only="heartbeat")
            if not acquired:
                self.takeovers.labels("acquire_failed").inc()
                await self._end(f"{kind}.failed", f"{a.new} did not acknowledge acquiring "
                                f"{a.group} (epoch {epoch}); will retry", data=ref, **common)
                return
            if not await self._wait_held(a.group, a.new, epoch, wait + ACQUIRE_DEADLINE):
                self.takeovers.labels("not_held").inc()
                await self._end(f"{kind}.failed", f"{a.new}'s lease holder did not take "
                                f"{a.group} (epoch {epoch}) in time; will retry",
                                data=ref, **common)
                return
            # Held: the policy may decide about the group again (its new owner could die
            # while its storage starts); the storage is awaited on the side.
            self.in_flight.discard(a.group)
            problem = await self._wait_served(a.group, a.new, epoch)
            if problem is not None:
                self.takeovers.labels("not_served").inc()
                await self._end(f"{kind}.failed", f"{a.new} holds {a.group} (epoch "
                                f"{epoch}) but does not serve its storage: {problem}",
                                data={**ref, "storage": problem}, **common)
                return
            took = time.monotonic() - c.t0
            self.takeover_seconds.observe(took)
            self.takeovers.labels("completed").inc()
            how = ("release acknowledged by every executor of the old owner" if released
                   else f"the old owner's lease ran out ({wait * 1000:.0f} ms to wait)")
            await self._end(
                f"{kind}.completed",
                f"{a.new} now serves {a.group} (epoch {epoch}), taken from {a.old} in "
                f"{took * 1000:.0f} ms; {how}",
                data={**ref, "duration_s": round(took, 4), "released_by_ack": released,
                      "wait_s": round(wait, 4)}, **common)
        finally:
            self.in_flight.discard(a.group)

    def _lease_left(self, group: str) -> float:
        """How long the old owner's lease may still run, as the arbiter can bound it:
        lease_ttl + margin after the last renewal it saw (the renewal was sent before it
        was seen); lease_ttl + margin from now when it saw none."""
        return takeover.acquire_wait(released_all=False,
                                     last_renewal_seen=self.view.last_renewal.get(group),
                                     now=time.monotonic(), lease_ttl=self.t.lease_ttl,
                                     margin=self.t.margin)

    async def _wait_held(self, group: str, owner: str, epoch: int, timeout: float) -> bool:
        """Until the new owner's lease holder has renewed the group at ``epoch``. The KV
        watch may lag (its consumer can sit on a server just cut off): read the key
        directly every heartbeat interval too."""
        deadline = time.monotonic() + timeout
        next_read = time.monotonic() + self.t.heartbeat_interval
        while time.monotonic() < deadline and not self.host.stopping:
            if time.monotonic() >= next_read:
                next_read = time.monotonic() + self.t.heartbeat_interval
                await self.records.read(group)
            rec = self.view.records.get(group)
            if rec is not None and rec[0].owner == owner and rec[0].epoch == epoch \
                    and rec[0].state == "held":
                return True
            if rec is not None and rec[0].epoch > epoch:
                return False  # someone moved it again
            if self.view.is_gone(owner):
                return False  # the new owner died meanwhile: the policy decides again
            await asyncio.sleep(0.005)
        return False

    def _storage_bound(self, group: str) -> float:
        """How long a data group's storage may take to be served: every resource's
        start timeout, plus reservations and a report."""
        starts = sum(r.start_timeout for r in self.host.config.group_resources(group))
        return starts + 2 * self.t.probe_timeout + 2 * self.t.probe_interval + 1.0

    async def _wait_served(self, group: str, owner: str, epoch: int) -> str | None:
        """For a data group with devices: until the owner's storage-monitor reports it
        ``served`` at ``epoch`` (None), or ``failed`` (its reason), or the bound passes."""
        if not self.host.config.group_devices(group):
            return None
        deadline = time.monotonic() + self._storage_bound(group)
        while time.monotonic() < deadline and not self.host.stopping:
            said = self.view.storage_state(owner, group, epoch)
            if said is not None and said[0] == "served":
                return None
            if said is not None and said[0] == "failed":
                return said[1] or "failed"
            rec = self.view.records.get(group)
            if rec is not None and rec[0].epoch > epoch:
                return f"moved again (epoch {rec[0].epoch})"
            if self.view.is_gone(owner):
                return f"{owner} went down before its storage was served"
            await asyncio.sleep(0.005)
        return (f"not reported served within {self._storage_bound(group):.1f} s "
                f"(storage-monitor of {owner} down?)")

    async def _served_event(self, kind: str, status: str, pair: str, group: str, node: str,
                            epoch: int, inputs: dict[str, Any]) -> None:
        self.in_flight.discard(group)  # held: the policy may decide about it again
        problem = await self._wait_served(group, node, epoch)
        if problem is None:
            await self.host.emit(kind, status, pair=pair, group=group, new=node,
                                 term=self.term, epoch=epoch, inputs=inputs)
            return
        await self.host.emit("group.not_served", f"{node} holds {group} (epoch {epoch}) but "
                             f"does not serve its storage: {problem}", pair=pair, group=group,
                             new=node, term=self.term, epoch=epoch,
                             data={"storage": problem})

    async def _assign(self, a: Assign, inputs: dict[str, Any]) -> None:
        try:
            rev = await self.records.cas(a.group, self._record(a.node, 1, "acquiring"), None)
            if rev is None:
                return
            if await self._acquire_all(a.node, a.group, 1, 0.0) and \
                    await self._wait_held(a.group, a.node, 1, ACQUIRE_DEADLINE):
                await self._served_event("group.assigned", a.status, a.pair, a.group, a.node,
                                         1, inputs)
        finally:
            self.in_flight.discard(a.group)

    async def _resume(self, a: Resume, inputs: dict[str, Any]) -> None:
        """Finish an acquisition left half done. The arbiter does not know whether the
        old owner released: the lease holder waits the full lease (its own default)."""
        try:
            if await self._acquire_all(a.node, a.group, a.epoch, None) and \
                    await self._wait_held(a.group, a.node, a.epoch, ACQUIRE_DEADLINE):
                await self._served_event("group.resumed", a.status, a.pair, a.group, a.node,
                                         a.epoch, inputs)
        finally:
            self.in_flight.discard(a.group)

    # ---- commands ----------------------------------------------------------
    async def _send(self, node: str, svc: str, action: str, group: str, epoch: int,
                    deadline: float, give_up_if_absent: bool = False,
                    wait: float | None = None) -> Ack | None:
        """Send one command, retried until acked or ``deadline`` (monotonic). With
        ``give_up_if_absent`` a missing executor (no responders) ends it at once."""
        host = self.host
        subject = host.subjects.cmd(node, svc)
        cmd = self.act.command(action, group, epoch, wait)
        while True:
            try:
                return await bus.send_command(host.nc, subject, cmd, self.t.command_timeout)
            except nats.errors.NoRespondersError:
                if give_up_if_absent:
                    return None
            except (nats.errors.TimeoutError, TimeoutError):
                pass
            except InvalidMessage as exc:
                host.invalid_messages.labels("ack").inc()
                host.log.warning("invalid ack", extra={"error": str(exc)})
            if time.monotonic() >= deadline or host.stopping or self.view.is_gone(node):
                return None  # (a node declared down will not answer: stop, decide anew)
            await asyncio.sleep(min(0.05, self.t.command_timeout))

    def executors_of(self, group: str) -> tuple[str, ...]:
        """Who carries a group out: the ip-manager, and the storage-monitor for a data
        group with devices."""
        return EXECUTORS if self.host.config.group_devices(group) else ("ip-manager",)

    async def _release_all(self, node: str, group: str, epoch: int) -> bool:
        """True when every executor of ``node`` acknowledged the release."""
        deadline = time.monotonic() + self.t.command_timeout
        acks = await asyncio.gather(*(self._send(node, s, "release", group, epoch, deadline,
                                                 give_up_if_absent=True)
                                      for s in self.executors_of(group)))
        for a in acks:
            if a is not None and not a.ok:
                self.host.log.warning("release not finished", extra={
                    "group": group, "by": a.node, "service": a.service, "reason": a.reason})
        return all(a is not None and a.ok for a in acks)

    async def _acquire_all(self, node: str, group: str, epoch: int, wait: float | None,
                           only: str | None = None) -> bool:
        """Tell the new owner's executors to hold the group (they do once its lease
        holder's notice for this epoch arrives) and its lease holder when it may start
        (``wait``; None leaves its own gate, the full lease, in place)."""
        deadline = time.monotonic() + ACQUIRE_DEADLINE
        services = (only,) if only else (*self.executors_of(group), "heartbeat")
        acks = await asyncio.gather(*(self._send(node, s, "acquire", group, epoch, deadline,
                                                 wait=wait) for s in services))
        for a in acks:
            if a is not None and not a.ok:
                self.host.log.warning("acquire refused", extra={"group": group, "by": a.node,
                                                                "reason": a.reason})
        return all(a is not None and a.ok for a in acks)
