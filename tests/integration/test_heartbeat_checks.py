"""The heartbeat's health inputs with real processes on a real nats-server:

- rule 7: a configured check that fails one run changes nothing in the heartbeats;
  ``fall`` failing runs in a row do, ``rise`` passing runs bring it back;
- rule 8: the built-in fatal checks "executor ip-manager alive" and "executor
  storage-monitor alive": executors that start after the heartbeat are no alarm (the
  start-up grace), a whole cluster's start is no alarm, and an executor killed alone is
  reported failing (fatal) within about ``fall`` check runs and passing again ``rise``
  runs after it is back. Measured times are printed (``-s``), not asserted tightly.

Heartbeats are collected by a subscriber in a thread of its own (``Beats``), stamped
with the monotonic time they arrived; synchronisation is polling with deadlines."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats

from tests.integration.test_services import edited_cluster, kv_bucket, wait_ready  # noqa: F401
from vtlha.messages import CheckResult, Heartbeat, decode
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster
from vtlha_lab.natsserver import NatsServer

START_TIMEOUT = 15.0  # service processes: interpreter, imports, NATS connect, KV
CHANGE_TIMEOUT = 5.0  # fall/rise check runs at check_interval 0.2-0.3 s, with slack
IPM, STM = "executor ip-manager alive", "executor storage-monitor alive"


class Beats:
    """Every heartbeat on ``subject``, decoded, with its arrival time (monotonic),
    collected by a NATS subscriber running in its own thread and event loop."""

    def __init__(self, url: str, subject: str) -> None:
        self.url, self.subject = url, subject
        self.got: list[tuple[float, Heartbeat]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="beats", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by the test thread
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
        nc = await nats.connect(self.url, connect_timeout=2)

        async def _cb(msg: Any) -> None:
            hb = decode(Heartbeat, msg.data)
            with self.lock:
                self.got.append((time.monotonic(), hb))

        try:
            await nc.subscribe(self.subject, cb=_cb)
            await nc.flush()
            self.ready.set()
            await self.stop.wait()
        finally:
            await nc.close()

    def __enter__(self) -> Beats:
        self.thread.start()
        assert self.ready.wait(10), "the heartbeat subscriber did not start"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)

    def since(self, t: float, node: str | None = None) -> list[tuple[float, Heartbeat]]:
        assert self.error is None, self.error
        with self.lock:
            return [(at, hb) for at, hb in self.got
                    if at >= t and (node is None or hb.node == node)]

    def first(self, node: str, name: str, pred: Callable[[CheckResult], bool],
              after: float) -> tuple[float, CheckResult] | None:
        """The first heartbeat of ``node`` since ``after`` whose check ``name``
        satisfies ``pred``: (arrival time, that check)."""
        for at, hb in self.since(after, node):
            c = check(hb, name)
            if c is not None and pred(c):
                return at, c
        return None


def check(hb: Heartbeat, name: str) -> CheckResult | None:
    found = [c for c in hb.checks if c.name == name]
    assert len(found) <= 1, f"check {name!r} more than once in {hb.checks}"
    return found[0] if found else None


def answered(c: CheckResult) -> bool:
    """Passing, and measured (not the start-up grace's "starting")."""
    return c.ok and not c.detail.startswith("starting: ")


def failing(c: CheckResult) -> bool:
    return not c.ok


def wait_check(lc: LocalCluster, beats: Beats, node: str, name: str,
               pred: Callable[[CheckResult], bool], after: float, what: str,
               timeout: float = CHANGE_TIMEOUT) -> tuple[float, CheckResult]:
    found: tuple[float, CheckResult] = lc.wait_for(
        lambda: beats.first(node, name, pred, after), timeout, what=what)
    return found


def executor_checks_ever_failed(beats: Beats, node: str) -> list[CheckResult]:
    return [c for _, hb in beats.since(0.0, node) for c in hb.checks
            if c.name in (IPM, STM) and not c.ok]


@contextmanager
def cluster_with(lc: LocalCluster, url: str,
                 edit: Callable[[dict[str, Any]], None]) -> Iterator[LocalCluster]:
    with edited_cluster(lc, url, edit) as c:
        c.create_devices()
        yield c


# ---- rule 7: hysteresis over check runs --------------------------------------------

def test_a_check_failing_one_run_changes_nothing_fall_runs_in_a_row_do(
        local_cluster: LocalCluster, nats_server: NatsServer, tmp_path: Path) -> None:
    url = nats_server.spec.url
    once, always, runs = tmp_path / "fail-once", tmp_path / "fail", tmp_path / "runs"
    script = (f"if [ -e {once} ]; then rm -f {once}; echo fail >> {runs}; exit 1; fi; "
              f"if [ -e {always} ]; then echo fail >> {runs}; exit 1; fi; "
              f"echo pass >> {runs}")

    def edit(data: dict[str, Any]) -> None:
        # runs every 0.3 s, heartbeats every 0.1 s: one run's result is in ~3 heartbeats
        data["timings"].update(check_interval=0.3, rise=2, fall=2)
        node = data["pairs"][0]["nodes"][0]
        node["checks"] = [{"name": "vtl-daemon", "kind": "command",
                           "command": ["sh", "-c", script], "fatal": True}]
        node["executor_checks"] = False  # the switch: only the configured check

    with cluster_with(local_cluster, url, edit) as c, \
            Beats(url, Subjects(c.cfg.cluster).hb("node-a")) as beats:
        c.start_service("node-a", "heartbeat")
        wait_check(c, beats, "node-a", "vtl-daemon", lambda ch: ch.ok, 0.0,
                   "the check to pass", START_TIMEOUT)
        assert all([ch.name for ch in hb.checks] == ["vtl-daemon"]
                   for _, hb in beats.since(0.0)), "executor_checks: false adds none"

        # One failing run: reported as being debounced, never as failing.
        t0 = time.monotonic()
        once.touch()
        at, _ = wait_check(c, beats, "node-a", "vtl-daemon",
                           lambda ch: ch.detail.startswith("failing 1 of 2 before it counts"),
                           t0, "the failing run to show")
        wait_check(c, beats, "node-a", "vtl-daemon",
                   lambda ch: not ch.detail.startswith("failing"), at,
                   "a passing run after the failing one")
        window = beats.since(t0, "node-a")
        flapped = [hb for _, hb in window
                   if (ch := check(hb, "vtl-daemon")) and ch.detail.startswith("failing 1")]
        assert all(check(hb, "vtl-daemon").ok for _, hb in window), window  # type: ignore[union-attr]
        print(f"\none failing run was in {len(flapped)} heartbeats; reported ok throughout")
        assert len(flapped) >= 2, "a failing run counted per heartbeat would have flipped it"
        assert runs.read_text().split().count("fail") == 1

        # fall (2) failing runs in a row: reported failing.
        before = runs.read_text().split().count("fail")
        t1 = time.monotonic()
        always.touch()
        at, down = wait_check(c, beats, "node-a", "vtl-daemon", failing, t1,
                              "the check to be reported failing")
        fails = runs.read_text().split().count("fail") - before
        print(f"reported failing {at - t1:.2f} s after the fault ({fails} failing runs "
              f"by the time it was seen)")
        assert down.fatal is True and down.detail == "sh exited 1"
        assert fails >= 2
        assert beats.first("node-a", "vtl-daemon",
                           lambda ch: ch.detail.startswith("failing 1 of 2"), t1)

        # rise (2) passing runs: back.
        t2 = time.monotonic()
        always.unlink()
        at, _ = wait_check(c, beats, "node-a", "vtl-daemon", lambda ch: ch.ok, t2,
                           "the check to pass again")
        print(f"reported passing again {at - t2:.2f} s after the fix")
        assert beats.first("node-a", "vtl-daemon",
                           lambda ch: ch.detail.startswith("passing 1 of 2 before it counts"),
                           t2)


def test_a_check_changing_state_is_sent_at_once_not_at_the_next_heartbeat(
        local_cluster: LocalCluster, nats_server: NatsServer, tmp_path: Path) -> None:
    """Heartbeats every 10 s here: the heartbeat that says a fatal check fails comes
    as soon as the check's state changed (fall runs), long before the next periodic
    one — the failover it starts does not wait a heartbeat interval."""
    url = nats_server.spec.url
    pid = tmp_path / "vtl.pid"
    pid.write_text(f"{os.getpid()}\n")

    def edit(data: dict[str, Any]) -> None:
        data["timings"].update(heartbeat_interval=10, dead_after=20, lease_ttl=20,
                               check_interval=0.2, rise=2, fall=2)
        node = data["pairs"][0]["nodes"][0]
        node["checks"] = [{"name": "vtl-daemon", "kind": "pidfile", "path": str(pid),
                           "fatal": True}]
        node["executor_checks"] = False

    with cluster_with(local_cluster, url, edit) as c, \
            Beats(url, Subjects(c.cfg.cluster).hb("node-a")) as beats:
        c.start_service("node-a", "heartbeat")
        wait_check(c, beats, "node-a", "vtl-daemon", answered, 0.0, "the check to pass",
                   START_TIMEOUT)
        t1 = time.monotonic()
        periodic = [at for at, _ in beats.since(0.0, "node-a")]
        pid.unlink()
        # 8 s: the next periodic heartbeat is due 10 s after the first one
        at, down = wait_check(c, beats, "node-a", "vtl-daemon", failing, t1,
                              "the failing check's heartbeat", timeout=8.0)
        assert down.fatal and "pid file" in down.detail
        assert at - periodic[0] < 10.0, "not sent at once: it came with a periodic beat"
        seqs = [hb.seq for _, hb in beats.since(0.0, "node-a")]
        assert seqs == sorted(set(seqs)), "every heartbeat has a sequence number of its own"
        print(f"\nthe failing check was sent {at - t1:.2f} s after the fault "
              f"({len(seqs)} heartbeats in all, heartbeat_interval 10 s)")


# ---- rule 8: executor liveness --------------------------------------------------------

def test_executors_starting_after_the_heartbeat_are_no_alarm(
        local_cluster: LocalCluster, nats_server: NatsServer) -> None:
    """The start-up grace: until an executor has answered once, its failures are
    reported as "starting" (passing), not as a fatal failure."""
    c, url = local_cluster, nats_server.spec.url
    c.create_devices()
    c.start_san()
    with Beats(url, Subjects(c.cfg.cluster).hb("node-a")) as beats:
        c.start_service("node-a", "heartbeat")
        c.wait_for(lambda: len(beats.since(0.0)) >= 5, START_TIMEOUT,
                   what="a few heartbeats while no executor runs")
        for _, hb in beats.since(0.0):
            for name in (IPM, STM):
                ch = check(hb, name)
                assert ch is not None and ch.ok and ch.fatal, hb.checks
                assert ch.detail.startswith("starting: ") and "no responder" in ch.detail, ch
        t0 = time.monotonic()
        c.start_service("node-a", "ip-manager")
        c.start_service("node-a", "storage-monitor")
        for name in (IPM, STM):
            at, ch = wait_check(c, beats, "node-a", name, answered, t0,
                                f"{name} to be answered", START_TIMEOUT)
            print(f"\n{name}: answered {at - t0:.2f} s after the executor was started: "
                  f"{ch.detail}")
        assert executor_checks_ever_failed(beats, "node-a") == []


def test_an_executor_dying_alone_is_a_fatal_check_until_it_is_back(
        local_cluster: LocalCluster, nats_server: NatsServer) -> None:
    c, url = local_cluster, nats_server.spec.url
    t = c.cfg.timings
    with Beats(url, Subjects(c.cfg.cluster).hb()) as beats:
        t_start = time.monotonic()
        c.start()
        c.wait_for(c.home_held, 30, what="every group held by its home node")
        for node in ("node-a", "node-b"):
            for name in (IPM, STM):
                at, _ = wait_check(c, beats, node, name, answered, 0.0,
                                   f"{node}: {name} answered", START_TIMEOUT)
                print(f"\n{node}: {name} answered {at - t_start:.2f} s after the cluster "
                      "start began")
        # (c) no executor check reported failing at the cluster's start
        for node in ("node-a", "node-b"):
            assert executor_checks_ever_failed(beats, node) == []

        print(f"check_interval {t.check_interval} s, fall {t.fall}, rise {t.rise}")
        for service, name in (("ip-manager", IPM), ("storage-monitor", STM)):
            t0 = time.monotonic()
            child = c.procs.find("node-a", service)
            child.signal(signal.SIGKILL)
            child.proc.wait(5)
            at, down = wait_check(c, beats, "node-a", name, failing, t0,
                                  f"{name} reported failing")
            debounced = beats.first("node-a", name,
                                    lambda ch: ch.detail.startswith("failing 1 of"), t0)
            print(f"{service} killed: reported failing (fatal) after {at - t0:.2f} s "
                  f"(bound ~ fall x check_interval = {t.fall * t.check_interval:.2f} s + one "
                  f"interval); debouncing seen first: {debounced is not None}")
            assert down.fatal is True
            assert "no responder" in down.detail or "did not answer" in down.detail, down
            # the other executor and the heartbeats carry on
            other = STM if name == IPM else IPM
            last = beats.since(at, "node-a")[-1][1]
            assert check(last, other).ok  # type: ignore[union-attr]

            t1 = time.monotonic()
            c.start_service("node-a", service)
            wait_ready(c, "node-a", service)
            t_ready = time.monotonic()
            at, up = wait_check(c, beats, "node-a", name, lambda ch: ch.ok, t1,
                                f"{name} reported passing again", START_TIMEOUT)
            first_answer = beats.first("node-a", name,
                                       lambda ch: "answered in" in ch.detail, t1)
            assert first_answer is not None
            print(f"{service} restarted: ready after {t_ready - t1:.2f} s, first answer "
                  f"seen after {first_answer[0] - t1:.2f} s, reported passing after "
                  f"{at - t1:.2f} s ({at - first_answer[0]:.2f} s of rise)")
            assert up.fatal is True and "answered in" in up.detail
