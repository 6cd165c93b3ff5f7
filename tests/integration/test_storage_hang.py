"""A hung device in the network lab: the backing of ``vtl-b1`` is a file of a FUSE mount
(``tests/fusehang.py``, its own process) whose reads block on demand. The SAN target's
reads of it hang in its threads; the storage-monitors' probes time out
(``probe_timeout``), the paths go down after ``fall`` failures while ``/healthz``
keeps answering, a SIGTERM during the hang still ends the storage-monitor cleanly and
on time, and unsticking the device brings the paths back without flapping."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import lab_config
from tests.fusemount import HangMount, fuse_missing
from vtlha.messages import Event
from vtlha_lab.lab import Lab
from vtlha_lab.localcluster import DEVICE_BYTES

pytestmark = pytest.mark.root

DEVICE = "vtl-b1"  # a device of node-b's data group; both nodes have 2 paths to it
GROUP = "node-b-data"
NODES = ("node-a", "node-b")
SERVICE = "storage-monitor"
SLACK = 10.0  # seconds on top of what the config predicts (machines are noisy)
HEALTHZ_BOUND = 1.0  # every /healthz call during the hang returns within this
SIGTERM_BOUND = 10.0
NO_FLAP_WINDOW = 3.0


@pytest.fixture
def hung_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Lab, HangMount]]:
    """A not-yet-started lab of the example cluster whose ``vtl-b1`` is backed by a
    file of a FUSE mount. Teardown, also after a failure: unstick the reads (the
    target's exit waits for its stuck threads), stop the lab, stop and unmount FUSE."""
    missing = fuse_missing()
    # Root tests skip only for want of root: `make test` installs FUSE (make sysdeps,
    # the dev extras), so a missing part is a failure to be fixed, not a skip.
    assert missing is None, f"the hung-device test needs FUSE: {missing}"
    fs = HangMount.start(tmp_path, {DEVICE: DEVICE_BYTES})
    try:
        def edit(raw: dict[str, Any]) -> None:
            raw["devices"][DEVICE]["backing"] = str(fs.file(DEVICE))
            # The test stops node-b's storage-monitor for seconds on purpose (SIGTERM
            # during the hang, restarted after it): with its built-in liveness check, that
            # is a fatal process error and node-a would rightly take node-b's groups over
            # (rule 8, tested in test_single_service.py); here only the storage rules are
            # under test.
            raw["pairs"][0]["nodes"][1]["executor_checks"] = False

        cfg = lab_config(request, tmp_path, edit)
        lab = Lab(cfg, tmp_path)
        try:
            yield lab, fs
        finally:
            fs.unstick()
            lab.stop()
    finally:
        fs.close()


# ---- looking in -------------------------------------------------------------------

def _paths(lab: Lab, node: str) -> dict[tuple[str, int], bool | None]:
    st = lab.status(node, SERVICE) or {}
    return {(p["device"], p["path"]): p["reachable"] for p in st.get("paths", [])}


def _all_reachable(lab: Lab, node: str) -> bool:
    got = _paths(lab, node)
    return len(got) == 2 * len(lab.cfg.devices) and all(v is True for v in got.values())


def _device_down(lab: Lab, node: str) -> bool:
    got = _paths(lab, node)
    return got.get((DEVICE, 0)) is False and got.get((DEVICE, 1)) is False


def _storage_events(events: list[Event], kind: str, device: str | None = DEVICE,
                    node: str | None = None) -> list[Event]:
    return [e for e in events if e.kind == kind
            and (device is None or e.data.get("device") == device)
            and (node is None or e.node == node)]


@dataclass
class HealthPoller:
    """Polls ``/healthz`` of the storage-monitors of ``nodes`` in a thread of its own:
    every call's duration and answer."""

    lab: Lab
    nodes: set[str]
    interval: float = 0.1
    calls: list[tuple[str, float, bool, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> HealthPoller:
        self._thread = threading.Thread(target=self._run, name="healthz", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for node in sorted(self.nodes):
                t0 = time.monotonic()
                try:
                    body: Any = self.lab.http_get(node, SERVICE, "/healthz",
                                                  timeout=2 * HEALTHZ_BOUND)
                    ok, detail = body.get("ok") is True, str(body)
                except Exception as exc:
                    ok, detail = False, repr(exc)
                self.calls.append((node, time.monotonic() - t0, ok, detail))
            self._stop.wait(self.interval)

    def check(self, node: str) -> tuple[int, float]:
        """Calls and the slowest one for ``node``; every call answered ok in time."""
        mine = [c for c in self.calls if c[0] == node]
        assert mine, f"no /healthz call to {node}'s storage-monitor"
        bad = [c for c in mine if not c[2] or c[1] > HEALTHZ_BOUND]
        assert not bad, f"{node}'s /healthz failed or was slow during the hang: {bad[:5]}"
        return len(mine), max(c[1] for c in mine)


def _served(lab: Lab, node: str, group: str) -> bool:
    st = lab.status(node, SERVICE) or {}
    return bool(st.get("groups", {}).get(group, {}).get("state") == "served")


def _group_events(events: list[Event], prefix: str) -> list[Event]:
    return [e for e in events if e.kind.startswith(prefix) and e.group == GROUP]


def _timeline(lab: Lab, t_wall: float) -> str:
    """The storage, failover and lease events from the hang on (for the log)."""
    try:
        events = lab.events()
    except Exception as exc:
        return f"(no events: {exc!r})"
    kinds = ("storage.", "failover.", "lease.", "group.")
    return "\n".join(f"  {e.sent_at - t_wall:+7.3f} {e.node:8} {e.kind:24} {e.reason[:140]}"
                     for e in events if e.sent_at >= t_wall - 0.5 and e.kind.startswith(kinds))


@dataclass
class Hang:
    t_wall: float = 0.0  # wall clock (events' sent_at) of the hang
    t0: float = 0.0  # monotonic clock of the hang
    first_error: dict[str, float] = field(default_factory=dict)  # node -> first failed probe
    detected: dict[str, float] = field(default_factory=dict)  # node -> both paths down
    others_down: list[tuple[str, tuple[str, int]]] = field(default_factory=list)

    def look(self, lab: Lab) -> bool:
        """One look at both storage-monitors' status; True once both report the device
        down. Notes any other device's path not reachable."""
        for node in NODES:
            st = lab.status(node, SERVICE) or {}
            now = time.monotonic() - self.t0
            for p in st.get("paths", []):
                if p["device"] != DEVICE:
                    if p["reachable"] is not True:
                        self.others_down.append((node, (p["device"], p["path"])))
                elif p["error"] and node not in self.first_error:
                    self.first_error[node] = now
            mine = [p["reachable"] for p in st.get("paths", []) if p["device"] == DEVICE]
            if node not in self.detected and len(mine) == 2 and not any(mine):
                self.detected[node] = now
        return len(self.detected) == len(NODES)


def _detect(lab: Lab, fs: HangMount, health: HealthPoller, hang: Hang) -> None:
    """Hang the device; both nodes report it down in time; the storage rules' verdict
    is a global failure: an alarm, no move."""
    t = lab.cfg.timings
    expected = t.fall * (t.probe_interval + t.probe_timeout) + t.probe_interval
    bound = expected + SLACK
    hang.t_wall, hang.t0 = time.time(), time.monotonic()
    fs.hang()
    lab.wait_for(lambda: hang.look(lab), bound, interval=0.05,
                 what=f"both nodes' storage-monitors to report {DEVICE}'s paths down")
    lost = lab.wait_for(
        lambda: (evs := _storage_events(lab.events(), "storage.device_lost"))
        and {e.node for e in evs} >= set(NODES) and evs, 10,
        what=f"storage.device_lost for {DEVICE} from both nodes")
    lab.wait_for(lambda: _group_events(lab.events(), "storage.global_failure"), 10,
                 what=f"storage.global_failure for {GROUP}")
    time.sleep(1.0)  # more of the hang with /healthz polled: no second alarm, no move
    for node in NODES:
        calls, slowest = health.check(node)
        sent = min(e.sent_at for e in lost if e.node == node) - hang.t_wall
        print(f"{node}: first failed probe of {DEVICE} seen at +{hang.first_error[node]:.2f} s"
              f" (probe_timeout {t.probe_timeout} s); both paths down at "
              f"+{hang.detected[node]:.2f} s (config: at most ~{expected:.1f} s, bound "
              f"{bound:.1f} s), device_lost sent at +{sent:.2f} s; /healthz {calls} calls, "
              f"slowest {slowest * 1000:.0f} ms")
    for node in NODES:
        assert hang.first_error[node] <= t.probe_timeout + t.probe_interval + SLACK
    assert not hang.others_down, f"other devices went down: {hang.others_down[:5]}"

    events = lab.events()
    for node in NODES:
        downs = _storage_events(events, "storage.path_down", node=node)
        assert sorted(e.data["path"] for e in downs) == [0, 1], downs
        assert all(e.data.get("error") for e in downs), downs
        assert len(_storage_events(events, "storage.device_lost", node=node)) == 1
    assert not [e for e in _storage_events(events, "storage.path_down", device=None)
                if e.data.get("device") != DEVICE], "path_down for another device"
    alarms = _group_events(events, "storage.global_failure")
    assert len(alarms) == 1, f"the alarm was raised more than once: {alarms}"
    assert alarms[0].data.get("node") == "node-b", alarms[0]
    assert alarms[0].data.get("devices") == [DEVICE], alarms[0]
    assert "not local" in alarms[0].reason, alarms[0].reason
    moved = _group_events(events, "failover.")
    assert not moved, f"{GROUP} moved on a failure neither node survives: {moved}"
    assert lab.held_by()[GROUP] == "node-b"


def _sigterm_during_hang(lab: Lab, health: HealthPoller) -> None:
    """node-b's storage-monitor, its probes of the device waiting on the target (which
    waits on FUSE), exits 0 on SIGTERM within SIGTERM_BOUND."""
    health.nodes.discard("node-b")
    time.sleep(2 * health.interval + HEALTHZ_BOUND)  # no call to node-b's in flight
    assert _device_down(lab, "node-b")
    child = lab.procs.find("node-b", SERVICE)
    ts = time.monotonic()
    child.signal(signal.SIGTERM)
    try:
        rc = child.proc.wait(timeout=SIGTERM_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node-b's storage-monitor did not exit within {SIGTERM_BOUND} s of "
                    f"SIGTERM during the hang; log: {child.log_path}")
    print(f"node-b's storage-monitor exited {rc} {time.monotonic() - ts:.2f} s after SIGTERM "
          f"during the hang")
    assert rc == 0, f"exit code {rc}; log: {child.log_path}"
    calls, slowest = health.check("node-a")  # node-a's answered all along
    print(f"node-a: /healthz {calls} calls during the hang, slowest {slowest * 1000:.0f} ms")


def _recover(lab: Lab, fs: HangMount) -> None:
    """Unstuck: node-a's paths come back (path_up for both) and stay up; node-b's
    storage-monitor, started again, reaches everything; the alarm clears."""
    tu = time.monotonic()
    fs.unstick()
    lab.wait_for(lambda: _all_reachable(lab, "node-a"), 15,
                 what=f"node-a's paths to {DEVICE} reachable again")
    back = time.monotonic() - tu
    lab.wait_for(
        lambda: sorted(e.data["path"] for e in _storage_events(
            lab.events(), "storage.path_up", node="node-a")) == [0, 1], 10,
        what=f"storage.path_up for node-a's two paths to {DEVICE}")
    print(f"node-a: {DEVICE} reachable again {back:.2f} s after the unstick")
    downs = len(_storage_events(lab.events(), "storage.path_down"))
    deadline = time.monotonic() + NO_FLAP_WINDOW
    while time.monotonic() < deadline:  # no flapping: up it stays
        assert _all_reachable(lab, "node-a"), _paths(lab, "node-a")
        time.sleep(0.1)

    lab.start_service("node-b", SERVICE)
    lab.wait_for(lambda: _all_reachable(lab, "node-b"), 20,
                 what="node-b's restarted storage-monitor to reach every path")
    lab.wait_for(lambda: _group_events(lab.events(), "storage.recovered"), 10,
                 what=f"storage.recovered for {GROUP}")
    time.sleep(0.5)
    events = lab.events()
    assert len(_storage_events(events, "storage.path_down")) == downs, "flapping after recovery"
    assert len(_storage_events(events, "storage.path_up", node="node-a")) == 2
    assert not _group_events(events, "failover."), "a move after recovery"
    assert lab.held_by()[GROUP] == "node-b"


# ---- the test ---------------------------------------------------------------------

@pytest.mark.long
def test_hung_device_detected_healthz_answers_sigterm_bounded_and_recovery(
        hung_lab: tuple[Lab, HangMount]) -> None:
    """Reads of ``vtl-b1`` (node-b's data group) hang for every reader.

    - Each node's storage-monitor sees a failed probe within ``probe_timeout`` (plus a
      round's phase) and reports both of its paths down (``storage.path_down`` for each,
      one ``storage.device_lost``) within ``fall`` rounds of at most ``probe_interval +
      probe_timeout`` (plus slack), while its ``/healthz`` answers every call within
      1 s; every other device stays reachable from both nodes (no ``path_down``).
    - The storage rules (``vtlha.policy``): node-b, the owner, has no path left to
      ``vtl-b1``; node-a, the companion, takes over only if its own fresh view reaches
      every device of the group. Both lose the device, so the failure is global: the
      arbiter raises ``storage.global_failure`` once for node-b-data (owner node-b,
      devices [vtl-b1], "not local") and no ``failover.*`` event happens: node-b keeps
      it. The two nodes cross ``fall`` within a few ms of each other here, the owner
      often first: this holds because a companion's path confirms a device only when
      its latest probe answered (hysteresis keeps the companion's failing paths "up"
      for ``fall`` probes).
    - SIGTERM to node-b's storage-monitor during the hang: it exits 0 within 10 s.
    - Unstuck: node-a's paths come back (``storage.path_up`` for both) and stay up, no
      new ``path_down`` over a few seconds; node-b's storage-monitor, started again,
      reaches every path and the arbiter clears the alarm (``storage.recovered``); still
      no move."""
    lab, fs = hung_lab
    t_start = time.monotonic()
    lab.start()
    lab.wait_for(lab.home_held, 30, what="every group held by its home node")
    for node in NODES:
        lab.wait_for(lambda node=node: _served(lab, node, f"{node}-data"), 30,
                     what=f"{node} to serve its data group's storage")
        lab.wait_for(lambda node=node: _all_reachable(lab, node), 15,
                     what=f"{node}'s storage-monitor to reach every path of every device")
    assert not _storage_events(lab.events(), "storage.path_down", device=None)
    print(f"\nlab up in {time.monotonic() - t_start:.1f} s")

    hang = Hang()
    try:
        with HealthPoller(lab, set(NODES)) as health:
            _detect(lab, fs, health, hang)
            _sigterm_during_hang(lab, health)
        _recover(lab, fs)
    finally:
        if hang.t_wall:
            print(f"events from the hang on:\n{_timeline(lab, hang.t_wall)}")
        print(f"whole test {time.monotonic() - t_start:.1f} s")
