"""Where a service's NATS connection belongs (``vtlha.homeserver.choose``): its own
node's server whenever that one reaches the KV leader, else the first that does."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from vtlha.homeserver import HomeServer, at_fault, choose, is_leader_answer
from vtlha.subjects import Subjects

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


@pytest.mark.parametrize(("answers", "fault"), [
    ([{OWN: False, B: True}, {OWN: False, B: True}], True),  # own cut from the leader
    ([{OWN: False, B: False}, {OWN: False, B: True}], False),  # both failed: an election
    ([{OWN: False, B: True}, {OWN: True, B: True}], False),  # own answers again
    ([{OWN: False, B: True}], False),  # not enough steps yet
])
def test_the_server_in_use_is_left_only_when_it_alone_fails(
        answers: list[dict[str, bool]], fault: bool) -> None:
    assert at_fault(answers, OWN, B, 2) is fault


class _NC:
    """What HomeServer reads of a nats-py client, and the move it makes."""

    def __init__(self, url: str) -> None:
        self.connected_url = urlsplit(url)
        self.is_connected, self.is_closed, self.is_reconnecting = True, False, False
        self.moved_to: list[str] = []

    def set_server_pool(self, urls: list[str]) -> None:
        self.moved_to.append(urls[0])

    async def force_reconnect(self) -> None:
        self.connected_url = urlsplit(self.moved_to[-1])


class _Scripted(HomeServer):
    def __init__(self, nc: _NC, script: list[dict[str, bool]]) -> None:
        super().__init__(nc, URLS, Subjects("t"), "test")  # type: ignore[arg-type]
        self.script = script

    async def _ask(self, url: str) -> bool:
        return self.script[0][url]


async def test_after_a_kv_election_the_first_server_back_does_not_take_the_connection(
) -> None:
    """The witness lab's trace: every server failed its probes together (the stream
    leader asked to step down towards the witness); node-a's came back one probe before
    node-b's own, and node-b's ip-manager moved to node-a's server — 0.1 s before
    node-a's links were cut, and node-b's groups lapsed. It now stays home."""
    nc = _NC(OWN)
    steps = [{OWN: True, B: True, W: True}] * 3 + [{OWN: False, B: False, W: False}] * 3 \
        + [{OWN: False, B: True, W: True}] * 1 + [{OWN: True, B: True, W: True}] * 4
    home = _Scripted(nc, steps)
    while home.script:
        await home.step()
        home.script.pop(0)
    assert nc.moved_to == [] and home.moves == 0
    assert home.states[OWN].state is True
    # the own server cut from the leader alone: it moves, as before
    steps = [{OWN: False, B: True, W: True}] * 3
    home.script = steps
    while home.script:
        await home.step()
        home.script.pop(0)
    assert nc.moved_to == [B]
