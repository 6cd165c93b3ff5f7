"""Operator requests and the arbiter's activation (vtlha_arbiter.admin, .term): an
operator request is carried out only by the activation that received it, still acting
when it claims (issue 14: a deposed arbiter used to sleep out its hold-off, then claim).
Real parts (Activation, AdminServer); the election is a stand-in with the runner's four
attributes, the mover and the decider are recorders (no NATS here)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from vtlha_arbiter.admin import AdminServer
from vtlha_arbiter.term import Activation

from tests.conftest import EXAMPLE
from vtlha.config import load_config
from vtlha.messages import AdminRequest

CFG = load_config(EXAMPLE)


@dataclass
class _Election:
    term: int
    active_since: float | None
    active: bool = True

    def is_active(self) -> bool:
        return self.active


@dataclass
class _Host:
    config: Any = CFG
    node: str = "witness"
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("test"))
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)


class _Decider:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.snapshots = 0

    def snapshot(self, now: float) -> Any:
        self.snapshots += 1
        raise AssertionError("a deposed arbiter must not even look")


def _activation(term: int, since: float) -> tuple[Activation, _Election]:
    act = Activation(_Host())  # type: ignore[arg-type]
    el = _Election(term, since)
    act.election = el  # type: ignore[assignment]
    act.term, act.active_since, act.announced_term = term, since, term
    return act, el


def test_acting_is_per_activation() -> None:
    act, el = _activation(5, 100.0)
    token = act.token()
    assert act.is_acting() and act.is_acting_as(token)
    el.term, el.active_since = 9, 200.0  # lapsed and won again: another activation
    act.term, act.active_since, act.announced_term = 9, 200.0, 9
    assert act.is_acting() and not act.is_acting_as(token)
    el.active = False
    assert not act.is_acting() and not act.is_acting_as(act.token())


def test_hold_off_end_and_what_is_left() -> None:
    act, _ = _activation(5, 100.0)
    lease_ttl = CFG.timings.lease_ttl
    assert act.hold_off_until() == 100.0 + lease_ttl
    assert act.hold_off_left(100.0) == pytest.approx(lease_ttl) and act.hold_off_left(1e9) == 0.0


async def test_a_deposed_arbiter_never_carries_out_a_request_it_took_while_active() -> None:
    loop_now = asyncio.get_running_loop().time
    act, el = _activation(5, time.monotonic())  # just active: the hold-off runs
    decider = _Decider()
    admin = AdminServer(_Host(), act, decider, mover=None)  # type: ignore[arg-type]
    req = AdminRequest(cluster=CFG.cluster, node="node-a", verb="switchover",
                       operator="op@host", group="node-a-mgmt")
    token = act.token()

    async def depose() -> None:  # while it sleeps out the hold-off, it loses the key
        await asyncio.sleep(0)
        el.active = False

    t0 = loop_now()
    _, answer = await asyncio.gather(depose(), admin._answer(req, token))
    assert answer is None  # no reply, no claim
    assert decider.snapshots == 0
    assert loop_now() - t0 < CFG.timings.lease_ttl + 0.5
