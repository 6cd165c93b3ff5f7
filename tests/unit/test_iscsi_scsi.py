"""The pure part of the iSCSI backend (``vtlha.iscsi.scsi``) and the ctypes layout."""

from __future__ import annotations

import struct

import pytest

from vtlha.iscsi import libiscsi
from vtlha.iscsi.scsi import (
    Plan,
    PrType,
    Sense,
    describe_key,
    format_key,
    key_epoch,
    key_tag,
    make_key,
    node_tag,
    parse_read_capacity16,
    parse_read_keys,
    parse_read_reservation,
    parse_report_capabilities,
    parse_url,
    preempt_target,
)
from vtlha.iscsi.session import Permit
from vtlha.protocol.hold import HoldGate


def test_key_layout_is_prefix_tag_epoch() -> None:
    key = make_key("demo", "node-a", 7)
    assert key >> 56 == 0x76
    assert key_tag(key) == node_tag("demo", "node-a")
    assert key_epoch(key) == 7
    assert format_key(key) == f"0x76{node_tag('demo', 'node-a'):06x}00000007"
    assert len(format_key(key)) == 18


def test_keys_differ_by_node_cluster_and_epoch() -> None:
    keys = {make_key(c, n, e) for c in ("demo", "prod") for n in ("node-a", "node-b")
            for e in (1, 2)}
    assert len(keys) == 8
    assert all(k != 0 for k in keys)


@pytest.mark.parametrize("epoch", [0, -1, 2**32])
def test_epoch_must_fit(epoch: int) -> None:
    with pytest.raises(ValueError):
        make_key("demo", "node-a", epoch)


def test_foreign_keys_have_no_epoch() -> None:
    assert key_epoch(0x1234) is None and key_tag(0x1234) is None


def test_plan() -> None:
    a1, a3 = make_key("c", "node-a", 1), make_key("c", "node-a", 3)
    b2, b3 = make_key("c", "node-b", 2), make_key("c", "node-b", 3)
    assert preempt_target(b2, None) is Plan.RESERVE
    assert preempt_target(b2, b2) is Plan.HELD
    assert preempt_target(b2, a1) is Plan.PREEMPT         # older owner
    assert preempt_target(a3, make_key("c", "node-a", 2)) is Plan.PREEMPT  # our old key
    assert preempt_target(a1, b2) is Plan.NEWER           # never take from a newer owner
    assert preempt_target(a3, b3) is Plan.NEWER           # same epoch, not ours
    assert preempt_target(b2, 0x1234) is Plan.NEWER       # a foreign key is never preempted


def test_parse_read_keys() -> None:
    data = struct.pack(">IIQQ", 9, 16, 0x76AA, 0x76BB)
    assert parse_read_keys(data).keys == (0x76AA, 0x76BB)
    assert parse_read_keys(data).generation == 9
    assert parse_read_keys(struct.pack(">II", 3, 0)).keys == ()
    with pytest.raises(ValueError):
        parse_read_keys(b"\0" * 4)


def test_parse_read_reservation() -> None:
    desc = struct.pack(">QIBBH", 0x76AB, 0, 0, (0 << 4) | PrType.WRITE_EXCLUSIVE, 0)
    r = parse_read_reservation(struct.pack(">II", 4, 16) + desc)
    assert (r.generation, r.key, r.scope, r.type) == (4, 0x76AB, 0, 1)
    assert parse_read_reservation(struct.pack(">II", 4, 0)).key is None


def test_parse_read_capacity16() -> None:
    assert parse_read_capacity16(struct.pack(">QI", 2047, 4096) + b"\0" * 20) == (2048, 4096)


def test_parse_report_capabilities_as_tgt_sends_it() -> None:
    caps = parse_report_capabilities(bytes.fromhex("00080080ea010000"))
    assert not caps.ptpl_capable and not caps.ptpl_active
    assert caps.types == frozenset(PrType)              # all six types


def test_sense_names_key_and_codes() -> None:
    assert str(Sense(6, 0x2A, 0x03)) == "UNIT_ATTENTION 2A/03 (reservations preempted)"
    assert str(Sense(5, 0x99, 0x01)) == "ILLEGAL_REQUEST 99/01"


def test_permit_refuses_once_run_out() -> None:
    p = Permit("node-a-data", 3, valid_until=10.0)
    p.check("RESERVE", now=9.9)
    with pytest.raises(Exception, match="ran out"):
        p.check("RESERVE", now=10.0)


def test_ctypes_layout_matches_libiscsi_header() -> None:
    libiscsi.check_layout()   # raises on any field off its C offset


@pytest.mark.root  # libiscsi7 is installed by root's `make sysdeps` (a normal user's
# machine may not have it); as root it must be there: no skip
def test_libiscsi_decodes_sense_into_our_struct() -> None:
    lib = libiscsi.load()     # load() runs check_sense_parser
    libiscsi.check_sense_parser(lib)


def test_describe_key_names_the_node_and_epoch() -> None:
    names = {node_tag("demo", n): n for n in ("node-a", "node-b")}
    assert describe_key(0x760BFC5800000007, names) == "0x760bfc5800000007 (node-b, epoch 7)"
    assert describe_key(0x760BFC5800000007) == \
        "0x760bfc5800000007 (unknown node, tag 0bfc58, epoch 7)"
    assert describe_key(0x1234) == "0x0000000000001234 (not vtl-ha's)"


def test_parse_url() -> None:
    assert parse_url("iscsi://198.51.100.9:3261/iqn.2026-12.org.vtlha:lab/2") == \
        ("198.51.100.9:3261", "iqn.2026-12.org.vtlha:lab", 2)
    assert parse_url("iscsi://san/iqn.x:t/1") == ("san:3260", "iqn.x:t", 1)
    for bad in ("iscsi://h/iqn/x", "http://h/iqn/1", "iscsi://h/iqn", "iscsi:///iqn/1"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_permit_from_the_hold_rule() -> None:
    """The iSCSI guard's permit is the hold rule's verdict: a valid notice gives one,
    ending at valid_until - margin; no notice, a revoke or a release floor give none."""
    gate = HoldGate(margin=0.03)
    assert Permit.from_gate(gate, "node-a-data", now=1.0) is None          # no notice
    gate.on_notice("node-a-data", 4, valid_until=2.0, revoked=False, since=1.0)
    p = Permit.from_gate(gate, "node-a-data", now=1.5)
    assert p == Permit("node-a-data", 4, 1.97)
    p.check("PREEMPT", now=1.96)
    with pytest.raises(Exception, match="ran out"):
        p.check("PREEMPT", now=1.97)
    assert Permit.from_gate(gate, "node-a-data", now=1.97) is None         # expired
    gate.on_release("node-a-data", 5)
    assert Permit.from_gate(gate, "node-a-data", now=1.5) is None          # released
    gate.on_notice("node-b-data", 2, valid_until=9.0, revoked=True, since=1.0)
    assert Permit.from_gate(gate, "node-b-data", now=1.5) is None          # revoked
