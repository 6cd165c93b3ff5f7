"""Unit tests of what the heartbeat reports for its process checks: hysteresis over
check runs (rule 7, ``Debounce``), the built-in executor liveness checks (rule 8,
``ExecutorLiveness``: start-up grace, not-measured runs, the same hysteresis), which
executors are checked, and ``ping_executor`` against a real nats-server (no
responder, an answer, a late answer, nonsense, a wrong service). No mocks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from vtlha.checks import (
    Debounce,
    ExecutorLiveness,
    checked_executors,
    executor_check_name,
    ping_executor,
    ping_timeout,
)
from vtlha.config import ClusterConfig, parse_config
from vtlha.errors import ConfigError
from vtlha.messages import CheckResult, Pong, encode
from vtlha_lab.natsserver import NatsServer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"


def run(ok: bool, detail: str = "d") -> CheckResult:
    return CheckResult(name="vtl-daemon", ok=ok, fatal=True, detail=detail)


def example(edit: Callable[[dict[str, Any]], None] | None = None) -> ClusterConfig:
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    if edit is not None:
        edit(raw)
    return parse_config(raw)


# ---- Debounce: hysteresis over check runs -------------------------------------------

@pytest.mark.parametrize(
    ("runs", "reported"),
    [
        # the first run sets the state directly, passing or failing
        ([True], [True]),
        ([False], [False]),
        # one failing run (a flap) changes nothing; fall=2 in a row do
        ([True, False, True, True], [True, True, True, True]),
        ([True, False, False], [True, True, False]),
        ([True, False, True, False, True], [True] * 5),  # never two in a row
        # back: rise=3 passing runs in a row
        ([False, True, True, True], [False, False, False, True]),
        ([False, True, True, False, True, True, True], [False] * 6 + [True]),
    ],
)
def test_state_changes_only_after_fall_or_rise_runs_in_a_row(
        runs: list[bool], reported: list[bool]) -> None:
    d = Debounce(rise=3, fall=2)
    assert [d.update(run(ok)).ok for ok in runs] == reported


def test_the_detail_says_when_a_change_is_being_debounced() -> None:
    d = Debounce(rise=2, fall=2)
    first = d.update(run(True, "process 7 runs"))
    assert (first.ok, first.detail, d.changed) == (True, "process 7 runs", True)
    same = d.update(run(True, "process 7 runs"))
    assert (same.detail, d.changed) == ("process 7 runs", False)
    one = d.update(run(False, "process 7 is not running"))
    assert one.ok is True and not d.changed
    assert one.detail == "failing 1 of 2 before it counts: process 7 is not running"
    two = d.update(run(False, "process 7 is not running"))
    assert (two.ok, two.detail, d.changed) == (False, "process 7 is not running", True)
    back = d.update(run(True, "process 8 runs"))
    assert back.ok is False
    assert back.detail == "passing 1 of 2 before it counts: process 8 runs"
    assert d.update(run(True, "process 8 runs")).ok is True and d.changed


def test_name_and_fatal_are_kept() -> None:
    d = Debounce(rise=1, fall=1)
    r = d.update(CheckResult(name="disk", ok=False, fatal=False, detail="x"))
    assert (r.name, r.fatal) == ("disk", False)


# ---- ExecutorLiveness: start-up grace, hysteresis, not-measured runs -----------------

T0 = 1000.0
GRACE = 20.0
NAME = "executor ip-manager alive"


def liveness(rise: int = 2, fall: int = 2) -> ExecutorLiveness:
    return ExecutorLiveness("ip-manager", rise, fall, GRACE, T0)


def test_the_check_is_named_fatal_and_cannot_clash_with_a_configured_one() -> None:
    assert executor_check_name("ip-manager") == NAME
    r = liveness().update(True, "answered", T0)
    assert (r.name, r.ok, r.fatal) == (NAME, True, True)
    with pytest.raises(ConfigError, match=r"checks\[0\]\.name"):  # no spaces allowed
        example(lambda raw: raw["pairs"][0]["nodes"][0].update(
            checks=[{"name": NAME, "kind": "command", "command": ["true"]}]))


def test_failures_before_the_first_answer_are_not_counted_within_the_grace() -> None:
    x = liveness()
    for i in range(10):
        r = x.update(False, "ip-manager does not answer: no responder", T0 + i)
        assert r.ok is True and r.fatal is True and not x.changed
        assert r.detail.startswith("starting: ip-manager does not answer"), r.detail
        assert f"another {GRACE - i:.1f} s" in r.detail
    r = x.update(True, "ip-manager answered", T0 + 10)
    assert (r.ok, r.detail, x.changed) == (True, "ip-manager answered", True)
    # from its first answer on, every run counts
    assert x.update(False, "gone", T0 + 10.5).ok is True
    assert x.update(False, "gone", T0 + 11).ok is False and x.changed


def test_an_executor_that_never_answers_fails_once_the_grace_has_run_out() -> None:
    x = liveness()
    assert x.update(False, "no responder", T0 + GRACE - 0.1).ok is True
    r = x.update(False, "no responder", T0 + GRACE)
    # it failed for the whole grace: reported failing at once (the first counted run)
    assert (r.ok, r.fatal, r.detail, x.changed) == (False, True, "no responder", True)
    assert x.update(True, "answered", T0 + GRACE + 1).ok is False  # rise=2
    assert x.update(True, "answered", T0 + GRACE + 2).ok is True and x.changed


def test_one_missed_answer_does_not_change_the_state() -> None:
    x = liveness()
    x.update(True, "answered", T0)
    flap = x.update(False, "did not answer within 0.2 s", T0 + 1)
    assert flap.ok is True
    assert flap.detail == "failing 1 of 2 before it counts: did not answer within 0.2 s"
    assert x.update(True, "answered", T0 + 2).ok is True
    assert x.update(False, "late", T0 + 3).ok is True  # the streak started again


def test_a_run_that_measured_nothing_keeps_the_state_and_the_streak() -> None:
    x = liveness()
    x.update(True, "answered", T0)
    x.update(False, "no responder", T0 + 1)
    r = x.update(None, "not measured: this heartbeat's NATS connection was down", T0 + 2)
    assert (r.ok, x.changed) == (True, False)
    assert r.detail.startswith("not measured")
    assert x.update(False, "no responder", T0 + 3).ok is False  # 2 counted in a row
    assert x.update(None, "not measured", T0 + 4).ok is False


def test_nothing_measured_at_all_is_starting_then_not_a_failure() -> None:
    x = liveness()
    assert x.update(None, "not measured", T0).detail.startswith("starting: not measured")
    r = x.update(None, "not measured", T0 + GRACE + 1)
    assert (r.ok, r.detail) == (True, "nothing measured yet: not measured")


# ---- which executors are checked ------------------------------------------------------

def test_both_executors_are_checked_by_default() -> None:
    cfg = example()
    assert checked_executors(cfg, "node-a") == ["ip-manager", "storage-monitor"]
    assert checked_executors(cfg, "node-b") == ["ip-manager", "storage-monitor"]
    assert ping_timeout(cfg) == min(cfg.timings.check_interval, cfg.timings.command_timeout)


def test_the_switch_turns_them_off_per_node() -> None:
    cfg = example(lambda raw: raw["pairs"][0]["nodes"][0].update(executor_checks=False))
    assert checked_executors(cfg, "node-a") == []
    assert checked_executors(cfg, "node-b") == ["ip-manager", "storage-monitor"]


def test_no_storage_monitor_check_when_the_pair_has_no_devices() -> None:
    def no_devices(raw: dict[str, Any]) -> None:
        for n in raw["pairs"][0]["nodes"]:
            n["groups"]["data"]["devices"] = []
        raw["devices"] = {}

    cfg = example(no_devices)
    assert checked_executors(cfg, "node-a") == ["ip-manager"]


def test_one_node_with_devices_is_enough_for_both() -> None:
    def b_without(raw: dict[str, Any]) -> None:
        raw["pairs"][0]["nodes"][1]["groups"]["data"]["devices"] = []

    cfg = example(b_without)
    assert checked_executors(cfg, "node-b") == ["ip-manager", "storage-monitor"]


# ---- ping_executor against a real nats-server ------------------------------------------

SUBJECT = "ha.unit.ping.node-a.ip-manager"


def pong(**fields: Any) -> bytes:
    base: dict[str, Any] = {"cluster": "unit", "node": "node-a", "service": "ip-manager",
                            "pid": 42, "uptime": 3.5}
    return encode(Pong(**{**base, **fields}))


async def ask(url: str, responder: Callable[[Any], Awaitable[None]] | None,
              timeout: float = 0.2) -> tuple[bool | None, str]:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        if responder is not None:
            await nc.subscribe(SUBJECT, cb=responder)
            await nc.flush()
        return await ping_executor(nc, SUBJECT, "node-a", "ip-manager", timeout)
    finally:
        await nc.close()


def answering(body: bytes, delay: float = 0.0) -> Callable[[Any], Awaitable[None]]:
    async def _cb(msg: Any) -> None:
        if delay:
            await asyncio.sleep(delay)  # the executor being slow, not synchronisation
        await msg.respond(body)

    return _cb


async def test_an_answer_passes(nats_server: NatsServer) -> None:
    ok, detail = await ask(nats_server.spec.url, answering(pong()))
    assert ok is True
    assert detail.startswith("ip-manager answered in ") and "(pid 42, up 3.5 s)" in detail


async def test_an_answer_that_is_not_ready_still_passes(nats_server: NatsServer) -> None:
    ok, detail = await ask(nats_server.spec.url, answering(pong(ready=False)))
    assert ok is True and detail.endswith(", not ready)")


async def test_no_responder_fails_at_once(nats_server: NatsServer) -> None:
    ok, detail = await ask(nats_server.spec.url, None, timeout=5.0)
    assert ok is False
    assert detail == f"ip-manager does not answer: no responder on {SUBJECT}"


async def test_a_late_answer_fails(nats_server: NatsServer) -> None:
    ok, detail = await ask(nats_server.spec.url, answering(pong(), delay=0.5), timeout=0.1)
    assert (ok, detail) == (False, "ip-manager did not answer within 0.1 s")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"not json", "ip-manager answered nonsense: Pong: not JSON"),
        (b'{"cluster": "unit", "node": "node-a"}', "ip-manager answered nonsense: Pong"),
        (pong(service="storage-monitor"), "storage-monitor on node-a answered for ip-manager"),
        (pong(node="node-b"), "ip-manager on node-b answered for ip-manager"),
    ],
)
async def test_a_wrong_answer_fails(nats_server: NatsServer, body: bytes,
                                    expected: str) -> None:
    ok, detail = await ask(nats_server.spec.url, answering(body))
    assert ok is False
    assert detail.startswith(expected), detail
