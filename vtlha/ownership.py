"""Reading ownership records from the KV (the CLI, the demo, tests and benchmarks).
Writing them is the arbiter's alone, by compare-and-set."""

from __future__ import annotations

from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from vtlha.errors import InvalidMessage
from vtlha.messages import GroupRecord, decode
from vtlha.subjects import Subjects


async def read_groups(js: JetStreamContext, subjects: Subjects,
                      groups: Iterable[str]) -> dict[str, tuple[GroupRecord, int]]:
    """group -> (record, revision) for each of ``groups`` that has a valid record; empty
    when the bucket does not exist yet."""
    out: dict[str, tuple[GroupRecord, int]] = {}
    try:
        kv = await js.key_value(subjects.kv_bucket)
    except NotFoundError:
        return out
    for g in groups:
        try:
            e = await kv.get(subjects.group_key(g))
        except NotFoundError:
            continue
        if e.value is None or e.revision is None:
            continue
        try:
            out[g] = (decode(GroupRecord, e.value), e.revision)
        except InvalidMessage:
            continue
    return out
