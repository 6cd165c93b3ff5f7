"""Resource agents: executables run as ``AGENT start|stop|monitor`` (as Pacemaker's
resource agents), each with a timeout.

The agent learns what to act on from its environment:

=====================  ===========================================================
``VTLHA_ACTION``       start, stop or monitor (also the first argument)
``VTLHA_CLUSTER``      the cluster's name
``VTLHA_NODE``         the node it runs on (the group's owner)
``VTLHA_GROUP``        the data group
``VTLHA_EPOCH``        the group's epoch: the data service writes at this epoch, and
                       the SAN target refuses it once another node preempted
``VTLHA_DEVICES``      the group's devices, comma-separated
``VTLHA_RESOURCE``     the resource's name in the cluster file
``VTLHA_PORTAL``       ``host:port`` the data service listens on
``VTLHA_SAN_HOST``     the SAN target's address; ``VTLHA_SAN_PORT`` its port base
``VTLHA_SAN_KIND``     the cluster file's ``san.kind`` (reference, iscsi)
``VTLHA_PERMIT_FILE``  iSCSI: the hold rule's permit for the group at the epoch
                       (``vtlha.iscsi.permitfile``): register, reserve and
                       acknowledge writes only while it is valid
``VTLHA_CONFIG``       the cluster file
``VTLHA_RUN_DIR``      a directory of the resource's own (pid file, logs)
=====================  ===========================================================

Exit status: 0 is success; for ``monitor``, 0 is running and 7 (OCF_NOT_RUNNING) is
not running; anything else, or no exit within the timeout (the agent is then killed),
is a failure. The agent runs in the storage-monitor's process group, so what it
starts stops with the storage-monitor's container."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vtlha.config import BUILTIN_TAPE_AGENT, Resource

OCF_NOT_RUNNING = 7
OUTPUT_LIMIT = 2000  # characters of an agent's output kept for the report


@dataclass(frozen=True)
class AgentResult:
    action: str
    resource: str
    ok: bool
    code: int | None  # None: timed out (killed) or could not be run
    seconds: float
    detail: str

    @property
    def not_running(self) -> bool:
        return self.action == "monitor" and self.code == OCF_NOT_RUNNING


def agent_argv(resource: Resource) -> list[str]:
    if resource.agent == BUILTIN_TAPE_AGENT:
        return [sys.executable, "-m", "vtlha.tape.agent"]
    return [resource.agent]


def _timeout(resource: Resource, action: str) -> float:
    return {"start": resource.start_timeout, "stop": resource.stop_timeout,
            "monitor": resource.monitor_timeout}[action]


async def run_agent(resource: Resource, action: str, env: dict[str, str],
                    run_dir: Path) -> AgentResult:
    """Run one agent action with its timeout; never raises for the agent's failures."""
    os.makedirs(run_dir, exist_ok=True)
    argv = [*agent_argv(resource), action]
    full_env = {**os.environ, **env, "VTLHA_ACTION": action, "VTLHA_RUN_DIR": str(run_dir),
                "VTLHA_RESOURCE": resource.name}
    timeout = _timeout(resource, action)
    t0 = time.monotonic()
    if resource.agent == BUILTIN_TAPE_AGENT and action == "stop":
        return await _builtin_stop(resource, run_dir, timeout, t0)
    if resource.agent == BUILTIN_TAPE_AGENT and action == "start":
        return await _builtin_start(resource, run_dir, full_env, timeout, t0)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=full_env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            cwd=str(run_dir))
    except OSError as exc:
        return AgentResult(action, resource.name, False, None, time.monotonic() - t0,
                           f"cannot run {argv[0]}: {exc.strerror or exc}")
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 1.0)
        return AgentResult(action, resource.name, False, None, time.monotonic() - t0,
                           f"{action} of {resource.name} did not finish within {timeout} s "
                           "(killed)")
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    text = out.decode(errors="replace").strip()[-OUTPUT_LIMIT:]
    code = proc.returncode
    ok = code == 0
    detail = text or f"exit {code}"
    if not ok and action == "monitor" and code == OCF_NOT_RUNNING:
        detail = f"not running ({text})" if text else "not running"
    elif not ok:
        detail = f"exit {code}: {text}" if text else f"exit {code}"
    return AgentResult(action, resource.name, ok, code, time.monotonic() - t0, detail)


async def _builtin_stop(resource: Resource, run_dir: Path, timeout: float,
                        t0: float) -> AgentResult:
    """The built-in tape agent's ``stop``, in this process (a thread: it polls for the
    service's end): the same work and result as ``python -m vtlha.tape.agent stop``
    without starting an interpreter for it — a release waits on this."""
    from vtlha.tape.agent import stop_service
    try:
        said = await asyncio.wait_for(asyncio.to_thread(stop_service, run_dir), timeout)
    except TimeoutError:
        return AgentResult("stop", resource.name, False, None, time.monotonic() - t0,
                           f"stop of {resource.name} did not finish within {timeout} s")
    except OSError as exc:
        return AgentResult("stop", resource.name, False, 1, time.monotonic() - t0,
                           f"exit 1: {exc}")
    return AgentResult("stop", resource.name, True, 0, time.monotonic() - t0, said)


async def _builtin_start(resource: Resource, run_dir: Path, env: dict[str, str],
                         timeout: float, t0: float) -> AgentResult:
    """The built-in tape agent's ``start``, in this process (a thread: it polls for the
    service's ready file): the work and result of ``python -m vtlha.tape.agent start``,
    and the service is the standby ``prepare`` left waiting when there is one."""
    from vtlha.tape.agent import start_service
    try:
        code, said = await asyncio.wait_for(
            asyncio.to_thread(start_service, run_dir, env, timeout), timeout + 1.0)
    except TimeoutError:
        code, said = None, ""
    except OSError as exc:
        return AgentResult("start", resource.name, False, 1, time.monotonic() - t0,
                           f"exit 1: {exc}")
    if code is None or said == "tape service not ready in time":
        return AgentResult("start", resource.name, False, None, time.monotonic() - t0,
                           f"start of {resource.name} did not finish within {timeout} s")
    return AgentResult("start", resource.name, code == 0, code, time.monotonic() - t0,
                       said if code == 0 else f"exit {code}: {said}")


def prepare(resource: Resource, run_dir: Path, env: dict[str, str]) -> int | None:
    """Get the resource's next start ready ahead, where its agent can: for the built-in
    tape agent, a standby service waiting in ``run_dir`` (its pid); None for others.
    An OSError (it could not be started) is the caller's to log: a start without a
    standby starts the service the slow way."""
    if resource.agent != BUILTIN_TAPE_AGENT:
        return None
    from vtlha.tape.agent import prepare_standby
    return prepare_standby(run_dir, {**os.environ, **env, "VTLHA_RUN_DIR": str(run_dir),
                                     "VTLHA_RESOURCE": resource.name})


def drop_prepared() -> None:
    """Let every standby this process prepared go (at its stop)."""
    from vtlha.tape.agent import drop_standbys
    drop_standbys()
