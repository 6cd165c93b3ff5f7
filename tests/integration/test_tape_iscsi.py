"""The tape data service on a real iSCSI target (tgtd on 127.0.0.1), in process: it
holds the reservation itself (Write Exclusive: only the holder's session writes), with
the permit its storage-monitor hands it, and every block records writer, epoch and
sequence. The writes-in-flight mitigation for a target without PREEMPT AND ABORT
(``docs/storage.md``, "Writes in flight"): a write of node-a's stalled in the target
across node-b's PREEMPT lands when the store answers, and tgt answers GOOD — node-a's
service does not acknowledge it (its permit ran out), sends nothing more without a
permit, is refused by the target with one, and the read-back check names a block from
a fenced writer. tgtd needs root, hence the marker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLE
from tests.fusemount import HangMount, stalling_target
from vtlha.config import ClusterConfig, load_config
from vtlha.iscsi.permitfile import revoke_permit, write_permit
from vtlha.iscsi.scsi import make_key
from vtlha.iscsi.session import Session, Target, initiator_name
from vtlha.tape import record
from vtlha.tape.service import TapeService
from vtlha.tape.stores import IscsiStore
from vtlha_lab.ports import free_port
from vtlha_lab.tapeclient import TapeConnection, TapeError, payload, verify_blocks
from vtlha_lab.tgt import Tgtd

pytestmark = pytest.mark.root

IQN = "iqn.2026-12.org.vtlha:tape"
BLOCK = 4096
LUN_BYTES = 1 << 20
GROUP = "node-a-data"


def _config(tmp_path: Path, portal: str) -> ClusterConfig:
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    raw["cluster"] = "tapeiscsi"
    raw["san"] = {"kind": "iscsi", "iqn": IQN, "portals": [portal]}
    raw["devices"] = {"d0": {"backing": "unused", "paths": {"node-a": 1, "node-b": 1},
                             "lun": 1}}
    for pair in raw["pairs"]:
        for n in pair["nodes"]:
            n["groups"]["data"]["devices"] = ["d0"] if n["name"] == "node-a" else []
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path)


@dataclass
class Rig:
    cfg: ClusterConfig
    fs: HangMount
    tgtd: Tgtd
    tmp: Path

    def permit_file(self, node: str) -> Path:
        return self.tmp / f"{node}-permit.json"

    async def service(self, node: str, epoch: int) -> TapeService:
        run = self.tmp / f"{node}-run"
        run.mkdir(exist_ok=True)
        write_permit(self.permit_file(node), GROUP, epoch, time.monotonic() + 30)
        store = IscsiStore(self.cfg, node, GROUP, epoch, ["d0"], self.permit_file(node), 2.0)
        svc = TapeService(self.cfg, node, GROUP, epoch, ["d0"], f"127.0.0.1:{free_port()}",
                          store, run)
        await svc.start()
        return svc


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    with stalling_target(tmp_path, IQN, LUN_BYTES, BLOCK, device="d0") as (fs, daemon):
        yield Rig(_config(tmp_path, daemon.spec.portals[0]), fs, daemon, tmp_path)


async def _holder(rig: Rig) -> int | None:
    s = await Session.open(Target(rig.cfg.san.portals[0], IQN, 1),
                           initiator_name(rig.cfg.cluster, "test", "keys"), 2.0)
    try:
        return (await s.read_reservation()).key
    finally:
        await s.close()


def _put(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


async def _write(svc: TapeService, block: int) -> dict[str, Any]:
    conn = TapeConnection(f"{svc.host}:{svc.port}", timeout=10.0)
    try:
        reply, _ = await conn.request({"op": "write", "block": block}, payload(block))
        return reply
    finally:
        await conn.close()


async def test_the_writer_holds_and_a_write_after_the_lease_is_never_acknowledged(
        rig: Rig) -> None:
    cfg = rig.cfg
    a = await rig.service("node-a", 1)
    b: TapeService | None = None
    try:
        # node-a's data service holds the reservation itself: only its session writes
        assert await _holder(rig) == make_key(cfg.cluster, "node-a", 1)
        ack0 = await _write(a, 0)
        assert ack0["ok"] and ack0["node"] == "node-a" and ack0["epoch"] == 1
        # node-a's next write stalls in the target's backing store (accepted by tgt)
        rig.fs.hang_writes(record.MAGIC + (1).to_bytes(8, "big"))
        stale = asyncio.create_task(_write(a, 1))
        deadline = time.monotonic() + 10
        while not rig.fs.write_blocked():
            assert time.monotonic() < deadline, "node-a's write never reached the store"
            await asyncio.sleep(0.01)
        # node-a's lease ends (its storage-monitor revokes the permit); node-b takes over
        revoke_permit(rig.permit_file("node-a"), GROUP, 1)
        b = await asyncio.wait_for(rig.service("node-b", 2), 10)  # PREEMPT while stuck
        assert await _holder(rig) == make_key(cfg.cluster, "node-b", 2)
        rig.fs.unstick()
        # tgt answers node-a's stale write GOOD; node-a's service does not acknowledge it
        with pytest.raises(TapeError, match="not acknowledged: the permit ran out"):
            await asyncio.wait_for(stale, 10)
        assert a.unacknowledged == 1
        with pytest.raises(TapeError, match="not writing: the permit ran out"):
            await _write(a, 1)   # without a permit nothing is sent
        # node-a paused with an old belief (a permit that looks valid again): the target
        # refuses it, and its service stops serving for good
        write_permit(rig.permit_file("node-a"), GROUP, 1, time.monotonic() + 30)
        with pytest.raises(TapeError, match="RESERVATION CONFLICT"):
            await _write(a, 1)
        assert a.lost is not None
        ack1 = await _write(b, 1)
        assert ack1["ok"] and ack1["node"] == "node-b" and ack1["epoch"] == 2
        acks = {0: {"node": "node-a", "epoch": 1}, 1: {"node": "node-b", "epoch": 2}}
        out = await verify_blocks(f"{b.host}:{b.port}", acks, deadline=10)
        assert out["bad"] == [] and out["fenced"] == []
        assert out["writers"] == {"node-a@1": 1, "node-b@2": 1}
        # On a store that runs writes in parallel (not FUSE, which serialises them), the
        # stale write could land after node-b's: its bytes over block 1 on the LUN are
        # what the read-back check must name.
        stale_block = record.encode(BLOCK, record.Record("node-a", 1, 2, 1, 0, payload(1)))
        await asyncio.to_thread(_put, rig.fs.file("lun"), 1 * BLOCK, stale_block)  # lba 1
        out = await verify_blocks(f"{b.host}:{b.port}", acks, deadline=10)
        assert out["fenced"] == [{"block": 1, "acknowledged_by": ["node-b", 2],
                                  "written_by": ["node-a", 1], "seq": 2}], out
        assert len(out["bad"]) == 1
    finally:
        rig.fs.unstick()
        await a.stop()
        if b is not None:
            await b.stop()


async def test_a_clean_stop_releases_and_a_restart_at_the_epoch_reserves_again(
        rig: Rig) -> None:
    """A local restart of the data service: its stop releases and unregisters (nothing
    of node-a's left at the target), the next one reserves again under the permit;
    without a valid permit it cannot start."""
    a = await rig.service("node-a", 1)
    assert (await _write(a, 0))["ok"]
    await a.stop()
    assert await _holder(rig) is None
    a2 = await rig.service("node-a", 1)
    try:
        assert await _holder(rig) == make_key(rig.cfg.cluster, "node-a", 1)
        reply = await _write(a2, 1)
        assert reply["ok"] and reply["seq"] == 1
    finally:
        await a2.stop()
    revoke_permit(rig.permit_file("node-a"), GROUP, 1)
    store = IscsiStore(rig.cfg, "node-a", GROUP, 1, ["d0"], rig.permit_file("node-a"), 2.0)
    try:
        with pytest.raises(Exception, match="permit"):
            await store.start()
    finally:
        await store.close(release=False)
    assert await _holder(rig) is None
