"""A new active arbiter reconciles every group (DESIGN.md "Roles on a node"; issue 14).

Its predecessor may have stopped anywhere: between the claim and the commands, while
its ``<kind>.started`` event went out, after the new owner's lease holder turned the
claim into ``held`` on its own. So once the hold-off after becoming active is over
(``lease_ttl``), the new active arbiter, whatever the KV shows:

- re-drives every group whose owner is alive (``Kind.RESUME``: acquire commands with the
  lease holder's own gate, then held, then served): an acquisition left half done is
  finished, a group held but never commanded is commanded; for a group already served
  this costs one acknowledged command per executor;
- leaves a group whose owner is not alive to the policy (a takeover).

A takeover its predecessor claimed but never announced (it stopped between the claim
and the event: the group record notes the move, ``GroupRecord.move``, at an epoch newer
than the last announced one) is announced now with the id the claim noted, and ended
like the others.

Every ``<kind>.started`` its predecessor left unfinished (``eventbook``: the event
state in the KV, adopted on becoming active) is ended by the move that re-drives its
group at its epoch, or by what the KV shows (``Mover.end_adopted``)."""

from __future__ import annotations

from vtlha.protocol import takeover as tk
from vtlha_arbiter.host import Host
from vtlha_arbiter.mover import Job, Mover
from vtlha_arbiter.term import Activation
from vtlha_arbiter.view import ClusterView


class Reconciler:
    def __init__(self, host: Host, view: ClusterView, mover: Mover,
                 activation: Activation) -> None:
        self.host = host
        self.view = view
        self.mover = mover
        self.act = activation
        self.done_for: tuple[int, float | None] | None = None  # the activation reconciled

    def tick(self, now: float) -> None:
        """Once per activation, on the first tick after its hold-off (no I/O here)."""
        token = self.act.token()
        until = self.act.hold_off_until()
        if self.done_for == token or until is None or now < until \
                or not self.act.is_acting():
            return
        self.done_for = token
        driven, announced = [], []
        for group, (rec, _rev) in sorted(self.view.records.items()):
            m = self.mover.announce_unannounced(group, rec)
            if m is not None:  # ended by the re-drive below, or by what the KV shows
                announced.append(group)
                self.host.spawn(self.mover.end_adopted(m), f"adopted-{group}",
                                critical=False)
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
            self.mover.run(Job(move, pair, status, {}, announce=rec.state == "acquiring"))
            driven.append(group)
        self.host.log.info("reconciled every group", extra={
            "term": self.act.term, "re_driven": driven, "announced_late": announced})
