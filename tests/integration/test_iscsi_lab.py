"""The network lab on a real iSCSI target: Debian's tgtd in the witness's namespace
(``san.kind: iscsi``), a portal per path on the witness's service address (two paths),
one LUN per device; the nodes reach it over the lab's data network, each through its
own sessions. Faults are real: a path is cut by an nftables drop of its portal's port
inside a node's namespace; a node is killed. The tape data service writes through the
LUNs and holds the reservations itself (Write Exclusive: only the holder writes), under
its storage-monitor's permit; a client in the client namespace writes numbered blocks
and reads every acknowledged one back, checking who wrote it (writer, epoch).

- one path of the owner cut: the data service and the storage-monitor move to the
  other path (the reservation with them), no node failover, no block lost;
- every path of the owner cut: a local storage failure, node-b takes the data group
  over and its key PREEMPTs node-a's; node-a cannot write again (a session of its
  that was the holder is refused with RESERVATION CONFLICT after the heal, and it
  cannot register again without its node's valid permit);
- node-a killed: node-b acknowledges blocks; none of them is from a fenced writer.

tgtd and the lab need root, hence the marker."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ROOT, torn_down_lab
from tests.integration.test_storage_lab import Writer, _served, _storage
from vtlha_lab.lab import Lab
from vtlha_lab.tgt import LAB_IQN, LAB_PORT, use_iscsi

pytestmark = pytest.mark.root

IQN = LAB_IQN
PORT = LAB_PORT
A_DEVICES = ("vtl-a0", "vtl-a1")


def _iscsi(tape: bool) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        use_iscsi(raw, PORT, IQN)
        if not tape:
            for pair in raw["pairs"]:
                for n in pair["nodes"]:
                    n["groups"]["data"]["resources"] = []
    return edit


@pytest.fixture
def tape_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    """The lab on tgtd with the builtin tape data service (not yet started)."""
    yield from torn_down_lab(request, tmp_path, _iscsi(tape=True))


@pytest.fixture
def bare_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    """The lab on tgtd with no data service (the storage-monitor holds the LUNs)."""
    yield from torn_down_lab(request, tmp_path, _iscsi(tape=False))


def _start(lab: Lab, tape: bool = True) -> Writer | None:
    lab.start()
    lab.wait_for(lambda: _served(lab, "node-a", "node-a-data", 1)
                 and _served(lab, "node-b", "node-b-data", 1), 60,
                 what="each node to serve its data group on tgt")
    if not tape:
        return None
    w = Writer(lab, "writer")
    w.wait_acked_by("node-a", 30, 20)
    return w


def _cut(lab: Lab, paths: list[int]) -> None:
    for i in paths:
        lab.nft("node-a", f"""table inet vtlha_cut_{i} {{
  chain in {{ type filter hook input priority -300; tcp sport {PORT + i} drop; }}
  chain out {{ type filter hook output priority -300; tcp dport {PORT + i} drop; }}
}}
""")


def _heal(lab: Lab, paths: list[int]) -> None:
    for i in paths:
        lab.nft("node-a", f"delete table inet vtlha_cut_{i}\n")


def _events(lab: Lab, kind: str, since: float = 0.0) -> list[Any]:
    return [e for e in lab.events() if e.kind == kind and e.sent_at >= since]


def _seen(lab: Lab, host: str, device: str) -> dict[str, Any]:
    """READ RESERVATION / READ KEYS of ``device`` as ``host``'s probes last read them."""
    out: dict[str, Any] = _storage(lab, host).get("reservations", {}).get(device, {})
    return out


def _verify_all(w: Writer, acks: dict[int, dict[str, Any]]) -> dict[str, Any]:
    result = w.verify()
    assert sorted(acks) == list(range(len(acks)))  # no hole in the numbers
    assert result["checked"] == len(acks)
    assert result["bad"] == [] and result["fenced"] == [], result
    # every block reads back as written by the node and epoch that acknowledged it
    want: dict[str, int] = {}
    for a in acks.values():
        who = f"{a['node']}@{a['epoch']}"
        want[who] = want.get(who, 0) + 1
    assert result["writers"] == want
    return result


def _tape_status(lab: Lab, portal: str) -> dict[str, Any]:
    """`vtlha-lab tape status` from the client namespace, asked again while it fails (a
    request timeout on a loaded machine); the last error when it never answers."""
    errors: list[str] = []

    def ask() -> dict[str, Any] | None:
        r = subprocess.run([*lab.prefix("client"), str(Path(sys.executable).parent /
                                                        "vtlha-lab"), "tape", "status", portal],
                           capture_output=True, timeout=30)
        if r.returncode == 0:
            out: dict[str, Any] = orjson.loads(r.stdout)
            return out
        errors.append(r.stderr.decode(errors="replace").strip())
        return None

    try:
        out: dict[str, Any] = lab.wait_for(ask, 20, what=f"the tape data service's status "
                                           f"at {portal}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {errors[-3:]}") from None
    return out


def _gap(acks: dict[int, dict[str, Any]], after: float) -> float:
    """The longest time between two acknowledgements around ``after`` (wall clock)."""
    return max((a["t"] - acks[b - 1]["t"] for b, a in acks.items()
                if b > 0 and a["t"] >= after), default=0.0)


def test_one_path_cut_fails_over_to_the_other_path_not_to_the_companion(
        tape_lab: Lab) -> None:
    lab = tape_lab
    w = _start(lab)
    assert w is not None
    status0 = _tape_status(lab, w.portal)
    assert status0["path"] == {"vtl-a0": 0, "vtl-a1": 0}, status0
    t_cut, w_cut = time.monotonic(), time.time()
    _cut(lab, [0])
    try:
        lab.wait_for(lambda: sum(1 for a in w.acks().values() if a["t"] > w_cut) >= 30, 30,
                     what="30 blocks acknowledged after the cut")
        lab.wait_for(lambda: {e.data["device"] for e in _events(lab, "storage.path_down", w_cut)
                              if e.node == "node-a" and e.data["path"] == 0}
                     == set(lab.cfg.devices), 30, what="node-a's path 0 down for every device")
        # the holder sessions moved: node-a's storage-monitor saw its own lost and found
        # the reservation held by its node's key (the data service's, on path 1)
        lab.wait_for(lambda: {e.data["detail"].split(":")[0]
                              for e in _events(lab, "storage.retaken", w_cut)
                              if e.node == "node-a" and "(held)" in e.data["detail"]}
                     >= set(A_DEVICES), 30,
                     what="node-a's storage-monitor to find its holders again")
        acks = w.acks()
        assert all(a["node"] == "node-a" and a["epoch"] == 1 for a in acks.values())
        st = _tape_status(lab, w.portal)
        assert st["node"] == "node-a" and st["path"] == {"vtl-a0": 1, "vtl-a1": 1}, st
        assert st["path_failovers"] >= 2
        for dev in A_DEVICES:  # node-b's probes: node-a's key at epoch 1 holds it
            v = _seen(lab, "node-b", dev)
            assert v["holder"] == "node-a" and v["epoch"] == 1, v
        assert not [e for e in lab.events() if e.kind.startswith("failover.")]
        assert not _events(lab, "storage.device_lost")
        assert lab.held_by()["node-a-data"] == "node-a"
        assert lab.kv_groups()["node-a-data"][0].epoch == 1
    finally:
        _heal(lab, [0])
    lab.wait_for(lambda: all(p["reachable"] for p in _storage(lab, "node-a").get("paths", [])),
                 20, what="node-a's paths back")
    acks = w.stop()
    print(f"one path cut: longest gap between acknowledgements after the cut "
          f"{_gap(acks, w_cut):.2f} s (the writes' path failover), {len(acks)} blocks, no "
          f"failover ({time.monotonic() - t_cut:.1f} s observed)")
    _verify_all(w, acks)


class StandIn:
    """``tests.iscsiholder`` in a node's namespace (see there)."""

    def __init__(self, lab: Lab, node: str, device: str, path: int) -> None:
        group = f"{node}-data"
        permit = lab.state_root / node / "resources" / group / "permit.json"
        argv = [*lab.prefix(node), sys.executable, "-m", "tests.iscsiholder", "--config",
                str(lab.config_path), "--node", node, "--group", group, "--epoch", "1",
                "--device", device, "--path", str(path), "--permit-file", str(permit)]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                         [str(ROOT), os.environ.get("PYTHONPATH", "")])})
        self.opened = self.answer(15)

    def answer(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("the stand-in did not answer in time")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the stand-in exited ({self.proc.poll()})")
        out: dict[str, Any] = orjson.loads(line)
        return out

    def ask(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.answer(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def test_every_path_cut_moves_the_group_and_node_a_cannot_write_again(bare_lab: Lab) -> None:
    """node-a's storage cut off entirely: a local failure (node-b reaches every device),
    node-b's key PREEMPTs node-a's; after the heal a session of node-a's that held the
    reservation (idle during the cut, so still open) is refused, and node-a cannot
    register again: its permit was revoked when it lost the group."""
    lab = bare_lab
    _start(lab, tape=False)
    holder = StandIn(lab, "node-a", "vtl-a0", 1)
    try:
        assert holder.opened["ok"], holder.opened
        took = holder.ask("take")  # as node-a's data service, with node-a's permit
        assert took == {"ok": True, "how": "moved"}, took
        assert holder.ask("write 5 a") == {"ok": True}
        w0, t0 = time.time(), time.monotonic()
        _cut(lab, [0, 1])
        try:
            lab.wait_for(lambda: _served(lab, "node-b", "node-a-data", 2), 60,
                         what="node-b to serve node-a's data group at epoch 2")
            took_over = time.monotonic() - t0
            owners = lab.held_by()
            assert owners["node-a-data"] == "node-b" and owners["node-a-mgmt"] == "node-a"
            started = [e for e in _events(lab, "failover.started", w0)
                       if e.group == "node-a-data"]
            assert started and "no path left" in started[0].reason, started
            takeovers = [e for e in _events(lab, "storage.takeover", w0)
                         if e.group == "node-a-data"]
            assert {e.data["device"] for e in takeovers} == set(A_DEVICES)
            for dev in A_DEVICES:  # the first take of each: node-b's key preempts node-a's
                first = min((e for e in takeovers if e.data["device"] == dev),
                            key=lambda e: e.sent_at)
                assert (first.epoch, first.data["op"]) == (2, "preempted"), first
                assert first.data["key"].endswith("(node-b, epoch 2)"), first
                assert first.data["previous_key"].endswith("(node-a, epoch 1)"), first
        finally:
            _heal(lab, [0, 1])
        for dev in A_DEVICES:  # node-a's own probes, after the heal: node-b's key holds
            lab.wait_for(lambda d=dev: _seen(lab, "node-a", d).get("holder") == "node-b", 20,
                         what=f"node-a's probes to read node-b's reservation of {dev}")
            v = _seen(lab, "node-a", dev)
            assert v["epoch"] == 2 and not [k for k in v["keys"] if "node-a" in k], v
        refused = holder.ask("write 6 x")
        assert not refused["ok"] and "ReservationConflict" in refused["error"], refused
        assert holder.ask("read 6") == {"ok": True, "byte": "\x00", "uniform": True}
        assert holder.ask("read 5") == {"ok": True, "byte": "a", "uniform": True}
        again = holder.ask("take")  # node-a's permit was revoked when it lost the group
        assert not again["ok"] and "NotPermitted" in again["error"], again
        assert not holder.ask("write 6 x")["ok"]
        print(f"every path of node-a cut -> node-b serves node-a-data: {took_over:.2f} s; "
              f"node-a's holder session afterwards: {refused['error'][:60]} "
              f"(unit attentions first: {refused['attentions']})")
    finally:
        holder.close()


@pytest.mark.parametrize("fault", ["every-path-cut", "killed"])
def test_node_b_takes_over_and_no_block_is_from_a_fenced_writer(tape_lab: Lab,
                                                                 fault: str) -> None:
    """node-a's storage cut off entirely (a local failure), or node-a killed: node-b
    acknowledges blocks at epoch 2; every acknowledged block reads back as written by
    the node and epoch that acknowledged it; node-b's key holds node-a's LUNs."""
    lab = tape_lab
    w = _start(lab)
    assert w is not None
    w0 = time.time()
    if fault == "killed":
        lab.crash("node-a")
    else:
        _cut(lab, [0, 1])
    try:
        w.wait_acked_by("node-b", 30, 60)
        first_b = min(a["t"] for a in w.acks().values() if a["node"] == "node-b")
        owners = lab.held_by()
        assert owners["node-a-data"] == "node-b"
        if fault != "killed":
            assert owners["node-a-mgmt"] == "node-a"
        for dev in A_DEVICES:
            lab.wait_for(lambda d=dev: _seen(lab, "node-b", d).get("epoch") == 2, 10,
                         what=f"node-b's probes to read its reservation of {dev}")
            assert _seen(lab, "node-b", dev)["holder"] == "node-b"
    finally:
        if fault != "killed":
            _heal(lab, [0, 1])
    acks = w.stop()
    assert {a["epoch"] for a in acks.values() if a["node"] == "node-b"} == {2}
    result = _verify_all(w, acks)
    print(f"node-a {fault} -> node-b acknowledging: {first_b - w0:.2f} s; read back: "
          f"{result['writers']}")
