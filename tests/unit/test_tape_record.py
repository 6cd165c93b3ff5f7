"""The tape data service's block records (writer, epoch, sequence) and the permit file
the storage-monitor hands its data service."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtlha.iscsi.permitfile import read_permit, revoke_permit, write_permit
from vtlha.tape import record
from vtlha.tape.record import Record, RecordError

BLOCK = 4096


@given(writer=st.from_regex(r"[a-z0-9][a-z0-9-]{0,40}", fullmatch=True),
       epoch=st.integers(0, 2**63), seq=st.integers(0, 2**63), block=st.integers(0, 2**63),
       pid=st.integers(0, 2**31), payload=st.binary(max_size=record.capacity(BLOCK)))
def test_a_record_reads_back_as_written(writer: str, epoch: int, seq: int, block: int,
                                        pid: int, payload: bytes) -> None:
    rec = Record(writer, epoch, seq, block, pid, payload)
    data = record.encode(BLOCK, rec)
    assert len(data) == BLOCK
    assert record.decode(data) == rec


def test_an_unwritten_block_is_none_and_a_foreign_one_an_error() -> None:
    assert record.decode(b"\0" * BLOCK) is None
    with pytest.raises(RecordError, match="not a tape record"):
        record.decode(b"vtlha tape block 00000001;" + b"\0" * (BLOCK - 26))
    with pytest.raises(RecordError, match="cannot hold"):
        record.decode(b"\0" * 10)
    bad = bytearray(record.encode(BLOCK, Record("n", 1, 1, 1, 1, b"x")))
    bad[32:36] = (BLOCK).to_bytes(4, "big")  # a payload longer than the block
    with pytest.raises(RecordError, match="corrupt"):
        record.decode(bytes(bad))


def test_a_payload_or_writer_that_does_not_fit_is_refused() -> None:
    with pytest.raises(RecordError, match="at most 4000 B"):
        record.encode(BLOCK, Record("n", 1, 1, 1, 1, b"x" * 4001))
    with pytest.raises(RecordError, match="longer than"):
        record.encode(BLOCK, Record("n" * 56, 1, 1, 1, 1, b""))


def test_permit_file_for_its_group_and_epoch_only(tmp_path: Path) -> None:
    p = tmp_path / "permit.json"
    assert read_permit(p, "g", 1) is None  # none written
    until = time.monotonic() + 5
    write_permit(p, "g", 1, until)
    got = read_permit(p, "g", 1)
    assert got is not None and got.valid_until == until
    got.check("REGISTER")  # valid: no exception
    assert read_permit(p, "g", 2) is None and read_permit(p, "h", 1) is None
    revoke_permit(p, "g", 1)
    revoked = read_permit(p, "g", 1)
    assert revoked is not None and revoked.valid_until == 0.0
    with pytest.raises(Exception, match="ran out"):
        revoked.check("REGISTER")
    p.write_text("{not json")
    assert read_permit(p, "g", 1) is None
    p.write_text('{"group": "g", "epoch": 1, "valid_until": true}')
    assert read_permit(p, "g", 1) is None
