"""Where a service's NATS connection belongs (``vtlha.homeserver.choose``): its own
node's server whenever that one reaches the KV leader, else the first that does."""

from __future__ import annotations

import pytest

from vtlha.homeserver import choose, is_leader_answer

OWN, B, W = "nats://127.0.0.1:4222", "nats://198.51.100.2:4222", "nats://198.51.100.9:4222"
URLS = [OWN, B, W]


@pytest.mark.parametrize(("current", "good", "to"), [
    (OWN, {OWN: True, B: True, W: True}, None),  # at home, all well
    (B, {OWN: True, B: True, W: True}, OWN),  # after a rolling restart: go home
    (W, {OWN: True, B: False, W: True}, OWN),
    (OWN, {OWN: False, B: True, W: True}, B),  # own server cut from the leader: away
    (OWN, {OWN: False, B: False, W: True}, W),  # the first good one, in order
    (B, {OWN: False, B: True, W: True}, None),  # away, own still bad: stay
    (B, {OWN: False, B: False, W: True}, W),  # the one in use went bad too
    (OWN, {OWN: False, B: False, W: False}, None),  # a KV election: nobody does better
    (B, {OWN: False, B: False, W: False}, None),
    (None, {OWN: True, B: True, W: True}, None),  # nats-py is reconnecting: leave it
    (B, {OWN: None, B: True, W: True}, None),  # not every server asked yet
    ("nats://198.51.100.1:4222", {OWN: True, B: True, W: True}, OWN),  # a discovered one
    ("nats://198.51.100.1:4222", {OWN: False, B: True, W: True}, None),
])
def test_choose(current: str | None, good: dict[str, bool | None], to: str | None) -> None:
    assert choose(URLS, current, good) == to


@pytest.mark.parametrize(("body", "ok"), [
    ({"type": "io.nats.jetstream.api.v1.stream_msg_get_response", "message": {}}, True),
    ({"error": {"code": 404, "err_code": 10037, "description": "no message found"}}, True),
    ({"error": {"code": 503, "err_code": 10008, "description": "JetStream system "
                "temporarily unavailable"}}, False),
    ([], False),
])
def test_only_the_stream_leader_answer_counts(body: object, ok: bool) -> None:
    assert is_leader_answer(body) is ok
