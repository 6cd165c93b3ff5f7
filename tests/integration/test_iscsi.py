"""SCSI-3 persistent reservations over iSCSI against a real target: Debian's tgtd, one
daemon per module on 127.0.0.1 with two portals (two paths), one LUN per test (so no
test sees another's registrations). No mocks: every command goes through libiscsi.

tgtd needs root (its control socket lives in /var/run/tgtd), hence the marker."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.fusemount import stalling_target
from vtlha.cli import main as vtlha_cli
from vtlha.iscsi.multipath import Multipath
from vtlha.iscsi.reservation import NewerHolder, Taken, give_up, take
from vtlha.iscsi.scsi import (
    RESERVATION_TYPE,
    CheckCondition,
    IscsiTimeout,
    NotPermitted,
    PrIn,
    PrType,
    ReservationConflict,
    SenseKey,
    SessionLost,
    make_key,
)
from vtlha.iscsi.session import Permit, Session, Target, initiator_name
from vtlha_lab.ports import free_port
from vtlha_lab.tgt import Tgtd, TgtdSpec

pytestmark = pytest.mark.root  # tgtd needs root; root's `make sysdeps` installs tgt

IQN = "iqn.2026-12.org.vtlha:test"
CLUSTER = "itest"
LUNS = 32
LUN_BYTES = 1 << 20
TIMEOUT = 1.0
BLOCK = 4096


@pytest.fixture(scope="module")
def tgtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tgtd]:
    d = tmp_path_factory.mktemp("tgt")
    devices = {}
    for i in range(LUNS):
        path = d / f"dev{i}.img"
        with open(path, "wb") as f:
            f.truncate(LUN_BYTES)
        devices[f"dev{i}"] = path
    spec = TgtdSpec(IQN, [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], devices,
                    block_size=BLOCK)
    daemon = Tgtd(spec, d / "tgtd.log", nice=-10)   # as the lab runs it
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        assert not daemon.alive


_luns = itertools.count(1)


@pytest.fixture
def lun(tgtd: Tgtd) -> int:
    n = next(_luns)
    assert n <= LUNS, "add LUNs to the module's tgtd"
    return n


def target(tgtd: Tgtd, lun: int, path: int = 0) -> Target:
    return Target(tgtd.spec.portals[path], IQN, lun)


def permit(epoch: int, seconds: float = 60.0) -> Permit:
    return Permit("node-a-data", epoch, time.monotonic() + seconds)


class Sessions:
    """Opens sessions and closes every one of them at the end of the test."""

    def __init__(self, tgtd: Tgtd, lun: int) -> None:
        self.tgtd, self.lun = tgtd, lun
        self.opened: list[Session] = []

    async def open(self, node: str, path: int = 0, role: str = "data",
                   timeout: float = TIMEOUT) -> Session:
        s = await Session.open(target(self.tgtd, self.lun, path),
                               initiator_name(CLUSTER, node, f"{role}-p{path}"), timeout)
        self.opened.append(s)
        return s


@pytest.fixture
async def sessions(tgtd: Tgtd, lun: int) -> AsyncIterator[Sessions]:
    s = Sessions(tgtd, lun)
    try:
        yield s
    finally:
        for session in s.opened:
            await session.close()


KA1 = make_key(CLUSTER, "node-a", 1)
KB2 = make_key(CLUSTER, "node-b", 2)


async def test_holder_writes_and_reads_back(sessions: Sessions) -> None:
    a = await sessions.open("node-a")
    assert a.block_size == BLOCK and a.blocks == LUN_BYTES // BLOCK
    result = await take(a, KA1, permit(1))
    assert result.how is Taken.RESERVED and result.previous is None
    data = os.urandom(BLOCK)
    await a.write(3, data)
    assert await a.read(3, 1) == data


async def test_read_keys_and_reservation_show_keys_and_type(sessions: Sessions) -> None:
    a = await sessions.open("node-a")
    b = await sessions.open("node-b")
    empty = await a.read_keys()
    assert empty.keys == ()
    assert (await a.read_reservation()).key is None
    await take(a, KA1, permit(1))
    await b.register_ignore(KB2, permit(2))
    keys = await b.read_keys()
    assert sorted(keys.keys) == sorted([KA1, KB2])
    assert keys.generation > empty.generation       # each PR OUT bumps it
    res = await b.read_reservation()
    assert (res.key, res.type, res.scope) == (KA1, PrType.WRITE_EXCLUSIVE, 0)


async def test_registered_non_holder_cannot_write_but_can_read(sessions: Sessions) -> None:
    a = await sessions.open("node-a")
    b = await sessions.open("node-b")
    stranger = await sessions.open("node-c")
    await take(a, KA1, permit(1))
    await b.register_ignore(KB2, permit(2))
    with pytest.raises(ReservationConflict):
        await b.write(0, b"b" * BLOCK)
    with pytest.raises(ReservationConflict):
        await stranger.write(0, b"c" * BLOCK)
    assert len(await b.read(0, 1)) == BLOCK          # Write Exclusive: reads are open
    assert len(await stranger.read(0, 1)) == BLOCK   # (the companion's probes read)


async def test_same_key_on_another_session_is_not_the_holder(sessions: Sessions) -> None:
    """Write Exclusive's holder is the session (I_T nexus) that reserved, not the key:
    the node's other sessions with the same key are refused."""
    a = await sessions.open("node-a")
    a_other = await sessions.open("node-a", role="monitor")
    await take(a, KA1, permit(1))
    await a_other.register_ignore(KA1, permit(1))
    with pytest.raises(ReservationConflict):
        await a_other.write(0, b"x" * BLOCK)


async def test_preempted_node_gets_unit_attention_once_then_conflict(sessions: Sessions) -> None:
    a = await sessions.open("node-a")
    b = await sessions.open("node-b")
    await take(a, KA1, permit(1))
    await a.write(0, b"a" * BLOCK)
    result = await take(b, KB2, permit(2))
    assert (result.how, result.previous) == (Taken.PREEMPTED, KA1)
    assert not result.aborted and b.abort_supported is False  # tgt: PREEMPT, no ABORT
    assert a.attentions == []
    with pytest.raises(ReservationConflict):
        await a.write(1, b"a" * BLOCK)
    # the first try got a unit attention (2A/03, reservations preempted): it did not
    # run, was sent again, and the second try got the conflict
    assert [(s.key, s.asc, s.ascq) for s in a.attentions] == [(SenseKey.UNIT_ATTENTION,
                                                               0x2A, 0x03)]
    with pytest.raises(ReservationConflict):
        await a.write(1, b"a" * BLOCK)
    assert len(a.attentions) == 1                     # only once
    await b.write(1, b"b" * BLOCK)
    assert await b.read(1, 1) == b"b" * BLOCK
    assert (await b.read_keys()).keys == (KB2,)       # node-a's registration is gone


async def test_reregistered_preempted_node_still_cannot_write(sessions: Sessions) -> None:
    """The fenced node registers again on its own (a reconnect, a resumed process): under
    Write Exclusive it is a registrant, not the holder, and stays refused; a PREEMPT it
    prepared from an old read names a key no longer registered and is refused too."""
    a = await sessions.open("node-a")
    b = await sessions.open("node-b")
    await take(a, KA1, permit(1))
    await take(b, KB2, permit(2))
    await a.register_ignore(KA1, permit(1))           # REGISTER AND IGNORE EXISTING KEY
    with pytest.raises(ReservationConflict):
        await a.write(0, b"a" * BLOCK)
    with pytest.raises(ReservationConflict):
        await a.reserve(KA1, RESERVATION_TYPE, permit(1))
    stale = make_key(CLUSTER, "node-b", 1)            # what node-b held before epoch 2
    with pytest.raises(ReservationConflict):
        await a.preempt(KA1, stale, RESERVATION_TYPE, permit(1))
    res = await b.read_reservation()
    assert res.key == KB2
    await b.write(0, b"b" * BLOCK)
    # and take() at node-a's old epoch refuses to preempt a newer owner
    with pytest.raises(NewerHolder):
        await take(a, KA1, permit(1))
    assert (await b.read_reservation()).key == KB2


async def test_registrants_only_would_let_a_reregistered_node_write(sessions: Sessions) -> None:
    """Why not Write Exclusive - Registrants Only (fence_scsi's type): after a PREEMPT,
    one REGISTER from the fenced node is enough for tgt to take its writes again."""
    a = await sessions.open("node-a")
    b = await sessions.open("node-b")
    ro = PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY
    await a.register_ignore(KA1, permit(1))
    await a.reserve(KA1, ro, permit(1))
    await b.register_ignore(KB2, permit(2))
    await b.preempt(KB2, KA1, ro, permit(2))
    with pytest.raises(ReservationConflict):
        await a.write(0, b"a" * BLOCK)
    await a.register_ignore(KA1, permit(1))
    await a.write(0, b"a" * BLOCK)                    # the fence is undone
    assert await b.read(0, 1) == b"a" * BLOCK


async def test_no_permit_no_access(sessions: Sessions) -> None:
    """The hold rule's guard: a run-out permit sends nothing; a new session of the
    holder's node is not registered until someone with a permit registers it."""
    a = await sessions.open("node-a")
    await take(a, KA1, permit(1))
    before = await a.read_keys()
    run_out = Permit("node-a-data", 1, time.monotonic() - 0.001)
    a2 = await sessions.open("node-a", role="data-again")
    for call in (a2.register_ignore(KA1, run_out), a2.reserve(KA1, RESERVATION_TYPE, run_out),
                 a2.preempt(KA1, KA1, RESERVATION_TYPE, run_out)):
        with pytest.raises(NotPermitted):
            await call
    assert await a.read_keys() == before              # nothing reached the target
    with pytest.raises(ReservationConflict):
        await a2.write(0, b"a" * BLOCK)               # never registered on its own


async def test_take_retried_on_second_path_is_idempotent(sessions: Sessions) -> None:
    """node-b's PREEMPT landed through path 0 but its answer was slow; the takeover is
    tried again through path 1: it ends with node-b's key holding the reservation through
    path 1 (node-b's own key moved there), node-a still fenced."""
    a = await sessions.open("node-a")
    b0 = await sessions.open("node-b", path=0)
    b1 = await sessions.open("node-b", path=1)
    await take(a, KA1, permit(1))
    first = await take(b0, KB2, permit(2))
    assert first.how is Taken.PREEMPTED
    # the retry's own PREEMPT of node-a's key, as the first try sent it, is refused...
    await b1.register_ignore(KB2, permit(2))
    with pytest.raises(ReservationConflict):
        await b1.preempt(KB2, KA1, RESERVATION_TYPE, permit(2))
    # ...and take() reads, sees its own key and moves the reservation to this path
    again = await take(b1, KB2, permit(2))
    assert (again.how, again.previous) == (Taken.MOVED, KB2)
    assert (await b1.read_reservation()).key == KB2
    await b1.write(0, b"b" * BLOCK)
    with pytest.raises(ReservationConflict):
        await b0.write(0, b"b" * BLOCK)               # the holder is path 1 now
    with pytest.raises(ReservationConflict):
        await a.write(0, b"a" * BLOCK)
    third = await take(b1, KB2, permit(2))            # a third try changes nothing
    assert third.how is Taken.MOVED
    assert (await b1.read_reservation()).key == KB2
    await b1.write(1, b"b" * BLOCK)


async def test_give_up_releases_and_unregisters(sessions: Sessions) -> None:
    a = await sessions.open("node-a")
    b = await sessions.open("node-b")
    await take(a, KA1, permit(1))
    await b.register_ignore(KB2, permit(2))
    after = await give_up(a, KA1)
    assert after.key is None
    assert (await b.read_keys()).keys == (KB2,)
    assert (await give_up(a, KA1)).key is None        # again: nothing left, no error
    result = await take(b, KB2, permit(2))
    assert result.how is Taken.RESERVED


async def test_register_changes_key_clear_removes_everything(sessions: Sessions) -> None:
    """Plain REGISTER changes this session's key only when the old key is given right;
    CLEAR (by a registrant) removes every registration and the reservation."""
    a = await sessions.open("node-a")
    b = await sessions.open("node-b")
    stranger = await sessions.open("node-c")
    ka3 = make_key(CLUSTER, "node-a", 3)
    await a.register(KA1, permit(1))                  # first registration: old key 0
    with pytest.raises(ReservationConflict):
        await a.register(ka3, permit(3), old_key=KB2)  # wrong old key
    await a.register(ka3, permit(3), old_key=KA1)
    await a.reserve(ka3, RESERVATION_TYPE, permit(3))
    await b.register_ignore(KB2, permit(2))
    assert sorted((await b.read_keys()).keys) == sorted([ka3, KB2])
    with pytest.raises(ReservationConflict):
        await stranger.clear(KB2)                     # not registered: refused
    await b.clear(KB2)
    assert (await a.read_keys()).keys == ()
    assert (await a.read_reservation()).key is None
    await a.write(0, b"a" * BLOCK)                    # nothing reserved: open to all
    assert [(x.asc, x.ascq) for x in a.attentions] == [(0x2A, 0x03)]  # told, retried
    await b.register_ignore(KB2, permit(2))
    await b.unregister(KB2)
    assert (await a.read_keys()).keys == ()


async def test_what_tgt_lacks(sessions: Sessions) -> None:
    """docs/storage.md's list, pinned: no PREEMPT AND ABORT, no READ FULL STATUS, no
    APTPL (REPORT CAPABILITIES says so: PTPL_C is 0); every type is supported."""
    a = await sessions.open("node-a")
    b = await sessions.open("node-b")
    await take(a, KA1, permit(1))
    await b.register_ignore(KB2, permit(2))
    caps = await b.report_capabilities()
    assert not caps.ptpl_capable and PrType.WRITE_EXCLUSIVE in caps.types
    for call in (b.preempt_and_abort(KB2, KA1, RESERVATION_TYPE, permit(2)),
                 b.pr_in(PrIn.READ_FULL_STATUS)):
        with pytest.raises(CheckCondition) as info:
            await call
        assert info.value.sense is not None
        assert (info.value.sense.key, info.value.sense.asc) == (SenseKey.ILLEGAL_REQUEST, 0x24)
    assert (await b.read_reservation()).key == KA1    # the refused preempt did nothing


async def test_other_check_conditions_name_sense(sessions: Sessions) -> None:
    a = await sessions.open("node-a")
    with pytest.raises(CheckCondition) as info:
        await a.read(a.blocks, 1)                     # past the end of the LUN
    assert info.value.sense is not None
    assert (info.value.sense.key, info.value.sense.asc) == (SenseKey.ILLEGAL_REQUEST, 0x21)
    assert "ILLEGAL_REQUEST 21/00" in str(info.value)
    assert len(await a.read(0, 1)) == BLOCK           # the session goes on


async def test_a_stopped_target_times_out_and_the_session_is_lost(tgtd: Tgtd,
                                                                  sessions: Sessions) -> None:
    a = await sessions.open("node-a")
    tgtd.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(IscsiTimeout):
            await a.read(0, 1)
        took = time.monotonic() - t0
        assert took < TIMEOUT + 1.6, took             # libiscsi's timeout, checked ~1/s
        with pytest.raises(SessionLost):
            await a.read(0, 1)                        # no silent reconnect
        t0 = time.monotonic()
        with pytest.raises(Exception, match="timed out"):
            await sessions.open("node-b")             # the login is bounded too
        assert time.monotonic() - t0 < TIMEOUT + 1.6
    finally:
        tgtd.signal(signal.SIGCONT)
    assert a.is_lost
    b = await sessions.open("node-b")
    assert len(await b.read(0, 1)) == BLOCK


async def test_a_dropped_connection_is_lost_and_the_new_session_a_stranger(
        tgtd: Tgtd, sessions: Sessions) -> None:
    """No silent reconnect: the target closes the holder's connection, the next call is
    SessionLost. tgt ties the registration to the session, so the node's new session
    (same initiator name, same key) is a stranger to its own reservation until someone
    with a permit takes it again (take() moves it: PREEMPT of its own key)."""
    a = await sessions.open("node-a")
    await take(a, KA1, permit(1))
    assert tgtd.drop_sessions(a.initiator) == 1
    with pytest.raises(SessionLost):
        await a.write(0, b"a" * BLOCK)
    assert a.is_lost
    with pytest.raises(SessionLost):
        await a.read(0, 1)                            # and it stays lost
    a2 = await sessions.open("node-a")                # what a reconnect would be
    assert (await a2.read_reservation()).key == KA1   # the old session's, still held
    with pytest.raises(ReservationConflict):
        await a2.write(0, b"a" * BLOCK)
    assert (await take(a2, KA1, permit(1))).how is Taken.MOVED
    await a2.write(0, b"a" * BLOCK)


async def test_calls_from_several_sessions_at_once(sessions: Sessions) -> None:
    """Each session runs on its own thread; concurrent calls on different sessions."""
    ss = [await sessions.open(f"node-{i}") for i in range(4)]
    out = await asyncio.gather(*(s.read(i, 1) for i, s in enumerate(ss)))
    assert [len(x) for x in out] == [BLOCK] * 4


def test_tgtd_restart_forgets_every_reservation(tmp_path: Path) -> None:
    """No APTPL in tgt: after a restart nothing is registered (the lab re-creates)."""
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(LUN_BYTES)
    spec = TgtdSpec(IQN, [f"127.0.0.1:{free_port()}"], {"d": img}, block_size=BLOCK)

    async def reserve_then_read(first: bool) -> tuple[int, ...]:
        s = await Session.open(Target(spec.portals[0], IQN, 1), "iqn.2026-12.test:r", TIMEOUT)
        try:
            if first:
                await take(s, KA1, permit(1))
            return (await s.read_keys()).keys
        finally:
            await s.close()

    for first in (True, False):
        with Tgtd(spec, tmp_path / "tgtd.log") as daemon:
            keys = asyncio.run(reserve_then_read(first))
            assert keys == ((KA1,) if first else ())
            if first:
                daemon.kill()
        assert not (Path("/var/run/tgtd") / f"socket.{spec.control_port}").exists()


async def test_a_write_stalled_in_the_target_across_a_preempt(tmp_path: Path) -> None:
    """tgt has no PREEMPT AND ABORT: node-a's write that tgt accepted before node-b's
    PREEMPT, stalled in the backing store, is not aborted. What this machine shows
    (docs/storage.md, "Writes in flight"): the PREEMPT succeeds while the write is stuck;
    when the store answers, the stale write lands and node-a is told GOOD — a write
    acknowledged to a fenced node after its fence; node-b's own write, sent after the
    PREEMPT, waits behind it, so the stale write lands first. That order comes from the
    only stall available here (FUSE serialises every write to a file), not from tgt: a
    backing store that runs writes in parallel would let the stale write land after
    node-b's."""
    opened: list[Session] = []
    with stalling_target(tmp_path, IQN, LUN_BYTES, BLOCK) as (fs, daemon):
        t = Target(daemon.spec.portals[0], IQN, 1)
        try:
            a = await Session.open(t, initiator_name(CLUSTER, "node-a", "data"), 10.0)
            opened.append(a)
            b = await Session.open(t, initiator_name(CLUSTER, "node-b", "data"), 10.0)
            opened.append(b)
            await take(a, KA1, permit(1))
            await a.write(0, b"A" * BLOCK)
            fs.hang_writes(b"STALE")
            stale = asyncio.create_task(a.write(0, b"STALE" + b"a" * (BLOCK - 5)))
            deadline = time.monotonic() + 5
            while not fs.write_blocked():
                assert time.monotonic() < deadline, "node-a's write never reached the store"
                await asyncio.sleep(0.01)
            result = await asyncio.wait_for(take(b, KB2, permit(2)), 3)
            assert result.how is Taken.PREEMPTED          # not held up by the stuck write
            b_write = asyncio.create_task(b.write(0, b"B" * BLOCK))
            done, _ = await asyncio.wait([b_write], timeout=1.0)
            assert not done                               # queued behind the stale write
            assert not stale.done()
            fs.unstick()
            await asyncio.wait_for(stale, 5)              # GOOD: acknowledged after the fence
            await asyncio.wait_for(b_write, 5)
            assert await b.read(0, 1) == b"B" * BLOCK     # here the stale write landed first
            with pytest.raises(ReservationConflict):
                await a.write(0, b"a" * BLOCK)            # and nothing more from node-a
        finally:
            fs.unstick()
            for s in opened:
                await s.close()


def paths(tgtd: Tgtd, lun: int, node: str, role: str, key: int | None = None,
          permits: list[Permit | None] | None = None) -> Multipath:
    def permit() -> Permit | None:
        assert permits is not None
        return permits[-1]

    return Multipath([target(tgtd, lun, i) for i in range(2)],
                     lambda i: initiator_name(CLUSTER, node, f"{role}-p{i}"), TIMEOUT,
                     key=key, permit=permit if key is not None else None)


async def test_writer_fails_over_to_the_next_path_under_its_permit(tgtd: Tgtd,
                                                                   lun: int) -> None:
    """A path lost mid-run: the writer's next write goes through the other path, whose
    new session takes the reservation (our own key moved there) with the permit valid
    at that moment; without one it stays unregistered and the write is refused."""
    permits: list[Permit | None] = [permit(1)]
    mp = paths(tgtd, lun, "node-a", "data", KA1, permits)
    look = await Session.open(target(tgtd, lun), "iqn.2026-12.test:look", TIMEOUT)
    try:
        await mp.call(lambda s: s.write(0, b"0" * BLOCK))
        assert mp.current == 0
        first = mp.sessions[0]
        assert first is not None
        tgtd.drop_sessions(first.initiator)            # path 0 cut (target side)
        await mp.call(lambda s: s.write(1, b"1" * BLOCK))
        assert (mp.current, mp.failovers) == (1, 1)
        s1 = mp.sessions[1]
        assert s1 is not None and (await s1.read_reservation()).key == KA1
        assert await mp.call(lambda s: s.read(0, 2)) == b"0" * BLOCK + b"1" * BLOCK
        # the lease ends (no permit any more), then path 1 is lost too
        permits.append(None)
        tgtd.drop_sessions(s1.initiator)
        before = await look.read_keys()
        with pytest.raises(NotPermitted):
            await mp.call(lambda s: s.write(2, b"2" * BLOCK))
        # nothing sent: no PR OUT changed the generation (the key listed is the dropped
        # session's registration, which tgt keeps, as SPC says, until preempted)
        assert await look.read_keys() == before
        with pytest.raises(ReservationConflict):
            await look.write(2, b"2" * BLOCK)
    finally:
        await look.close()
        await mp.close()


async def test_writer_failover_never_takes_from_a_newer_owner(tgtd: Tgtd, lun: int) -> None:
    """node-a's path drops; meanwhile node-b took over at epoch 2. node-a's failover,
    even with a permit it still believes valid, finds a newer key and takes nothing."""
    mp_a = paths(tgtd, lun, "node-a", "data", KA1, [permit(1)])
    mp_b = paths(tgtd, lun, "node-b", "data", KB2, [permit(2)])
    try:
        await mp_a.call(lambda s: s.write(0, b"a" * BLOCK))
        s0 = mp_a.sessions[0]
        assert s0 is not None
        tgtd.drop_sessions(s0.initiator)
        await mp_b.call(lambda s: s.write(0, b"b" * BLOCK))
        with pytest.raises(NewerHolder):
            await mp_a.call(lambda s: s.write(0, b"a" * BLOCK))
        assert await mp_b.call(lambda s: s.read(0, 1)) == b"b" * BLOCK
    finally:
        await mp_a.close()
        await mp_b.close()


async def test_probe_reads_every_path_and_reports_a_lost_one(tgtd: Tgtd, lun: int) -> None:
    writer = paths(tgtd, lun, "node-a", "data", KA1, [permit(1)])
    probes = paths(tgtd, lun, "node-b", "probe")      # the companion's: never registers
    try:
        await writer.call(lambda s: s.write(0, b"a" * BLOCK))
        got = await probes.probe()
        assert [(p.path, p.ok) for p in got] == [(0, True), (1, True)]
        assert all(p.latency is not None and p.latency < TIMEOUT for p in got)
        s1 = probes.sessions[1]
        assert s1 is not None
        tgtd.drop_sessions(s1.initiator)
        got = await probes.probe()
        assert [(p.path, p.ok) for p in got] == [(0, True), (1, False)]
        assert got[1].error
        got = await probes.probe()                    # reopened: back
        assert [p.ok for p in got] == [True, True]
        s0 = probes.sessions[0]
        assert s0 is not None
        assert (await s0.read_keys()).keys == (KA1,)  # the probes registered nothing
        with pytest.raises(ValueError):
            await writer.probe()
    finally:
        await writer.close()
        await probes.close()


def test_cli_shows_keys_and_reservation_by_node(tgtd: Tgtd, lun: int, tmp_path: Path) -> None:
    """`vtlha iscsi keys URL --config FILE`: read-only, each key named by node and
    epoch (the cluster file's nodes; here the example's node-a and node-b)."""
    import yaml

    from tests.conftest import EXAMPLE

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["cluster"] = CLUSTER
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(raw))

    async def reserve() -> None:
        a = await Session.open(target(tgtd, lun), "iqn.2026-12.test:cli-a", TIMEOUT)
        b = await Session.open(target(tgtd, lun), "iqn.2026-12.test:cli-b", TIMEOUT)
        try:
            await take(a, KA1, permit(1))
            await b.register_ignore(KB2, permit(2))
        finally:
            await a.close()
            await b.close()

    asyncio.run(reserve())
    url = f"iscsi://{tgtd.spec.portals[0]}/{IQN}/{lun}"
    r = CliRunner().invoke(vtlha_cli, ["iscsi", "keys", url, "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert f"{url}: PR generation" in r.output and "2 registered key(s)" in r.output
    assert "(node-a, epoch 1)" in r.output and "(node-b, epoch 2)" in r.output
    assert f"reservation: 0x{KA1:016x} (node-a, epoch 1), write exclusive" in r.output
    r = CliRunner().invoke(vtlha_cli, ["iscsi", "keys", url])   # no cluster file
    assert r.exit_code == 0 and "unknown node, tag" in r.output
    bad = CliRunner().invoke(vtlha_cli, ["iscsi", "keys", f"iscsi://{tgtd.spec.portals[0]}"
                                         f"/{IQN}-nope/1", "--timeout", "1"])
    assert bad.exit_code == 1
