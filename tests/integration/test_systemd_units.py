"""The rendered systemd units under a real systemd (root, podman; ``make
test-containers`` builds both images first; ``vtlha_lab.systemdhost``): node-a's,
node-b's and the witness's units, as `vtlha deploy render` wrote them, run by systemd
(PID 1 of a container) through a nested podman. Every unit comes up and its container
answers ``/healthz``; every group is held at home; a crashed service is restarted by
systemd (``Restart=always``); stopping node-a's heartbeat unit removes its container
and node-b takes node-a's groups; nothing is left behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vtlha_lab.containers import default_image, image_exists, not_ready
from vtlha_lab.systemdhost import HOST_IMAGE, SystemdHost

pytestmark = [pytest.mark.root, pytest.mark.containers, pytest.mark.timeout(900)]


def test_the_rendered_units_run_the_cluster_under_systemd(tmp_path: Path) -> None:
    missing = not_ready() or (None if image_exists(HOST_IMAGE)
                              else f"no image {HOST_IMAGE} (make systemd-host-image)")
    if missing:
        pytest.fail(missing)
    host = SystemdHost(tmp_path, default_image())
    f: dict[str, object] = {}
    try:
        t0 = time.monotonic()
        host.start()
        f["boot_and_image_load_s"] = round(time.monotonic() - t0, 1)
        t1 = time.monotonic()
        host.start_units()
        f["units_started_s"] = round(time.monotonic() - t1, 1)
        host.wait_healthy(180)
        f["units_to_healthy_s"] = round(time.monotonic() - t1, 1)
        containers = host.ctr.containers()
        states = {c.name: host.show(c, "ActiveState", "SubState") for c in containers}
        assert all(s == {"ActiveState": "active", "SubState": "running"}
                   for s in states.values()), states
        assert sorted(host.inner_running()) == sorted(c.name for c in containers)
        home = {g: h for g, (h, _) in host.ctr.cfg.groups().items()}
        host.wait_for(lambda: host.held_by() == home, 60, "every group held at home")

        # systemd is the supervisor: a crashed service comes back (Restart=always)
        arb = next(c for c in host.ctr.containers("node-a") if c.service == "arbiter")
        before = int(host.show(arb, "NRestarts")["NRestarts"])
        t_crash = time.monotonic()
        host.crash(arb)
        host.wait_for(lambda: int(host.show(arb, "NRestarts")["NRestarts"]) > before
                      and host.healthy(arb), 60, f"{arb.name} restarted by systemd")
        f["crash_to_restarted_healthy_s"] = round(time.monotonic() - t_crash, 2)

        # stopping node-a's heartbeat unit stops and removes its container: a takeover
        hb = next(c for c in host.ctr.containers("node-a") if c.service == "heartbeat")
        t_stop = time.monotonic()
        host.run("systemctl", "stop", host.unit(hb))
        host.wait_for(lambda: all(host.held_by().get(g) == "node-b"
                                  for g in ("node-a-data", "node-a-mgmt")), 30,
                      "node-b holding node-a's groups")
        f["stop_to_takeover_s"] = round(time.monotonic() - t_stop, 2)
        assert hb.name not in host.inner_running()  # ExecStopPost: podman rm
        print("\n" + json.dumps(f, indent=1))
    finally:
        left = host.stop()
    assert left == []
