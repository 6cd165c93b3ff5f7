"""The resource-agent runner (real processes, no mocks): exit codes, timeouts, the
environment, and the builtin tape agent's idempotent stop/monitor."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from vtlha.agents import OCF_NOT_RUNNING, AgentResult, agent_argv, run_agent
from vtlha.config import BUILTIN_TAPE_AGENT, DataGroup, Resource, parse_config


def _script(tmp_path: Path, body: str) -> str:
    p = tmp_path / "agent.sh"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


def _run(r: Resource, action: str, tmp_path: Path,
         env: dict[str, str] | None = None) -> AgentResult:
    return asyncio.run(run_agent(r, action, env or {"VTLHA_GROUP": "g"}, tmp_path / "run"))


def test_success_failure_and_not_running(tmp_path: Path) -> None:
    agent = _script(tmp_path, 'case "$1" in start) echo started;; stop) exit 0;;'
                              ' monitor) exit 7;; esac\n')
    r = Resource(name="lib", agent=agent)
    ok = _run(r, "start", tmp_path)
    assert ok.ok and ok.code == 0 and ok.detail == "started"
    mon = _run(r, "monitor", tmp_path)
    assert not mon.ok and mon.not_running and mon.code == OCF_NOT_RUNNING
    assert mon.detail == "not running"
    bad = _run(Resource(name="lib", agent=_script(tmp_path, "echo boom; exit 3\n")),
               "start", tmp_path)
    assert not bad.ok and bad.code == 3 and bad.detail == "exit 3: boom"


def test_timeout_kills_the_agent(tmp_path: Path) -> None:
    agent = _script(tmp_path, "echo $$ > \"$VTLHA_RUN_DIR/pid\"; exec sleep 30\n")
    r = Resource(name="slow", agent=agent, start_timeout=0.3)
    t0 = time.monotonic()
    res = _run(r, "start", tmp_path)
    assert not res.ok and res.code is None
    assert "did not finish within 0.3 s" in res.detail
    assert time.monotonic() - t0 < 5
    pid = int((tmp_path / "run" / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_executable_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    res = _run(Resource(name="x", agent=str(tmp_path / "nope")), "start", tmp_path)
    assert not res.ok and res.code is None and "cannot run" in res.detail


def test_environment_and_run_dir(tmp_path: Path) -> None:
    agent = _script(tmp_path, 'echo "$1 $VTLHA_ACTION $VTLHA_GROUP $VTLHA_EPOCH '
                              '$VTLHA_RESOURCE $(pwd)"\n')
    res = _run(Resource(name="lib", agent=agent), "stop", tmp_path,
               {"VTLHA_GROUP": "node-a-data", "VTLHA_EPOCH": "7"})
    assert res.detail == f"stop stop node-a-data 7 lib {tmp_path / 'run'}"


def test_builtin_tape_agent_stop_and_monitor_when_nothing_runs(tmp_path: Path) -> None:
    r = Resource()
    assert r.agent == BUILTIN_TAPE_AGENT
    assert agent_argv(r) == [sys.executable, "-m", "vtlha.tape.agent"]
    assert _run(r, "monitor", tmp_path).not_running
    stop = _run(r, "stop", tmp_path)
    assert stop.ok and "not running" in stop.detail


def test_default_resources_follow_devices() -> None:
    assert [r.name for r in DataGroup(devices=["d0"]).effective_resources()] == ["tape"]
    assert DataGroup().effective_resources() == []
    assert DataGroup(devices=["d0"], resources=[]).effective_resources() == []


def test_resource_config_errors_name_the_field() -> None:
    from vtlha.errors import ConfigError

    raw = {"cluster": "c", "nats": {"servers": ["witness"]}, "pairs": [{"name": "p", "nodes": [
        {"name": "a", "service_ip": "192.0.2.1/24", "groups": {"data": {
            "resources": [{"name": "t", "start_timeout": -1}, {"name": "t"}]}}},
        {"name": "b", "service_ip": "192.0.2.2/24"}]}]}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "c.yaml")
    assert "pairs[0].nodes[0].groups.data.resources[0].start_timeout" in str(e.value)
    raw["pairs"][0]["nodes"][0]["groups"]["data"]["resources"][0]["start_timeout"] = 5
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "c.yaml")
    assert "resource names must be unique" in str(e.value)


@pytest.mark.parametrize(("ignores_term", "said"), [(False, "stopped"), (True, "killed")])
def test_builtin_tape_agent_stops_a_running_service_in_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ignores_term: bool,
        said: str) -> None:
    """The storage-monitor runs the built-in agent's ``stop`` in its own process: the
    service gets SIGTERM (SIGKILL after the grace), is gone when the stop returns, and
    its pid and ready files are removed — what ``python -m vtlha.tape.agent stop`` does."""
    import subprocess

    from vtlha.tape import agent
    monkeypatch.setattr(agent, "STOP_GRACE", 0.3)
    code = ("import signal, sys, time\n"
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignores_term else "")
            + "print('up', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        run = tmp_path / "run"
        run.mkdir()
        (run / "pid").write_text(f"{proc.pid} 3")
        (run / "ready").write_text(str(proc.pid))
        res = _run(Resource(), "stop", tmp_path)
        assert res.ok and res.code == 0 and f"tape service {proc.pid} {said}" in res.detail
        assert proc.wait(5) == (-9 if ignores_term else -15)
        assert not (run / "pid").exists() and not (run / "ready").exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _service_env(tmp_path: Path) -> dict[str, str]:
    """An environment the tape service cannot start with (its cluster file is missing):
    it exits before it is ready, after the start has shown which process it was."""
    return {**os.environ, "VTLHA_CONFIG": str(tmp_path / "missing.yaml"),
            "VTLHA_NODE": "node-b", "VTLHA_GROUP": "node-a-data", "VTLHA_EPOCH": "4",
            "VTLHA_DEVICES": "vtl-a0", "VTLHA_PORTAL": "127.0.0.1:1",
            "VTLHA_RUN_DIR": str(tmp_path / "run")}


def test_a_start_hands_the_prepared_standby_its_environment(tmp_path: Path) -> None:
    """The storage-monitor prepares a standby tape service (imports done, waiting on its
    stdin); the next start is that process, given the start's environment — and a start
    with no standby starts a new interpreter, as ``python -m vtlha.tape.agent start``."""
    from vtlha.tape import agent
    run = tmp_path / "run"
    env = _service_env(tmp_path)
    try:
        pid = agent.prepare_standby(run, env)
        assert agent.prepare_standby(run, env) == pid  # one standby per run directory
        code, said = agent.start_service(run, env, wait=30)
        assert code == 1 and said.startswith("tape service (standby) exited 1")
        assert "missing.yaml" in said  # it ran with the environment it was handed
        assert (run / "pid").read_text() == f"{pid} 4"
        code, said = agent.start_service(run, env, wait=30)  # no standby now
        assert code == 1 and said.startswith("tape service exited 1")
        assert (run / "pid").read_text().split()[0] != str(pid)
    finally:
        agent.drop_standbys()


def test_a_standby_leaves_when_its_stdin_closes_and_a_dead_one_is_not_used(
        tmp_path: Path) -> None:
    from vtlha.tape import agent
    run = tmp_path / "run"
    env = _service_env(tmp_path)
    try:
        agent.prepare_standby(run, env)
        sb = agent._standby[run]
        agent.drop_standbys()
        assert sb.wait(30) == 0 and run not in agent._standby
        # a standby that died (killed) is replaced by a new interpreter at the start
        agent.prepare_standby(run, env)
        sb = agent._standby[run]
        sb.kill()
        sb.wait(10)
        code, said = agent.start_service(run, env, wait=30)
        assert code == 1 and said.startswith("tape service exited 1"), said
        assert (run / "pid").read_text().split()[0] != str(sb.pid)
    finally:
        agent.drop_standbys()


def test_the_builtin_start_runs_in_process_and_uses_the_standby(tmp_path: Path) -> None:
    from vtlha.agents import drop_prepared, prepare
    run = tmp_path / "run"
    env = _service_env(tmp_path)
    try:
        pid = prepare(Resource(), run, env)
        assert pid is not None
        assert prepare(Resource(name="lib", agent="/bin/true"), run, env) is None
        res = asyncio.run(run_agent(Resource(start_timeout=30), "start", env, run))
        assert not res.ok and res.code == 1
        assert res.detail.startswith("exit 1: tape service (standby) exited 1")
        assert (run / "pid").read_text() == f"{pid} 4"
    finally:
        drop_prepared()


@pytest.mark.parametrize(("line", "why"), [
    (b"{not json\n", "not JSON"), (b"[1]\n", "an object of strings"),
    (b'{"VTLHA_EPOCH": 4}\n', "an object of strings")])
def test_a_standby_refuses_a_bad_environment_line(line: bytes, why: str) -> None:
    from vtlha.tape.service import standby_environment
    with pytest.raises(ValueError, match=why):
        standby_environment(line)
    assert standby_environment(b'{"VTLHA_EPOCH": "4"}\n') == {"VTLHA_EPOCH": "4"}
