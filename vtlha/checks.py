"""Process-health checks the heartbeat service runs: a pid file's process alive, a TCP
port accepting, a command's exit status. Each has a timeout; none raises.

What the heartbeat reports is not one run's result but the check's state after
hysteresis (rule 7, ``Debounce``): it changes only after ``fall`` failing or ``rise``
passing runs in a row (check runs, every ``check_interval``; never heartbeats). The
first run sets the state directly, as the storage-monitor's path probes do: there is no
history to be hysteretic about, and a check that fails from the start is reported at
once. While a change is being debounced the detail says so ("failing 1 of 2 before it
counts: ...").

Built-in checks (rule 8, ``ExecutorLiveness``): one **fatal** check per local executor,
"executor ip-manager alive" and "executor storage-monitor alive" (the latter only when
the node's pair has storage devices), unless the node's ``executor_checks`` is off. The
heartbeat asks the executor over NATS (``Subjects.ping``, request/reply, timeout
``min(check_interval, command_timeout)``: an executor that cannot answer that fast
cannot answer the arbiter's commands either); an answer is a pass, no responder or no
answer in time is a failure, and both go through the same hysteresis. A request
during which the heartbeat's own NATS connection was down or reconnected measured
nothing and is not counted.

Start-up grace: at a node's start the executors may come up after the heartbeat. Until
an executor has answered once, its failures are not counted for
``EXECUTOR_START_GRACE`` seconds from the heartbeat's first check run; meanwhile the
check is reported passing with the detail "starting: ...". After its first answer, or
once the grace has run out, every run counts (a check still failing when the grace
runs out is reported failing at once: it has failed for the whole grace)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import nats.errors
from nats.aio.client import Client as NATS

from vtlha.config import Check, ClusterConfig
from vtlha.errors import InvalidMessage
from vtlha.health import Hysteresis
from vtlha.messages import CheckResult, Pong, decode

#: seconds from the heartbeat's first check run during which an executor that has not
#: answered yet is "starting", not failing (process start, NATS connect, its KV
#: reconcile at a cluster's start: a few seconds; this leaves room for a loaded host)
EXECUTOR_START_GRACE = 20.0

#: the executors the heartbeat checks, in the order they are reported
EXECUTORS = ("ip-manager", "storage-monitor")


def _pid_alive(path: str) -> tuple[bool, str]:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        return False, f"cannot read pid file {path}: {exc.strerror}"
    try:
        pid = int(text.split()[0])
    except (ValueError, IndexError):
        return False, f"pid file {path} holds no pid"
    if pid <= 0:  # kill(0) and kill(-1) would signal process groups, not one process
        return False, f"pid file {path} holds an invalid pid {pid}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, f"process {pid} from {path} is not running"
    except PermissionError:
        return True, f"process {pid} runs (other user)"
    return True, f"process {pid} runs"


async def _tcp(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        return False, f"{host}:{port} refused or timed out: {exc!r}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, f"{host}:{port} accepts"


async def _command(argv: list[str], timeout: float) -> tuple[bool, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
    except OSError as exc:
        return False, f"cannot run {argv[0]}: {exc.strerror}"
    try:
        rc = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"{argv[0]} timed out after {timeout} s"
    return rc == 0, f"{argv[0]} exited {rc}"


async def run_check(check: Check) -> CheckResult:
    if check.kind == "pidfile":
        assert check.path is not None
        ok, detail = _pid_alive(check.path)
    elif check.kind == "tcp":
        assert check.port is not None
        ok, detail = await _tcp(check.host, check.port, check.timeout)
    else:
        assert check.command is not None
        ok, detail = await _command(check.command, check.timeout)
    return CheckResult(name=check.name, ok=ok, fatal=check.fatal, detail=detail)


# ---- hysteresis over check runs (rule 7) ------------------------------------------


class Debounce:
    """One check's runs through a ``Hysteresis``: gives the result to report. Feed it
    one result per check run."""

    def __init__(self, rise: int, fall: int) -> None:
        self.h = Hysteresis(rise, fall)

    @property
    def changed(self) -> bool:
        """Whether the latest run changed the reported state (the first run does)."""
        return self.h.changed

    def update(self, run: CheckResult) -> CheckResult:
        state = self.h.update(run.ok)
        detail = run.detail
        if self.h.streak:
            verb, need = ("passing", self.h.rise) if run.ok else ("failing", self.h.fall)
            detail = f"{verb} {self.h.streak} of {need} before it counts: {run.detail}"
        return CheckResult(name=run.name, ok=state, fatal=run.fatal, detail=detail)


# ---- executor liveness (rule 8) ----------------------------------------------------


def executor_check_name(service: str) -> str:
    """The built-in check's name. It has spaces, so no configured check (whose names
    are ``[a-z0-9-]+``) can be called the same."""
    return f"executor {service} alive"


def checked_executors(config: ClusterConfig, node: str) -> list[str]:
    """The local executors whose liveness the heartbeat of ``node`` checks: none when
    the node's ``executor_checks`` is off; the ip-manager (it holds every floating
    address); the storage-monitor when the node's pair has storage devices (without
    any, it serves and watches nothing)."""
    n = config.node(node)
    if not n.executor_checks:
        return []
    pair = config.pair_of(node)
    has_devices = any(m.groups.data.devices for m in pair.nodes)
    return [s for s in EXECUTORS if s != "storage-monitor" or has_devices]


def ping_timeout(config: ClusterConfig) -> float:
    t = config.timings
    return min(t.check_interval, t.command_timeout)


async def ping_executor(nc: NATS, subject: str, node: str, service: str,
                        timeout: float) -> tuple[bool | None, str]:
    """Ask one executor whether it runs: (True, detail) when it answered, (False, why)
    when it did not, (None, why) when this side's own connection was down or
    reconnected meanwhile (nothing was measured). Never raises."""
    reconnects = nc.stats["reconnects"]
    started = time.monotonic()
    try:
        if not nc.is_connected:
            raise nats.errors.ConnectionReconnectingError
        msg = await nc.request(subject, b"", timeout=timeout)
        pong = decode(Pong, msg.data)
    except nats.errors.NoRespondersError:
        ok, detail = False, f"{service} does not answer: no responder on {subject}"
    except (nats.errors.TimeoutError, TimeoutError):
        ok, detail = False, f"{service} did not answer within {timeout:g} s"
    except InvalidMessage as exc:
        ok, detail = False, f"{service} answered nonsense: {exc}"
    except nats.errors.Error as exc:
        ok, detail = False, f"{service} not asked: {exc!r}"
    else:
        if pong.service != service or pong.node != node:
            ok, detail = False, f"{pong.service} on {pong.node} answered for {service}"
        else:
            took = (time.monotonic() - started) * 1000
            ok, detail = True, (f"{service} answered in {took:.1f} ms (pid {pong.pid}, up "
                                f"{pong.uptime:.1f} s{'' if pong.ready else ', not ready'})")
    if not ok and (not nc.is_connected or nc.stats["reconnects"] != reconnects):
        return None, f"not measured: this heartbeat's NATS connection was down ({detail})"
    return ok, detail


class ExecutorLiveness:
    """The built-in fatal check "executor <service> alive": ping results through a
    ``Debounce``, with the start-up grace (module docstring). Pure: the caller passes
    each run's outcome and the time."""

    def __init__(self, service: str, rise: int, fall: int, grace: float,
                 started_at: float) -> None:
        self.service = service
        self.name = executor_check_name(service)
        self.debounce = Debounce(rise, fall)
        self.grace_until = started_at + grace
        self.answered = False  # since this heartbeat started
        self.reported: CheckResult | None = None  # after the last counted run
        self.changed = False

    def update(self, ok: bool | None, detail: str, now: float) -> CheckResult:
        """Take one run's outcome (None: not measured) and return what to report;
        ``changed`` says whether the reported state moved."""
        self.changed = False
        if ok:
            self.answered = True
        if ok is not None and (self.answered or now >= self.grace_until):
            self.reported = self.debounce.update(
                CheckResult(name=self.name, ok=ok, fatal=True, detail=detail))
            self.changed = self.debounce.changed
            return self.reported
        if self.reported is not None:  # not measured: the state stands
            return self.reported.model_copy(update={"detail": detail})
        if now >= self.grace_until:
            return CheckResult(name=self.name, ok=True, fatal=True,
                               detail=f"nothing measured yet: {detail}")
        return CheckResult(name=self.name, ok=True, fatal=True,
                           detail=f"starting: {detail} (not counted for another "
                           f"{self.grace_until - now:.1f} s unless it answers)")
