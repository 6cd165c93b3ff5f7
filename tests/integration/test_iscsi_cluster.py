"""The running services against a real iSCSI target (``san.kind: iscsi``): a whole
cluster on loopback (LocalCluster, one nats-server) whose storage-monitors probe and
hold the data groups' LUNs on Debian's tgtd (two portals: two paths; one LUN per
device). The reservations are SCSI-3 persistent reservations, Write Exclusive, with
the key of the owner at the group's epoch; a crash of node-a moves node-a's data group
to node-b, whose key at the new epoch then holds every LUN of it, and a write through a
session of node-a's key that was writing before is refused (RESERVATION CONFLICT).

No tape data service here (the builtin one speaks only the reference target): the data
groups' resources are ``[]``. tgtd needs root, hence the marker."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import EXAMPLE, cluster_name
from vtlha.cli import main as vtlha_cli
from vtlha.iscsi.reservation import take
from vtlha.iscsi.scsi import ReservationConflict, make_key
from vtlha.iscsi.session import Permit, Session, Target, initiator_name
from vtlha_lab.localcluster import DEVICE_BYTES, LocalCluster, prepare_config
from vtlha_lab.natsserver import NatsServer
from vtlha_lab.ports import free_port
from vtlha_lab.tgt import Tgtd, TgtdSpec

pytestmark = pytest.mark.root  # tgtd needs root

IQN = "iqn.2026-12.org.vtlha:cluster-test"
BLOCK = 4096


@pytest.fixture
def iscsi_cluster(request: pytest.FixtureRequest, nats_server: NatsServer,
                  tmp_path: Path) -> Iterator[tuple[LocalCluster, Tgtd]]:
    cfg_path = prepare_config(EXAMPLE, tmp_path, cluster=cluster_name(request),
                              single_server=True)
    raw: dict[str, Any] = yaml.safe_load(cfg_path.read_text())
    backing = {}
    for name in raw["devices"]:
        p = tmp_path / "luns" / f"{name}.img"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(DEVICE_BYTES)
        backing[name] = p
    spec = TgtdSpec(IQN, [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], backing,
                    block_size=BLOCK)
    raw["san"] = {"kind": "iscsi", "iqn": IQN, "portals": spec.portals}
    for name, dev in raw["devices"].items():
        dev["lun"] = spec.lun_of(name)
        dev["backing"] = str(backing[name])
    for pair in raw["pairs"]:
        for node in pair["nodes"]:
            node["groups"]["data"]["resources"] = []
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    tgtd = Tgtd(spec, tmp_path / "tgtd.log", nice=-10)
    tgtd.start()
    c = LocalCluster(cfg_path, tmp_path, nats_urls=[nats_server.spec.url])
    try:
        yield c, tgtd
    finally:
        c.stop()
        tgtd.stop()


def _served(c: LocalCluster, host: str, group: str, epoch: int) -> bool:
    st = c.status(host, "storage-monitor") or {}
    g = st.get("groups", {}).get(group)
    return bool(g) and g["state"] == "served" and g["epoch"] == epoch


async def _reservation(target: Target, who: str) -> tuple[int | None, tuple[int, ...]]:
    s = await Session.open(target, who, 2.0)
    try:
        return (await s.read_reservation()).key, (await s.read_keys()).keys
    finally:
        await s.close()


def test_crash_moves_the_reservations_to_node_b_and_node_a_cannot_write(
        iscsi_cluster: tuple[LocalCluster, Tgtd]) -> None:
    c, tgtd = iscsi_cluster
    cfg = c.cfg
    c.start_services()
    c.wait_for(lambda: _served(c, "node-a", "node-a-data", 1)
               and _served(c, "node-b", "node-b-data", 1), 30,
               what="both nodes to serve their data groups on tgt")
    reader = initiator_name(cfg.cluster, "test", "keys")

    def target(device: str, path: int = 0) -> Target:
        lun = cfg.devices[device].lun
        assert lun is not None
        return Target(spec_portal(path), IQN, lun)

    def spec_portal(path: int) -> str:
        return tgtd.spec.portals[path]

    key_a1 = make_key(cfg.cluster, "node-a", 1)
    key_b1 = make_key(cfg.cluster, "node-b", 1)
    for group, key in (("node-a-data", key_a1), ("node-b-data", key_b1)):
        for dev in cfg.group_devices(group):
            held, _ = asyncio.run(_reservation(target(dev), reader))
            assert held == key, f"{dev}: {held!r}"
    # The storage-monitor's /status shows READ KEYS / READ RESERVATION per device.
    # (a probe's view: the next probe after node-a took it)
    def seen_by_b() -> dict[str, Any] | None:
        v = (c.status("node-b", "storage-monitor") or {}).get("reservations", {}).get("vtl-a0")
        return v if v and v["holder"] == "node-a" else None

    st = c.wait_for(seen_by_b, 10, what="node-b's probes to see node-a's reservation of vtl-a0")
    assert st["epoch"] == 1 and st["type"] == "write exclusive"
    assert st["reservation"].endswith("(node-a, epoch 1)")
    assert (c.status("node-a", "storage-monitor") or {})["san_kind"] == "iscsi"

    async def scenario() -> tuple[int | None, float]:
        # node-a's writer: a session with node-a's key at epoch 1 made the holder (as a
        # data service of node-a's would be, under node-a's valid notice) and writing.
        old = await Session.open(target("vtl-a0", 1),
                                 initiator_name(cfg.cluster, "node-a", "data-p1"), 2.0)
        try:
            await take(old, key_a1, Permit("node-a-data", 1, time.monotonic() + 5))
            await old.write(8, b"a" * BLOCK)
            t0 = time.monotonic()
            killed = c.crash("node-a")
            assert "storage-monitor" in killed
            await asyncio.to_thread(
                c.wait_for, lambda: _served(c, "node-b", "node-a-data", 2), 30,
                what="node-b to serve node-a's data group at epoch 2")
            took = time.monotonic() - t0
            held, _ = await _reservation(target("vtl-a0"), reader)
            with pytest.raises(ReservationConflict):
                await old.write(9, b"x" * BLOCK)
            # the write did not land
            assert await old.read(9, 1) == b"\0" * BLOCK
            return held, took
        finally:
            await old.close()

    held, took = asyncio.run(scenario())
    assert held == make_key(cfg.cluster, "node-b", 2)
    for dev in cfg.group_devices("node-a-data"):
        held_dev, keys = asyncio.run(_reservation(target(dev, 1), reader))
        assert held_dev == make_key(cfg.cluster, "node-b", 2), dev
        assert key_a1 not in keys, f"{dev}: node-a's key is still registered: {keys}"
    # node-b's own group is untouched.
    for dev in cfg.group_devices("node-b-data"):
        assert asyncio.run(_reservation(target(dev), reader))[0] == key_b1
    events = [e for e in c.events() if e.kind == "storage.takeover" and e.new == "node-b"
              and e.group == "node-a-data"]
    assert {e.data["device"] for e in events} == set(cfg.group_devices("node-a-data"))
    assert all(e.epoch == 2 and e.data["op"] == "preempted" for e in events)
    assert all(e.data["key"].endswith("(node-b, epoch 2)")
               and e.data["previous_key"].endswith("(node-a, epoch 1)") for e in events)
    # `vtlha status` reads each device's reservation and keys from the target.
    out = CliRunner().invoke(vtlha_cli, ["status", "--config", str(c.config_path),
                                         "--nats", ",".join(c.client_urls())])
    assert out.exit_code == 0, out.output
    lines = {ln.split()[1]: ln for ln in out.output.splitlines() if ln.startswith("device ")}
    assert "reservation 0x" in lines["vtl-a0"] and "(node-b, epoch 2)" in lines["vtl-a0"]
    assert "(node-b, epoch 1)" in lines["vtl-b0"]
    print(f"takeover (crash -> node-b serves node-a-data on tgt): {took:.2f} s")


def test_a_hung_target_is_a_global_failure_and_probes_stay_bounded(
        iscsi_cluster: tuple[LocalCluster, Tgtd]) -> None:
    """tgtd stopped (SIGSTOP: every path of both nodes hangs): the probes time out
    (bounded), each node loses every device, and the arbiter raises the global alarm
    without moving any group; SIGCONT: the paths come back and the episode ends."""
    c, tgtd = iscsi_cluster
    c.start_services()
    c.wait_for(lambda: _served(c, "node-a", "node-a-data", 1)
               and _served(c, "node-b", "node-b-data", 1), 30,
               what="both nodes to serve their data groups on tgt")

    def kinds(kind: str) -> list[Any]:
        return [e for e in c.events() if e.kind == kind]

    tgtd.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        c.wait_for(lambda: kinds("storage.global_failure"), 60, interval=0.5,
                   what="the arbiter's global storage alarm")
        alarm = time.monotonic() - t0
        # The alarm needs only the companion's doubt (no probe confirmed now); a
        # device counts as lost after the fall count, so each node's device_lost may
        # follow the alarm by a probe round or two.
        c.wait_for(lambda: {e.data["node"] for e in kinds("storage.device_lost")}
                   == {"node-a", "node-b"}, 30, interval=0.5,
                   what="both nodes to report their devices lost")
        assert c.held_by() == {g: h for g, (h, _) in c.cfg.groups().items()}, \
            "a group moved although no node reaches the storage"
    finally:
        tgtd.signal(signal.SIGCONT)
    c.wait_for(lambda: kinds("storage.recovered"), 60, interval=0.5,
               what="the end of the storage episode")
    c.wait_for(lambda: all(p["reachable"] for h in ("node-a", "node-b")
                           for p in (c.status(h, "storage-monitor") or {"paths": [{}]})
                           .get("paths", [{}]) if p), 30, what="every path up again")
    assert c.held_by() == {g: h for g, (h, _) in c.cfg.groups().items()}
    # The holder sessions timed out with the target; each owner took its LUNs again
    # (under its still valid lease notice) once the target answered.
    c.wait_for(lambda: [e for e in kinds("storage.retaken")
                        if "taken again on path" in e.data["detail"]], 30, interval=0.5,
               what="a lost holder taken again")
    reader = initiator_name(c.cfg.cluster, "test", "keys")
    for group, (home, _) in c.cfg.groups().items():
        for dev in c.cfg.group_devices(group):
            lun = c.cfg.devices[dev].lun
            assert lun is not None
            want = make_key(c.cfg.cluster, home, 1)
            c.wait_for(lambda lun=lun, want=want: asyncio.run(_reservation(
                Target(tgtd.spec.portals[0], IQN, lun), reader))[0] == want, 30,
                interval=0.5, what=f"{dev} held by {home} again")
    print(f"hung tgtd -> global alarm: {alarm:.1f} s")
