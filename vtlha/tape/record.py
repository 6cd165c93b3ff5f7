"""What the tape data service writes in each device block: a header that says who wrote
it (writer node, the group's epoch, the writer's sequence number, the tape block
number), then the client's payload. Pure (no I/O).

The read-back check of the tape client uses it: a block acknowledged by node N at epoch
E must read back as written by N at E. A block from a fenced writer (a write the target
accepted before a PREEMPT and that landed after the new owner's write, which tgt allows:
``docs/storage.md``, "Writes in flight") reads back with an older epoch and is found.

Layout (big-endian)::

    0   8  magic b"VTLHATB1"
    8   8  epoch
    16  8  seq       the writer's sequence number (per service process, from 1)
    24  8  block     the tape block number
    32  4  length    payload bytes
    36  4  pid       the writing process
    40  1  writer    length of the writer's node name (at most 55)
    41 55  writer    the node name, zero-padded
    96  .. payload, then zeros to the block's end
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"VTLHATB1"
HEADER = struct.Struct(">8sQQQII B55s")
HEADER_SIZE = HEADER.size  # 96
WRITER_MAX = 55


class RecordError(ValueError):
    """A block that is not a tape record, or a payload that does not fit."""


@dataclass(frozen=True)
class Record:
    writer: str
    epoch: int
    seq: int
    block: int
    pid: int
    payload: bytes


def capacity(block_size: int) -> int:
    """Payload bytes a device block of ``block_size`` holds."""
    return block_size - HEADER_SIZE


def encode(block_size: int, rec: Record) -> bytes:
    """One device block holding ``rec``."""
    name = rec.writer.encode()
    if len(name) > WRITER_MAX:
        raise RecordError(f"writer name {rec.writer!r} is longer than {WRITER_MAX} bytes")
    if len(rec.payload) > capacity(block_size):
        raise RecordError(f"a payload is at most {capacity(block_size)} B, got "
                          f"{len(rec.payload)}")
    head = HEADER.pack(MAGIC, rec.epoch, rec.seq, rec.block, len(rec.payload), rec.pid,
                       len(name), name)
    return (head + rec.payload).ljust(block_size, b"\0")


def decode(data: bytes) -> Record | None:
    """The record in a device block; None for a block never written (all zeros).
    RecordError for anything else that is not a record."""
    if len(data) < HEADER_SIZE:
        raise RecordError(f"a block of {len(data)} B cannot hold a record")
    magic, epoch, seq, block, length, pid, n, name = HEADER.unpack_from(data)
    if magic != MAGIC:
        if not data.strip(b"\0"):
            return None
        raise RecordError(f"not a tape record (starts {data[:8]!r})")
    if n > WRITER_MAX or HEADER_SIZE + length > len(data):
        raise RecordError(f"corrupt record header (writer length {n}, payload {length} B)")
    return Record(name[:n].decode(errors="replace"), epoch, seq, block, pid,
                  data[HEADER_SIZE:HEADER_SIZE + length])
