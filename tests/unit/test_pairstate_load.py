"""``PairState.load`` reads every pair's record, and after a failed read the next load
(the start's retry) reads only the pairs not read yet."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError
from vtlha_arbiter.pairstate import PairState

from tests.conftest import EXAMPLE
from vtlha.config import load_config
from vtlha.messages import PairRecord, encode
from vtlha.subjects import Subjects

CFG = load_config(EXAMPLE)


class _Entry:
    def __init__(self, value: bytes, revision: int) -> None:
        self.value, self.revision = value, revision


class _KV:
    """A KV whose reads of ``slow`` keys time out once; it records every read."""

    def __init__(self, records: dict[str, PairRecord], slow: set[str]) -> None:
        self.records, self.slow = records, slow
        self.reads: list[str] = []

    async def get(self, key: str) -> Any:
        self.reads.append(key)
        if key in self.slow:
            self.slow.discard(key)
            raise TimeoutError
        if key not in self.records:
            raise KeyNotFoundError
        return _Entry(encode(self.records[key]), 10)


async def test_a_load_after_a_failed_read_reads_only_what_is_left() -> None:
    many = CFG.model_copy(update={"pairs": [
        p.model_copy(update={"name": f"pair-{i}"}) for i, p in enumerate(CFG.pairs * 5)]})
    subj = Subjects(CFG.cluster)
    names = [p.name for p in many.pairs]
    kv = _KV({subj.pair_key(n): PairRecord(failback="auto", maintenance=True)
              for n in names}, slow={subj.pair_key(names[-1])})
    ps = PairState(kv, subj, many, logging.getLogger("test"))  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await ps.load()
    first = len(kv.reads)
    assert first == len(names)  # the others were read: concurrently, not stopped
    await ps.load()
    assert kv.reads[first:] == [subj.pair_key(names[-1])]  # only the one that failed
    assert all(ps.record(n).maintenance for n in names)
    ps.forget()  # a new bucket: everything is read again
    await ps.load()
    assert len(kv.reads) == first + 1 + len(names)
