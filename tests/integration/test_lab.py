"""The network lab: addresses that really move between namespaces, gratuitous ARP that
really updates a client's neighbour table, and a lab that leaves nothing behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from vtlha.messages import MgmtReport, decode
from vtlha.subjects import Subjects
from vtlha_lab.lab import Lab, leftovers
from vtlha_lab.probes import answered_by, outage, read_timeline

pytestmark = pytest.mark.root

PORT = 7000
A_DATA = "198.51.100.101"
A_MGMT = "203.0.113.101"


def test_cut_links_moves_addresses_and_gratuitous_arp_updates_the_client(
        secured_lab: Lab) -> None:
    """(On rendered credentials and TLS: the permissions allow what a failover needs.)"""
    lab = secured_lab
    lab.start()
    lab.wait_for(lab.home_held, 30, what="every group held by its home node")
    lab.wait_for(lambda: lab.floating_on("node-a") == [f"{A_DATA}/32", f"{A_MGMT}/32"] and
                 lab.floating_on("node-b") == ["198.51.100.102/32", "203.0.113.102/32"], 5,
                 what="each node to configure its own addresses (on its lease notice)")

    timeline = lab.probe_service(A_DATA, PORT, duration=40)
    assert lab.neighbour("client", A_DATA) == lab.mac("node-a")

    t_cut = time.monotonic()
    lab.set_links("node-a", up=False)

    lab.wait_for(lambda: answered_by(timeline, "node-b", t_cut), 15,
                 what="the client reaching node-a's address on node-b")
    # The client's neighbour entry now holds node-b's MAC: the gratuitous ARP took effect
    # (neighbour locktime would have blocked an ordinary ARP reply for a while).
    assert lab.neighbour("client", A_DATA) == lab.mac("node-b")
    assert f"{A_DATA}/32" in lab.floating_on("node-b")
    lab.wait_for(lambda: f"{A_MGMT}/32" in lab.floating_on("node-b"), 5,
                 what="node-a's management address on node-b")
    owners = lab.held_by()
    assert owners["node-a-data"] == "node-b" and owners["node-a-mgmt"] == "node-b"
    # The management address moved too, and the client on the management network sees it.
    lab.wait_for(lambda: lab.neighbour("client", A_MGMT) in (None, lab.mac("node-b", "eth1")),
                 5, what="the management address's neighbour entry")

    gap = outage(read_timeline(str(timeline)), "node-a", "node-b", t_cut)
    assert gap is not None
    print(f"\nclient-observed outage (links of node-a cut -> node-b answers): "
          f"{gap[2] * 1000:.0f} ms (cut at +0, node-b first answered at "
          f"+{(gap[1] - t_cut) * 1000:.0f} ms)")
    # Cut off, node-a's renewals fail and node-b (which reaches the KV) refuses it a
    # promise: its ip-manager released the address on its own when the lease ran out.
    lab.wait_for(lambda: f"{A_DATA}/32" not in lab.floating_on("node-a"), 5,
                 what="node-a to drop its address when its lease ran out")


def test_two_labs_coexist_and_leave_nothing(tmp_path: Path) -> None:
    import yaml

    from tests.conftest import EXAMPLE

    labs = []
    try:
        for i in range(2):
            d = tmp_path / f"lab{i}"
            d.mkdir()
            raw = yaml.safe_load(EXAMPLE.read_text())
            raw["state_dir"] = str(d / "state")
            (d / "cluster.yaml").write_text(yaml.safe_dump(raw))
            lab = Lab(d / "cluster.yaml", d)
            labs.append(lab)
            lab.record.save()
            lab.build_network()
        a, b = labs
        assert a.lab_id != b.lab_id
        assert set(a.record.namespaces.values()).isdisjoint(b.record.namespaces.values())
        assert a.record.uplink_host_ip != b.record.uplink_host_ip
        for lab in labs:  # each lab's witness answers on its own uplink
            assert lab.addresses("witness") == sorted([lab.record.uplink_peer_ip,
                                                       "198.51.100.9/24"])
    finally:
        for lab in labs:
            lab.stop()
    names = [n for lab in labs for n in lab.record.namespaces.values()]
    assert not set(names) & set(leftovers())


def _mgmt_reports(lab: Lab, node: str, until: object, before: object = None,
                  timeout: float = 10.0) -> list[MgmtReport]:
    """Collect node's management reports (over the uplink) until ``until(reports)``."""
    import asyncio

    async def _go() -> list[MgmtReport]:
        nc = await lab.connect()
        got: list[MgmtReport] = []
        done = asyncio.Event()

        async def cb(msg: Msg) -> None:
            got.append(decode(MgmtReport, msg.data))
            if until(got):  # type: ignore[operator]
                done.set()

        await nc.subscribe(Subjects(lab.cfg.cluster).mgmt(node), cb=cb)
        await nc.flush()
        if before is not None:
            await asyncio.to_thread(before)  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(done.wait(), timeout)
        finally:
            await nc.close()
        return got

    return asyncio.run(_go())


def test_management_link_down_is_reported_and_recovers(lab: Lab) -> None:
    lab.start()
    lab.wait_for(lab.home_held, 30, what="every group held by its home node")
    fall, rise = lab.cfg.timings.fall, lab.cfg.timings.rise
    healthy = _mgmt_reports(lab, "node-a", lambda rs: rs[-1].healthy and rs[-1].gateway_ok)
    assert healthy[-1].monitored and healthy[-1].link_up

    t0 = time.monotonic()
    reports = _mgmt_reports(lab, "node-a", lambda rs: not rs[-1].healthy,
                            before=lambda: lab.set_links("node-a", False, ("eth1",)))
    took = time.monotonic() - t0
    assert not reports[-1].link_up and reports[-1].monitored
    # Health fell only after `fall` ticks of the link being down (hysteresis).
    down = [r for r in reports if not r.link_up]
    assert len(down) >= fall
    assert took < 10
    # The data path is untouched: node-a keeps its groups (moving the management group
    # alone is the policy issue's rule).
    assert lab.held_by()["node-a-data"] == "node-a"

    back = _mgmt_reports(lab, "node-a", lambda rs: rs[-1].healthy,
                         before=lambda: lab.set_links("node-a", True, ("eth1",)))
    assert back[-1].link_up and back[-1].gateway_ok
    assert len([r for r in back if r.link_up]) >= rise
    print(f"\nmanagement link down reported unhealthy after {took * 1000:.0f} ms "
          f"(fall {fall} x probe_interval {lab.cfg.timings.probe_interval} s)")


def _path_state(lab: Lab, node: str, device: str, path: int) -> bool | None:
    st = lab.status(node, "storage-monitor") or {}
    for p in st.get("paths", []):
        if p["device"] == device and p["path"] == path:
            return p["reachable"]  # type: ignore[no-any-return]
    return None


def test_one_cut_path_goes_down_without_failover(lab: Lab) -> None:
    """An nftables drop of node-a's path 1 to the SAN target (its port, in node-a's
    namespace): that path goes down, the device stays reachable through path 0, and
    nothing fails over; removing the drop brings the path back."""
    lab.start()
    lab.wait_for(lab.home_held, 30, what="every group held by its home node")
    dev = "vtl-a0"
    lab.wait_for(lambda: all(_path_state(lab, "node-a", dev, i) for i in range(2)), 10,
                 what="both of node-a's paths to vtl-a0 reachable")
    assert lab.san_host() == lab.service_ip("witness").split("/")[0]
    t0 = time.monotonic()
    lab.cut_path("node-a", "witness", port=lab.cfg.san.port + 1)  # path 1 only
    try:
        lab.wait_for(lambda: _path_state(lab, "node-a", dev, 1) is False, 15,
                     what="node-a's path 1 to vtl-a0 down")
        took = time.monotonic() - t0
        assert _path_state(lab, "node-a", dev, 0) is True
        # A short observation: node-a keeps its data group (the device is reachable).
        deadline = time.monotonic() + 3 * lab.cfg.timings.lease_ttl + 1.0
        while time.monotonic() < deadline:
            assert lab.held_by()["node-a-data"] == "node-a"
            assert _path_state(lab, "node-a", dev, 0) is True
            time.sleep(0.1)
        lab.wait_for(lambda: [e for e in lab.events() if e.kind == "storage.path_down"
                              and e.node == "node-a" and e.data.get("device") == dev
                              and e.data.get("path") == 1], 10,
                     what="a storage.path_down event for node-a's path 1")
        kinds = [e.kind for e in lab.events()]
        assert "storage.device_lost" not in kinds
        assert not [k for k in kinds if k.startswith("failover.")], kinds
    finally:
        lab.heal_path("node-a")
    lab.wait_for(lambda: _path_state(lab, "node-a", dev, 1) is True, 15,
                 what="node-a's path 1 to vtl-a0 up again")
    lab.wait_for(lambda: [e for e in lab.events() if e.kind == "storage.path_up"
                          and e.node == "node-a" and e.data.get("device") == dev
                          and e.data.get("path") == 1], 10,
                 what="a storage.path_up event for node-a's path 1")
    assert lab.held_by()["node-a-data"] == "node-a"
    lat = sorted(p["latency"] for p in (lab.status("node-a", "storage-monitor") or {})["paths"]
                 if p["latency"] is not None)
    print(f"\nnode-a's path 1 reported down {took * 1000:.0f} ms after the drop; probe "
          f"latencies through the target now: {[round(x * 1e6) for x in lat]} us")
