"""The services raise their scheduling priority when the host allows it, and say so
when it does not (vtlha.priority)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from vtlha.config import Scheduling
from vtlha.priority import raise_priority

IS_ROOT = os.geteuid() == 0
LOG = logging.getLogger("test")


def test_the_default_nice_value_is_raised_priority() -> None:
    assert Scheduling().nice == -10


@pytest.mark.root
def test_root_raises_a_processs_priority_and_never_lowers_it() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        start = os.getpriority(os.PRIO_PROCESS, child.pid)  # the caller's (`nice` may run us)
        assert raise_priority(-7, LOG, child.pid)
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == -7 < start
        assert raise_priority(5, LOG, child.pid)  # lower: left as it is
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == -7
    finally:
        child.kill()
        child.wait()


def test_without_the_right_it_warns_and_goes_on() -> None:
    """As a normal user (root drops to nobody for this): False, one warning naming
    CAP_SYS_NICE, the priority unchanged."""
    code = ("import logging, os, sys; from vtlha.priority import raise_priority; "
            "logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "ok = raise_priority(-10, logging.getLogger('t')); "
            "print('result', ok, os.getpriority(os.PRIO_PROCESS, 0))")
    argv = [sys.executable, "-c", code]
    if IS_ROOT:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert "CAP_SYS_NICE" in out.stdout
    # unchanged: the niceness this test runs at (0, or what `nice` gave it)
    assert out.stdout.strip().endswith(f"result False {os.getpriority(os.PRIO_PROCESS, 0)}")


@pytest.mark.root
def test_the_exec_wrapper_runs_a_program_at_the_absolute_nice_value() -> None:
    """``python3 -m vtlha.priority NICE CMD``: absolute (from a niced parent too), then
    exec; a bad call is refused with usage."""
    code = "import os; print('nice', os.getpriority(os.PRIO_PROCESS, 0), os.getpid())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = ["nice", "-n", "5", sys.executable, "-c",
            "import os, sys; print(os.getpid(), flush=True); "
            f"os.execvp(sys.executable, [sys.executable, '-m', 'vtlha.priority', '-7', "
            f"sys.executable, '-c', {code!r}])"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("\n")[:2]
    assert second == f"nice -7 {first}"  # the same process, exec'd, at -7 (not 5 - 7)
    bad = subprocess.run([sys.executable, "-m", "vtlha.priority", "x", "true"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "usage" in bad.stderr
