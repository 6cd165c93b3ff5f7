"""The cluster in containers (root, podman; ``make test-containers`` builds the image
first): the image ``make images`` builds, the compose files and credentials `vtlha
deploy render` writes, on the host's network, over TLS. Killing node-a's heartbeat container moves
node-a's groups to node-b; a crashed service is brought back by its restart policy;
nothing is left behind, also when the run fails. Deselected from `make test` (it needs
the image: minutes to build the first time)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from vtlha_lab.containers import not_ready, podman_env, run

pytestmark = [pytest.mark.root, pytest.mark.containers, pytest.mark.timeout(600)]


@pytest.fixture
def ready() -> None:
    """`make test-containers` installs podman and podman-compose and builds the image
    first: a missing one here is a failure, never a skip."""
    missing = not_ready()
    if missing:
        pytest.fail(missing)


def _containers_of(work: Path) -> list[str]:
    cluster = yaml.safe_load((work / "cluster.yaml").read_text())["cluster"]
    out = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], env=podman_env(),
                         capture_output=True, text=True, check=True).stdout.split()
    return [n for n in out if n.startswith(f"vtlha-{cluster}-")]


def test_node_b_takes_over_when_node_a_heartbeat_container_is_killed(
        ready: None, tmp_path: Path) -> None:
    f = run(tmp_path)
    print(json.dumps(f, indent=1))
    assert f["owners_after"] == {"node-a-data": "node-b", "node-a-mgmt": "node-b",
                                 "node-b-data": "node-b", "node-b-mgmt": "node-b"}
    # lease 1 s, dead_after 1 s: a takeover well under the appliance's 3 minutes
    assert f["kill_to_takeover_s"] < 10
    assert f["killed_with_podman_kill_state"] == "exited"  # podman kill: no restart
    assert f["crash_to_restarted_healthy_s"] < 60
    assert f["node_a_heartbeat_nats_auth"] == {  # its own user, over TLS
        "user": "node-a-heartbeat", "tls": True,
        "credential": str(tmp_path / "creds" / "node-a-heartbeat.nk")}
    priv = f["privileges"]
    assert priv.pop("lab_importable") is False  # the runtime only
    assert {s: (p["uid"], p["net_caps"], p["host_pids"]) for s, p in priv.items()} == {
        "nats": ("10001", [], False), "heartbeat": ("10001", [], True),
        "storage-monitor": ("0", [], False),
        "ip-manager": ("0", ["CAP_NET_ADMIN", "CAP_NET_RAW"], False),
        "arbiter": ("10001", [], False)}
    # scheduling.nice (-10 by default): every service raised itself, nats-server was
    # started under nice, uid 10001 too (CAP_SYS_NICE); read from the host
    assert {s: (p["sys_nice"], p["nice"]) for s, p in priv.items()} == {
        s: (True, [-10]) for s in ("nats", "heartbeat", "storage-monitor", "ip-manager",
                                   "arbiter")}
    assert f["left_behind"] == [] and _containers_of(tmp_path) == []


def test_everything_is_removed_when_the_run_fails(ready: None, tmp_path: Path) -> None:
    with pytest.raises(TimeoutError, match=r"not healthy after 0\.0 s"):
        run(tmp_path, healthy_timeout=0.0)
    assert _containers_of(tmp_path) == []
