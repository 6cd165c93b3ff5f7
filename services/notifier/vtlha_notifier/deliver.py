"""One event to one target: an executable run or a webhook POST, each attempt bounded by
the target's ``timeout``, tried up to ``attempts`` times with exponential backoff
(tenacity). Every failed attempt and every event given up on is logged as one JSON line
and counted; nothing here raises to the caller but cancellation.

The interface a script or a webhook sees is ``docs/notifications.md``'s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from vtlha.messages import Event, encode
from vtlha.notifyconfig import ExecTarget, WebhookTarget, render_argv

#: bytes of a failed script's stderr (its tail) or a webhook's answer kept for the log
DETAIL_BYTES = 2048
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_AGENT = "vtl-ha notifier"


class AttemptFailed(Exception):
    """One attempt failed; ``result`` is its metric label, ``retryable`` whether another
    attempt may help."""

    def __init__(self, result: str, detail: str, retryable: bool = True) -> None:
        super().__init__(detail)
        self.result = result
        self.detail = detail
        self.retryable = retryable


@dataclass(frozen=True)
class Delivery:
    """What a target is called with: the event, its stream sequence and how many times
    JetStream has handed it out (above 1: a notifier stopped during an earlier delivery,
    which may have reached the target)."""

    event: Event
    seq: int
    delivered: int = 1


@dataclass(frozen=True)
class Outcome:
    ok: bool
    attempts: int
    seconds: float
    error: str | None = None


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.notifications = Counter(
            "vtlha_notifications_total", "Events a target was called for, by outcome "
            "(ok: an attempt succeeded; failed: every attempt failed, or a failure that "
            "no retry helps)", ["target", "result"], registry=registry)
        self.attempts = Counter(
            "vtlha_notification_attempts_total", "Attempts to call a target, by result "
            "(ok, timeout, exit, http, connect, spawn, error)", ["target", "result"],
            registry=registry)
        self.duration = Histogram(
            "vtlha_notification_duration_seconds", "From an event's first attempt to its "
            "outcome, retries included", ["target"], registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300))
        self.running = Gauge("vtlha_notifications_running", "Deliveries under way",
                             ["target"], registry=registry)


def event_fields(d: Delivery, target: str, attempt: int) -> dict[str, Any]:
    """The values of a command's placeholders (and of the ``VTLHA_*`` variables)."""
    e = d.event
    return {"kind": e.kind, "id": e.id, "seq": d.seq, "cluster": e.cluster, "pair": e.pair,
            "group": e.group, "old": e.old, "new": e.new, "term": e.term, "epoch": e.epoch,
            "node": e.node, "reason": e.reason, "target": target, "attempt": attempt}


def script_env(target: ExecTarget, d: Delivery, attempt: int) -> dict[str, str]:
    """A clean environment: PATH and LANG, the target's ``env``, then ``VTLHA_<FIELD>``
    for every field (empty when the event has none) and ``VTLHA_DELIVERY``. Nothing of the
    service's own environment (its NATS credential's path) reaches the script."""
    env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), "LANG": "C.UTF-8", **target.env}
    for key, value in event_fields(d, target.name, attempt).items():
        env[f"VTLHA_{key.upper()}"] = "" if value is None else str(value)
    env["VTLHA_SENT_AT"] = repr(d.event.sent_at)
    env["VTLHA_DELIVERY"] = str(d.delivered)
    return env


class Deliverer:
    def __init__(self, registry: CollectorRegistry, log: logging.Logger) -> None:
        self.metrics = Metrics(registry)
        self.log = log
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
        return self._session

    async def deliver(self, target: ExecTarget | WebhookTarget, d: Delivery) -> Outcome:
        """Call ``target`` for ``d`` until an attempt succeeds, a failure no retry helps,
        or ``target.attempts`` attempts; log and count the outcome."""
        started = time.monotonic()
        attempt = 0
        labels = self.metrics.running.labels(target.name)
        labels.inc()
        try:
            async for tries in AsyncRetrying(
                stop=stop_after_attempt(target.attempts),
                wait=wait_exponential(multiplier=target.backoff, max=target.max_backoff),
                retry=retry_if_exception(lambda e: isinstance(e, AttemptFailed)
                                         and e.retryable),
                before_sleep=lambda rs: self._retrying(target, d, rs),
                reraise=True,
            ):
                with tries:
                    attempt = tries.retry_state.attempt_number
                    await self._attempt(target, d, attempt)
        except AttemptFailed as exc:
            return self._gave_up(target, d, attempt, started, exc)
        finally:
            labels.dec()
        took = time.monotonic() - started
        self.metrics.notifications.labels(target.name, "ok").inc()
        self.metrics.duration.labels(target.name).observe(took)
        self.log.info("notification sent", extra={
            "target": target.name, "event_kind": d.event.kind, "event_id": d.event.id,
            "seq": d.seq, "attempts": attempt, "seconds": round(took, 3)})
        return Outcome(True, attempt, took)

    async def _attempt(self, target: ExecTarget | WebhookTarget, d: Delivery,
                       attempt: int) -> None:
        try:
            if isinstance(target, ExecTarget):
                await run_script(target, d, attempt)
            else:
                await post_webhook(self.session(), target, d, attempt)
        except AttemptFailed as exc:
            self.metrics.attempts.labels(target.name, exc.result).inc()
            raise
        except Exception as exc:  # anything else is this attempt's failure, never a crash
            self.metrics.attempts.labels(target.name, "error").inc()
            raise AttemptFailed("error", repr(exc)) from exc
        self.metrics.attempts.labels(target.name, "ok").inc()

    def _retrying(self, target: ExecTarget | WebhookTarget, d: Delivery,
                  rs: RetryCallState) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
        self.log.warning("notification attempt failed, retrying", extra={
            "target": target.name, "event_kind": d.event.kind, "event_id": d.event.id,
            "seq": d.seq, "attempt": rs.attempt_number, "of": target.attempts,
            "result": getattr(exc, "result", "error"), "error": str(exc),
            "retry_in_s": round(rs.upcoming_sleep, 3)})

    def _gave_up(self, target: ExecTarget | WebhookTarget, d: Delivery, attempt: int,
                 started: float, exc: AttemptFailed) -> Outcome:
        took = time.monotonic() - started
        self.metrics.notifications.labels(target.name, "failed").inc()
        self.metrics.duration.labels(target.name).observe(took)
        self.log.error("notification FAILED", extra={
            "target": target.name, "event_kind": d.event.kind, "event_id": d.event.id,
            "seq": d.seq, "attempts": attempt, "of": target.attempts, "result": exc.result,
            "error": exc.detail, "retryable": exc.retryable, "seconds": round(took, 3)})
        return Outcome(False, attempt, took, exc.detail)


async def run_script(target: ExecTarget, d: Delivery, attempt: int) -> None:
    """Run the target's command once: the event's JSON on stdin, its own process group
    (killed whole at the timeout), stderr kept for the log. Raises AttemptFailed."""
    argv = render_argv(target.command, event_fields(d, target.name, attempt))
    with tempfile.TemporaryFile() as err:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=err, env=script_env(target, d, attempt), start_new_session=True)
        except OSError as exc:  # missing, not executable: the next attempt may find it
            raise AttemptFailed("spawn", f"cannot run {argv[0]}: {exc}") from None
        feed = asyncio.create_task(_feed(proc, encode(d.event) + b"\n"))
        try:
            async with asyncio.timeout(target.timeout):
                code = await proc.wait()
        except TimeoutError:
            raise AttemptFailed("timeout", f"{argv[0]} still running after "
                                f"{target.timeout:g} s: killed (its process group)") from None
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
                await proc.wait()
            feed.cancel()
            await asyncio.gather(feed, return_exceptions=True)
        if code != 0:
            err.seek(max(0, err.seek(0, os.SEEK_END) - DETAIL_BYTES))
            tail = err.read().decode(errors="replace").strip()
            raise AttemptFailed("exit", f"{argv[0]} exited {code}" + (f": {tail}" if tail
                                                                       else ""))


async def _feed(proc: asyncio.subprocess.Process, body: bytes) -> None:
    """Write the event to the script's stdin and close it; a script that does not read
    it (exits first) is fine."""
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(body)
        await proc.stdin.drain()
        proc.stdin.close()
        await proc.stdin.wait_closed()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def post_webhook(session: aiohttp.ClientSession, target: WebhookTarget, d: Delivery,
                       attempt: int) -> None:
    """POST the event's JSON to the target's URL once. Raises AttemptFailed: retryable
    for no answer, 408, 429 and 5xx; not for any other non-2xx answer."""
    headers = {"Content-Type": "application/json", "X-Vtlha-Event-Id": d.event.id,
               "X-Vtlha-Event-Kind": d.event.kind, "X-Vtlha-Event-Seq": str(d.seq),
               "X-Vtlha-Attempt": str(attempt), "X-Vtlha-Delivery": str(d.delivered),
               **target.headers}
    try:
        async with session.post(target.url, data=encode(d.event), headers=headers,
                                timeout=aiohttp.ClientTimeout(total=target.timeout),
                                allow_redirects=False) as resp:
            body = await resp.content.read(DETAIL_BYTES)
            status = resp.status
    except TimeoutError:
        raise AttemptFailed("timeout", f"no answer from {target.url} within "
                            f"{target.timeout:g} s") from None
    except aiohttp.ClientError as exc:
        raise AttemptFailed("connect", f"{target.url}: {exc!r}") from None
    if 200 <= status < 300:
        return
    text = body.decode(errors="replace").strip()
    raise AttemptFailed("http", f"{target.url} answered {status}" + (f": {text}" if text
                                                                     else ""),
                        retryable=status in (408, 429) or status >= 500)
