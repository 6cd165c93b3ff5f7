"""A new active arbiter reconciles every group (DESIGN.md "Roles on a node"; issue 14).

Its predecessor may have stopped anywhere: between the claim and the commands, while
its ``<kind>.started`` event was awaited, after the new owner's lease holder turned the
claim into ``held`` on its own. So once the hold-off after becoming active is over
(``lease_ttl``), the new active arbiter, whatever the KV shows:

- re-drives every group whose owner is alive (``Kind.RESUME``: acquire commands with the
  lease holder's own gate, then held, then served): an acquisition left half done is
  finished, a group held but never commanded is commanded; for a group already served
  this costs one acknowledged command per executor;
- leaves a group whose owner is not alive to the policy (a takeover);
- ends every ``<kind>.started`` event it finds unfinished in the event stream (the last
  ``SCAN_EVENTS`` events): with the move that re-drives its group and epoch (its
  ``.completed`` or ``.failed``), or ``.failed`` at once when the group has moved on
  to a later epoch or its new owner is not alive.

The scan of the event stream starts when the activation begins and runs beside the
hold-off; it never delays a group: what it finds later is attached to the moves then
under way, or ended by what the KV shows."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from vtlha.errors import InvalidMessage
from vtlha.messages import Event, decode
from vtlha.protocol import takeover as tk
from vtlha_arbiter.host import Host
from vtlha_arbiter.mover import Job, Mover
from vtlha_arbiter.term import Activation
from vtlha_arbiter.view import ClusterView

SCAN_EVENTS = 2000  # events looked at (the newest) for unfinished <kind>.started
SCAN_TIMEOUT = 3.0  # seconds the scan may take in all
FAMILIES = ("failover", "failback", "switchover")


@dataclass(frozen=True)
class Start:
    """A ``<family>.started`` event: its number and what it moved."""

    family: str
    seq: int
    group: str
    epoch: int
    new: str | None
    old: str | None
    pair: str | None


def unfinished(events: list[tuple[int, Event]]) -> list[Start]:
    """The ``<family>.started`` events with no ``.completed`` or ``.failed`` of the same
    family, group and epoch after them. Pure."""
    open_: dict[tuple[str, str, int], Start] = {}
    for seq, e in events:
        family, _, what = e.kind.rpartition(".")
        if family not in FAMILIES or e.group is None or e.epoch is None:
            continue
        key = (family, e.group, e.epoch)
        if what == "started":
            open_[key] = Start(family, seq, e.group, e.epoch, e.new, e.old, e.pair)
        elif what in ("completed", "failed"):
            open_.pop(key, None)
    return sorted(open_.values(), key=lambda s: s.seq)


async def scan(js: JetStreamContext, stream: str, subject: str,
               timeout: float = SCAN_TIMEOUT) -> list[tuple[int, Event]]:
    """The newest ``SCAN_EVENTS`` events (an ordered consumer from a start sequence:
    it survives a server's death), up to the end the stream had when the scan began."""
    info = await asyncio.wait_for(js.stream_info(stream), timeout)
    last = info.state.last_seq
    if last == 0:
        return []
    first = max(info.state.first_seq, last - SCAN_EVENTS + 1, 1)
    cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first)
    sub = await js.subscribe(subject, ordered_consumer=True, config=cfg)
    out: list[tuple[int, Event]] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"event scan: {len(out)} events read in {timeout} s")
            msg = await sub.next_msg(timeout=left)
            seq = msg.metadata.sequence.stream
            with contextlib.suppress(InvalidMessage):
                out.append((seq, decode(Event, msg.data)))
            if seq >= last:
                return out
    finally:
        await sub.unsubscribe()


class Reconciler:
    def __init__(self, host: Host, view: ClusterView, mover: Mover, activation: Activation,
                 js: Callable[[], JetStreamContext]) -> None:
        self.host = host
        self.view = view
        self.mover = mover
        self.act = activation
        self.js = js
        self.done_for: tuple[int, float | None] | None = None  # the activation reconciled
        self.scanned: list[Start] | None = None
        self.scan_for: tuple[int, float | None] | None = None

    def on_active(self) -> None:
        """A new activation: scan the event stream beside the hold-off."""
        token = self.act.token()
        self.scanned, self.scan_for = None, token
        self.host.spawn(self._scan(token), "reconcile-scan", critical=False)

    async def _scan(self, token: tuple[int, float | None]) -> None:
        subjects = self.host.subjects
        try:
            events = await scan(self.js(), subjects.events_stream, subjects.events_all)
        except Exception as exc:  # no stream leader, timeout: the KV side goes ahead
            self.host.log.warning("event scan failed: unfinished <kind>.started events are "
                                  "not ended", extra={"error": repr(exc)})
            return
        if self.scan_for != token:
            return
        self.scanned = unfinished(events)
        if self.done_for == token:
            self._end_starts(self.scanned)

    def tick(self, now: float) -> None:
        """Once per activation, on the first tick after its hold-off (no I/O here)."""
        token = self.act.token()
        until = self.act.hold_off_until()
        if self.done_for == token or until is None or now < until \
                or not self.act.is_acting():
            return
        self.done_for = token
        driven = []
        for group, (rec, _rev) in sorted(self.view.records.items()):
            if self.mover.busy(group) or not self.view.is_alive(rec.owner, now) \
                    or self.view.is_gone(rec.owner):
                continue
            home = self.host.config.groups()[group][0]
            pair = self.host.config.pair_of(home).name
            move = tk.Move(tk.Kind.RESUME, group, rec.owner, epoch=rec.epoch,
                           storage=bool(self.host.config.group_devices(group)))
            status = (f"{rec.owner} finishes acquiring {group} (epoch {rec.epoch}): "
                      f"reconciled by the new active arbiter" if rec.state == "acquiring"
                      else f"{rec.owner} holds {group} (epoch {rec.epoch}): its executors "
                      f"are told again by the new active arbiter")
            self.mover.run(Job(move, pair, status, {}, completed="group.resumed"
                               if rec.state == "acquiring" else None))
            driven.append(group)
        self.host.log.info("reconciled every group", extra={"term": self.act.term,
                                                            "re_driven": driven})
        if self.scanned is not None:
            self._end_starts(self.scanned)

    def _end_starts(self, starts: list[Start]) -> None:
        """End each unfinished ``<kind>.started``: with the move re-driving its group at
        its epoch, or ``.failed`` now."""
        for s in starts:
            run = self.mover.runs.get(s.group)
            if run is not None and not run.machine.done and run.machine.epoch == s.epoch:
                run.job.finishes.append((s.family, s.seq))
                continue
            rec = self.view.records.get(s.group)
            if rec is not None and rec[0].epoch == s.epoch and rec[0].owner == s.new \
                    and rec[0].state == "held" and not self.host.config.group_devices(s.group):
                what, why = "completed", (f"{s.new} holds {s.group} (epoch {s.epoch}): found "
                                          f"held by the new active arbiter")
            else:
                now_at = f"epoch {rec[0].epoch}, {rec[0].owner}" if rec else "no record"
                what, why = "failed", (f"{s.group} (epoch {s.epoch}) was left unfinished by "
                                       f"an earlier active arbiter; the KV now shows "
                                       f"{now_at}: the policy decides again")
            self.host.emit_soon(f"{s.family}.{what}", why, pair=s.pair, group=s.group,
                                old=s.old, new=s.new, term=self.act.term, epoch=s.epoch,
                                data={"started": s.seq, "reconciled": True})
