"""Notifications against a real cluster: the notifier service as a process, a real
nats-server and its event stream, real notify scripts and a real aiohttp server as the
webhook.

- A notify script and a webhook each receive the failover's events with all fields,
  each once.
- A hanging script does not delay the failover: the failover completes while the script
  still hangs, the webhook is told meanwhile, at most ``max_concurrent`` scripts run at
  once, and each is killed at its timeout.
- A failing webhook is retried; events stored while the notifier is down are sent after
  its restart, each once; an event whose delivery a killed notifier left unfinished is
  delivered again.
- A bad ``notifications:`` section is refused with the field named; a notifier on a
  host that is not one of ``notifications.hosts`` refuses to run."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
import yaml
from aiohttp import web
from nats.js.api import ConsumerInfo

from tests.conftest import EXAMPLE
from tests.integration.natsutil import events, metric
from vtlha import bus, deploy
from vtlha.config import load_config
from vtlha.messages import Event
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster, prepare_config
from vtlha_lab.procs import Child, pid_alive
from vtlha_lab.tlsmaterial import make_tls

#: the operator tools' end-to-end tests: their own target (make test-ops, run by .ci/run)
pytestmark = pytest.mark.ops

FAILOVER_FIELDS = ("v", "cluster", "node", "sent_at", "id", "kind", "pair", "group", "old",
                   "new", "term", "epoch", "reason", "inputs", "data")


# ---- the webhook: a real aiohttp server in a thread of its own -------------------------
class HookServer:
    """Records every POST (headers, JSON body, arrival time); ``answer(body, n)`` gives
    the status of the n-th request (1, 2, ...) for that event id, or None to never
    answer (the request hangs until the server stops)."""

    def __init__(self, answer: Callable[[dict[str, Any], int], int | None] | None = None
                 ) -> None:
        self.answer = answer or (lambda body, n: 200)
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="hook", daemon=True)
        self.url = ""

    def __enter__(self) -> HookServer:
        self._thread.start()
        assert self._ready.wait(10), "the webhook server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def bodies(self, target_kinds: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [r["body"] for r in self.requests if r["status"] == 200
                    and (not target_kinds or r["body"]["kind"] in target_kinds)]

    def of(self, event_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["body"]["id"] == event_id]

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        with self._lock:
            n = 1 + sum(1 for r in self.requests if r["body"]["id"] == body["id"])
            status = self.answer(body, n)
            self.requests.append({"headers": dict(request.headers), "body": body,
                                  "at": time.time(), "status": status})
        if status is None:
            assert self._stop is not None
            await self._stop.wait()
            status = 503
        return web.Response(status=status)

    def _run(self) -> None:
        async def _serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            app = web.Application()
            app.router.add_post("/hook", self._handle)
            runner = web.AppRunner(app, shutdown_timeout=1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}/hook"
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        asyncio.run(_serve())


# ---- helpers ------------------------------------------------------------------------
def configure(c: LocalCluster, notifications: dict[str, Any]) -> None:
    raw = yaml.safe_load(c.config_path.read_text())
    raw["notifications"] = notifications
    c.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    c.cfg = load_config(c.config_path)


def notifier_argv(c: LocalCluster, host: str, config: Path | None = None) -> list[str]:
    # ``python -m``: the same entry point as the ``vtlha-notifier`` script
    return [sys.executable, "-m", "vtlha_notifier", "--config", str(config or c.config_path),
            "--node", host, "--state-dir", str(c.state_root),
            "--nats", ",".join(c.nats_urls(host))]


def start_notifier(c: LocalCluster, host: str = "witness") -> Child:
    child = c.procs.spawn(host, "notifier", notifier_argv(c, host))
    c.wait_for(lambda: c.http_get(host, "notifier", "/readyz").get("ready"), 30,
               what="the notifier bound to its consumers")
    return child


def notifier_metric(c: LocalCluster, name: str, **labels: str) -> float:
    port = c.cfg.port("witness", "notifier")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return metric(r.read().decode(), name, **labels) or 0.0


def script(tmp_path: Path, name: str, body: str) -> tuple[str, Path]:
    """A notify script ``<name>.sh`` and the directory ``<name>/`` it writes to ($OUT)."""
    path = tmp_path / f"{name}.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    (tmp_path / name).mkdir()
    return str(path), tmp_path / name



def stream_events(c: LocalCluster) -> list[tuple[int, Event]]:
    return events(c.external_nats[0], c.cfg.cluster)  # type: ignore[index]


def settled(c: LocalCluster) -> bool:
    """Every group held by its home node and served (its storage too: a data group's
    failover waits for its storage, and a loaded machine takes a while to serve it)."""
    assigned = {e.group for _, e in stream_events(c) if e.kind == "group.assigned"}
    return c.home_held() and assigned >= {"node-a-data", "node-a-mgmt", "node-b-data",
                                          "node-b-mgmt"}


def failover_done(c: LocalCluster) -> bool:
    return {"node-a-data", "node-a-mgmt"} <= {
        e.group for _, e in stream_events(c) if e.kind == "failover.completed"}


async def connect(c: LocalCluster, user: str = "operator") -> nats.NATS:
    """A connection as ``user`` (its credential and TLS when the cluster has them)."""
    return await nats.connect(c.client_urls(), connect_timeout=5, allow_reconnect=False,
                              **c.client_auth(user).connect_options())


def publish(c: LocalCluster, evs: list[Event]) -> None:
    """Store ``evs`` in the event stream, as a service's outbox does (as an arbiter)."""
    async def _go() -> None:
        nc = await connect(c, "witness-arbiter")
        try:
            js = nc.jetstream()
            for e in evs:
                await bus.publish_event(js, Subjects(c.cfg.cluster), e)
        finally:
            await nc.close()

    asyncio.run(_go())


def create_stream(c: LocalCluster) -> None:
    """The event stream, as the arbiter creates it (as an arbiter)."""
    async def _go() -> None:
        nc = await connect(c, "witness-arbiter")
        try:
            await bus.ensure_events_stream(nc.jetstream(), Subjects(c.cfg.cluster), 1,
                                           8 * 1024 * 1024, 3600.0)
        finally:
            await nc.close()

    asyncio.run(_go())


def consumer_info(c: LocalCluster, consumer: str) -> ConsumerInfo:
    async def _go() -> ConsumerInfo:
        nc = await connect(c)
        try:
            return await nc.jetstream().consumer_info(
                Subjects(c.cfg.cluster).events_stream, consumer)
        finally:
            await nc.close()

    return asyncio.run(_go())


def ack_pending(c: LocalCluster, consumer: str) -> int:
    """Events the consumer handed out that are not acknowledged yet."""
    return int(consumer_info(c, consumer).num_ack_pending or 0)


def handed_out(c: LocalCluster, consumer: str) -> int:
    """The last stream sequence the consumer has handed out; at its creation ("new events
    only"), the stream's last: the events after it are the consumer's."""
    return int(consumer_info(c, consumer).delivered.stream_seq or 0)


def an_event(c: LocalCluster, i: int) -> Event:
    return Event(cluster=c.cfg.cluster, node="witness", kind="failover.started",
                 pair="pair-1", group="node-a-data", old="node-a", new="node-b", term=1,
                 epoch=i, reason=f"test event {i}", data={"i": i})


@pytest.fixture
def hook_ok() -> Iterator[HookServer]:
    with HookServer() as h:
        yield h


# ---- a failover, told to a script and a webhook ---------------------------------------
def test_a_script_and_a_webhook_receive_the_failover_events_with_all_fields(
        local_cluster: LocalCluster, hook_ok: HookServer, tmp_path: Path) -> None:
    c = local_cluster
    page, out = script(tmp_path, "page",
                       'cat > "$OUT/$VTLHA_SEQ.json.tmp"\n'
                       'env | grep ^VTLHA_ | sort > "$OUT/$VTLHA_SEQ.env"\n'
                       'echo "$@" > "$OUT/$VTLHA_SEQ.argv"\n'
                       'mv "$OUT/$VTLHA_SEQ.json.tmp" "$OUT/$VTLHA_SEQ.json"\n')
    configure(c, {"targets": [
        {"type": "exec", "name": "page", "command": [page, "{kind}", "{group}", "{new}"],
         "env": {"OUT": str(out)}, "events": ["failover.*"], "timeout": 10},
        {"type": "webhook", "name": "chat", "url": hook_ok.url,
         "events": ["failover.*", "node.down"], "headers": {"Authorization": "Bearer t"}}]})
    c.start()
    start_notifier(c)
    # (what the stream had before the consumers existed is not theirs: a node declared
    # down while the cluster started, say)
    first = min(handed_out(c, "notify-page"), handed_out(c, "notify-chat")) + 1
    c.wait_for(lambda: settled(c), 60, what="every group held and served by its home node")
    c.procs.kill_host("node-a")
    c.wait_for(lambda: failover_done(c), 30, what="both takeovers to complete")

    def ours() -> list[tuple[int, Event]]:
        return [(seq, e) for seq, e in stream_events(c) if seq >= first]

    want = {seq: e for seq, e in ours() if e.kind.startswith("failover.")}
    assert {e.kind for e in want.values()} >= {"failover.started", "failover.completed"}
    c.wait_for(lambda: all((out / f"{seq}.json").exists() for seq in want), 15,
               what="the script to have run for every failover event")
    for seq, e in want.items():
        got = orjson.loads((out / f"{seq}.json").read_bytes())
        assert got == e.model_dump(mode="json")
        assert set(FAILOVER_FIELDS) <= set(got)
        assert (out / f"{seq}.argv").read_text().split() == [
            x for x in (e.kind, e.group, e.new) if x]
        env = (out / f"{seq}.env").read_text()
        assert f"VTLHA_KIND={e.kind}\n" in env and f"VTLHA_ID={e.id}\n" in env
        assert f"VTLHA_SEQ={seq}\n" in env and f"VTLHA_EPOCH={e.epoch}\n" in env
    started = [e for e in want.values() if e.kind == "failover.started"]
    for e in started:  # every field of a failover's start is filled in
        assert None not in (e.pair, e.group, e.old, e.new, e.term, e.epoch)
        assert e.inputs["snapshot"] and e.data["rule"] and e.reason

    told = {seq: e for seq, e in ours()
            if e.kind.startswith("failover.") or e.kind == "node.down"}
    c.wait_for(lambda: {b["id"] for b in hook_ok.bodies()} >= {e.id for e in told.values()},
               15, what="the webhook to have every failover event and node.down")
    every = [r["body"]["id"] for r in hook_ok.requests]
    assert len(every) == len(set(every)), "an event was posted twice"
    bodies = [r["body"] for r in hook_ok.requests
              if int(r["headers"]["X-Vtlha-Event-Seq"]) >= first]
    assert sorted(b["id"] for b in bodies) == sorted(e.id for e in told.values())
    by_id = {b["id"]: b for b in bodies}
    for seq, e in told.items():
        assert by_id[e.id] == e.model_dump(mode="json")
        (r,) = [r for r in hook_ok.requests if r["body"]["id"] == e.id]
        assert r["headers"]["X-Vtlha-Event-Seq"] == str(seq)
        assert r["headers"]["Authorization"] == "Bearer t"
    # (counted once the script has exited, the webhook answered)
    runs = len(list(out.glob("*.json")))  # one run per failover event
    assert runs == len(want)
    c.wait_for(lambda: notifier_metric(c, "vtlha_notifications_total", target="page",
                                       result="ok") == runs, 5, what="runs counted")
    c.wait_for(lambda: notifier_metric(c, "vtlha_notifications_total", target="chat",
                                       result="ok") == len(every), 5, what="posts counted")


# ---- a hanging script -----------------------------------------------------------------
HANG_TIMEOUT = 25.0  # far above a loopback failover's time, even under load


def test_a_hanging_script_does_not_delay_the_failover(
        local_cluster: LocalCluster, hook_ok: HookServer, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    c = local_cluster
    hang, out = script(tmp_path, "hang",
                       'echo "$$ $(date +%s.%N)" > "$OUT/$VTLHA_SEQ.pid.tmp"\n'
                       'mv "$OUT/$VTLHA_SEQ.pid.tmp" "$OUT/$VTLHA_SEQ.pid"\n'
                       "exec sleep 1000\n")

    def reap() -> None:  # (the notifier kills them as it stops; never leave one behind)
        for f in out.glob("*.pid"):
            pid = int(f.read_text().split()[0])
            with contextlib.suppress(OSError):  # (gone; only our sleep, never a reused pid)
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"):
                    os.kill(pid, signal.SIGKILL)

    request.addfinalizer(reap)
    configure(c, {"targets": [
        {"type": "exec", "name": "hang", "command": [hang], "env": {"OUT": str(out)},
         "events": ["node.down", "failover.*"], "timeout": HANG_TIMEOUT, "attempts": 1,
         "max_concurrent": 2},
        {"type": "webhook", "name": "chat", "url": hook_ok.url, "events": ["failover.*"]}]})
    c.start()
    start_notifier(c)
    c.wait_for(lambda: settled(c), 60, what="every group held and served by its home node")

    t0, t0_wall = time.monotonic(), time.time()
    c.procs.kill_host("node-a")
    most = 0

    def running() -> dict[int, float]:
        """pid -> start (wall clock) of every hang script now running."""
        pids = {}
        for f in out.glob("*.pid"):
            pid, started = f.read_text().split()
            if pid_alive(int(pid)):
                pids[int(pid)] = float(started)
        return pids

    def done_and_sampled() -> bool:
        nonlocal most
        most = max(most, len(running()))
        return failover_done(c)

    c.wait_for(done_and_sampled, 30, what="both takeovers to complete")
    took = time.monotonic() - t0
    hanging = running()
    print(f"failover (kill to both .completed in the stream) {took:.2f} s; "
          f"{len(hanging)} hang script(s) still running then")
    assert any(started >= t0_wall for started in hanging.values()), \
        f"no hang script started by the crash was running when the failover completed: {hanging}"
    # the webhook was told of the completion while the scripts hung
    done_ids = {e.id for _, e in stream_events(c) if e.kind == "failover.completed"}
    c.wait_for(lambda: done_ids <= {b["id"] for b in hook_ok.bodies()}, 10,
               what="the webhook to get both failover.completed")
    first_death = min(hanging.values()) + HANG_TIMEOUT
    assert all(r["at"] < first_death for r in hook_ok.requests
               if r["body"]["id"] in done_ids)

    # each script is killed at its timeout; never more than max_concurrent at once
    deaths: dict[int, float] = {}
    starts: dict[int, float] = {}

    def first_ones_killed() -> bool:
        nonlocal most
        now = running()
        most = max(most, len(now))
        starts.update(now)
        for pid in starts:
            if pid not in now and pid not in deaths:
                deaths[pid] = time.time()
        return all(pid in deaths for pid in hanging)

    c.wait_for(first_ones_killed, HANG_TIMEOUT + 10, interval=0.01,
               what="the hanging scripts to be killed")
    for pid in hanging:
        lived = deaths[pid] - starts[pid]
        print(f"hang script {pid} killed after {lived:.2f} s (timeout {HANG_TIMEOUT} s)")
        assert HANG_TIMEOUT - 0.1 <= lived <= HANG_TIMEOUT + 2.5, lived
    assert most <= 2, f"{most} scripts ran at once (max_concurrent 2)"
    c.wait_for(lambda: notifier_metric(c, "vtlha_notification_attempts_total",
                                       target="hang", result="timeout") >= len(hanging), 5,
               what="the timeouts counted")
    log = c.procs.find("witness", "notifier").log_path.read_text()
    failed = [orjson.loads(line) for line in log.splitlines()
              if '"notification FAILED"' in line]
    assert failed and all(f["level"] == "error" and f["target"] == "hang"
                          and f["result"] == "timeout" for f in failed)


# ---- retries and restarts (the stream, no failover) ---------------------------------
def test_a_failing_webhook_is_retried_and_nothing_is_lost_or_repeated_across_restarts(
        local_cluster: LocalCluster, tmp_path: Path) -> None:
    c = local_cluster
    flaky: set[str] = set()  # ids answered 503 twice before 200
    stuck: set[str] = set()  # ids whose first request is never answered

    def answer(body: dict[str, Any], n: int) -> int | None:
        if body["id"] in flaky and n <= 2:
            return 503
        if body["id"] in stuck and n == 1:
            return None
        return 200

    with HookServer(answer) as hook:
        configure(c, {"ack_wait": 2, "targets": [
            {"type": "webhook", "name": "chat", "url": hook.url, "events": ["failover.*"],
             "attempts": 4, "backoff": 0.2, "timeout": 30}]})
        create_stream(c)
        notifier = start_notifier(c)

        # retried: 503, 503, then 200
        e1 = an_event(c, 1)
        flaky.add(e1.id)
        publish(c, [e1])
        c.wait_for(lambda: any(r["status"] == 200 for r in hook.of(e1.id)), 15,
                   what="the webhook to accept the event at the third attempt")
        reqs = hook.of(e1.id)
        assert [r["status"] for r in reqs] == [503, 503, 200]
        assert [r["headers"]["X-Vtlha-Attempt"] for r in reqs] == ["1", "2", "3"]
        gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(reqs)]
        assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps  # exponential backoff
        assert notifier_metric(c, "vtlha_notification_attempts_total", target="chat",
                               result="http") == 2
        log = notifier.log_path.read_text()
        retried = [orjson.loads(line) for line in log.splitlines()
                   if '"notification attempt failed, retrying"' in line]
        assert [(r["target"], r["attempt"], r["result"]) for r in retried] == [
            ("chat", 1, "http"), ("chat", 2, "http")]

        # events stored while the notifier is down are sent after its restart, once each;
        # the one it had finished (acknowledged) is not sent again
        c.wait_for(lambda: ack_pending(c, "notify-chat") == 0, 5, what="the ack")
        notifier.signal(signal.SIGKILL)
        notifier.proc.wait(5)
        later = [an_event(c, i) for i in (2, 3, 4)]
        publish(c, later)
        notifier = start_notifier(c)
        c.wait_for(lambda: all(hook.of(e.id) for e in later), 15,
                   what="the events stored meanwhile to be sent")
        c.wait_for(lambda: notifier_metric(c, "vtlha_notifications_total", target="chat",
                                           result="ok") >= 3, 5, what="three sent")
        # an event whose delivery a killed notifier left unfinished comes again
        e5 = an_event(c, 5)
        stuck.add(e5.id)
        publish(c, [e5])
        c.wait_for(lambda: hook.of(e5.id), 10, what="the stuck delivery to start")
        notifier.signal(signal.SIGKILL)
        notifier.proc.wait(5)
        notifier = start_notifier(c)
        c.wait_for(lambda: any(r["status"] == 200 for r in hook.of(e5.id)), 15,
                   what="the unfinished event to be delivered again")
        again = [r for r in hook.of(e5.id) if r["status"] == 200]
        assert again[0]["headers"]["X-Vtlha-Delivery"] == "2"
        for e in [e1, *later]:
            assert len([r for r in hook.of(e.id) if r["status"] == 200]) == 1, e.data
        assert len(hook.of(e1.id)) == 3  # not sent again after the restarts


# ---- refusals ------------------------------------------------------------------------
def test_a_bad_notifications_section_is_refused_naming_the_field(
        local_cluster: LocalCluster, tmp_path: Path) -> None:
    c = local_cluster
    raw = yaml.safe_load(c.config_path.read_text())
    raw["notifications"] = {"targets": [
        {"type": "webhook", "name": "chat", "url": "http://127.0.0.1:9/hook",
         "events": ["failover.*"], "timeout": -1}]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = subprocess.run(notifier_argv(c, "witness", bad), capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2, run.stderr
    assert f"{bad}: invalid cluster config" in run.stderr
    assert "notifications.targets[0].webhook.timeout: Input should be greater than 0" \
        in run.stderr

    configure(c, {"targets": [{"type": "webhook", "name": "chat",
                               "url": "http://127.0.0.1:9/hook", "events": ["*"]}]})
    run = subprocess.run(notifier_argv(c, "node-a"), capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2, run.stderr
    assert "node-a is not one of notifications.hosts (witness)" in run.stderr


# ---- on its own least-privilege user ---------------------------------------------------
def test_a_notifier_on_its_own_user_with_tls_consumes_and_acknowledges(
        tmp_path: Path, hook_ok: HookServer) -> None:
    """`vtlha deploy render`'s permissions, as a real server enforces them: the notifier
    connects as ``witness-notifier`` over TLS, creates and pulls its consumer, delivers
    and acknowledges, and the server refuses it nothing."""
    path = prepare_config(EXAMPLE, tmp_path, cluster="notify-sec", single_server=True)
    raw = yaml.safe_load(path.read_text())
    raw["nats"]["credentials_dir"] = str(tmp_path / "deploy" / "creds")
    raw["nats"]["tls"] = make_tls(tmp_path / "tls")
    raw["notifications"] = {"targets": [{"type": "webhook", "name": "chat",
                                         "url": hook_ok.url, "events": ["failover.*"]}]}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    deploy.render(load_config(path), tmp_path / "deploy")
    c = LocalCluster(path, tmp_path)
    try:
        c.start_nats()
        create_stream(c)
        notifier = start_notifier(c)
        st = c.status("witness", "notifier")
        assert st is not None and st["nats_auth"]["user"] == "witness-notifier"
        assert st["nats_auth"]["tls"] is True
        evs = [an_event(c, i) for i in (1, 2)]
        publish(c, evs)
        c.wait_for(lambda: all(hook_ok.of(e.id) for e in evs), 15,
                   what="the webhook to get both events")
        c.wait_for(lambda: ack_pending(c, "notify-chat") == 0, 5, what="both acknowledged")
        assert [len(hook_ok.of(e.id)) for e in evs] == [1, 1]
        log = notifier.log_path.read_text().lower()
        assert "permissions violation" not in log and "authorization" not in log
    finally:
        c.stop()
