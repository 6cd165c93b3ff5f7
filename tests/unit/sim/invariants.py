"""The checks, run at every step that can make an executor hold (a notice or a command
handled; holding only ever starts at such a step) and at the instants a lease runs out:

- **one holder**: no two nodes' executors hold a group at once (holding = the executor's
  ``HoldGate`` says hold, on its own host's clock; a crashed executor's gate still
  counts until its lease ends: the kernel fence keeps its element);
- **epochs never go back** at an executor (across its restarts), within one KV bucket
  (a recreated bucket starts them again; the executor adopts its identity);
- **a valid renewal or promise**: an executor holds (G, E) only before the end of a
  renewal of (G, E) by its node that the KV committed (``sent_at + lease_ttl``, its
  node's clock) or of a promise its companion granted (``sent_at + D``);
- **liveness** (``liveness``): once every fault has healed, every group is served (all
  its executors on one node hold it) within ``Timings.liveness_bound()``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .timings import GROUPS, NODES, executors_of

if TYPE_CHECKING:
    from .runner import Sim


class Violation(Exception):
    pass


class Checker:
    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.renewals: dict[tuple[str, str, int], float] = {}
        self.promises: dict[tuple[str, str], float] = {}
        self.last_epoch: dict[tuple[str, str, str], int] = {}
        self.rechecks: set[float] = set()

    # ---- ground truth -------------------------------------------------------------
    def renewed(self, node: str, group: str, epoch: int, sent_at: float) -> None:
        key = (node, group, epoch)
        self.renewals[key] = max(self.renewals.get(key, 0.0),
                                 sent_at + self.sim.t.lease_ttl)

    def promised(self, node: str, groups: tuple[str, ...], until: float) -> None:
        for g in groups:
            self.promises[(node, g)] = max(self.promises.get((node, g), 0.0), until)

    # ---- the checks ------------------------------------------------------------------
    def fail(self, what: str) -> None:
        self.sim.w.log("CHECK", "violation: %s", what)
        raise Violation(what)

    def step(self, group: str) -> None:
        s = self.sim
        holders: dict[str, int] = {}
        for ex in s.execs_of[group]:
            epoch = ex.holds(group)
            if epoch is None:
                continue
            holders[ex.node] = epoch
            key = (ex.name, group, ex.fencing.bucket)  # epochs restart with a new bucket
            if epoch < self.last_epoch.get(key, 0):
                self.fail(f"{ex.name} holds {group} at epoch {epoch} after epoch "
                          f"{self.last_epoch[key]}")
            self.last_epoch[key] = epoch
            self._valid(ex.node, group, epoch, ex.hold_end(group))
        if len(holders) > 1:
            self.fail(f"two holders of {group}: {holders}")

    def _valid(self, node: str, group: str, epoch: int, hold_end: float) -> None:
        s = self.sim
        now = s.w.local(node)
        valid = max(self.renewals.get((node, group, epoch), 0.0),
                    self.promises.get((node, group), 0.0))
        if now >= valid:
            self.fail(f"{node} serves {group} at epoch {epoch} without a valid renewal or "
                      f"promise (valid until {valid - s.w.offset[node]:.4f})")
        if hold_end > valid:  # look again when the lease runs out
            t = valid - s.w.offset[node] + 1e-9
            if t not in self.rechecks:
                self.rechecks.add(t)
                s.w.at(t, lambda: self.step(group))

    def served_by(self, group: str) -> list[str]:
        s = self.sim
        return [n for n in NODES
                if all(not s.w.procs[f"{n}/{svc}"].down
                       and s.execs[f"{n}/{svc}"].serves(group)
                       for svc in executors_of(group))]

    def liveness(self, when: str) -> None:
        for g in GROUPS:
            self.step(g)
            if not self.served_by(g):
                rec = self.sim.kv.keys.get(f"group.{g}", (None, 0))
                why = ", ".join(f"{ex.name}: {ex.verdict(g)}" for ex in self.sim.execs_of[g])
                self.fail(f"{g} served by nobody {when} (KV: {rec[0]!r} at rev {rec[1]}; "
                          f"{why})")
