"""The active role goes back to the witness's arbiter (the preferred one).

A node's arbiter becomes active only when the witness's is gone (killed, restarting,
cut off); once the witness's arbiter is back it would otherwise stay standby for as long
as the node's arbiter keeps renewing. That costs availability: when the node that holds
the active arbiter is cut off, its companion's takeover waits ``leader_ttl +
leader_standby_delay`` for a new active arbiter instead of ``dead_after`` (the chaos
suite's ``cut-links`` after ``kill-active-arbiter``). So:

- the preferred arbiter, standing by and warm (up for ``leader_ttl``), while it sees a
  node's arbiter renew the key, asks it (``ha.<c>.arbiter.handback``) at most once per
  ``leader_ttl``;
- the active arbiter agrees only when it is acting, past its hold-off and its
  reconciliation, and no move of its is under way; it then resigns
  (``ElectionRunner.resign``: standby first, then the key deleted by compare-and-set)
  and answers;
- told yes, the preferred arbiter reads the key at once and, finding it absent, creates
  it (a non-preferred arbiter waits ``leader_standby_delay`` first).

No rule of the election changes: the resigner stops acting before its delete is sent,
and the next holder reconciles every group after its own hold-off, as after any change
of the active arbiter."""

from __future__ import annotations

import time
from collections.abc import Callable

import nats.errors
from nats.aio.msg import Msg
from prometheus_client import Counter

from vtlha.errors import InvalidMessage
from vtlha.messages import HandbackReply, HandbackRequest, decode, encode
from vtlha_arbiter.election import ElectionRunner
from vtlha_arbiter.host import Host
from vtlha_arbiter.mover import Mover
from vtlha_arbiter.reconcile import Reconciler
from vtlha_arbiter.term import Activation


class Handback:
    def __init__(self, host: Host, act: Activation, mover: Mover, reconciler: Reconciler,
                 election: Callable[[], ElectionRunner | None]) -> None:
        self.host = host
        self.t = host.config.timings
        self.act = act
        self.mover = mover
        self.reconciler = reconciler
        self.election = election
        self.preferred = host.node == host.config.witness.host
        self.started = time.monotonic()
        self.asked_at = -1e9
        self.results = Counter("vtlha_arbiter_handbacks_total",
                               "Hand-backs of the active role to the preferred arbiter, by "
                               "side (asked, gave) and result", ["side", "result"],
                               registry=host.registry)

    async def start(self) -> None:
        host = self.host
        await host.nc.subscribe(host.subjects.handback,
                                cb=host.subscribe_handler("handback", self._on_request))

    # ---- the preferred arbiter asks --------------------------------------------------
    def due(self, now: float) -> bool:
        """Ask now: preferred, warm, standing by, the key held by a node's arbiter that
        renews it (seen changing within ``leader_ttl``), not asked within ``leader_ttl``."""
        el = self.election()
        if el is None or not self.preferred or el.is_active():
            return False
        ttl = self.t.leader_ttl
        if now - self.started < ttl or now - self.asked_at < ttl:
            return False
        seen = el.status().get("seen") or {}
        leader = seen.get("node")
        return (leader is not None and leader != self.host.node
                and float(seen.get("age_s", ttl)) < ttl / 2)

    async def check(self) -> None:
        now = time.monotonic()
        el = self.election()
        if el is None or not self.due(now):
            return
        self.asked_at = now
        host = self.host
        req = HandbackRequest(cluster=host.config.cluster, node=host.node,
                              incarnation=el.incarnation)
        try:
            msg = await host.nc.request(host.subjects.handback, encode(req),
                                        timeout=2 * self.t.command_timeout)
            reply = decode(HandbackReply, msg.data)
        except (nats.errors.Error, TimeoutError) as exc:
            self.results.labels("asked", "no answer").inc()
            host.log.info("hand-back asked: no answer", extra={"error": repr(exc)})
            return
        except InvalidMessage as exc:
            host.invalid_messages.labels("handback").inc()
            host.log.warning("invalid hand-back reply", extra={"error": str(exc)})
            return
        self.results.labels("asked", "yes" if reply.ok else "no").inc()
        host.log.info("hand-back asked", extra={"from": reply.node, "ok": reply.ok,
                                                "reason": reply.reason, "term": reply.term})
        if reply.ok:
            el.read_soon()

    # ---- the active arbiter answers --------------------------------------------------
    def refusal(self, req: HandbackRequest) -> str | None:
        """Why not to hand back now (None: hand back). Pure but for the clock."""
        if req.cluster != self.host.config.cluster:
            return f"cluster {req.cluster!r} is not ours"
        if req.node != self.host.config.witness.host:
            return f"{req.node} is not the preferred arbiter's node"
        if self.preferred:
            return "this is the preferred arbiter"
        if not self.act.is_acting():
            return "not the acting arbiter"
        if self.reconciler.done_for != self.act.token():
            return "its reconciliation is not done yet"
        busy = sorted(g for g in self.host.config.groups() if self.mover.busy(g))
        if busy or self.mover.ending:
            return f"moves under way: {', '.join(busy or sorted(self.mover.ending))}"
        return None

    async def _on_request(self, msg: Msg) -> None:
        req = decode(HandbackRequest, msg.data)
        el = self.election()
        why = self.refusal(req) if el is not None else "not started"
        term = self.act.term
        if why is None and el is not None:
            ok = await el.resign(f"handed the active role back to {req.node}'s arbiter "
                                 "(the preferred one)")
            reason = "handed back" if ok else "resigned; the key lapses after leader_ttl"
        else:
            ok, reason = False, why or ""
        if why is not None and not self.act.is_acting():
            return  # a standby stays silent: the active arbiter answers
        self.results.labels("gave", "yes" if ok else "no").inc()
        self.host.log.info("hand-back requested", extra={"by": req.node, "ok": ok,
                                                         "reason": reason, "term": term})
        if msg.reply:
            await msg.respond(encode(HandbackReply(
                cluster=self.host.config.cluster, node=self.host.node, ok=ok,
                reason=reason, term=term)))
