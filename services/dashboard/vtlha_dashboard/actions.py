"""Operator actions from the dashboard: an HTTP body becomes an ``AdminRequest`` sent on
``ha.<cluster>.admin.<verb>`` as the signed-in operator's NATS user, and the active
arbiter's answer becomes the HTTP answer. Nothing here waits for a move to finish: the
page sees it happen through the live status and the timeline."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from vtlha import bus
from vtlha.config import ClusterConfig
from vtlha.errors import ConfigError, InvalidMessage
from vtlha.messages import ADMIN_FIELDS, AdminReply, AdminRequest, decode, encode
from vtlha.natsauth import client_auth
from vtlha.subjects import Subjects
from vtlha_dashboard.auth import Operator

#: the verbs the page offers (those of them this version's ``AdminRequest`` knows)
OFFERED = ("switchover", "failback", "maintenance", "standby", "clear-hold")
#: seconds for the active arbiter's answer, and to connect as an operator's user
ANSWER_TIMEOUT = 5.0
CONNECT_TIMEOUT = 3.0
#: the body's fields, and the request's field each one sets
BODY_FIELDS = {"group": "group", "pair": "pair", "node": "target_node", "on": "on"}

log = logging.getLogger("vtlha.dashboard.actions")


def offered() -> list[str]:
    return [v for v in OFFERED if v in ADMIN_FIELDS]


@dataclass(frozen=True)
class Outcome:
    """The HTTP status and JSON body of one action."""

    http: int
    body: dict[str, Any]


def error(http: int, message: str) -> Outcome:
    return Outcome(http, {"ok": False, "error": message})


def build_request(cfg: ClusterConfig, sender: str, verb: str, body: Any,
                  op: Operator) -> AdminRequest | Outcome:
    """The request, or the 4xx outcome saying what is wrong with the body."""
    if verb not in offered():
        return error(404, f"unknown action {verb[:40]!r} (actions: {', '.join(offered())})")
    if not isinstance(body, dict):
        return error(400, "the body must be a JSON object")
    if unknown := set(body) - set(BODY_FIELDS):
        return error(400, f"unknown field(s): {', '.join(sorted(map(str, unknown)))[:200]}")
    fields = {BODY_FIELDS[k]: v for k, v in body.items()}
    try:
        return AdminRequest(cluster=cfg.cluster, node=sender, verb=verb,
                            operator=f"{op.name} (dashboard)", **fields)
    except ValidationError as exc:
        why = "; ".join(f"{'.'.join(map(str, e['loc'])) or verb}: {e['msg']}"
                        for e in exc.errors())
        return error(400, f"{verb}: {why}"[:500])


@dataclass
class Actor:
    """Sends operator requests, one NATS connection per acting user (made at the first
    action of that user, with its credential from the deployment)."""

    cfg: ClusterConfig
    urls: list[str]
    sender: str  # the host the dashboard runs on (the requests' ``node``)
    conns: dict[str, NATS] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def connection(self, user: str) -> NATS:
        async with self.lock:
            nc = self.conns.get(user)
            if nc is not None and not nc.is_closed:
                return nc
            nc = await bus.connect(self.urls, name=f"vtlha-dashboard@{self.sender} as {user}",
                                   connect_deadline=CONNECT_TIMEOUT,
                                   auth=client_auth(self.cfg, user))
            self.conns[user] = nc
            return nc

    async def act(self, verb: str, body: Any, op: Operator) -> Outcome:
        req = build_request(self.cfg, self.sender, verb, body, op)
        if isinstance(req, Outcome):
            return req
        subject = Subjects(self.cfg.cluster).admin(verb)
        try:
            nc = await self.connection(op.nats_user)
        except ConfigError as exc:
            return error(503, f"no credential for NATS user {op.nats_user}: {exc}")
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            return error(503, f"cannot reach NATS as {op.nats_user} within "
                              f"{CONNECT_TIMEOUT:g} s ({str(exc) or type(exc).__name__})")
        log.info("operator request", extra={"operator": op.name, "nats_user": op.nats_user,
                                            "request": req.policy_request()})
        try:
            raw = await nc.request(subject, encode(req), timeout=ANSWER_TIMEOUT)
            reply = decode(AdminReply, raw.data)
        except nats.errors.NoRespondersError:
            return error(503, "no active arbiter answers operator requests (is the "
                              "cluster up?)")
        except (nats.errors.TimeoutError, TimeoutError):
            return error(504, f"no answer from the active arbiter within "
                              f"{ANSWER_TIMEOUT:g} s (or NATS user {op.nats_user} may not "
                              f"send on {subject})")
        except InvalidMessage as exc:
            return error(502, f"unreadable answer from the arbiter: {exc}")
        body_out = {"ok": reply.ok, "status": reply.status, "operator": op.name,
                    "request": req.policy_request(),
                    "takeovers": [t.model_dump(mode="json") for t in reply.takeovers]}
        if not reply.ok:
            body_out["error"] = reply.status
        return Outcome(200 if reply.ok else 409, body_out)

    async def close(self) -> None:
        conns, self.conns = self.conns, {}
        for nc in conns.values():
            try:
                await asyncio.wait_for(nc.close(), 1.0)
            except Exception as exc:  # closing anyway
                log.info("close failed", extra={"error": repr(exc)})
