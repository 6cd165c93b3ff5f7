"""The kernel fence: a killed, frozen or crashed owner stops answering for its floating
addresses within its lease, even with the address still configured (DESIGN.md "Safety",
the two-layer kernel lease). "Answering" = configured on an up link AND in the node's
fence set, read from each namespace by the observer every ~10 ms, cross-checked by TCP
probes from the client namespace."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from vtlha.fence import TABLE
from vtlha_lab.lab import Lab, OverlapObserver
from vtlha_lab.probes import answered_by, arp_responders

pytestmark = pytest.mark.root

PORT = 7000
A_DATA = "198.51.100.101"
A_GROUPS = ("node-a-data", "node-a-mgmt")
CLIENT_IP = "198.51.100.200"


def _start(lab: Lab) -> Path:
    lab.start()
    lab.wait_for(lambda: lab.home_held() and lab.floating_on("node-a") == [
        f"{A_DATA}/32", "203.0.113.101/32"] and len(lab.fenced("node-a")) == 2, 40,
        what="node-a serving (configured and fenced in) its addresses")
    return lab.probe_service(A_DATA, PORT, duration=60)


def _lone_executor_fault(lab: Lab, sig: int) -> None:
    """node-a's ip-manager alone is killed (or frozen): nothing refreshes its fence, so
    within lease_ttl node-a stops answering though the address stays configured; the
    heartbeat's built-in fatal check ("executor ip-manager alive") fails and node-b takes
    over (rule 8): never both answering."""
    timeline = _start(lab)
    ttl = lab.cfg.timings.lease_ttl
    ipm = lab.procs.find("node-a", "ip-manager")
    with OverlapObserver(lab) as obs:
        t0 = time.monotonic()
        ipm.signal(sig)
        lab.wait_for(lambda: lab.fenced("node-a") == [], 2,
                     what="node-a's fence elements to expire")
        assert f"{A_DATA}/32" in lab.floating_on("node-a"), "still configured"
        lab.wait_for(lambda: answered_by(timeline, "node-b", t0), 15,
                     what="the client reaching node-a's address on node-b")
        # ... and after the takeover exactly one MAC answers: node-b's.
        assert arp_responders(lab.ns("client"), CLIENT_IP, A_DATA) == {lab.mac("node-b")}
        time.sleep(2 * ttl)  # keep observing two more leases
    stopped = obs.stopped_answering_at(f"{A_DATA}/32", "node-a", t0)
    assert stopped is not None
    started = [e for e in lab.events() if e.kind == "failover.started"
               and e.group == "node-a-data"]
    print(f"\n{'SIGKILL' if sig == signal.SIGKILL else 'SIGSTOP'} of node-a's ip-manager: "
          f"node-a stopped answering {(stopped - t0) * 1000:.0f} ms after (lease_ttl "
          f"{ttl * 1000:.0f} ms), address still configured; node-b took over "
          f"({started[-1].data.get('rule') if started else '?'}); observer {obs.samples} "
          f"samples, longest gap {obs.max_gap * 1000:.1f} ms, {len(obs.overlaps)} overlaps")
    assert started and started[-1].data.get("rule") == "fatal_process_error"
    assert stopped - t0 <= ttl + obs.max_gap + 0.01  # seen at the observer's next poll
    assert obs.overlaps == [], obs.overlaps[:3]
    if sig == signal.SIGSTOP:
        ipm.signal(signal.SIGCONT)  # resumed: no valid notice, so it removes the address
        lab.wait_for(lambda: f"{A_DATA}/32" not in lab.floating_on("node-a"), 5,
                     what="the resumed ip-manager to remove the address")


def test_killed_ip_manager_stops_answering_within_the_lease(lab: Lab) -> None:
    _lone_executor_fault(lab, signal.SIGKILL)


def test_frozen_ip_manager_stops_answering_within_the_lease(lab: Lab) -> None:
    _lone_executor_fault(lab, signal.SIGSTOP)


def test_whole_node_frozen_then_resumed_removes_its_address(lab: Lab) -> None:
    timeline = _start(lab)
    ttl = lab.cfg.timings.lease_ttl
    frozen = [*lab.procs.of_host("node-a")]
    with OverlapObserver(lab) as obs:
        t0 = time.monotonic()
        for c in frozen:
            c.signal(signal.SIGSTOP)
        lab.servers["node-a"].signal(signal.SIGSTOP)
        lab.wait_for(lambda: answered_by(timeline, "node-b", t0), 10,
                     what="node-b answering while node-a is frozen")
        time.sleep(max(0.0, t0 + 3 * ttl - time.monotonic()))  # frozen for 3 x lease_ttl
        lab.servers["node-a"].signal(signal.SIGCONT)
        for c in frozen:
            c.signal(signal.SIGCONT)
        lab.wait_for(lambda: f"{A_DATA}/32" not in lab.floating_on("node-a"), 10,
                     what="node-a to remove the address after it resumed")
        time.sleep(2 * ttl)
    assert obs.overlaps == [], obs.overlaps[:3]
    assert lab.held_by()["node-a-data"] == "node-b"
    print(f"\nnode-a frozen {3 * ttl:.1f} s: {obs.samples} samples, no overlap; after "
          f"SIGCONT node-a removed {A_DATA}")


def _crash(lab: Lab) -> dict[str, float]:
    with OverlapObserver(lab) as obs:
        t0 = time.monotonic()
        lab.crash("node-a", cut_links=False)  # processes and nats-server; links stay up
        lab.wait_for(lambda: all(lab.held_by().get(g) == "node-b" for g in A_GROUPS), 30,
                     what="node-b to hold node-a's groups")
        lab.wait_for(lambda: set(lab.fenced("node-b")) >= {A_DATA, "203.0.113.101"}, 10,
                     what="node-b answering for node-a's addresses")
        time.sleep(2 * lab.cfg.timings.lease_ttl)
    assert obs.overlaps == [], obs.overlaps[:3]
    starts = [t for t, who in obs.holders.get(f"{A_DATA}/32", []) if who == "node-b"]
    a_stop = obs.stopped_answering_at(f"{A_DATA}/32", "node-a", t0)
    assert starts and a_stop is not None
    return {"b_serves_s": starts[0] - t0, "a_stops_s": a_stop - t0}


def test_node_crash_with_kv_leader_on_the_witness(lab: Lab) -> None:
    _start(lab)
    lab.wait_for(lambda: lab.kv_leader() == "witness", 15, what="the KV leader on the witness")
    fig = _crash(lab)
    t = lab.cfg.timings
    print(f"\ncrash of node-a, KV leader on the witness: node-a stopped answering at "
          f"+{fig['a_stops_s'] * 1000:.0f} ms, node-b serves at +{fig['b_serves_s'] * 1000:.0f} "
          f"ms (lease_ttl + margin = {(t.lease_ttl + t.margin) * 1000:.0f} ms, heartbeat "
          f"{t.heartbeat_interval * 1000:.0f} ms)")
    # Safety (never both answering) and the outcome (node-b serves) are asserted in _crash;
    # how fast is a figure for bench/failover.py, not a timed assert (CI saw 1.23 s at load).
    assert fig["a_stops_s"] < fig["b_serves_s"]


@pytest.mark.long
def test_node_crash_with_kv_leader_forced_onto_it(request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:
    """The same crash with the KV leader on node-a: the survivor has nobody to promise
    it anything and waits out the raft election (reported, not a goal)."""
    from tests.conftest import EXAMPLE, cluster_name

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["cluster"] = cluster_name(request)
    raw["nats"]["keep_leaders_on_witness"] = False
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    lab = Lab(tmp_path / "cluster.yaml", tmp_path)
    try:
        _start(lab)
        _move_kv_leader(lab, "node-a")
        fig = _crash(lab)
        print(f"\ncrash of node-a, KV leader on node-a: node-b serves at "
              f"+{fig['b_serves_s'] * 1000:.0f} ms (a raft election, then the lease)")
    finally:
        lab.stop()


def test_fence_write_recheck_corrects_a_write_delayed_past_the_lease(lab: Lab) -> None:
    pause = lab.work_dir / "fence-pause"
    lab.service_env[("node-a", "ip-manager")] = {"VTLHA_TEST_FENCE_PAUSE_FILE": str(pause)}
    _start(lab)
    ttl = lab.cfg.timings.lease_ttl
    pause.write_text(str(2 * ttl))  # the next fence write is delayed past the lease
    lab.wait_for(lambda: not pause.exists(), 5, what="the pause hook to fire")
    # (A loaded machine may also delay an ordinary write past the bound: that is corrected
    # the same way; pick the event of the pause we caused.)
    ev = lab.wait_for(lambda: [e for e in lab.events() if e.kind == "fence.corrected"
                               and e.data["took_s"] >= 2 * ttl], 10,
                      what="the fence.corrected event of our pause")[0]
    window = float(ev.data["corrected_after_s"])
    print(f"\nfence write delayed {ev.data['took_s'] * 1000:.0f} ms: the stale element was "
          f"{'shortened' if ev.data['left_s'] > 0 else 'removed'} "
          f"{window * 1e6:.0f} us after the write returned (the residual window)")
    # The lease ran out during the write, so the element was removed, not shortened; the
    # removal is made by the same synchronous step as the write (no await between them),
    # so its window is one nft write: a figure to print, not to bound on a shared machine.
    assert ev.data["left_s"] <= 0 and ev.data["took_s"] >= 2 * ttl
    assert "removed at once" in ev.reason
    # Later notices refresh it properly again — on node-a, or on node-b: a pause of the
    # ip-manager this long also fails its liveness check (rule 8), and node-b may take over.
    lab.wait_for(lambda: A_DATA in lab.fenced("node-a") or A_DATA in lab.fenced("node-b"),
                 10, what="node-a's data address fenced (answered) again by its owner")


def test_removed_fence_is_reinstalled(lab: Lab) -> None:
    _start(lab)
    lab.nft("node-a", f"delete table inet {TABLE}\ndelete table arp {TABLE}\n")
    lab.wait_for(lambda: [e for e in lab.events() if e.kind == "fence.repaired"], 10,
                 what="a fence.repaired event")
    lab.wait_for(lambda: len(lab.fenced("node-a")) == 2, 5,
                 what="node-a's held addresses back in its fence")


def test_ip_manager_refuses_to_run_unfenced(lab: Lab) -> None:
    lab.build_network()
    env = {**os.environ, "VTLHA_LIBNFTABLES": "/nonexistent/libnftables.so"}
    out = subprocess.run([*lab.prefix("node-a"), str(Path(sys.executable).parent /
                                                      "vtlha-ip-manager"),
                          "--config", str(lab.config_path), "--node", "node-a",
                          "--state-dir", str(lab.state_root), "--backend", "netlink",
                          "--nats", "nats://127.0.0.1:1"], env=env, capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 2, out
    assert "nftables" in out.stderr and "unfenced" in out.stderr


# ---- helpers ---------------------------------------------------------------------


def _move_kv_leader(lab: Lab, server: str) -> None:
    from vtlha import bus
    from vtlha.subjects import Subjects

    async def _ask() -> Any:
        nc = await lab.connect()
        try:
            return await bus.prefer_leader(nc, nc.jetstream(timeout=2),
                                           bus.kv_stream(Subjects(lab.cfg.cluster)), server)
        finally:
            await nc.close()

    def _moved() -> bool:
        if lab.kv_leader() == server:
            return True
        asyncio.run(_ask())
        return False

    lab.wait_for(_moved, 30, interval=1.0, what=f"the KV leader on {server}")


def _garps(sock: Any, ip: str, mac: str, until: float) -> int:
    """Gratuitous ARP requests for ``ip`` from ``mac`` read from ``sock`` until ``until``
    (monotonic); with ``until`` in the past, only what is queued already."""
    want = bytes(int(x) for x in ip.split("."))
    n = 0
    while True:
        left = until - time.monotonic()
        ready, _, _ = select.select([sock], [], [], max(0.0, left))
        if not ready:
            return n
        frame = sock.recv(2048)
        arp = frame[14:42]
        if (len(arp) == 28 and arp[6:8] == b"\x00\x01" and arp[14:18] == arp[24:28] == want
                and arp[8:14].hex(":") == mac):
            n += 1


def test_frozen_ip_manager_resumed_after_its_group_moved_sends_no_gratuitous_arp(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Issue 14: node-a's ip-manager frozen (SIGSTOP) while its gratuitous ARPs for its
    data address are still being repeated; the group moves to node-b (rule 8); resumed
    (SIGCONT) it must send no more for it (clients would point at a fenced MAC)."""
    from pyroute2 import netns as pr_netns

    from tests.conftest import lab_config

    def edit(raw: dict[str, Any]) -> None:
        raw["ip"] = {**raw.get("ip", {}), "garp_count": 100, "garp_interval": 0.2}

    lab = Lab(lab_config(request, tmp_path, edit), tmp_path)
    sniffer = None
    try:
        lab.start()
        lab.wait_for(lambda: lab.home_held() and f"{A_DATA}/32" in lab.floating_on("node-a"),
                     40, what="node-a serving its data address")
        sniffer = pr_netns.create_socket(lab.ns("client"), socket.AF_PACKET, socket.SOCK_RAW,
                                         socket.htons(0x0806), flags=0)
        sniffer.bind(("eth0", 0x0806))
        mac_a = lab.mac("node-a")
        assert _garps(sniffer, A_DATA, mac_a, time.monotonic() + 1.0) > 0, \
            "node-a repeats its gratuitous ARPs (garp_count 100, every 0.2 s)"
        ipm = lab.procs.find("node-a", "ip-manager")
        ipm.signal(signal.SIGSTOP)
        try:
            lab.wait_for(lambda: lab.held_by().get("node-a-data") == "node-b"
                         and f"{A_DATA}/32" in lab.floating_on("node-b"), 20,
                         what="node-b to take node-a's data group over")
            _garps(sniffer, A_DATA, mac_a, time.monotonic())  # drain: sent before the freeze
        finally:
            ipm.signal(signal.SIGCONT)
        after = _garps(sniffer, A_DATA, mac_a, time.monotonic() + 1.0)
        print(f"\nresumed ip-manager: {after} gratuitous ARP(s) for {A_DATA} after SIGCONT")
        assert after == 0
        lab.wait_for(lambda: f"{A_DATA}/32" not in lab.floating_on("node-a"), 5,
                     what="the resumed ip-manager to remove the address")
        st = lab.http_get("node-a", "ip-manager", "/status")
        assert st["backend_status"]["garp_withheld"] >= 1
    finally:
        if sniffer is not None:
            sniffer.close()
        lab.stop()
