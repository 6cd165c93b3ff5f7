"""Storage in the network lab, with real faults: a client in the client namespace
writes numbered blocks to the tape data service on node-a's portal address, node-a is
failed over (all its processes killed; all of them SIGSTOPped; its storage paths cut),
and every acknowledged block is read back through node-b, while the SAN target's log
shows no write accepted from node-a after node-b's preempt. Cutting node-a's storage
is a local failure: node-b takes the data group, the management group stays. A device
that fails for both nodes (EIO from a truncated backing file) is a global failure: an
alarm, no failover. Restoring either brings events and no flapping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from vtlha_lab.lab import Lab
from vtlha_lab.localcluster import DEVICE_BYTES
from vtlha_lab.santarget import read_audit_log
from vtlha_lab.tapeclient import read_acks

pytestmark = pytest.mark.root

VTLHA_LAB = str(Path(sys.executable).parent / "vtlha-lab")
A_DEVICES = ("vtl-a0", "vtl-a1")


def _storage(lab: Lab, host: str) -> dict[str, Any]:
    try:
        st: dict[str, Any] = lab.http_get(host, "storage-monitor", "/status")
    except OSError:
        return {}
    return st


def _served(lab: Lab, host: str, group: str, epoch: int | None = None) -> bool:
    g = _storage(lab, host).get("groups", {}).get(group)
    return bool(g) and g["state"] == "served" and (epoch is None or g["epoch"] == epoch)


class Writer:
    """``vtlha-lab tape write`` in the client namespace, to node-a's portal."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.log = lab.work_dir / f"{name}.jsonl"
        ip = lab.cfg.group_addresses("node-a-data")[0].split("/")[0]
        self.portal = f"{ip}:{lab.cfg.ports.tape}"
        self.child = lab.procs.spawn("client", name, [
            *lab.prefix("client"), VTLHA_LAB, "tape", "write", self.portal, "--log", str(self.log),
            "--interval", "0.005"])

    def acks(self) -> dict[int, dict[str, Any]]:
        return read_acks(self.log)

    def wait_acked_by(self, node: str, n: int, timeout: float) -> None:
        def enough() -> bool:
            return sum(1 for a in self.acks().values() if a["node"] == node) >= n
        self.lab.wait_for(enough, timeout, what=f"{n} blocks acknowledged by {node}")

    def stop(self) -> dict[int, dict[str, Any]]:
        self.child.signal(signal.SIGTERM)
        self.child.proc.wait(10)
        return self.acks()

    def verify(self) -> dict[str, Any]:
        out = subprocess.run([*self.lab.prefix("client"), VTLHA_LAB, "tape", "verify", self.portal,
                              "--log", str(self.log), "--json"], capture_output=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr.decode() + out.stdout.decode()
        result: dict[str, Any] = orjson.loads(out.stdout)
        return result


def _no_write_from_a_after_b_took(lab: Lab) -> dict[str, int]:
    """For each of node-a's devices: node-b's reservation (preempt, or reserve after
    node-a released) at epoch 2, and no write accepted from node-a after it. Returns how
    many writes from node-a the target refused after it, per device."""
    audit = read_audit_log(lab.state_root / "san" / "san-log.jsonl")
    refused = {}
    for dev in A_DEVICES:
        k = next(i for i, e in enumerate(audit) if e["device"] == dev and e["node"] == "node-b"
                 and e["event"] in ("preempt", "reserve") and e["decision"] == "accepted")
        assert audit[k]["epoch"] == 2
        late = [e for e in audit[k:] if e["device"] == dev and e["node"] == "node-a"
                and e["event"] == "write"]
        assert not [e for e in late if e["decision"] == "accepted"], late
        refused[dev] = len(late)
    return refused


def _check_blocks(acks: dict[int, dict[str, Any]], result: dict[str, Any]) -> None:
    assert sorted(acks) == list(range(len(acks)))  # no hole in the numbers
    assert {acks[0]["node"], acks[max(acks)]["node"]} == {"node-a", "node-b"}
    assert result["bad"] == [] and result["checked"] == len(acks)
    assert result["nodes"] == {"node-b": len(acks)}


def _start(lab: Lab) -> Writer:
    lab.start()
    lab.wait_for(lambda: _served(lab, "node-a", "node-a-data", 1) and
                 _served(lab, "node-b", "node-b-data", 1), 60,
                 what="each node to serve its data group's storage")
    w = Writer(lab, "writer")
    w.wait_acked_by("node-a", 30, 20)
    return w


def test_node_a_killed_no_acknowledged_block_lost(lab: Lab) -> None:
    w = _start(lab)
    t0 = time.monotonic()
    lab.crash("node-a")
    w.wait_acked_by("node-b", 30, 30)
    acks = w.stop()
    gap = max(a["t"] - acks[b - 1]["t"] for b, a in acks.items() if b > 0)
    print(f"kill: {len(acks)} blocks acknowledged, longest gap between acks {gap:.3f} s, "
          f"node-b serving after {time.monotonic() - t0:.2f} s")
    _check_blocks(acks, w.verify())
    _no_write_from_a_after_b_took(lab)


@pytest.mark.long
def test_node_a_frozen_then_resumed_writes_nothing(lab: Lab) -> None:
    w = _start(lab)
    frozen = lab.procs.kill_host("node-a", signal.SIGSTOP)  # its data service with them
    try:
        w.wait_acked_by("node-b", 30, 30)
    finally:
        for c in frozen:
            c.signal(signal.SIGCONT)
    # node-a wakes with an old belief: its data service may try a write in flight, which
    # the target refuses; its storage-monitor lets the group go.
    lab.wait_for(lambda: "node-a-data" not in _storage(lab, "node-a").get("groups", {"x": 1}),
                 20, what="node-a's storage-monitor to let node-a-data go")
    w.wait_acked_by("node-b", 60, 20)
    acks = w.stop()
    _check_blocks(acks, w.verify())
    refused = _no_write_from_a_after_b_took(lab)
    print(f"sigstop: {len(acks)} blocks acknowledged; writes from node-a refused by the "
          f"target after node-b's preempt: {refused}")


@pytest.mark.long
def test_node_a_storage_cut_is_a_local_failure(lab: Lab) -> None:
    w = _start(lab)
    san = lab.cfg.san
    t0, w0 = time.monotonic(), time.time()
    for i in range(2):  # both of node-a's paths: it reaches no device at all
        lab.cut_path("node-a", san.host, port=san.port + i)
    try:
        w.wait_acked_by("node-b", 30, 60)
        print(f"storage cut: node-b acknowledging after {time.monotonic() - t0:.2f} s")
        for e in lab.events():
            if e.sent_at >= w0 and e.kind != "storage.noop":
                print(f"  +{e.sent_at - w0:6.2f} s {e.node:8} {e.kind:22} {e.reason[:90]}")
        owners = lab.held_by()
        assert owners["node-a-data"] == "node-b"
        assert owners["node-a-mgmt"] == "node-a"  # the management group stays
        evs = lab.events()
        started = [e for e in evs if e.kind == "failover.started" and e.group == "node-a-data"]
        assert started and started[0].inputs and "no path left" in started[0].reason
        assert not [e for e in evs if e.kind == "failover.started" and e.group != "node-a-data"]
        lost = {e.data["device"] for e in evs if e.kind == "storage.device_lost"
                and e.node == "node-a"}
        assert set(A_DEVICES) <= lost
        acks = w.stop()
        _check_blocks(acks, w.verify())
        _no_write_from_a_after_b_took(lab)
    finally:
        lab.heal_path("node-a")
    # Restored: paths come back on node-a (events), and nothing moves (failback is
    # manual by default): no flapping.
    lab.wait_for(lambda: all(p["reachable"] for p in _storage(lab, "node-a").get("paths", [])),
                 20, what="node-a's paths back")
    n_before = len([e for e in lab.events() if e.kind.startswith("failover.")])
    time.sleep(2.0)  # a quiet period: the assertion is that nothing happens in it
    evs = lab.events()
    assert len([e for e in evs if e.kind.startswith("failover.")]) == n_before
    assert [e for e in evs if e.kind == "storage.path_up" and e.node == "node-a"]
    assert lab.held_by()["node-a-data"] == "node-b"


def test_device_failing_for_both_nodes_is_a_global_failure(lab: Lab) -> None:
    lab.start()
    lab.wait_for(lambda: _served(lab, "node-a", "node-a-data", 1), 60,
                 what="node-a to serve its data group's storage")
    backing = lab.state_root / "san" / "vtl-a0.img"
    os.truncate(backing, 0)  # the device itself fails: EIO for everyone
    try:
        alarm = lab.wait_for(lambda: [e for e in lab.events()
                                      if e.kind == "storage.global_failure"], 30,
                             what="storage.global_failure")
        assert alarm[0].group == "node-a-data" and "not local" in alarm[0].reason
        assert alarm[0].data["devices"] == ["vtl-a0"]
        for node in ("node-a", "node-b"):
            lab.wait_for(lambda n=node: [e for e in lab.events()
                                         if e.kind == "storage.device_lost" and e.node == n],
                         10, what=f"{node} to report vtl-a0 lost")
        time.sleep(1.0)  # a quiet period: no failover, no second alarm
        evs = lab.events()
        assert not [e for e in evs if e.kind.startswith("failover.")]
        assert len([e for e in evs if e.kind == "storage.global_failure"]) == 1
        assert lab.held_by()["node-a-data"] == "node-a"
    finally:
        os.truncate(backing, DEVICE_BYTES)
    lab.wait_for(lambda: [e for e in lab.events() if e.kind == "storage.recovered"], 30,
                 what="storage.recovered")
    # (The alarm clears on the owner's view; node-b's paths come back on its own probes.)
    lab.wait_for(lambda: {e.node for e in lab.events() if e.kind == "storage.path_up"
                          and e.data["device"] == "vtl-a0"} == {"node-a", "node-b"}, 15,
                 what="vtl-a0's paths up again on both nodes")
    assert not [e for e in lab.events() if e.kind.startswith("failover.")]
