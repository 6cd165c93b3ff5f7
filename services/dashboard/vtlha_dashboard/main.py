"""``vtlha-dashboard``: the live web dashboard, a service on the project's Service base.

It shows what ``vtlha status`` shows (the same gathering: ``vtlha.statuscollect`` and
``vtlha.clusterstatus``), refreshed every ``--refresh`` seconds and pushed to the page
with Server-Sent Events, and the event timeline. Reading needs no sign-in; an operator
action needs an operator's token (``vtlha_dashboard.auth``) and HTTPS: with
``--operators`` the service refuses to start without ``--tls-cert``/``--tls-key``.

Routes: ``/`` the page; ``/static/*`` its script and style; ``/api/status``,
``/api/events`` JSON; ``/api/stream`` the live stream (``status`` and ``event``
events); ``/api/whoami`` and ``POST /api/action/<verb>`` with ``Authorization: Bearer``;
and the base's ``/healthz``, ``/readyz``, ``/metrics``, ``/status``."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import orjson
from aiohttp import web
from prometheus_client import Counter, Gauge

from vtlha.deploy import DASHBOARD
from vtlha.errors import ConfigError, FatalError
from vtlha.service import Service, service_command
from vtlha.statuscollect import Collector, UnknownCluster, read_kv, snapshot
from vtlha_dashboard import sse
from vtlha_dashboard.actions import Actor, error, offered
from vtlha_dashboard.auth import AuthError, Operator, authenticate, load_operators
from vtlha_dashboard.timeline import Timeline

STATIC = Path(__file__).parent / "static"
#: the files the page is made of (served from the package; nothing from elsewhere)
FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
RETRY_MS = 1000  # the browser reconnects after this long when the stream ends
#: the page's own script and style only; no inline script, no other origin
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


class Dashboard(Service):
    name = "dashboard"
    http_port_key = "dashboard"
    raises_priority = False  # not on the failover path
    nats_user = DASHBOARD
    cli_options = [
        click.Option(["--operators"], default=None, type=click.Path(dir_okay=False),
                     help="The operators file (tokens' SHA-256 and NATS users); without "
                          "it the dashboard is read-only."),
        click.Option(["--tls-cert"], default=None, type=click.Path(dir_okay=False),
                     help="Serve HTTPS with this certificate (PEM; needed with --operators)."),
        click.Option(["--tls-key"], default=None, type=click.Path(dir_okay=False),
                     help="The certificate's private key (PEM)."),
        click.Option(["--refresh"], default=1.0, show_default=True,
                     type=click.FloatRange(min=0.05),
                     help="Seconds between status refreshes pushed to the page."),
        click.Option(["--timeline"], default=200, show_default=True,
                     type=click.IntRange(min=1, max=10000),
                     help="How many of the latest events the timeline keeps."),
    ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        o = self.options
        cert, key = o.get("tls_cert"), o.get("tls_key")
        if bool(cert) != bool(key):
            raise FatalError("--tls-cert and --tls-key go together")
        self._ssl: ssl.SSLContext | None = None
        if cert and key:
            try:
                self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
                self._ssl.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise FatalError(f"cannot load the TLS certificate {cert} / key {key}: "
                                 f"{exc}") from None
        self.operators: dict[str, Operator] = {}
        if o.get("operators"):
            if self._ssl is None:
                raise FatalError("--operators needs --tls-cert and --tls-key: operators' "
                                 "tokens travel over HTTPS only")
            try:
                self.operators = load_operators(o["operators"])
            except ConfigError as exc:
                raise FatalError(str(exc)) from None
        self.refresh_s = float(o.get("refresh") or 1.0)
        self.hub = sse.Hub()
        self.timeline = Timeline(lambda: self.js, self.subjects, int(o.get("timeline") or 200),
                                 self._on_event)
        self.actor = Actor(self.config, self.nats_urls, self.node)
        self.collector: Collector | None = None
        self.latest: dict[str, Any] = {"status": None, "error": "not read yet"}
        self.read_at: float | None = None
        self.browsers = Gauge("vtlha_dashboard_streams", "Browsers following the live "
                              "stream", registry=self.registry)
        self.browsers.set_function(lambda: len(self.hub.clients))
        self.actions = Counter("vtlha_dashboard_actions_total", "Operator actions asked "
                               "from the dashboard, by verb and HTTP status",
                               ["verb", "http"], registry=self.registry)
        self.version_str = self.version

    def ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl

    # ---- the service -------------------------------------------------------------
    async def start(self) -> None:
        self.collector = Collector(self.nc, self.config)
        await self.collector.start()
        self.every(self.refresh_s, self._refresh, "refresh")
        self.spawn(self.timeline.run(self._stopping), "timeline", critical=False)
        self.spawn(self._end_streams(), "streams", critical=False)

    async def _end_streams(self) -> None:
        """At SIGTERM, end the browsers' streams first: the HTTP server's shutdown waits
        for its handlers, and a stream's would otherwise last until the browser left."""
        await self._stopping.wait()
        self.hub.close()

    async def stop(self) -> None:
        self.hub.close()
        if self.collector is not None:
            await self.collector.stop()
        await self.actor.close()

    def is_ready(self) -> bool:
        return self.read_at is not None

    def status(self) -> dict[str, Any]:
        return {"streams": len(self.hub.clients), "dropped_streams": self.hub.dropped,
                "operators": len(self.operators), "https": self._ssl is not None,
                "last_read_age_s": None if self.read_at is None
                else round(time.monotonic() - self.read_at, 3),
                "error": self.latest.get("error"), "timeline_error": self.timeline.error}

    async def _refresh(self) -> None:
        assert self.collector is not None
        try:
            read = await read_kv(self.nc, self.config)
        except UnknownCluster as exc:
            self._set(None, str(exc))
            return
        except TimeoutError:
            self._set(None, f"the KV of cluster {self.config.cluster} did not answer in time")
            return
        except Exception as exc:  # NATS gone or refusing: say so on the page, log, count
            self._set(None, f"cannot read the cluster's status: {str(exc) or type(exc).__name__}")
            raise
        st = snapshot(self.config, read, self.collector, self.version_str)
        self.read_at = time.monotonic()
        self._set(st.model_dump(mode="json"), None)

    def _set(self, status: dict[str, Any] | None, err: str | None) -> None:
        if status is None and self.latest.get("status") is not None:
            status = self.latest["status"]  # keep showing the last one read, with the error
        self.latest = {"status": status, "error": err, "actions": offered(),
                       "signin": bool(self.operators)}
        self.hub.publish(sse.encode(_dumps(self.latest), event="status"))

    def _on_event(self, item: dict[str, Any]) -> None:
        self.hub.publish(sse.encode(_dumps(item), event="event", event_id=str(item["seq"])))

    # ---- HTTP ----------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self._headers)
        r = app.router
        r.add_get("/", self._page)
        r.add_get("/static/{name}", self._static)
        r.add_get("/api/status", self._api_status)
        r.add_get("/api/events", self._api_events)
        r.add_get("/api/stream", self._stream)
        r.add_get("/api/whoami", self._whoami)
        r.add_post("/api/action/{verb}", self._action)
        return app

    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resp = await handler(request)
        h = resp.headers
        h.setdefault("Content-Security-Policy", CSP)
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("Referrer-Policy", "no-referrer")
        h.setdefault("Cache-Control", "no-store")
        if self._ssl is not None:
            h.setdefault("Strict-Transport-Security", "max-age=31536000")
        return resp

    async def _page(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in FILES or name == "index.html":
            raise web.HTTPNotFound()
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        return web.Response(body=(STATIC / name).read_bytes(),
                            content_type=FILES[name], charset="utf-8")

    async def _api_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.latest, dumps=_dumps)

    async def _api_events(self, request: web.Request) -> web.Response:
        return web.json_response({"events": list(self.timeline.recent),
                                  "error": self.timeline.error}, dumps=_dumps)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        client = self.hub.join()
        try:
            # the whole picture first (again after every reconnect), then what changes
            await resp.write(sse.encode(_dumps(self.latest), event="status",
                                        retry_ms=RETRY_MS))
            for item in list(self.timeline.recent):
                await resp.write(sse.encode(_dumps(item), event="event",
                                            event_id=str(item["seq"])))
            while True:
                try:
                    frame = await asyncio.wait_for(client.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    frame = sse.comment("keepalive")
                if frame is None:
                    break  # dropped (too slow) or shutting down: the browser reconnects
                await resp.write(frame)
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the browser went away
        finally:
            self.hub.leave(client)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    def _operator(self, request: web.Request) -> Operator | web.Response:
        try:
            return authenticate(request.headers.get("Authorization"), self.operators)
        except AuthError as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=exc.status,
                                     headers={"WWW-Authenticate": 'Bearer realm="vtlha"'}
                                     if exc.status == 401 else None)

    async def _whoami(self, request: web.Request) -> web.Response:
        op = self._operator(request)
        if isinstance(op, web.Response):
            return op
        return web.json_response({"operator": op.name, "nats_user": op.nats_user})

    async def _action(self, request: web.Request) -> web.Response:
        verb = request.match_info["verb"]
        op = self._operator(request)
        if isinstance(op, web.Response):
            self.actions.labels(verb if verb in offered() else "unknown",
                                str(op.status)).inc()
            return op
        if request.content_type != "application/json":
            outcome = error(415, "send the body as application/json")
        else:
            try:
                body = await request.json(loads=orjson.loads)
            except ValueError:
                outcome = error(400, "the body is not JSON")
            else:
                outcome = await self.actor.act(verb, body, op)
        self.actions.labels(verb if verb in offered() else "unknown",
                            str(outcome.http)).inc()
        return web.json_response(outcome.body, status=outcome.http, dumps=_dumps)


main = service_command(Dashboard)

if __name__ == "__main__":
    main()
