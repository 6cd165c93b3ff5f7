"""Operator requests: ``ha.<cluster>.admin.<verb>`` (request/reply), answered by the
active arbiter alone.

The subscription is open only while this arbiter is acting (active, its term announced):
with no active arbiter a request finds no responders at once. A request that arrives in
the moment between losing the leader key and closing the subscription gets no answer
(a "not active" reply could arrive before the new active arbiter's real answer).

Each request is an ``AdminRequest``; it is answered by the policy's pure ``answer`` on a
fresh snapshot, under the same lock as the decision loop. A granted move is claimed here
(so the reply carries its epoch and ``<kind>.started`` event) and finished in the
background through the same claim -> release -> acquire path as an automatic one; the
client follows the events for its completion. Every answer is an event whose inputs
include the request (``vtlha explain`` replays it): ``switchover.*``, ``failback.*``,
``pair.maintenance``, ``node.hold_cleared``, ``node.standby``, ``pair.failback_mode``,
``storage.cleanup``, ``<verb>.refused``. Leaving maintenance is
followed by a decision at once.

A cleanup (``vtlha cleanup GROUP``) is carried out by the nodes' storage-monitors: a
``cleanup`` command to each, with this arbiter's term and the group's epoch (refused
there when stale, as every command), answered with what it forgot and whether it started
the group again; the reply and the event ``storage.cleanup`` carry each node's
answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter

from vtlha import bus, policy
from vtlha.errors import InvalidMessage
from vtlha.messages import AdminReply, AdminRequest, AdminTakeover, decode, encode
from vtlha.policy import (
    Cleanup,
    ClearHold,
    Refusal,
    SetFailbackMode,
    SetMaintenance,
    SetStandby,
    Takeover,
)
from vtlha_arbiter.decider import Decider
from vtlha_arbiter.host import Host
from vtlha_arbiter.mover import Mover
from vtlha_arbiter.pairstate import PairState
from vtlha_arbiter.term import Activation

CLEANUP_TIMEOUT = 2.0  # seconds a storage-monitor has to answer a cleanup (one try)


class AdminServer:
    def __init__(self, host: Host, activation: Activation, decider: Decider,
                 mover: Mover) -> None:
        self.host = host
        self.act = activation
        self.decider = decider
        self.mover = mover
        self.pairs: PairState | None = None
        self.sub: Subscription | None = None
        self.requests = Counter("vtlha_admin_requests_total", "Operator requests answered, "
                                "by verb and result (ok, refused, failed, invalid)",
                                ["verb", "result"], registry=host.registry)

    async def open(self) -> None:
        if self.sub is None:
            host = self.host
            self.sub = await host.nc.subscribe(host.subjects.admin("*"),
                                               cb=host.subscribe_handler("admin",
                                                                         self._on_request))
            host.log.info("answering operator requests",
                          extra={"subject": host.subjects.admin("*")})

    async def close(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                self.host.log.info("admin unsubscribe failed", extra={"error": repr(exc)})

    # ---- one request ---------------------------------------------------------------
    def _reply(self, ok: bool, verb: str, status: str, **fields: Any) -> AdminReply:
        host = self.host
        return AdminReply(cluster=host.config.cluster, node=host.node, ok=ok, verb=verb,
                          status=status, term=self.act.term, **fields)

    async def _on_request(self, msg: Msg) -> None:
        if not self.act.is_acting():
            return  # the active arbiter answers; a lapsed one stays silent
        verb = msg.subject.rsplit(".", 1)[-1]
        decide_again = False
        token = self.act.token()
        try:
            req = self._validate(msg, verb)
            answered = await self._answer(req, token)
            if answered is None:
                return  # deposed meanwhile: the active arbiter answers, this one is silent
            reply = answered
            # leaving maintenance or standby, or a new failback mode: decide at once
            decide_again = reply.ok and (req.verb == "failback-mode" or (
                req.verb in ("maintenance", "standby") and req.on is False))
        except InvalidMessage as exc:
            self.host.invalid_messages.labels("admin").inc()
            self.host.reject("admin", msg.subject, str(exc))
            reply = self._reply(False, verb, f"{verb} refused: invalid request: {exc}")
        except Exception as exc:
            self.host.log.exception("operator request failed", extra={"verb": verb})
            reply = self._reply(False, verb, f"{verb} failed: {exc!r}")
        self.requests.labels(verb, _result(reply)).inc()
        if msg.reply:
            await msg.respond(encode(reply))
        if decide_again:
            await self.decider.decide_now()

    def _validate(self, msg: Msg, verb: str) -> AdminRequest:
        req = decode(AdminRequest, msg.data)
        if req.cluster != self.host.config.cluster:
            raise InvalidMessage(f"AdminRequest: cluster {req.cluster!r} is not ours")
        if req.verb != verb:
            raise InvalidMessage(f"AdminRequest: verb {req.verb!r} sent on {msg.subject}")
        return req

    async def _answer(self, req: AdminRequest,
                      token: tuple[int, float | None]) -> AdminReply | None:
        """The answer, or None when this arbiter is no longer the activation that took the
        request: it is carried out only by an arbiter still active when it claims (the
        mover checks again right before the claim)."""
        host = self.host
        # No move within lease_ttl of becoming active: wait that out (at most lease_ttl).
        left = self.act.hold_off_left(time.monotonic())
        if left > 0:
            await asyncio.sleep(left)
        async with self.decider.lock:
            if not self.act.is_acting_as(token):
                host.log.info("operator request dropped: no longer active",
                              extra={"verb": req.verb})
                return None
            now = time.monotonic()
            snap = self.decider.snapshot(now)
            request = req.policy_request()
            result = policy.answer(snap, request, now)
            status = policy.answer_status(result)
            about = _about(req, snap)
            part = snap.for_pairs([about["pair"]]) if about.get("pair") else snap
            inputs = {"snapshot": part.to_inputs(), "now": now, "request": request}
            who = {"operator": req.operator, "from": req.node, "request": request}
            host.log.info(status, extra={"term": self.act.term, **who})
            if isinstance(result, Refusal):
                eid = await host.emit(f"{req.verb}.refused", status, inputs=inputs,
                                      term=self.act.term, data=who,
                                      **_about(req, snap))
                return self._reply(False, req.verb, status, request=request,
                                   event_ids=_ids(eid))
            return await self._carry_out(req, result, status, inputs, who)

    async def _carry_out(self, req: AdminRequest, actions: tuple[policy.OperatorAction, ...],
                         status: str, inputs: dict[str, Any],
                         who: dict[str, Any]) -> AdminReply:
        events: list[str] = []
        takeovers: list[AdminTakeover] = []
        problems: list[str] = []
        details: list[str] = []
        restarted: list[str] = []
        for a in actions:
            if isinstance(a, Cleanup):
                eid, answers = await self._cleanup(a, inputs, who)
                events += _ids(eid)
                details += [why for _, why, _ in answers.values()]
                problems += [why for ok, why, _ in answers.values() if not ok]
                restarted += [n for n, (_, _, again) in answers.items() if again]
            elif isinstance(a, Takeover):
                done = await self._takeover(a, inputs, who)
                if isinstance(done, str):
                    problems.append(done)
                else:
                    takeovers.append(done)
                    events += _ids(done.started_id)
            elif isinstance(a, PAIR_CHANGES):
                problem, eid = await self._pair_change(a, inputs, who)
                events += _ids(eid)
                if problem:
                    problems.append(problem)
                    break  # standby not recorded: its moves would come straight back
        if problems:
            self.host.log.warning("operator request not carried out", extra={"problems": problems})
            return self._reply(False, req.verb, f"{status}; but: {'; '.join(problems)}",
                               request=who["request"], event_ids=events, takeovers=takeovers,
                               details=details, restarted=restarted)
        return self._reply(True, req.verb, status, request=who["request"], event_ids=events,
                           takeovers=takeovers, details=details, restarted=restarted)

    async def _cleanup(self, a: Cleanup, inputs: dict[str, Any], who: dict[str, Any]
                       ) -> tuple[str | None, dict[str, tuple[bool, str, bool]]]:
        """A ``cleanup`` command to each node's storage-monitor (one try each, at once);
        the event and, per node, (ok, its answer, whether it started the group again)."""
        host = self.host
        cmd = self.act.command("cleanup", a.group, a.epoch)

        async def one(node: str) -> tuple[bool, str, bool]:
            subject = host.subjects.cmd(node, "storage-monitor")
            try:
                ack = await bus.send_command(host.nc, subject, cmd, CLEANUP_TIMEOUT)
            except nats.errors.NoRespondersError:
                return False, f"{node}: no storage-monitor answered", False
            except (nats.errors.TimeoutError, TimeoutError):
                return False, f"{node}: no answer within {CLEANUP_TIMEOUT:g} s", False
            except InvalidMessage as exc:
                return False, f"{node}: an invalid answer: {exc}", False
            why = ack.reason if ack.ok else f"{node} refused: {ack.reason}"
            return ack.ok, why, ack.restarted

        answers = dict(zip(a.nodes, await asyncio.gather(*(one(n) for n in a.nodes)),
                           strict=True))
        said = "; ".join(why for _, why, _ in answers.values())
        eid = await host.emit("storage.cleanup", f"{a.status} — {said}", group=a.group,
                              epoch=a.epoch, term=self.act.term, inputs=inputs,
                              data={**who, "rule": a.rule.value, "nodes": {
                                  n: {"ok": ok, "detail": why, "restarted": again}
                                  for n, (ok, why, again) in answers.items()}},
                              pair=host.config.pair_of(host.config.groups()[a.group][0]).name)
        return eid, answers

    async def _takeover(self, a: Takeover, inputs: dict[str, Any],
                        who: dict[str, Any]) -> AdminTakeover | str:
        """Claim now (the reply says the epoch); finish in the background."""
        claimed = await self.mover.operator_takeover(a, inputs, who)
        if claimed is None:
            return f"{a.group} changed since it was looked at (try again)"
        return AdminTakeover(group=a.group, old=a.old, new=a.new, epoch=claimed.epoch,
                             kind=claimed.kind, started_id=claimed.started)

    async def _pair_change(self, a: PairChange, inputs: dict[str, Any],
                           who: dict[str, Any]) -> tuple[str | None, str | None]:
        host, pairs = self.host, self.pairs
        assert pairs is not None
        common: dict[str, Any] = {"pair": a.pair, "term": self.act.term, "inputs": inputs}
        if isinstance(a, SetStandby):
            if not a.changed:
                return None, None
            if await pairs.set_standby(a.pair, a.node, a.on) is None:
                return f"the KV did not take {a.pair}'s standby list (try again)", None
            return None, await host.emit("node.standby", a.status, new=a.node, data={
                **who, "rule": a.rule.value, "node": a.node, "on": a.on}, **common)
        if isinstance(a, SetFailbackMode):
            if not a.changed:
                return None, None
            if await pairs.set_failback(a.pair, a.mode) is None:
                return f"the KV did not take {a.pair}'s failback mode (try again)", None
            return None, await host.emit("pair.failback_mode", a.status, data={
                **who, "rule": a.rule.value, "mode": a.mode}, **common)
        if isinstance(a, SetMaintenance):
            if not a.changed:
                return None, None
            if await pairs.set_maintenance(a.pair, a.on) is None:
                return f"the KV did not take {a.pair}'s maintenance state (try again)", None
            return None, await host.emit("pair.maintenance", a.status, data={
                **who, "rule": a.rule.value, "on": a.on}, **common)
        if await pairs.clear_hold(a.pair, a.node) is None:
            return f"the KV did not take {a.pair}'s hold list (try again)", None
        return None, await host.emit("node.hold_cleared", a.status, new=a.node, data={
            **who, "rule": a.rule.value, "node": a.node}, **common)


PairChange = ClearHold | SetMaintenance | SetStandby | SetFailbackMode
PAIR_CHANGES = (ClearHold, SetMaintenance, SetStandby, SetFailbackMode)


def _result(reply: AdminReply) -> str:
    if reply.ok:
        return "ok"
    if " refused: invalid request" in reply.status:
        return "invalid"
    return "refused" if " refused: " in reply.status else "failed"


def _ids(event_id: str | None) -> list[str]:
    return [] if event_id is None else [event_id]


def _about(req: AdminRequest, snap: policy.Snapshot) -> dict[str, Any]:
    """The event fields a request is about (pair, group), when they exist."""
    out: dict[str, Any] = {}
    if req.group is not None and req.group in snap.groups:
        out["group"] = req.group
        home = snap.groups[req.group].home
        pair = policy.pair_of(snap, home)
        out["pair"] = pair.name if pair else None
    elif req.pair is not None and any(p.name == req.pair for p in snap.pairs):
        out["pair"] = req.pair
    return out
