"""The service base every vtl-ha process stands on.

Each service: ``--config``, ``--node``; a NATS connection (reconnect with backoff);
an aiohttp app with ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus) and
``/status`` (JSON); JSON-lines logs; on SIGTERM it stops taking new work, lets work
in flight finish within a timeout, cancels the rest and closes (aiohttp's
``cleanup_ctx``: entered in order, exited in reverse).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import platform
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar

import click
import orjson
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from vtlha import bus
from vtlha.config import ClusterConfig, load_config
from vtlha.errors import ConfigError, FatalError, InvalidMessage, VtlhaError
from vtlha.homeserver import HomeServer
from vtlha.log import setup_logging
from vtlha.looplag import LAG_BUCKETS, LAG_INTERVAL, watch_loop_lag
from vtlha.messages import Event
from vtlha.natsauth import ClientAuth, client_auth, service_user
from vtlha.outbox import Outbox, stream_publisher
from vtlha.priority import raise_priority
from vtlha.rejects import RejectLog
from vtlha.subjects import Subjects

SHUTDOWN_GRACE = 3.0  # seconds for work in flight at SIGTERM


#: inputs whose handler validates the envelope itself: a liveness ping's body is ignored,
#: an operator's request comes from any host, and both a request and a command are
#: answered even when refused
OWN_VALIDATION = frozenset({"ping", "admin", "command"})


class Service:
    """Base class: subclasses set ``name`` and implement ``start``/``status``."""

    name: ClassVar[str] = "service"
    http_port_key: ClassVar[str] = ""
    #: extra click options of this service; their values reach ``self.options``
    cli_options: ClassVar[list[click.Option]] = []
    #: the NATS user when it is not ``<host>-<service>`` (one user wherever it runs)
    nats_user: ClassVar[str | None] = None
    #: raise the scheduling priority (``scheduling.nice``): the services on the failover
    #: path do; one that is not (notifier, dashboard) must not compete with them, nor
    #: hand a raised priority to the scripts it runs
    raises_priority: ClassVar[bool] = True
    #: the inputs whose handler checks the envelope itself (``check_envelope`` parses
    #: the JSON once more than the handler does: a service whose handler checks the
    #: cluster and the sender on the validated message skips that second parse)
    own_validation: ClassVar[frozenset[str]] = OWN_VALIDATION

    def __init__(
        self,
        config: ClusterConfig,
        node: str,
        nats_urls: list[str],
        state_root: Path,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.options: dict[str, Any] = options or {}
        self.config = config
        self.node = node
        self.subjects = Subjects(config.cluster)
        self.nats_urls = nats_urls
        #: this service's NATS user on this host (credential and TLS; none in the lab)
        self.nats_auth: ClientAuth = client_auth(
            config, self.nats_user or service_user(node, self.name))
        self.state_root = state_root
        self.state_dir = state_root / node
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log = logging.getLogger(f"vtlha.{self.name}")
        self.registry = CollectorRegistry()
        self.started_wall = time.time()
        self.invalid_messages = Counter(
            "vtlha_invalid_messages_total",
            "Messages that failed validation and were dropped",
            ["kind"],
            registry=self.registry,
        )
        #: logs and reports invalid input once per source per interval
        self.rejects = RejectLog()
        self.loop_errors = Counter(
            "vtlha_loop_errors_total", "Errors caught by a background loop", ["loop"],
            registry=self.registry,
        )
        self.up = Gauge("vtlha_up", "1 while the service runs", registry=self.registry)
        self.loop_lag = Histogram(
            "vtlha_event_loop_lag_seconds", f"How much later than due the event loop woke a "
            f"task sleeping {LAG_INTERVAL:g} s (vtlha.looplag): a busy loop delays every "
            f"callback by as much", buckets=LAG_BUCKETS, registry=self.registry)
        self.version = _version()
        Gauge("vtlha_build_info", "Always 1: the version of vtl-ha this service runs, its "
              "Python's", ["version", "service", "python"], registry=self.registry).labels(
            self.version, self.name, platform.python_version()).set(1)
        n = config.nats
        #: events go through here: written locally first, published until stored
        self.outbox = Outbox(self.state_dir / f"outbox-{self.name}", self.registry,
                             log=logging.getLogger(f"vtlha.{self.name}.outbox"),
                             max_events=n.outbox_max_events, max_bytes=n.outbox_max_bytes)
        self._nc: NATS | None = None
        #: keeps the connection on a server that reaches the KV leader, own one first
        self.home: HomeServer | None = None
        self._js: JetStreamContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.fatal: BaseException | None = None
        self.last_tick = time.monotonic()

    # ---- to override -------------------------------------------------------
    async def start(self) -> None:
        """Subscribe and start background loops."""

    async def stop(self) -> None:
        """Stop taking new work (called first at shutdown)."""

    def status(self) -> dict[str, Any]:
        return {}

    def is_ready(self) -> bool:
        return True

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS for the HTTP side (None: plain HTTP, as the services' probes are)."""
        return None

    # ---- helpers for subclasses --------------------------------------------
    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "not connected"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            self._js = self.nc.jetstream(timeout=2.0)
        return self._js

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str,
              critical: bool = True) -> asyncio.Task[None]:
        """Run ``coro`` as a task. A critical task (a loop the service lives by) that
        fails ends the service; a non-critical one (a single takeover) is logged."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._task_done(t, critical))
        return task

    def _task_done(self, task: asyncio.Task[None], critical: bool) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is None or not critical:
            self._tasks.remove(task)
        if exc is None:
            return
        self.loop_errors.labels(task.get_name().split("-")[0]).inc()
        self.log.error("task failed", extra={"task": task.get_name(), "error": repr(exc),
                                              "critical": critical}, exc_info=exc)
        if critical:
            self.fatal = exc
            self._stopping.set()

    def every(self, interval: float, fn: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``fn`` at a fixed rate on the loop's monotonic clock, subtracting the
        iteration's own time; an overrun is logged; errors are caught per iteration
        (fatal ones end the service)."""

        async def _loop() -> None:
            loop = asyncio.get_running_loop()
            next_at = loop.time()
            while not self.stopping:
                try:
                    await fn()
                except FatalError:
                    raise
                except (VtlhaError, Exception) as exc:
                    self.loop_errors.labels(name).inc()
                    self.log.exception("loop iteration failed", extra={"loop": name,
                                                                         "error": repr(exc)})
                self.last_tick = time.monotonic()
                next_at += interval
                delay = next_at - loop.time()
                if delay < 0:
                    if -delay > interval:
                        self.log.warning("tick overran", extra={"loop": name,
                                                                "late_s": round(-delay, 4)})
                    next_at = loop.time()
                    delay = 0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

        self.spawn(_loop(), name)

    def subscribe_handler(
        self, kind: str, handler: Callable[[Msg], Awaitable[None]]
    ) -> Callable[[Msg], Awaitable[None]]:
        """Wrap a subscription callback: InvalidMessage is counted and logged; any other
        error is logged; nothing a message does can crash the service."""

        async def _cb(msg: Msg) -> None:
            if self.stopping:
                return
            try:
                if kind not in self.own_validation:
                    self.check_envelope(msg.data)
                await handler(msg)
            except InvalidMessage as exc:
                self.invalid_messages.labels(kind).inc()
                self.reject(kind, msg.subject, str(exc))
            except Exception as exc:
                self.loop_errors.labels(kind).inc()
                self.log.exception("handler failed", extra={"kind": kind, "error": repr(exc)})

        return _cb

    def check_envelope(self, data: bytes) -> None:
        """Raise InvalidMessage for a message of another cluster or from no host of this
        one (what a schema cannot know); anything else is left to the handler's decode,
        which says what is wrong with it. It parses the JSON once more than the handler
        does (a few microseconds for these sizes): the price of checking every subscriber
        in one place rather than trusting each handler to pass the cluster to decode."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        cluster, node = obj.get("cluster"), obj.get("node")
        if isinstance(cluster, str) and cluster != self.config.cluster:
            raise InvalidMessage(f"cluster {cluster[:64]!r} is not ours")
        if isinstance(node, str) and node not in self.config.lookups.host_index:
            raise InvalidMessage(f"node {node[:64]!r} is not a host of the cluster")

    def reject(self, kind: str, subject: str, error: str) -> None:
        """An invalid message was dropped (and counted): log it and report it as an
        ``input.rejected`` event, once per source per interval (``vtlha.rejects``)."""
        report = self.rejects.note(kind, subject, error)
        if report is None:
            return
        self.log.warning("invalid message dropped", extra={
            "kind": kind, "subject": report.subject, "error": report.error,
            "dropped": report.dropped})
        self.emit_soon("input.rejected",
                       f"{self.name} on {self.node} dropped {report.dropped} invalid {kind} "
                       f"message(s) on {report.subject}: {report.error}",
                       data={"input": kind, "subject": report.subject, "error": report.error,
                             "dropped": report.dropped})

    async def emit(self, kind: str, reason: str, **fields: Any) -> str | None:
        """Record an event and return its id at once (None when the outbox is full and
        the event was dropped, which is logged and counted). The event is written to the
        service's outbox and published in the background until the stream stores it
        (``vtlha.outbox``): nothing that emits ever waits for the event stream."""
        return self.emit_soon(kind, reason, **fields)

    def emit_soon(self, kind: str, reason: str, **fields: Any) -> str | None:
        """``emit`` for code that is not a coroutine (the same: it never waits)."""
        pair = self.config.pair_of(self.node).name if self.config.has_node(self.node) else None
        fields.setdefault("pair", pair)
        event = Event(cluster=self.config.cluster, node=self.node, kind=kind, reason=reason,
                      **fields)
        if not self.outbox.put(event):
            return None
        self.log.info(reason, extra={"event": kind, "event_id": event.id})
        return event.id

    async def reconnected(self) -> None:
        """The NATS connection was made again (its server died, or it moved home): the
        replies to requests sent on the old one will not come. The heartbeat renews its
        leases at once instead of waiting out their timeouts."""

    async def ready_to_move(self) -> bool:
        """Whether the NATS connection may move home now (``HomeServer``): a move loses
        the replies of requests in flight. A service with requests on the failover path
        overrides this (the heartbeat: its lease renewals)."""
        return True

    # ---- lifecycle ---------------------------------------------------------
    async def _nats_ctx(self, app: web.Application) -> AsyncIterator[None]:
        self._nc = await bus.connect(self.nats_urls, name=f"{self.name}@{self.node}",
                                     auth=self.nats_auth, on_reconnect=self.reconnected)
        self.log.info("connected to nats", extra={"server": bus.server_url(self._nc),
                                                  **self.nats_auth.describe()})
        if len(self.nats_urls) > 1:  # back to its own server, away from one cut off
            self.home = HomeServer(self._nc, self.nats_urls, self.subjects,
                                   f"{self.name}@{self.node}", auth=self.nats_auth,
                                   ready=self.ready_to_move)
            self.spawn(self.home.run(self._stopping), "nats-home", critical=False)
        yield
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._nc.drain(), timeout=1.0)
        with contextlib.suppress(Exception):
            await self._nc.close()

    async def _service_ctx(self, app: web.Application) -> AsyncIterator[None]:
        if len(self.nats_urls) == 1 or len(self.config.nats.servers) == 1:
            self.log.warning("one NATS server: NOT partition-safe (no quorum elsewhere, no "
                             "failsafe for its loss); for quick tests only",
                             extra={"nats": self.nats_urls})
        self.outbox.load()
        publish = stream_publisher(lambda: self.js, self.subjects)
        self.spawn(self.outbox.run(publish, self._stopping), "outbox")
        self.spawn(watch_loop_lag(self.loop_lag.observe, self._stopping), "loop-lag",
                   critical=False)
        await self.start()
        # What start-up made (the cluster file, the modules, the views' indexes) lives as
        # long as the service: out of the collector's reach, a full collection no longer
        # walks it (at 2,000 pairs it doubled the arbiter's snapshot: bench/decide_cost.py)
        gc.collect()
        gc.freeze()
        self.up.set(1)
        self.log.info("started", extra={"nats": self.nats_urls})
        yield
        self.up.set(0)
        self._stopping.set()
        await self.stop()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
            for t in still:
                t.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        self.log.info("stopped")

    def make_app(self) -> web.Application:
        app = web.Application()
        app.cleanup_ctx.append(self._nats_ctx)
        app.cleanup_ctx.append(self._service_ctx)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        app.router.add_get("/nats", self._nats)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        # a task that ended with an error; one that just returned is on its way out of
        # the list (its done-callback runs a moment later: no reason to answer 503)
        dead = [t.get_name() for t in self._tasks
                if t.done() and not t.cancelled() and t.exception() is not None]
        ok = not dead and self.fatal is None
        return web.json_response({"ok": ok, "dead_tasks": dead,
                                  "since_tick_s": round(time.monotonic() - self.last_tick, 3)},
                                 status=200 if ok else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ok = self._nc is not None and self._nc.is_connected and self.is_ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _nats(self, request: web.Request) -> web.Response:
        """Which server the connection uses and which servers reach the KV leader."""
        body = self.home.status() if self.home else {
            "server": bus.server_url(self._nc) if self._nc else None}
        return web.json_response(body, dumps=_dumps)

    async def _status(self, request: web.Request) -> web.Response:
        body = {"service": self.name, "node": self.node, "cluster": self.config.cluster,
                "nats": bus.server_url(self._nc) if self._nc else None,
                "nats_auth": self.nats_auth.describe(),
                "outbox": self.outbox.status(), **self.status()}
        return web.json_response(body, dumps=_dumps)

    async def run(self, http_host: str, http_port: int) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        runner = web.AppRunner(self.make_app(), handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, http_host, http_port, reuse_address=True,
                           ssl_context=self.ssl_context())
        try:
            await site.start()
            self.log.info("http listening", extra={"host": http_host, "port": http_port})
            await self._stopping.wait()
            self.log.info("shutting down")
        finally:
            await runner.cleanup()
        if self.fatal is not None:
            return 1
        return 0


def _dumps(obj: Any) -> str:
    import orjson

    return orjson.dumps(obj, default=str).decode()


def service_command(cls: type[Service]) -> Callable[..., None]:
    """A click command that runs ``cls`` with the common options."""

    @click.command(name=f"vtlha-{cls.name}", help=f"Run the vtl-ha {cls.name} service.")
    @click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                  help="The cluster file (YAML).")
    @click.option("--node", required=True, help="This host's name in the cluster file.")
    @click.option("--nats", "nats_urls", default=None,
                  help="Comma-separated NATS URLs (default: from the cluster file, own first).")
    @click.option("--state-dir", default=None, type=click.Path(file_okay=False),
                  help="State root (default: the cluster file's state_dir).")
    @click.option("--http-host", default="127.0.0.1", show_default=True)
    @click.option("--http-port", default=None, type=int,
                  help="HTTP port (default: the cluster file's port for this service and host).")
    @click.option("--log-level", default="info", show_default=True)
    def _cmd(config_path: str, node: str, nats_urls: str | None, state_dir: str | None,
             http_host: str, http_port: int | None, log_level: str, **options: Any) -> None:
        log = setup_logging(cls.name, node, log_level)
        try:
            cfg = load_config(config_path)
        except ConfigError as exc:
            click.echo(str(exc), err=True)
            sys.exit(2)
        if node not in cfg.hosts:
            click.echo(f"{config_path}: --node {node!r} is not a host of the cluster "
                       f"(hosts: {', '.join(cfg.hosts)})", err=True)
            sys.exit(2)
        if cls.raises_priority:
            raise_priority(cfg.scheduling.nice, log)
        urls = nats_urls.split(",") if nats_urls else cfg.nats_urls(first=node)
        options["config_path"] = str(Path(config_path).resolve())
        port = http_port if http_port is not None else cfg.port(node, cls.http_port_key)
        root = Path(state_dir) if state_dir else Path(cfg.state_dir)

        async def _main() -> int:
            try:
                svc = cls(cfg, node, urls, root, options)
                return await svc.run(http_host, port)
            except FatalError as exc:
                log.error("fatal", extra={"error": str(exc)})
                return 2
            except Exception as exc:  # a supervisor restarts us; say why in one JSON line
                log.exception("start failed", extra={"error": repr(exc)})
                return 1

        sys.exit(asyncio.run(_main()))

    for opt in cls.cli_options:
        _cmd.params.append(opt)
    return _cmd


def _version() -> str:
    """This installation's version of vtl-ha ("unknown" when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vtlha")
    except PackageNotFoundError:
        return "unknown"
