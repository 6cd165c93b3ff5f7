"""One history from one seed: build the cluster, play the fault plan, heal, check.

``run(seed)`` returns a ``Result``; a violation carries the seed and the last events.
``Variant`` names the pieces a test may swap for a mutant (a subclass or a function of
the shipped code, never an edit of it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from vtlha.messages import GroupRecord
from vtlha.protocol import takeover
from vtlha.protocol.hold import HoldGate
from vtlha.protocol.lease import LeaseHolder

from .arbiter import ArbiterProc
from .faults import PROCS, Fault, Plan, draw
from .invariants import Checker, Violation
from .kv import KV
from .network import Network
from .nodes import ExecProc, LeaseProc, group_key
from .timings import GROUPS, HOSTS, NODES, WITNESS, Timings, executors_of, home
from .world import World


def _recall(gate: HoldGate, group: str, epoch: int) -> None:
    """Level-triggered executors remember nothing of the KV at start (a mutant may)."""


@dataclass(frozen=True)
class Variant:
    lease_holder: type[LeaseHolder] = LeaseHolder
    gate: type[HoldGate] = HoldGate
    mover: type[takeover.Mover] = takeover.Mover
    claim_current: bool = False  # claim against the key's current revision
    #: what a (re)started executor does with a group its node owns in the KV
    recall: Callable[[HoldGate, str, int], None] = _recall
    #: executors and lease holders know the KV bucket's identity (issue 14)
    bucket_identity: bool = True
    #: a read answered after the bucket was found recreated is ignored (its generation)
    read_generation: bool = True
    #: a new activation reconciles every group once its hold-off is over (issue 14)
    reconcile: bool = True
    #: an arbiter that finds the bucket recreated starts afresh on it (issue 14)
    arbiter_bucket: bool = True
    #: a recreated bucket's revisions start above the old one's (``bus.ensure_kv``);
    #: False: from 1 again (a bucket created by something else than an arbiter)
    first_revision_above: bool = True
    #: lease notices name their bucket; an executor of another one ignores them
    notice_bucket: bool = True


SHIPPED = Variant()
CHECK_EVERY = 0.05  # seconds between liveness checks after the heal
STAYS = 0.3  # seconds every group must stay served once it is


@dataclass
class Result:
    seed: int
    violation: str | None
    story: str
    events: int
    plan: Plan = field(repr=False)
    served_after: float | None = None  # from the heal until every group was served

    def report(self) -> str:
        return (f"seed {self.seed}: {self.violation}\nfaults: {self.plan.faults}\n"
                f"last events:\n{self.story}")


class Sim:
    def __init__(self, seed: int, variant: Variant = SHIPPED, plan: Plan | None = None,
                 timings: Timings | None = None) -> None:
        self.seed, self.variant = seed, variant
        self.t = timings or Timings()
        self.plan = plan if plan is not None else draw(seed)
        offsets = self.plan.offsets or dict.fromkeys(HOSTS, 0.0)
        self.w = World(seed, offsets)
        self.net = Network(self.w, self.t, self.plan.weather)
        self.kv = KV(self.w, self.net, self.t)
        self.kv.stale = self.plan.stale
        self.kv.restart_revisions = not variant.first_revision_above
        self.check = Checker(self)
        for name in PROCS:
            self.w.proc(name)
        self.leases = {n: LeaseProc(self, n) for n in NODES}
        self.execs = {f"{n}/{svc}": ExecProc(self, n, svc) for n in NODES for svc in ("ip", "sm")}
        self.execs_of = {g: [ex for ex in self.execs.values() if ex.svc in executors_of(g)]
                         for g in GROUPS}
        self.arbiters = {h: ArbiterProc(self, h) for h in HOSTS}
        self.traps: set[tuple[str, str]] = set()  # (process, what): armed by a fault
        #: when the last trap sprang: one armed before the heal may spring after it, a
        #: fault of its own then, and the liveness bound counts from it
        self.sprung_at = 0.0

    def trapped(self, proc: str, what: str) -> bool:
        """A trap armed for ``proc`` springs (once)."""
        if (proc, what) in self.traps:
            self.traps.discard((proc, what))
            self.sprung_at = self.w.now
            self.w.log("FAULT", "%s springs on %s", what, proc)
            return True
        return False

    # ---- set-up and faults ----------------------------------------------------------
    def setup(self) -> None:
        for g in GROUPS:
            self.kv.update_now(group_key(g), GroupRecord(
                owner=home(g), term=0, epoch=1, state="held", renewed_by=home(g), since=0.0),
                None, "setup")
        for lp in self.leases.values():
            lp.start()
            lp.started_long_ago()
        for ex in self.execs.values():
            for g in ex.groups:
                ex.fencing.record(0, g, 1)
            ex.start(restart=False)
        for arb in self.arbiters.values():
            arb.start()
        for f in self.plan.faults:
            self.w.at(f.at, partial(self.apply, f))

    def start_proc(self, name: str) -> None:
        host, svc = name.split("/")
        if svc == "lease":
            self.leases[host].start()
        elif svc == "arbiter":
            self.arbiters[host].start()
        else:
            self.execs[name].start(restart=True)

    def restart(self, name: str) -> None:
        host = name.split("/")[0]
        if host in self.net.hosts_down and not self.net.faulty:
            return
        if self.w.revive(name):
            self.start_proc(name)

    def apply(self, f: Fault) -> None:
        if not self.net.faulty:
            return
        w = self.w
        w.log("FAULT", "%s %s until %s", f.kind, f.target, f.until or "the heal")
        if f.kind in ("crash", "pause", "host"):
            self.apply_process(f)
        elif f.kind == "cut":
            a, b = f.target.split("|")
            self.net.set_link(a, b, False)
            w.at(f.until, lambda: self.net.set_link(a, b, True))
        elif f.kind == "election":
            self.kv.down = True
            w.at(f.until, self._election_over)
        elif f.kind == "stall":
            self.kv.stall(f.target)
            if f.until:
                w.at(f.until, lambda: self.kv.unstall(f.target))
        elif f.kind == "replay":
            proc, g = f.target.split("|")
            self.kv.replay(proc, group_key(g), f.arg)
        elif f.kind == "switchover":
            self.switchover(f.target)
        elif f.kind == "recreate":
            self.kv.recreate()
        elif f.kind in ("crash-after-claim", "lose-claim-answer", "pause-after-claim"):
            self.traps.add((f.target, f.kind))

    def apply_process(self, f: Fault) -> None:
        w = self.w
        if f.kind == "crash":
            if w.crash(f.target) and f.until:
                w.at(f.until, lambda: self.restart(f.target))
        elif f.kind == "pause":
            w.pause(f.target)
            if f.until:
                w.at(f.until, lambda: w.resume(f.target))
        elif f.kind == "host":
            self.host_down(f.target, f.until)

    def _election_over(self) -> None:
        self.kv.down = False

    def host_down(self, host: str, until: float) -> None:
        self.net.set_host(host, False)
        for name in PROCS:
            if name.startswith(host + "/"):
                self.w.crash(name)
        if until:
            def back() -> None:
                self.net.set_host(host, True)
                for name in PROCS:
                    if name.startswith(host + "/"):
                        self.restart(name)
            self.w.at(until, back)

    def switchover(self, group: str) -> None:
        for h in HOSTS:
            arb = self.arbiters[h]
            self.net.send(WITNESS, h, partial(self.w.run_in, arb.name,
                                              partial(arb.on_request, group)))

    def heal(self) -> None:
        w = self.w
        w.log("FAULT", "everything heals%s", f" ({self.plan.down_for_good} stays down)"
              if self.plan.down_for_good else "")
        self.net.heal(self.plan.down_for_good)
        self.kv.down = False
        self.kv.leader = WITNESS
        for name in PROCS:
            if name not in self.plan.stalled_for_good:
                self.kv.unstall(name)
            w.resume(name)
            if not name.startswith(f"{self.plan.down_for_good}/"):
                self.restart(name)

    # ---- running ------------------------------------------------------------------------
    def run(self) -> Result:
        heal = self.plan.heal_at
        violation, served = None, None
        try:
            self.setup()
            self.w.run_until(heal)
            self.heal()
            served = self.until_served(heal)
        except Violation as exc:
            violation = str(exc)
        return Result(self.seed, violation, self.w.story(), self.w.events, self.plan, served)

    def until_served(self, heal: float) -> float:
        """Run until every group has been served for ``STAYS`` without a break (checked
        every ``CHECK_EVERY``), since no later than the liveness bound after the heal or
        after the last trap that sprang after it (a fault of its own: an arbiter crashed
        right after a claim); returns when that began, from the heal."""
        bound = self.t.liveness_bound()
        t, since = heal, None
        while True:
            t += CHECK_EVERY
            self.w.run_until(t)
            if all(self.check.served_by(g) for g in GROUPS):
                since = t if since is None else since
                if t - since >= STAYS - 1e-9:
                    return since - heal
            else:
                since = None
                last = max(heal, self.sprung_at)
                if t >= last + bound:
                    what = "the heal" if last == heal else "the last trap sprang"
                    self.check.liveness(f"{bound:.3f} s after {what} at {last:.3f}")


def run(seed: int, variant: Variant = SHIPPED, plan: Plan | None = None,
        timings: Timings | None = None) -> Result:
    return Sim(seed, variant, plan, timings).run()
