"""Integration tests of the reference SAN target (test/demo infrastructure standing in
for a real SAN): a real target on free loopback ports with temporary backing files,
real TCP clients. Reservations, the storage fence (a write as A after B's preempt is
refused, and the target's log shows it), persistence across a restart, EIO from a
truncated backing file, a hung device, bad frames, and the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from vtlha.config import ClusterConfig, parse_config
from vtlha.san import SanClient, SanConnectionError, SanRefused, SanTimeout
from vtlha.san.protocol import MAX_HEADER, decode_header, encode_frame, read_frame
from vtlha_lab.ports import free_block
from vtlha_lab.santarget import SanTarget, read_audit_log

VTLHA_LAB = Path(sys.executable).parent / "vtlha-lab"
BS = 4096
DEV_BYTES = 64 * BS


def _free_base(n: int = 2) -> int:
    return free_block(n)
    raise RuntimeError("no free port range")


def _raw_config(port: int) -> dict[str, Any]:
    def node(name: str, ip: str, devs: list[str]) -> dict[str, Any]:
        return {"name": name, "service_ip": f"198.51.100.{ip}/24",
                "groups": {"data": {"devices": devs}}}

    return {
        "cluster": "santest",
        "nats": {"servers": ["witness"]},
        "pairs": [{"name": "pair-1", "nodes": [node("node-a", "1", ["dev0", "dev2"]),
                                               node("node-b", "2", ["dev1"])]}],
        "san": {"host": "witness", "port": port},
        "devices": {
            "dev0": {"backing": "san/dev0.img", "paths": {"node-a": 2, "node-b": 2}},
            "dev1": {"backing": "san/dev1.img", "paths": {"node-a": 2, "node-b": 2}},
            "dev2": {"backing": "san/dev2.img", "paths": {"node-a": 1}},
        },
    }


@pytest.fixture
def cfg() -> ClusterConfig:
    return parse_config(_raw_config(_free_base()))


@pytest.fixture
async def target(cfg: ClusterConfig, tmp_path: Path) -> AsyncIterator[SanTarget]:
    t = SanTarget(cfg, tmp_path, host="127.0.0.1", io_timeout=3.0, create_size=DEV_BYTES)
    await t.start()
    try:
        yield t
    finally:
        await t.stop()


async def _client(t: SanTarget, node: str | None, path: int = 0,
                  timeout: float = 2.0) -> SanClient:
    c = SanClient("127.0.0.1", t.port_base + path, node, path, timeout=timeout)
    await c.connect()
    return c


def _block(tag: bytes) -> bytes:
    return (tag * (BS // len(tag) + 1))[:BS]


async def test_reserve_write_read_back(target: SanTarget) -> None:
    a, b = await _client(target, "node-a"), await _client(target, "node-b", path=1)
    try:
        for c in (a, b):
            await c.register("dev0")
        r = await a.reserve("dev0", 1)
        assert (r["holder"], r["epoch"]) == ("node-a", 1)
        await a.write("dev0", 5, 1, _block(b"A1"), fua=True)
        assert await a.read("dev0", 5) == _block(b"A1")
        assert await b.read("dev0", 5) == _block(b"A1")  # registrants may read
        with pytest.raises(SanRefused, match="held by node-a at epoch 1"):
            await b.write("dev0", 5, 1, _block(b"B1"))
        with pytest.raises(SanRefused, match=r"reservation conflict.*held by node-a"):
            await b.reserve("dev0", 2)
        await a.reserve("dev0", 1)  # idempotent for the holder
        st = await b.status()
        assert st["devices"]["dev0"]["holder"] == "node-a"
        assert st["devices"]["dev0"]["registrants"] == ["node-a", "node-b"]
    finally:
        await a.close()
        await b.close()


async def test_write_as_a_after_b_preempt_is_refused(target: SanTarget) -> None:
    a, b = await _client(target, "node-a"), await _client(target, "node-b")
    try:
        await a.register("dev0")
        await b.register("dev0")
        await a.reserve("dev0", 3)
        await a.write("dev0", 0, 3, _block(b"A"))
        r = await b.preempt("dev0", 4)
        assert (r["holder"], r["epoch"], r["old_holder"], r["old_epoch"]) == \
            ("node-b", 4, "node-a", 3)
        assert r["drained"] is True
        with pytest.raises(SanRefused) as ei:
            await a.write("dev0", 0, 3, _block(b"late"))  # the paused node's late write
        assert "held by node-b at epoch 4" in ei.value.reason
        assert ei.value.reply["holder"] == "node-b" and ei.value.reply["epoch"] == 4
        with pytest.raises(SanRefused, match="held by node-b at epoch 4"):
            await a.write("dev0", 0, 4, _block(b"late"))  # right epoch, not the holder
        await b.write("dev0", 1, 4, _block(b"B"))
        assert await a.read("dev0", 0, 2) == _block(b"A") + _block(b"B")
    finally:
        await a.close()
        await b.close()

    entries = read_audit_log(target.audit_path)
    writes = [(e["node"], e["epoch"], e["decision"]) for e in entries if e["event"] == "write"]
    assert writes == [("node-a", 3, "accepted"), ("node-a", 3, "refused"),
                      ("node-a", 4, "refused"), ("node-b", 4, "accepted")]
    for e in entries:
        assert {"ts", "node", "device", "epoch", "reason", "decision"} <= set(e)
    refused = [e for e in entries if e["event"] == "write" and e["decision"] == "refused"]
    assert all("node-b" in e["reason"] and e["lba"] == 0 for e in refused)
    preempt = next(e for e in entries if e["event"] == "preempt")
    assert (preempt["node"], preempt["epoch"], preempt["old_holder"]) == ("node-b", 4, "node-a")
    _assert_no_write_after_preempt(entries)
    assert target.counters["writes_refused"] == 2


def _assert_no_write_after_preempt(entries: list[dict[str, Any]]) -> None:
    """The fence's invariant, from the log alone: once a node took a device by
    reservation at epoch E, no write at a lower epoch or from another node is accepted."""
    holder: dict[str, tuple[str, int]] = {}
    for e in entries:
        if e["decision"] != "accepted":
            continue
        if e["event"] in ("reserve", "preempt"):
            holder[e["device"]] = (e["node"], e["epoch"])
        elif e["event"] == "write":
            assert holder.get(e["device"]) == (e["node"], e["epoch"]), e


async def test_preempt_waits_for_writes_in_flight(target: SanTarget) -> None:
    """A write accepted before a preempt lands before the preempt's reply, never after."""
    a, b = await _client(target, "node-a"), await _client(target, "node-b")
    try:
        await a.register("dev0")
        await b.register("dev0")
        await a.reserve("dev0", 1)
        target.hang_writes("dev0")
        w = asyncio.create_task(a.write("dev0", 9, 1, _block(b"in flight")))
        await asyncio.sleep(0.05)
        p = asyncio.create_task(b.preempt("dev0", 2))
        await asyncio.sleep(0.1)
        assert not p.done() and not w.done()
        async with SanClient("127.0.0.1", target.port_base + 1, "node-a", 1) as a1:
            with pytest.raises(SanRefused, match="held by node-b at epoch 2"):
                await a1.write("dev0", 9, 1, _block(b"new"))
        target.unhang("dev0")
        assert (await asyncio.wait_for(p, 2))["drained"] is True
        assert w.done() and (await w)["lba"] == 9
        assert await b.read("dev0", 9) == _block(b"in flight")
    finally:
        target.unhang("dev0")
        await a.close()
        await b.close()
    events = [(e["event"], e["node"], e["decision"]) for e in read_audit_log(target.audit_path)
              if e["event"] in ("write", "preempt")]
    assert events == [("write", "node-a", "accepted"), ("preempt", "node-b", "accepted"),
                      ("write", "node-a", "refused")]


async def test_preempt_with_lower_or_equal_epoch_refused(target: SanTarget) -> None:
    a, b = await _client(target, "node-a"), await _client(target, "node-b")
    try:
        await a.register("dev1")
        await b.register("dev1")
        await a.reserve("dev1", 5)
        for epoch in (5, 4, 0):
            with pytest.raises(SanRefused, match=r"not above .* epoch 5.*held by node-a"):
                await b.preempt("dev1", epoch)
        await a.write("dev1", 0, 5, _block(b"still A"))
        b1 = await _client(target, "node-b", 1)
        with pytest.raises(SanRefused, match="not registered"):
            await b1.preempt("dev0", 9)
        await b1.close()
    finally:
        await a.close()
        await b.close()
    refused = [e for e in read_audit_log(target.audit_path)
               if e["event"] == "preempt" and e["decision"] == "refused"]
    assert [e["epoch"] for e in refused] == [5, 4, 0]


async def test_release_only_by_holder(target: SanTarget) -> None:
    a, b = await _client(target, "node-a"), await _client(target, "node-b")
    try:
        await a.register("dev0")
        await b.register("dev0")
        await a.reserve("dev0", 2)
        with pytest.raises(SanRefused, match=r"release refused.*held by node-a at epoch 2"):
            await b.release("dev0", 2)
        with pytest.raises(SanRefused, match="release refused"):
            await a.release("dev0", 1)  # a stale release at an old epoch
        r = await a.release("dev0", 2)
        assert r["holder"] is None and r["epoch"] == 2
        with pytest.raises(SanRefused, match="not reserved"):
            await a.write("dev0", 0, 2, _block(b"x"))
        with pytest.raises(SanRefused, match="below device dev0's epoch 2"):
            await b.reserve("dev0", 1)  # the epoch never goes down
        await b.reserve("dev0", 2)
        await b.write("dev0", 0, 2, _block(b"b"))
    finally:
        await a.close()
        await b.close()


async def test_hello_path_and_registration_checks(target: SanTarget) -> None:
    anon = await _client(target, None)
    try:
        with pytest.raises(SanRefused, match="hello"):
            await anon.read("dev0", 0)
        assert (await anon.status())["cluster"] == "santest"
        with pytest.raises(SanRefused, match="not a node"):
            await anon.call({"op": "hello", "node": "witness", "path": 0})
        with pytest.raises(SanRefused, match="serves path 0, not path 1"):
            await anon.call({"op": "hello", "node": "node-a", "path": 1})
    finally:
        await anon.close()
    a1 = await _client(target, "node-a", path=1)
    b = await _client(target, "node-b")
    try:
        with pytest.raises(SanRefused, match="has 1 path"):
            await a1.register("dev2")  # dev2 has one path from node-a
        with pytest.raises(SanRefused, match="has 0 path"):
            await b.register("dev2")
        with pytest.raises(SanRefused, match="unknown device"):
            await b.register("nodev")
        with pytest.raises(SanRefused, match="not registered"):
            await b.read("dev0", 0)
        await b.register("dev0")
        with pytest.raises(SanRefused, match=r"EINVAL .*beyond the end"):
            await b.read("dev0", DEV_BYTES // BS)
    finally:
        await a1.close()
        await b.close()


async def test_reservations_survive_a_restart(cfg: ClusterConfig, tmp_path: Path) -> None:
    t = SanTarget(cfg, tmp_path, host="127.0.0.1", create_size=DEV_BYTES)
    await t.start()
    try:
        a, b = await _client(t, "node-a"), await _client(t, "node-b")
        await a.register("dev0")
        await b.register("dev0")
        await a.reserve("dev0", 1)
        await b.preempt("dev0", 7)
        await b.write("dev0", 2, 7, _block(b"kept"))
        await a.close()
        await b.close()
    finally:
        await t.stop()
    saved = orjson.loads(t.reservations_path.read_bytes())
    assert saved["devices"]["dev0"]["holder"] == "node-b"

    t2 = SanTarget(cfg, tmp_path, host="127.0.0.1", create_size=DEV_BYTES)
    await t2.start()
    try:
        a, b = await _client(t2, "node-a"), await _client(t2, "node-b")
        st = (await a.status())["devices"]["dev0"]
        assert (st["holder"], st["epoch"], st["registrants"]) == \
            ("node-b", 7, ["node-a", "node-b"])
        with pytest.raises(SanRefused, match="held by node-b at epoch 7"):
            await a.write("dev0", 2, 1, _block(b"stale"))
        with pytest.raises(SanRefused, match="not above"):
            await a.preempt("dev0", 7)
        assert await a.read("dev0", 2) == _block(b"kept")
        await b.write("dev0", 3, 7, _block(b"more"))
        await a.close()
        await b.close()
    finally:
        await t2.stop()


async def test_corrupt_reservations_file_stops_the_start(cfg: ClusterConfig,
                                                        tmp_path: Path) -> None:
    from vtlha.errors import FatalError

    (tmp_path / "san").mkdir()
    (tmp_path / "san" / "reservations.json").write_text("{not json")
    t = SanTarget(cfg, tmp_path, host="127.0.0.1", create_size=DEV_BYTES)
    with pytest.raises(FatalError, match="cannot load reservations"):
        await t.start()
    await t.stop()


async def test_truncated_backing_gives_eio_and_others_keep_working(
        target: SanTarget) -> None:
    a = await _client(target, "node-a")
    try:
        for d in ("dev0", "dev1"):
            await a.register(d)
            await a.reserve(d, 1)
        await a.write("dev1", 0, 1, b"".join(_block(b"%d" % i) for i in range(4)))
        os.truncate(target.devices["dev1"].path, BS)  # the fault: the device shrinks
        assert await a.read("dev1", 0) == _block(b"0")
        with pytest.raises(SanRefused) as ei:
            await a.read("dev1", 2)
        assert ei.value.reason.startswith("EIO") and "truncated" in ei.value.reason
        with pytest.raises(SanRefused, match="write refused: EIO write"):
            await a.write("dev1", 3, 1, _block(b"x"))
        await a.write("dev0", 0, 1, _block(b"fine"))  # the other device is served
        assert await a.read("dev0", 0) == _block(b"fine")
        assert target.counters["io_errors"] == 2
    finally:
        await a.close()
    failed = [e for e in read_audit_log(target.audit_path) if e["event"] == "write-failed"]
    assert len(failed) == 1 and failed[0]["reason"].startswith("EIO")


async def test_hung_read_blocks_neither_other_connections_nor_the_client(
        target: SanTarget) -> None:
    a = await _client(target, "node-a", timeout=0.3)
    b = await _client(target, "node-b", path=1)
    try:
        for c in (a, b):
            await c.register("dev0")
            await c.register("dev1")
        await a.reserve("dev1", 1)
        target.hang_reads("dev0")
        t0 = time.monotonic()
        hung = asyncio.create_task(a.read("dev0", 0))
        await asyncio.sleep(0.05)
        # meanwhile the target serves another connection, the same device's writes
        # and another device's reads
        assert await b.read("dev1", 0) == b"\0" * BS
        assert (await b.status())["devices"]["dev0"]["registrants"] == ["node-a", "node-b"]
        assert time.monotonic() - t0 < 0.25
        with pytest.raises(SanTimeout, match=r"no reply within 0\.3 s"):
            await hung
        assert 0.28 < time.monotonic() - t0 < 1.5
        assert not a.connected
        await a.connect()  # a new connection on the same path works
        await a.write("dev1", 0, 1, _block(b"after"))
        assert await a.read("dev1", 0) == _block(b"after")
        # the target's own I/O timeout: the reply says ETIMEDOUT
        target.io_timeout = 0.2
        with pytest.raises(SanRefused, match="read refused: ETIMEDOUT device dev0"):
            await b.read("dev0", 0, timeout=2.0)
        assert target.counters["io_timeouts"] >= 1
    finally:
        target.unhang("dev0")
        await a.close()
        await b.close()


async def _raw(t: SanTarget, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", t.port_base), 2)
    w.write(data)
    await asyncio.wait_for(w.drain(), 2)
    return r, w


async def _reply(r: asyncio.StreamReader) -> dict[str, Any]:
    head, _ = await asyncio.wait_for(read_frame(r), 2)
    return decode_header(head)


async def test_bad_frames_are_answered_counted_and_survived(target: SanTarget) -> None:
    bad = [struct.pack(">II", 5, 0) + b"nope!", encode_frame({"op": "wipe", "id": 4}),
           encode_frame({"op": "read", "device": "dev0", "lba": "x", "count": 1}),
           encode_frame([1, 2]),  # type: ignore[arg-type]
           encode_frame({"op": "status"}, b"payload")]
    r, w = await _raw(target, b"".join(bad) + encode_frame({"op": "status", "id": 9}))
    try:
        replies = [await _reply(r) for _ in range(len(bad) + 1)]
    finally:
        w.close()
    assert [x["ok"] for x in replies] == [False] * len(bad) + [True]
    assert all(x["reason"].startswith("EINVAL") for x in replies[:-1])
    assert replies[1]["id"] == 4 and "unknown op 'wipe'" in replies[1]["reason"]
    assert replies[-1]["id"] == 9 and replies[-1]["counters"]["invalid_frames"] == len(bad)

    r, w = await _raw(target, struct.pack(">II", MAX_HEADER + 1, 0))
    try:
        assert "E2BIG" in (await _reply(r))["reason"]
        assert await asyncio.wait_for(r.read(), 2) == b""  # closed by the target
    finally:
        w.close()
    r, w = await _raw(target, b"\0\0\0")  # a partial prefix, then the peer goes away
    w.close()
    async with SanClient("127.0.0.1", target.port_base, None) as c:
        st = await c.status()
    assert st["counters"]["oversize_frames"] == 1
    assert st["counters"]["internal_errors"] == 0


async def test_client_errors_are_clear(target: SanTarget) -> None:
    c = SanClient("127.0.0.1", target.port_base, "node-a")
    with pytest.raises(SanConnectionError, match="not connected"):
        await c.status()
    await target.stop()
    with pytest.raises(SanConnectionError, match="cannot connect"):
        await c.connect()
    await target.start()


async def test_latency_through_the_target(target: SanTarget) -> None:
    """A few hundred 4 KiB writes and reads on one path; prints the figures."""
    a = await _client(target, "node-a")
    try:
        await a.register("dev0")
        await a.reserve("dev0", 1)
        n = 300
        wr, rd = [], []
        for i in range(n):
            t0 = time.perf_counter()
            await a.write("dev0", i % 64, 1, _block(b"%d" % i))
            wr.append(time.perf_counter() - t0)
        for i in range(n):
            t0 = time.perf_counter()
            await a.read("dev0", i % 64)
            rd.append(time.perf_counter() - t0)
    finally:
        await a.close()

    def fmt(xs: list[float]) -> str:
        xs = sorted(xs)
        return (f"median {statistics.median(xs) * 1e6:.0f} us, "
                f"p99 {xs[int(len(xs) * 0.99)] * 1e6:.0f} us")

    print(f"\nSAN target 4 KiB latency over loopback ({n} ops each): "
          f"write {fmt(wr)}; read {fmt(rd)}")
    assert statistics.median(wr) < 0.05 and statistics.median(rd) < 0.05


def test_cli_serve_status_and_sigterm(tmp_path: Path) -> None:
    base = _free_base()
    cfg_path = tmp_path / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(_raw_config(base)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [str(VTLHA_LAB), "san", "serve", "--config", str(cfg_path), "--state-dir",
         str(tmp_path / "state"), "--host", "127.0.0.1", "--create-size", str(DEV_BYTES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 15
        out = None
        while time.monotonic() < deadline:
            out = subprocess.run([str(VTLHA_LAB), "san", "status", "--config", str(cfg_path),
                                  "--timeout", "1"], capture_output=True, text=True,
                                 timeout=15)
            if out.returncode == 0:
                break
            assert proc.poll() is None, proc.communicate(timeout=5)
            time.sleep(0.1)
        assert out is not None and out.returncode == 0, out.stderr if out else None
        assert "dev0" in out.stdout and "dev2" in out.stdout and "santest" in out.stdout
        helps = subprocess.run([str(VTLHA_LAB), "san", "serve", "--help"], capture_output=True,
                               text=True, timeout=15).stdout
        assert "reference SAN target" in helps and "--port-base" in helps
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    lines = [orjson.loads(x) for x in err.splitlines() if x.strip()]
    msgs = [x["msg"] for x in lines]
    assert "san target listening" in msgs and "san target stopped" in msgs
    assert all(x["service"] == "san-target" for x in lines)
    assert (tmp_path / "state" / "san" / "dev0.img").stat().st_size == DEV_BYTES
