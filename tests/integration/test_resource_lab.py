"""A failed resource in the network lab (the chaos fault ``kill-tape-service``, for
real): the tape data service of node-a-data is SIGKILLed on node-a while a client in the
client namespace writes blocks to the group's portal.

- The first failure is recovered on node-a: its storage-monitor's monitor finds the
  service gone, runs the agent's ``stop`` then ``start`` (``storage.agent_failed``,
  ``storage.resource_restarted``), and the portal acknowledges blocks from node-a again;
  nothing moves.
- Killed again (the second failure within ``failure_timeout``: ``migration_threshold``
  2 reached), node-a gives the group up (reported ``failed``) and the arbiter's storage
  rule moves it to node-b: the KV owner changes, node-b serves the portal, the
  management group stays, and no acknowledged block is lost.

Short monitor intervals (0.5 s) make it run in seconds."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.conftest import lab_config
from tests.integration.test_storage_lab import (
    Writer,
    _check_blocks,
    _no_write_from_a_after_b_took,
    _served,
    _storage,
)
from vtlha.messages import Event
from vtlha_lab.chaos.inject import Ctx, kill_tape_service
from vtlha_lab.lab import Lab

pytestmark = pytest.mark.root

GROUP = "node-a-data"
TAPE = {"name": "tape", "agent": "builtin:tape", "monitor_interval": 0.5,
        "monitor_timeout": 2.0, "stop_timeout": 5.0, "start_timeout": 15.0}


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    """The example cluster with node-a's data group monitored every 0.5 s (the
    defaults otherwise: migration_threshold 2, failure_timeout 600 s)."""

    def edit(raw: dict[str, Any]) -> None:
        raw["pairs"][0]["nodes"][0]["groups"]["data"]["resources"] = [dict(TAPE)]

    the_lab = Lab(lab_config(request, tmp_path, edit), tmp_path)
    try:
        yield the_lab
    finally:
        the_lab.stop()


def _tape_pid(lab: Lab, host: str) -> int:
    """The pid of node-a-data's tape service on ``host`` (the agent's pid file), checked
    against the process's command line."""
    text = (lab.state_root / host / "resources" / GROUP / "tape" / "pid").read_text()
    pid = int(text.split()[0])
    assert b"vtlha.tape.service" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return pid


def _standbys(lab: Lab, host: str) -> list[int]:
    """The standby tape services waiting on ``host`` (none of them in a pid file)."""
    out = subprocess.run(["ip", "netns", "pids", lab.ns(host)], capture_output=True,
                         text=True, timeout=5, check=True).stdout
    found = []
    for pid in map(int, out.split()):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"vtlha.tape.service" in cmd and b"--standby" in cmd:
                found.append(pid)
    serving = {int(p.read_text().split()[0])
               for p in (lab.state_root / host / "resources").glob("*/*/pid")}
    return [p for p in found if p not in serving]


class _Only(random.Random):
    """The chaos context's choice of node, fixed."""

    def __init__(self, node: str) -> None:
        super().__init__(0)
        self.node = node

    def choice(self, seq: Any) -> Any:
        return self.node


def _events(lab: Lab, kind: str, since: float, node: str | None = None) -> list[Event]:
    return [e for e in lab.events() if e.kind == kind and e.group == GROUP
            and e.sent_at >= since and (node is None or e.node == node)]


def _acked_by_after(w: Writer, node: str, t: float, n: int) -> bool:
    return sum(1 for a in w.acks().values() if a["node"] == node and a["sent"] >= t) >= n


def test_a_killed_tape_service_is_restarted_then_its_group_moves(lab: Lab) -> None:
    lab.start()
    lab.wait_for(lambda: _served(lab, "node-a", GROUP, 1) and
                 _served(lab, "node-b", "node-b-data", 1), 60,
                 what="each node to serve its data group's storage")
    w = Writer(lab, "writer")
    try:
        w.wait_acked_by("node-a", 30, 20)

        # (a) the first failure (the chaos fault itself): restarted on node-a, served
        # again there, nothing moves; node-a's standby for node-b-data is left alone
        first = _tape_pid(lab, "node-a")
        standbys = _standbys(lab, "node-a")
        assert standbys  # node-a keeps one for its companion's group
        t_kill = time.time()
        fault = kill_tape_service(Ctx(lab, cast(Any, None), _Only("node-a")))
        assert fault.detail == {"host": "node-a", "pids": [first]}
        assert all(Path(f"/proc/{pid}").exists() for pid in standbys)
        (restarted,) = lab.wait_for(
            lambda: _events(lab, "storage.resource_restarted", t_kill, "node-a"), 30,
            interval=0.2, what="storage.resource_restarted on node-a")
        failed = _events(lab, "storage.agent_failed", t_kill, "node-a")
        assert [(e.data["action"], e.data["failures"], e.data["next"]) for e in failed] == [
            ("monitor", 1, "restart")]
        assert restarted.epoch == 1 and restarted.data["failures"] == 1
        assert _tape_pid(lab, "node-a") != first
        lab.wait_for(lambda: _acked_by_after(w, "node-a", restarted.sent_at, 20), 30,
                     interval=0.1, what="blocks acknowledged by node-a after the restart")
        print(f"restart: node-a acknowledging again {time.time() - t_kill:.2f} s after "
              f"the kill (restart took {restarted.data['seconds']} s)")
        assert lab.held_by()[GROUP] == "node-a"
        assert not [e for e in lab.events() if e.kind.startswith("failover.")]
        st = _storage(lab, "node-a")
        assert st["groups"][GROUP]["state"] == "served"
        assert st["failures"] == {GROUP: {"tape": 1}}

        # (b) the second failure within failure_timeout: node-a gives the group up and
        # the arbiter moves it to node-b
        t_kill2 = time.time()
        os.kill(_tape_pid(lab, "node-a"), signal.SIGKILL)
        w.wait_acked_by("node-b", 30, 30)
        print(f"move: node-b acknowledging {time.time() - t_kill2:.2f} s after the "
              f"second kill")
        given_up = _events(lab, "storage.agent_failed", t_kill2, "node-a")
        assert [(e.data["failures"], e.data["next"]) for e in given_up] == [(2, "give_up")]
        assert "migration_threshold 2 reached" in given_up[0].reason
        (started,) = lab.wait_for(lambda: _events(lab, "failover.started", t_kill2), 10,
                                  interval=0.2, what="failover.started")
        assert started.data["rule"] == "storage_local_failure"
        assert (started.old, started.new, started.epoch) == ("node-a", "node-b", 2)
        assert "node-a reports the group failed (resource tape: monitor failed" \
            in started.reason
        lab.wait_for(lambda: _events(lab, "failover.completed", t_kill2), 20, interval=0.2,
                     what="failover.completed")
        owners = lab.held_by()
        assert owners[GROUP] == "node-b"
        assert owners["node-a-mgmt"] == "node-a"  # the management group stays
        assert lab.kv_groups()[GROUP][0].epoch == 2
        lab.wait_for(lambda: _served(lab, "node-b", GROUP, 2), 10, what="node-b serving")
        lab.wait_for(lambda: GROUP not in _storage(lab, "node-a").get("groups", {GROUP: 1}),
                     20, what="node-a to let the group go")
        others = [(e.kind, e.group, e.reason) for e in lab.events()
                  if e.kind.startswith("failover.") and e.group != GROUP]
        assert not others
    finally:
        acks = w.stop()
    _check_blocks(acks, w.verify())
    _no_write_from_a_after_b_took(lab)
