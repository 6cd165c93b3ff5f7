"""The checker: a pure function over a chaos history (JSON-line records, see the runner)
and the fault table. No I/O, no clock: hand-made histories test it.

Violation classes:

- ``double-answer``: two nodes answered ARP for one address in one round (start, length);
- ``recovery-bound``: after a fault, an address (or a data group's tape portal) was
  served again later than the table's bound for that fault (address outages shorter
  than ``BLIP`` do not count for the bound; they count as unavailability);
- ``stranded``: at the iteration's check a group is owned (KV, state held) but nobody
  serves it (no ARP answer for its address for the last second; for a data group, no
  block acknowledged for the last two);
- ``baseline``: the runner could not restore every group at home within the bound;
- ``lost-event``: a fault that must cause an event did not; a ``<kind>.started``
  without its ``.completed`` / ``.failed``;
- ``needless-failover``: a failover started during a fault whose row says no move;
- ``epoch-back``: a group's or a device's epoch went down (events, KV, reservations,
  acknowledged blocks);
- ``lost-block`` / ``wrong-block``: an acknowledged block missing or different when
  read back; ``fenced-writer``: a block acknowledged at an epoch the target had already
  moved past when the block was sent."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from vtlha_lab.chaos import faults as ft

DATA_GAP = 0.3     # an ack gap longer than this counts as a data outage
BLIP = 0.1         # an address outage shorter than this does not count for the bound
STRANDED_ACK = 2.0  # a data group with no ack this long before the check is unserved
STRANDED_ARP = 1.0  # an address nobody answered this long before the check is unserved
MOVE_KINDS = ("failover",)
#: what must never happen: two nodes answering, an acknowledged block lost or wrong, a
#: fenced writer acknowledged, an epoch going back (the rest are availability classes)
SAFETY = frozenset({"double-answer", "lost-block", "wrong-block", "fenced-writer",
                    "epoch-back"})


@dataclass(frozen=True)
class Violation:
    cls: str
    iteration: int | None
    t: float
    detail: str
    kinds: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.cls, "iteration": self.iteration, "t": self.t,
                "detail": self.detail, "kinds": list(self.kinds)}


@dataclass
class Iteration:
    index: int
    kinds: tuple[str, ...]
    start: float
    end: float = 0.0
    check: float = 0.0
    owners: dict[str, Any] = field(default_factory=dict)
    detail: list[Any] = field(default_factory=list)
    baseline_ok: bool | None = None
    baseline_waited: float = 0.0
    baseline_bound: float = 0.0
    baseline_end: float = 0.0
    load: float | None = None
    not_injected: tuple[str, ...] = ()  # planned kinds whose injector failed (harness)
    unavailable: float = 0.0        # longest address outage in the window (s)
    data_unavailable: float = 0.0   # longest ack gap in the window (s)
    recovery: float = 0.0           # address: fault start -> served again (s)
    data_recovery: float = 0.0


@dataclass
class Result:
    seed: int | None
    command: str
    violations: list[Violation]
    iterations: list[Iteration]

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def safe(self) -> bool:
        """No violation of a safety class (``SAFETY``): what must never happen, whatever
        the availability classes say."""
        return not [v for v in self.violations if v.cls in SAFETY]


@dataclass
class History:
    run: dict[str, Any]
    iterations: list[Iteration]
    arp: dict[str, list[tuple[float, list[str]]]]
    acks: dict[str, list[dict[str, Any]]]
    events: list[dict[str, Any]]
    reservations: dict[str, list[tuple[float, str | None, int]]]
    verify: dict[str, dict[str, Any]]
    end: float


def _fault_record(r: dict[str, Any], iters: dict[int, Iteration]) -> None:
    i = int(r["iteration"])
    if r["phase"] == "start":
        iters[i] = Iteration(i, tuple(r["kinds"]), float(r["t"]), load=r.get("load"))
    elif i in iters and r["phase"] == "injected" and "planned" in r:
        # The faults really injected: an injector that failed (a harness fault, recorded
        # as an info record) leaves its kind out, so nothing is expected of it.
        iters[i].kinds = tuple(r["kinds"])
        iters[i].not_injected = tuple(k for k in r["planned"] if k not in r["kinds"])
        # An injector that prepares first (kill-arbiter-at-claim arms a KV watch) says
        # when its fault really began: the window and the recovery count from the
        # earliest such moment, never before the iteration's start.
        at = [float(d["injected_at"]) for d in r.get("detail", [])
              if isinstance(d, dict) and "injected_at" in d]
        if at and len(at) == len(r.get("detail", [])):
            iters[i].start = max(iters[i].start, min(at))
    elif i in iters and r["phase"] == "end":
        iters[i].end = float(r["t"])
        iters[i].detail = list(r.get("detail", []))


def _baseline_record(r: dict[str, Any], iters: dict[int, Iteration]) -> None:
    it = iters.get(int(r["iteration"]))
    if it is not None and r.get("phase") == "end":
        it.baseline_ok = bool(r.get("ok"))
        it.baseline_waited = float(r.get("waited", 0))
        it.baseline_bound = float(r.get("bound", 0))
        it.baseline_end = float(r["t"])


def parse(records: Iterable[Mapping[str, Any]]) -> History:
    h = History({}, [], {}, {}, [], {}, {}, 0.0)
    iters: dict[int, Iteration] = {}
    for rec in records:
        r = dict(rec)
        typ, t = r.get("type"), float(r.get("t", 0.0))
        h.end = max(h.end, t)
        if typ == "run" and r.get("phase") == "start":
            h.run = r
        elif typ == "fault":
            _fault_record(r, iters)
        elif typ == "check" and int(r["iteration"]) in iters:
            iters[int(r["iteration"])].check = t
            iters[int(r["iteration"])].owners = dict(r.get("owners", {}))
        elif typ == "baseline":
            _baseline_record(r, iters)
        elif typ == "arp":
            h.arp.setdefault(r["addr"], []).append((t, list(r["nodes"])))
        elif typ == "ack":
            h.acks.setdefault(r["group"], []).append(r)
        elif typ == "event":
            h.events.append(r)
        elif typ == "reservation":
            h.reservations.setdefault(r["device"], []).append(
                (t, r.get("holder"), int(r.get("epoch", 0))))
        elif typ == "verify":
            h.verify[r["group"]] = r
    h.iterations = [iters[i] for i in sorted(iters)]
    for seq in h.arp.values():
        seq.sort(key=lambda x: x[0])
    for acks in h.acks.values():
        acks.sort(key=lambda a: float(a["t"]))
    h.events.sort(key=lambda e: (int(e.get("seq") or 0), float(e["t"])))
    return h


# ---- address answers ------------------------------------------------------------------

def answer_spans(seq: list[tuple[float, list[str]]], end: float,
                 pred: Any) -> list[tuple[float, float, list[str]]]:
    """Spans (start, end, nodes) over which ``pred(nodes)`` held."""
    out = []
    for i, (t, nodes) in enumerate(seq):
        if pred(nodes):
            t_end = seq[i + 1][0] if i + 1 < len(seq) else end
            out.append((t, t_end, nodes))
    return out


def answering_at(seq: list[tuple[float, list[str]]], t: float) -> list[str] | None:
    cur = None
    for ts, nodes in seq:
        if ts > t:
            break
        cur = nodes
    return cur


def silent_since(seq: list[tuple[float, list[str]]], t: float) -> float | None:
    """Since when nobody has answered at ``t`` (None if somebody answers at ``t``)."""
    since = None
    for ts, nodes in seq:
        if ts > t:
            break
        since = None if nodes else (ts if since is None else since)
    return since


def double_answers(h: History) -> list[Violation]:
    out = []
    for addr, seq in sorted(h.arp.items()):
        for s, e, nodes in answer_spans(seq, h.end, lambda n: len(n) > 1):
            out.append(Violation("double-answer", _iteration_at(h, s), s,
                                 f"{addr} answered by {', '.join(nodes)} for "
                                 f"{(e - s) * 1000:.0f} ms"))
    return out


def _iteration_at(h: History, t: float) -> int | None:
    cur = None
    for it in h.iterations:
        if it.start <= t:
            cur = it.index
    return cur


def _outages(spans: list[tuple[float, float]], lo: float, hi: float) -> tuple[float, float]:
    """(longest outage overlapping [lo, hi], recovery: end of the last outage that
    overlaps it minus lo; an outage still open at hi counts up to hi + inf)."""
    longest, recovery = 0.0, 0.0
    for s, e in spans:
        if e <= lo or s >= hi:
            continue
        longest = max(longest, min(e, hi) - max(s, lo))
        recovery = max(recovery, (e if e <= hi else float("inf")) - lo)
    return longest, recovery


def address_outages(h: History, addr: str, blip: float = 0.0) -> list[tuple[float, float]]:
    """Spans with no ARP answer for ``addr`` (of at least ``blip`` seconds)."""
    return [(s, e) for s, e, _ in answer_spans(h.arp.get(addr, []), h.end, lambda n: not n)
            if e - s >= blip]


def held(h: History, it: Iteration, timings: Mapping[str, float]) -> bool:
    """A group moved (a move completed) less than failback_hold_time before the fault."""
    hold = float(timings.get("failback_hold_time", 0.0))
    return any(_family(e["kind"]) and e["kind"].endswith(".completed")
               and it.start - hold <= float(e["t"]) <= it.start for e in h.events)


def data_outages(h: History, group: str, until: float) -> list[tuple[float, float]]:
    acks = h.acks.get(group, [])
    out = []
    for a, b in pairwise(acks):
        if float(b["t"]) - float(a["t"]) > DATA_GAP:
            out.append((float(a["t"]), float(b["t"])))
    if acks and until - float(acks[-1]["t"]) > DATA_GAP:
        out.append((float(acks[-1]["t"]), float("inf")))
    return out


def recovery(h: History, timings: Mapping[str, float]) -> list[Violation]:
    out = []
    for it in h.iterations:
        if not it.check or not it.kinds:
            continue
        exp = ft.expectation(it.kinds, timings)
        for addr, group in sorted(h.run.get("addresses", {}).items()):
            longest, _ = _outages(address_outages(h, addr), it.start, it.check)
            _, rec = _outages(address_outages(h, addr, BLIP), it.start, it.check)
            it.unavailable = max(it.unavailable, longest)
            it.recovery = max(it.recovery, rec)
            if rec > exp.address_bound:
                out.append(Violation("recovery-bound", it.index, it.start,
                                     f"{addr} ({group}) served again {rec:.2f} s after the "
                                     f"fault (bound {exp.address_bound:.2f} s)", it.kinds))
        for group in h.run.get("data_groups", []):
            longest, rec = _outages(data_outages(h, group, h.end), it.start, it.check)
            it.data_unavailable = max(it.data_unavailable, longest)
            it.data_recovery = max(it.data_recovery, rec)
            if rec > exp.data_bound:
                out.append(Violation("recovery-bound", it.index, it.start,
                                     f"{group}'s tape portal acknowledged again {rec:.2f} s "
                                     f"after the fault (bound {exp.data_bound:.2f} s)",
                                     it.kinds))
    return out


def stranded(h: History) -> list[Violation]:
    out = []
    addrs_of: dict[str, list[str]] = {}
    for addr, g in h.run.get("addresses", {}).items():
        addrs_of.setdefault(g, []).append(addr)
    for it in h.iterations:
        if not it.check:
            continue
        for g, o in sorted(it.owners.items()):
            if not isinstance(o, dict) or o.get("state") != "held":
                continue
            silent = [a for a in addrs_of.get(g, [])
                      if (s := silent_since(h.arp.get(a, []), it.check)) is not None
                      and it.check - s >= STRANDED_ARP]
            acks = [a for a in h.acks.get(g, []) if float(a["t"]) <= it.check]
            no_data = g in h.run.get("data_groups", []) and (
                not acks or it.check - float(acks[-1]["t"]) > STRANDED_ACK)
            if silent or no_data:
                what = (f"{', '.join(silent)} unanswered" if silent else "") + (
                    "; " if silent and no_data else "") + (
                    "no block acknowledged" if no_data else "")
                out.append(Violation("stranded", it.index, it.check,
                                     f"{g} owned by {o.get('owner')} (held, epoch "
                                     f"{o.get('epoch')}) but unserved: {what}", it.kinds))
        if it.baseline_ok is False:
            out.append(Violation("baseline", it.index, it.check,
                                 f"not every group served at home after "
                                 f"{it.baseline_waited:.1f} s (bound {it.baseline_bound:.1f} s)",
                                 it.kinds))
        elif it.baseline_ok and it.baseline_waited > it.baseline_bound:
            out.append(Violation("baseline", it.index, it.check,
                                 f"home again after {it.baseline_waited:.1f} s (bound "
                                 f"{it.baseline_bound:.1f} s)", it.kinds))
    return out


# ---- events ---------------------------------------------------------------------------

def _family(kind: str) -> str | None:
    fam, _, phase = kind.rpartition(".")
    return fam if phase in ("started", "completed", "failed") and fam in (
        "failover", "failback", "switchover") else None


def lost_events(h: History, timings: Mapping[str, float]) -> list[Violation]:
    out = []
    for it in h.iterations:
        if not it.check or not it.kinds:
            continue
        exp = ft.expectation(it.kinds, timings, held(h, it, timings))
        seen = {e["kind"] for e in h.events if it.start <= float(e["t"]) <= it.check}
        for kind in exp.events:
            if kind not in seen:
                out.append(Violation("lost-event", it.index, it.start,
                                     f"{'+'.join(it.kinds)} must cause {kind}; none came",
                                     it.kinds))
    ended = {(e.get("group"), e.get("epoch"), _family(e["kind"])) for e in h.events
             if e["kind"].endswith((".completed", ".failed"))}
    ended_seq = {e.get("started") for e in h.events if e.get("started") is not None}
    for e in h.events:
        fam = _family(e["kind"])
        if fam and e["kind"].endswith(".started") and (
                e.get("group"), e.get("epoch"), fam) not in ended and e.get("seq") not in ended_seq:
            t = float(e["t"])
            out.append(Violation("lost-event", _iteration_at(h, t), t,
                                 f"{e['kind']} of {e.get('group')} epoch {e.get('epoch')} "
                                 f"(#{e.get('seq')}) never completed nor failed"))
    return out


def needless_failovers(h: History, timings: Mapping[str, float]) -> list[Violation]:
    """A failover started in the window of a fault whose row says no move, or between
    faults (after the baseline was restored, before the next fault; after the last)."""
    out = []
    starts = [e for e in h.events if e["kind"] == "failover.started"]
    for i, it in enumerate(h.iterations):
        quiet_until = h.iterations[i + 1].start if i + 1 < len(h.iterations) else h.end
        no_move = bool(it.check) and (
            not it.kinds or ft.expectation(it.kinds, timings).moves is ft.Moves.NONE)
        for e in starts:
            t = float(e["t"])
            what = f"{e.get('group')} moved ({e.get('rule')}): {e.get('reason', '')[:120]}"
            if no_move and it.start <= t <= it.check:
                out.append(Violation("needless-failover", it.index, t,
                                     f"{'+'.join(it.kinds)}: {what}", it.kinds))
            elif it.baseline_ok and it.baseline_end <= t < quiet_until:
                out.append(Violation("needless-failover", it.index, t,
                                     f"between faults (after the baseline of iteration "
                                     f"{it.index}): {what}"))
    return out


# ---- epochs and blocks ------------------------------------------------------------------

def _decreases(seq: list[tuple[float, int]]) -> list[tuple[float, int, int]]:
    out, hi = [], None
    for t, e in seq:
        if hi is not None and e < hi:
            out.append((t, hi, e))
        hi = e if hi is None else max(hi, e)
    return out


def epochs(h: History) -> list[Violation]:
    series: dict[str, list[tuple[float, int]]] = {}
    for e in h.events:  # the claims, in stream order (a move's end may come after the
        # next claim: a takeover that failed once a newer one began)
        if e.get("group") and e.get("epoch") and _family(e["kind"]) and \
                e["kind"].endswith(".started"):
            series.setdefault(f"group {e['group']} (claims)", []).append(
                (float(e["t"]), int(e["epoch"])))
    for it in h.iterations:
        for g, o in it.owners.items():
            if isinstance(o, dict) and isinstance(o.get("epoch"), int):
                series.setdefault(f"group {g} (KV)", []).append((it.check, o["epoch"]))
    for dev, res in h.reservations.items():
        series[f"device {dev} (target)"] = [(t, ep) for t, _, ep in res]
    for g, acks in h.acks.items():
        series[f"group {g} (acknowledged blocks)"] = [
            (float(a["t"]), int(a["epoch"])) for a in acks if a.get("epoch") is not None]
    out = []
    for name, seq in sorted(series.items()):
        for t, hi, low in _decreases(seq):
            out.append(Violation("epoch-back", _iteration_at(h, t), t,
                                 f"{name}: epoch {low} after {hi}"))
    return out


def blocks(h: History) -> list[Violation]:
    out = []
    for g in h.run.get("data_groups", []):
        acks = h.acks.get(g, [])
        nums = sorted(int(a["block"]) for a in acks)
        holes = sorted(set(range(nums[-1] + 1)) - set(nums)) if nums else []
        if holes:
            out.append(Violation("lost-block", None, h.end,
                                 f"{g}: acknowledged numbers have holes: {holes[:10]}"))
        v = h.verify.get(g)
        if v is None or "checked" not in v:
            out.append(Violation("lost-block", None, h.end,
                                 f"{g}: acknowledged blocks not read back: "
                                 f"{(v or {}).get('error', 'no verify record')}"))
            continue
        if int(v["checked"]) != len(nums):
            out.append(Violation("lost-block", None, h.end,
                                 f"{g}: {v['checked']} blocks read back of {len(nums)} acked"))
        for bad in v.get("bad", [])[:20]:
            out.append(Violation("wrong-block", None, h.end,
                                 f"{g}: block {bad.get('block')} reads back {bad.get('got')!r}"))
    return out


def fenced_writers(h: History) -> list[Violation]:
    """A block acknowledged at epoch e although, before it was sent, the target had
    already given a device of its group an epoch above e."""
    out = []
    for g, devices in h.run.get("devices", {}).items():
        moved: list[tuple[float, int]] = sorted(
            (t, e) for d in devices for t, _, e in h.reservations.get(d, []))
        for a in h.acks.get(g, []):
            e, sent = a.get("epoch"), float(a.get("sent") or a["t"])
            if e is None:
                continue
            passed = [t for t, ep in moved if ep > int(e) and t < sent]
            if passed:
                out.append(Violation("fenced-writer", _iteration_at(h, sent), sent,
                                     f"{g}: block {a['block']} acknowledged by {a.get('node')} "
                                     f"at epoch {e}; the target moved past it "
                                     f"{sent - passed[0]:.2f} s before it was sent"))
                break
    return out


def check(records: Iterable[Mapping[str, Any]]) -> Result:
    h = parse(records)
    timings = {**{k: float(v) for k, v in h.run.get("timings", {}).items()}}
    violations = (double_answers(h) + recovery(h, timings) + stranded(h)
                  + lost_events(h, timings) + needless_failovers(h, timings) + epochs(h)
                  + blocks(h) + fenced_writers(h))
    violations.sort(key=lambda v: v.t)
    return Result(h.run.get("seed"), str(h.run.get("command", "")), violations, h.iterations)
