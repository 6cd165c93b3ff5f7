"""Storage takeover end to end on loopback, against a real nats-server and the real
SAN target: the storage-monitor preempts the reservations at the group's epoch and
starts the tape data service through its resource agent; a client's acknowledged
blocks survive a crash of the owner; the target accepts no write from the old owner
after the preempt; a failing ``start`` agent is restarted once, then leaves the group
not served and says so; ``vtlha cleanup`` starts it again once the cause is mended."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLE, cluster_name
from vtlha_lab.localcluster import LocalCluster, prepare_config
from vtlha_lab.natsserver import NatsServer
from vtlha_lab.santarget import read_audit_log
from vtlha_lab.tapeclient import read_acks, verify_blocks, write_blocks


def _cluster(request: pytest.FixtureRequest, nats_server: NatsServer, tmp_path: Path,
             edit: Any = None) -> LocalCluster:
    cfg = prepare_config(EXAMPLE, tmp_path, cluster=cluster_name(request), single_server=True)
    if edit is not None:
        raw = yaml.safe_load(cfg.read_text())
        edit(raw)
        cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return LocalCluster(cfg, tmp_path, nats_urls=[nats_server.spec.url])


@pytest.fixture
def storage_cluster(request: pytest.FixtureRequest, nats_server: NatsServer,
                    tmp_path: Path) -> Iterator[LocalCluster]:
    c = _cluster(request, nats_server, tmp_path)
    try:
        yield c
    finally:
        c.stop()


def _served(c: LocalCluster, host: str, group: str, epoch: int | None = None) -> bool:
    st = c.status(host, "storage-monitor") or {}
    g = st.get("groups", {}).get(group)
    return bool(g) and g["state"] == "served" and (epoch is None or g["epoch"] == epoch)


def _portal(c: LocalCluster, home: str) -> str:
    return f"127.0.0.1:{c.cfg.port(home, 'tape')}"


def _log(c: LocalCluster, host: str, service: str) -> list[dict[str, Any]]:
    out = []
    for line in c.procs.find(host, service).log_path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                out.append(entry)
    return out


def test_crash_moves_storage_and_no_acknowledged_block_is_lost(
        storage_cluster: LocalCluster, tmp_path: Path) -> None:
    c = storage_cluster
    c.start()
    c.wait_for(lambda: _served(c, "node-a", "node-a-data", 1), 30,
               what="node-a to serve its data group's storage")
    portal = _portal(c, "node-a")
    log = tmp_path / "acks.jsonl"
    assert asyncio.run(write_blocks(portal, log, count=40)) == 40

    c.crash("node-a")
    # The writer goes on through the failover: each block is sent again until acked.
    assert asyncio.run(write_blocks(portal, log, count=80)) == 80
    acks = read_acks(log)
    assert sorted(acks) == list(range(80))
    assert {acks[b]["node"] for b in range(40)} == {"node-a"}
    assert acks[79]["node"] == "node-b" and acks[79]["epoch"] == 2
    # node-b's tape service was the standby its storage-monitor kept for node-a-data
    starts = [e for e in _log(c, "node-b", "storage-monitor") if e.get("msg") ==
              "resource agent" and e.get("action") == "start" and e.get("epoch") == 2]
    assert [e["group"] for e in starts] == ["node-a-data"] and starts[0]["ok"]
    assert "(standby) ready at epoch 2" in starts[0]["detail"]
    # each block says when the connection it came on was opened and established
    assert all(a["connected"] >= a["opened"] > 0 for a in acks.values())
    assert acks[79]["opened"] > acks[0]["connected"]  # node-b's is another connection

    out = asyncio.run(verify_blocks(portal, sorted(acks)))
    assert out["bad"] == [] and out["checked"] == 80 and out["nodes"] == {"node-b": 80}

    # The target: node-b preempted both devices at epoch 2, and accepted no write from
    # node-a after that (node-a was killed; anything late would be refused).
    audit = read_audit_log(c.state_root / "san" / "san-log.jsonl")
    for dev in ("vtl-a0", "vtl-a1"):
        k = next(i for i, e in enumerate(audit) if e["event"] == "preempt"
                 and e["decision"] == "accepted" and e["device"] == dev)
        assert audit[k]["node"] == "node-b" and audit[k]["epoch"] == 2
        assert audit[k]["old_holder"] == "node-a" and audit[k]["old_epoch"] == 1
        assert not [e for e in audit[k:] if e["event"] == "write" and e["node"] == "node-a"
                    and e["decision"] == "accepted" and e["device"] == dev]

    evs = c.events()
    taken = [e for e in evs if e.kind == "storage.takeover" and e.node == "node-b"
             and e.group == "node-a-data"]
    assert {e.data["device"] for e in taken} == {"vtl-a0", "vtl-a1"}
    assert all(e.epoch == 2 and e.data["node"] == "node-b" and e.data["path"] in (0, 1)
               and e.data["op"] == "preempt" and e.old == "node-a" for e in taken)
    done = c.wait_for(lambda: [e for e in c.events() if e.kind == "failover.completed"
                               and e.group == "node-a-data"], 10, what="failover.completed")
    assert done[0].new == "node-b" and done[0].epoch == 2


def test_switch_back_releases_storage_before_the_companion_preempts(
        storage_cluster: LocalCluster) -> None:
    """A live owner that loses its group (here: its heartbeat service dies, so the
    companion takes over) stops its data service and releases the reservations; the
    release is logged by the target before the companion's preempt."""
    c = storage_cluster
    c.start()
    c.wait_for(lambda: _served(c, "node-a", "node-a-data", 1), 30, what="node-a serving")
    c.procs.find("node-a", "heartbeat").signal(9)
    c.wait_for(lambda: _served(c, "node-b", "node-a-data", 2), 20,
               what="node-b to serve node-a-data at epoch 2")
    c.wait_for(lambda: "node-a-data" not in (c.status("node-a", "storage-monitor") or {})
               .get("groups", {"node-a-data": 1}), 10, what="node-a to let go of node-a-data")
    evs = c.events()
    released = [e for e in evs if e.kind == "storage.release" and e.node == "node-a"]
    assert {e.data["device"] for e in released} == {"vtl-a0", "vtl-a1"}
    assert all(e.epoch == 1 and e.data["node"] == "node-a" for e in released)
    # node-a's data service is gone: its I/O stopped before (or as) node-b took over.
    run = c.state_root / "node-a" / "resources" / "node-a-data" / "tape"
    assert not (run / "pid").exists()
    audit = read_audit_log(c.state_root / "san" / "san-log.jsonl")
    for dev in ("vtl-a0", "vtl-a1"):
        taken = next(i for i, e in enumerate(audit) if e["device"] == dev and e["epoch"] == 2
                     and e["event"] in ("preempt", "reserve") and e["decision"] == "accepted")
        assert audit[taken]["node"] == "node-b"
        assert not [e for e in audit[taken:] if e["device"] == dev and e["node"] == "node-a"
                    and e["event"] == "write" and e["decision"] == "accepted"]


FAILING_AGENT = """#!/bin/sh
# A resource agent that cannot start on node-b (say, a library it needs is missing).
env | grep '^VTLHA_' | sort > "$VTLHA_RUN_DIR/env-$1"
if [ "$1" = start ] && [ "$VTLHA_NODE" = node-b ]; then
    echo "cannot attach tape library on $VTLHA_NODE"
    exit 1
fi
exec {python} -m vtlha.tape.agent "$1"
"""


def _library_cluster(request: pytest.FixtureRequest, nats_server: NatsServer,
                     tmp_path: Path, script: str) -> LocalCluster:
    """node-a-data's one resource is the agent ``script`` ("library"); started, node-a
    serving it, then node-a crashed (node-b takes the group over)."""
    agent = tmp_path / "agent.sh"
    agent.write_text(script)
    agent.chmod(0o755)

    def edit(raw: dict[str, Any]) -> None:
        data = raw["pairs"][0]["nodes"][0]["groups"]["data"]
        data["resources"] = [{"name": "library", "agent": str(agent), "start_timeout": 10}]

    c = _cluster(request, nats_server, tmp_path, edit)
    try:
        c.start()
        c.wait_for(lambda: _served(c, "node-a", "node-a-data", 1), 30, what="node-a serving")
        c.crash("node-a")
    except BaseException:
        c.stop()
        raise
    return c


def test_failing_start_agent_leaves_the_group_not_served_and_reported(
        request: pytest.FixtureRequest, nats_server: NatsServer, tmp_path: Path) -> None:
    c = _library_cluster(request, nats_server, tmp_path,
                         FAILING_AGENT.format(python=sys.executable))
    try:
        failed = c.wait_for(lambda: [e for e in c.events() if e.kind == "storage.start_failed"],
                            20, what="storage.start_failed")
        assert failed[0].node == "node-b" and failed[0].group == "node-a-data"
        assert failed[0].epoch == 2 and "cannot attach tape library" in failed[0].reason
        # Restarted once on node-b (stop, start) before it gave up: the restart failed.
        tries = [(e.data["action"], e.data["failures"], e.data["next"]) for e in c.events()
                 if e.kind == "storage.agent_failed" and e.node == "node-b"]
        assert tries == [("start", 1, "restart"), ("start", 2, "give_up")]
        assert "the restart failed" in failed[0].reason
        ff = c.wait_for(lambda: [e for e in c.events() if e.kind == "failover.failed"
                                 and e.group == "node-a-data"], 20, what="failover.failed")
        assert "does not serve its storage" in ff[0].reason
        assert "cannot attach tape library" in ff[0].reason
        st = c.status("node-b", "storage-monitor")
        assert st is not None
        assert st["groups"]["node-a-data"]["state"] == "failed"
        # Never silently "taken over": no completion for the data group (the management
        # group's takeover completes as usual), and nothing listens on the portal.
        evs = c.events()
        assert {e.group for e in evs if e.kind == "failover.completed"} == {"node-a-mgmt"}
        with pytest.raises(OSError), socket.create_connection(
                ("127.0.0.1", c.cfg.port("node-a", "tape")), timeout=1):
            pass
        # The agent saw the group, its epoch and devices in its environment.
        env = (c.state_root / "node-b" / "resources" / "node-a-data" / "library"
               / "env-start").read_text()
        for line in ("VTLHA_GROUP=node-a-data", "VTLHA_EPOCH=2", "VTLHA_DEVICES=vtl-a0,vtl-a1",
                     "VTLHA_NODE=node-b", "VTLHA_RESOURCE=library", "VTLHA_ACTION=start"):
            assert line in env.splitlines()
        # As Pacemaker does, a failed start is followed by a stop.
        assert (c.state_root / "node-b" / "resources" / "node-a-data" / "library"
                / "env-stop").exists()
    finally:
        c.stop()


MENDABLE_AGENT = """#!/bin/sh
# Cannot start on node-b while {marker} exists (a library cable pulled, say).
if [ "$1" = start ] && [ "$VTLHA_NODE" = node-b ] && [ -e {marker} ]; then
    echo "cannot attach tape library on $VTLHA_NODE"
    exit 1
fi
exec {python} -m vtlha.tape.agent "$1"
"""


def _vtlha(c: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "vtlha"), *args, "--config",
                           str(c.config_path), "--nats", ",".join(c.client_urls())],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_cleanup_starts_a_failed_group_again_once_its_cause_is_mended(
        request: pytest.FixtureRequest, nats_server: NatsServer, tmp_path: Path) -> None:
    """node-a crashes; node-b cannot start node-a-data (restarted once after a back-off,
    then given up: failed, the companion dead, so it stays). The cause mended, ``vtlha
    cleanup`` forgets node-b's failures and node-b serves the group at the same epoch."""
    marker = tmp_path / "library-unplugged"
    marker.touch()
    c = _library_cluster(request, nats_server, tmp_path,
                         MENDABLE_AGENT.format(python=sys.executable, marker=marker))
    try:
        c.wait_for(lambda: [e for e in c.events() if e.kind == "storage.start_failed"], 20,
                   what="storage.start_failed on node-b")
        tries = [e for e in c.events() if e.kind == "storage.agent_failed"]
        assert [(e.data["failures"], e.data["next"], e.data["delay"]) for e in tries] == [
            (1, "restart", 0.5), (2, "give_up", 0.0)]
        assert "restarted on this node in 0.5 s" in tries[0].reason
        # the second start came after the back-off (the stop before it is quick)
        assert tries[1].sent_at - tries[0].sent_at >= 0.5
        st = c.status("node-b", "storage-monitor") or {}
        assert st["groups"]["node-a-data"]["state"] == "failed"
        assert st["failures"] == {"node-a-data": {"library": 2}}

        # Refused: a management group; not confirmed without a terminal and --yes.
        mgmt = _vtlha(c, "cleanup", "node-a-mgmt", "--yes")
        assert mgmt.returncode == 1
        assert "node-a-mgmt is a management group" in mgmt.stderr
        unconfirmed = _vtlha(c, "cleanup", "node-a-data")
        assert unconfirmed.returncode == 2 and "pass --yes" in unconfirmed.stderr
        assert (c.status("node-b", "storage-monitor") or {})["failures"] != {}

        marker.unlink()  # the cause mended
        done = _vtlha(c, "cleanup", "node-a-data", "--yes", "--wait", "30")
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert "node-a is down" in out
        assert "node-b: forgot 2 failures of library" in out
        assert "node-a-data (failed: " in out and "is started again at epoch 2" in out
        assert "storage.served: node-b serves node-a-data at epoch 2" in out
        st = c.status("node-b", "storage-monitor") or {}
        assert st["groups"]["node-a-data"]["state"] == "served"
        assert st["failures"] == {}
        (ev,) = [e for e in c.events() if e.kind == "storage.cleanup"]
        assert (ev.group, ev.epoch) == ("node-a-data", 2)
        assert ev.data["nodes"]["node-b"]["ok"] and ev.data["nodes"]["node-b"]["restarted"]
        assert "node-a" not in ev.data["nodes"] and "@" in ev.data["operator"]

        again = _vtlha(c, "cleanup", "node-a-data", "--yes")
        assert again.returncode == 0, again.stderr
        assert "no failure of node-a-data was counted" in again.stdout
        assert "node-a-data is served: nothing to restart" in again.stdout
    finally:
        c.stop()
