"""The storage-monitor's SAN seam (``vtlha_storage_monitor.backends``) against real
targets, in process: :class:`ReferenceSan` against the reference target (the code the
storage-monitor ran before the seam: probes, reserve/preempt at the epoch, release)
and :class:`IscsiSan` against tgtd (root): probes that never register, reservations
taken only with the hold rule's permit (a HoldGate's notice), a holder session dropped
by the target taken again only while the notice is valid, give-up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vtlha_storage_monitor.backends import IscsiSan, ReferenceSan, StorageError

from vtlha.config import ClusterConfig, parse_config
from vtlha.iscsi.scsi import make_key
from vtlha.iscsi.session import Session, Target, initiator_name
from vtlha.protocol.hold import HoldGate
from vtlha_lab.ports import free_block, free_port
from vtlha_lab.santarget import SanTarget
from vtlha_lab.tgt import Tgtd, TgtdSpec

BS = 4096
DEV_BYTES = 64 * BS
IQN = "iqn.2026-12.org.vtlha:backends"
GROUP = "node-a-data"


def _raw(san: dict[str, Any], resources: list[Any] | None = None) -> dict[str, Any]:
    def node(name: str, ip: str, devs: list[str]) -> dict[str, Any]:
        data: dict[str, Any] = {"devices": devs}
        if resources is not None:
            data["resources"] = resources
        return {"name": name, "service_ip": f"198.51.100.{ip}/24", "groups": {"data": data}}

    return {
        "cluster": "backends",
        "nats": {"servers": ["witness"]},
        "pairs": [{"name": "pair-1", "nodes": [node("node-a", "1", ["dev0", "dev1"]),
                                               node("node-b", "2", [])]}],
        "san": san,
        "devices": {"dev0": {"backing": "san/dev0.img", "paths": {"node-a": 2, "node-b": 2},
                             "lun": 1},
                    "dev1": {"backing": "san/dev1.img", "paths": {"node-a": 2, "node-b": 2},
                             "lun": 2}},
    }


def _gate(epoch: int | None = None, seconds: float = 30.0) -> HoldGate:
    g = HoldGate(margin=0.05)
    if epoch is not None:
        g.on_notice(GROUP, epoch, time.monotonic() + seconds, False)
    return g


def _noop(path: int) -> None:
    pass


# ---- the reference target -------------------------------------------------------------

@pytest.fixture
def ref_cfg() -> ClusterConfig:
    return parse_config(_raw({"host": "witness", "port": free_block(2)}))


async def test_reference_backend_probes_takes_preempts_and_releases(
        ref_cfg: ClusterConfig, tmp_path: Path) -> None:
    target = SanTarget(ref_cfg, tmp_path, host="127.0.0.1", create_size=DEV_BYTES)
    await target.start()
    connects: list[int] = []
    a = ReferenceSan(ref_cfg, "node-a", "127.0.0.1", {GROUP}, 1.0, connects.append)
    b = ReferenceSan(ref_cfg, "node-b", "127.0.0.1", {GROUP}, 1.0, _noop)
    try:
        assert a.path_indices() == [0, 1]
        for path in (0, 1):
            out = await a.probe_round(path, ["dev0", "dev1"])
            assert [(r.device, r.ok) for r in out] == [("dev0", True), ("dev1", True)]
        assert connects == [0, 1]
        took = await a.take(GROUP, "dev0", 1)
        assert (took.op, took.old_node) == ("reserve", None)
        took = await b.take(GROUP, "dev0", 2)
        assert (took.op, took.old_node, took.old_epoch) == ("preempt", "node-a", 1)
        with pytest.raises(StorageError):
            await a.take(GROUP, "dev0", 1)   # an older epoch is refused by the target
        how, _ = await a.give_up(GROUP, "dev0", 1)
        assert how.startswith("not ours any more")
        assert (await b.give_up(GROUP, "dev0", 2))[0] == "released"
        assert await a.keep(GROUP, ["dev0"], 1) == [] and a.reservations() == {}
    finally:
        await a.close()
        await b.close()
        await target.stop()


# ---- a real iSCSI target (tgtd) -----------------------------------------------------------

@pytest.fixture
def tgtd(tmp_path: Path) -> Iterator[Tgtd]:
    devices = {}
    for name in ("dev0", "dev1"):
        p = tmp_path / f"{name}.img"
        with open(p, "wb") as f:
            f.truncate(DEV_BYTES)
        devices[name] = p
    spec = TgtdSpec(IQN, [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], devices,
                    block_size=BS)
    d = Tgtd(spec, tmp_path / "tgtd.log")
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _iscsi_cfg(tgtd: Tgtd) -> ClusterConfig:
    return parse_config(_raw({"kind": "iscsi", "iqn": IQN, "portals": tgtd.spec.portals},
                             resources=[]))


async def _pr(tgtd: Tgtd, lun: int) -> tuple[int | None, tuple[int, ...]]:
    s = await Session.open(Target(tgtd.spec.portals[0], IQN, lun),
                           initiator_name("backends", "test", "keys"), 2.0)
    try:
        return (await s.read_reservation()).key, (await s.read_keys()).keys
    finally:
        await s.close()


@pytest.mark.root
async def test_iscsi_backend_takes_only_under_the_hold_rule(tgtd: Tgtd) -> None:
    cfg = _iscsi_cfg(tgtd)
    gate = _gate()
    a = IscsiSan(cfg, "node-a", gate, 1.0, _noop)
    b = IscsiSan(cfg, "node-b", _gate(2), 1.0, _noop)
    key_a1 = make_key("backends", "node-a", 1)
    a.keys_every = 0.0  # READ KEYS / READ RESERVATION at every probe here
    try:
        # probes read through both paths and register nothing
        for path in (0, 1):
            out = await a.probe_round(path, ["dev0", "dev1"])
            assert all(r.ok and r.latency is not None for r in out), out
        assert await _pr(tgtd, 1) == (None, ())
        assert a.reservations()["dev0"]["reservation"] is None

        # no notice: nothing is sent
        with pytest.raises(StorageError, match="no permit"):
            await a.take(GROUP, "dev0", 1)
        assert await _pr(tgtd, 1) == (None, ())

        gate.on_notice(GROUP, 1, time.monotonic() + 30, False)
        took = await a.take(GROUP, "dev0", 1)
        assert (took.op, took.path, took.old_node) == ("reserved", 0, None)
        assert (await _pr(tgtd, 1)) == (key_a1, (key_a1,))
        await a.probe_round(1, ["dev0"])
        seen = a.reservations()["dev0"]
        assert (seen["holder"], seen["epoch"], seen["type"]) == ("node-a", 1, "write exclusive")

        # the target drops the holder's session: taken again only while the notice is valid
        gate.on_notice(GROUP, 1, time.monotonic() + 30, True)   # revoked
        assert tgtd.drop_sessions(initiator_name("backends", "node-a", "holder0")) == 1
        a.holders[(GROUP, "dev0")].checked = 0.0
        out = await a.keep(GROUP, ["dev0"], 1)
        assert len(out) == 1 and "not taken again" in out[0] and "no permit" in out[0]
        assert await a.keep(GROUP, ["dev0"], 1) == []   # backing off: nothing tried
        gate = a.gate = _gate(1)
        a.retake_backoff.clear()
        out = await a.keep(GROUP, ["dev0"], 1)
        assert len(out) == 1 and "taken again" in out[0] and "not" not in out[0], out
        assert (await _pr(tgtd, 1))[0] == key_a1
        holder = a.holders[(GROUP, "dev0")].session
        await holder.write(4, b"a" * BS)

        # node-b at epoch 2 preempts node-a's key
        took = await b.take(GROUP, "dev0", 2)
        assert (took.op, took.old_node, took.old_epoch) == ("preempted", "node-a", 1)
        assert (await _pr(tgtd, 1))[0] == make_key("backends", "node-b", 2)
        how, _ = await a.give_up(GROUP, "dev0", 1)
        assert how.startswith("not ours any more (held by 0x") and "node-b, epoch 2" in how
        how, _ = await b.give_up(GROUP, "dev0", 2)
        assert how == "released"
        assert await _pr(tgtd, 1) == (None, ())
    finally:
        await a.close()
        await b.close()
