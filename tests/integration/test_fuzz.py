"""Property-based fuzzing of every subscribed subject and every HTTP endpoint (issue 17),
against a real cluster on loopback.

Hypothesis draws the inputs: random bytes, JSON that is not an object, truncated and
oversized messages, a valid message with one field of the wrong type, messages from an
unknown node or another cluster; then replays of real messages and commands with stale
fencing tokens. What must hold afterwards: no service crashed or failed in a handler,
nothing moved (owners, epochs, addresses, no event but ``input.rejected``), every
structurally invalid message was counted by every service subscribed to its subject,
and those services reported it as an ``input.rejected`` event."""

from __future__ import annotations

import asyncio
import http.client
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tests.conftest import EXAMPLE
from vtlha.errors import InvalidMessage
from vtlha.messages import (
    MAX_MESSAGE_BYTES,
    AdminRequest,
    Command,
    HandbackRequest,
    Heartbeat,
    LeaseNotice,
    MgmtReport,
    PromiseRequest,
    StorageReport,
    decode,
)
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster, prepare_config
from vtlha_lab.natsserver import NatsServer

CLUSTER = "fuzz"
HOSTS = {"node-a": ("heartbeat", "ip-manager", "storage-monitor", "arbiter"),
         "node-b": ("heartbeat", "ip-manager", "storage-monitor", "arbiter"),
         "witness": ("arbiter",)}
EXAMPLES = 25  # per subject and family: with 10 subjects, some 700 messages


def _valid(model: type[BaseModel], node: str = "node-a", cluster: str = CLUSTER) -> dict[str, Any]:
    """A schema-valid message of ``model`` (what the family of cases starts from)."""
    base: dict[str, Any] = {"cluster": cluster, "node": node}
    extra: dict[type[BaseModel], dict[str, Any]] = {
        Heartbeat: {"incarnation": "fuzz", "seq": 1, "interval": 0.1},
        StorageReport: {"seq": 1, "paths": [], "groups": []},
        MgmtReport: {"link_up": True, "healthy": True},
        LeaseNotice: {"group": "node-a-data", "epoch": 1, "valid_until": 1.0},
        PromiseRequest: {"groups": ["node-b-data"], "duration": 0.3},
        # term 0: stale whatever the cluster's term (a valid forged command is the
        # bus permissions' business, docs/deploy.md)
        Command: {"term": 0, "epoch": 0, "group": "node-a-data", "action": "release"},
        HandbackRequest: {"incarnation": "fuzz"},
        AdminRequest: {"verb": "maintenance", "operator": "fuzz", "pair": "pair-1",
                       "on": False},  # valid: changes nothing (maintenance is off)
    }
    return {**base, **extra[model]}


def _targets(s: Subjects) -> list[tuple[str, type[BaseModel]]]:
    return [(s.hb("node-a"), Heartbeat), (s.storage("node-a"), StorageReport),
            (s.mgmt("node-a"), MgmtReport), (s.lease("node-a"), LeaseNotice),
            (s.promise("node-a"), PromiseRequest),
            (s.cmd("node-a", "ip-manager"), Command),
            (s.cmd("node-a", "storage-monitor"), Command),
            (s.handback, HandbackRequest), (s.admin("maintenance"), AdminRequest)]


def _invalid_locally(model: type[BaseModel], payload: bytes) -> bool:
    try:
        decode(model, payload)
    except InvalidMessage:
        return True
    return False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                              max_size=3),
    max_leaves=8)


def _structural(model: type[BaseModel]) -> st.SearchStrategy[bytes]:
    """Messages that no schema accepts: each family of the issue."""
    valid = _valid(model)
    good = orjson.dumps(valid)
    random_bytes = st.binary(max_size=300)
    not_an_object = json_values.filter(lambda v: not isinstance(v, dict)).map(orjson.dumps)
    truncated = st.integers(0, len(good) - 1).map(lambda i: good[:i])
    oversized = st.integers(1, 1000).map(
        lambda n: orjson.dumps({**valid, "pad": "x" * (MAX_MESSAGE_BYTES + n)}))
    wrong_type = st.tuples(st.sampled_from(sorted(valid)), json_values).map(
        lambda kv: orjson.dumps({**valid, kv[0]: kv[1]}))
    missing = st.sampled_from(sorted(valid)).map(
        lambda k: orjson.dumps({f: v for f, v in valid.items() if f != k}))
    return (random_bytes | not_an_object | truncated | oversized | wrong_type | missing
            ).filter(lambda p: _invalid_locally(model, p))


def _semantic(model: type[BaseModel]) -> st.SearchStrategy[bytes]:
    """Schema-valid messages that are not for this cluster or from no node of it (an
    operator's request comes from any host: only its cluster is checked)."""
    foreign = [orjson.dumps(_valid(model, cluster="another"))]
    if model is not AdminRequest:
        foreign += [orjson.dumps(_valid(model, node="node-z")),
                    orjson.dumps(_valid(model, node=""))]
    return st.sampled_from(foreign)


def _draw(strategy: st.SearchStrategy[bytes], n: int) -> list[bytes]:
    """``n`` examples drawn by hypothesis (the property is checked on the whole batch,
    against the running cluster, afterwards)."""
    out: list[bytes] = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(payload: bytes) -> None:
        out.append(payload)

    collect()
    return out


# ---- the cluster ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("fuzz")
    c = LocalCluster(prepare_config(EXAMPLE, tmp, cluster=CLUSTER, single_server=True), tmp,
                     nats_urls=[nats_server.spec.url])
    try:
        c.start()
        c.wait_for(c.home_held, 30, what="every group held by its home node")
        c.wait_for(lambda: all(((c.status(n, "storage-monitor") or {}).get("groups", {})
                                .get(f"{n}-data", {}).get("state") == "served")
                               for n in ("node-a", "node-b")), 30,
                   what="both data groups served")
        c.wait_for(lambda: _all_healthy(c), 30, what="every service answering /healthz")
        yield c
    finally:
        c.stop()
        shutil.rmtree(Path(tmp) / "state", ignore_errors=True)


def _get(c: LocalCluster, host: str, service: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", c.cfg.port(host, service), timeout=3)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _metric_sum(c: LocalCluster, name: str) -> dict[str, float]:
    """``name`` summed over its labels, per host/service."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for host, services in HOSTS.items():
        for svc in services:
            _, body = _get(c, host, svc, "/metrics")
            total = 0.0
            for fam in text_string_to_metric_families(body.decode()):
                total += sum(s.value for s in fam.samples if s.name == name)
            out[f"{host}/{svc}"] = total
    return out


def _state(c: LocalCluster) -> dict[str, Any]:
    """What an action would change: owners and epochs, and the addresses held."""
    groups = {g: (r.owner, r.epoch, r.state) for g, (r, _) in c.kv_groups().items()}
    return {"groups": groups,
            "addresses": {n: sorted(c.recorded_addresses(n)) for n in ("node-a", "node-b")}}


def _publish(url: str, msgs: list[tuple[str, bytes]]) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        try:
            for i, (subject, payload) in enumerate(msgs):
                await nc.publish(subject, payload)
                if i % 50 == 49:  # a burst, not a flood: each service keeps up
                    await nc.flush()
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(go())


def _capture(url: str, subjects: list[str], n: int) -> list[tuple[str, bytes]]:
    """The next ``n`` messages on ``subjects`` (real ones, for replaying), a second old
    by the time they are returned."""
    async def go() -> list[tuple[str, bytes]]:
        nc = await nats.connect(url)
        got: list[tuple[str, bytes]] = []
        done = asyncio.Event()

        async def cb(msg: Any) -> None:
            got.append((msg.subject, bytes(msg.data)))
            if len(got) >= n:
                done.set()
        try:
            for s in subjects:
                await nc.subscribe(s, cb=cb)
            await asyncio.wait_for(done.wait(), 10)
            await asyncio.sleep(1.0)
            return got[:n]
        finally:
            await nc.close()

    return asyncio.run(go())


def _all_healthy(c: LocalCluster) -> bool:
    try:
        return all(_get(c, h, s, "/healthz")[0] == 200 for h, svcs in HOSTS.items()
                   for s in svcs)
    except OSError:
        return False


def _wait_counted(c: LocalCluster, want: dict[str, float]) -> None:
    """Until every service's invalid-message count is ``want``'s; else say whose is not."""
    got: dict[str, float] = {}

    def ok() -> bool:
        got.update(_metric_sum(c, "vtlha_invalid_messages_total"))
        return got == want
    try:
        c.wait_for(ok, 30, interval=0.2, what="every invalid message counted")
    except TimeoutError:
        raise AssertionError({k: {"counted": got.get(k), "sent": v} for k, v in want.items()
                              if got.get(k) != v}) from None


def test_invalid_messages_on_every_subject_are_counted_and_change_nothing(
        cluster: LocalCluster) -> None:
    c = cluster
    url = c.external_nats[0]  # type: ignore[index]
    subjects = Subjects(CLUSTER)
    before = _state(c)
    events_before = len(c.events())
    errors_before = _metric_sum(c, "vtlha_loop_errors_total")

    # Which services subscribe to each subject: one plainly invalid message each.
    subscribers: dict[str, dict[str, float]] = {}
    for subject, _ in _targets(subjects):
        base = _metric_sum(c, "vtlha_invalid_messages_total")
        _publish(url, [(subject, b"not json")])
        c.wait_for(lambda b=base: _metric_sum(c, "vtlha_invalid_messages_total") != b, 10,
                   interval=0.05, what=f"a subscriber of {subject} to count a bad message")
        time.sleep(0.3)  # the other subscribers of the subject: counted by now
        after = _metric_sum(c, "vtlha_invalid_messages_total")
        subscribers[subject] = {k: after[k] - base[k] for k in after if after[k] != base[k]}
    assert all(subscribers.values()), subscribers

    # The structurally invalid families: exactly counted by every subscriber.
    base = _metric_sum(c, "vtlha_invalid_messages_total")
    msgs: list[tuple[str, bytes]] = []
    want = dict(base)
    for subject, model in _targets(subjects):
        cases = _draw(_structural(model), EXAMPLES)
        assert len(cases) >= EXAMPLES // 2, (subject, len(cases))
        msgs += [(subject, p) for p in cases]
        for svc, per_msg in subscribers[subject].items():
            want[svc] += per_msg * len(cases)
    _publish(url, msgs)
    _wait_counted(c, want)

    # Not of this cluster, from no node of it: invalid too, counted the same way.
    base = _metric_sum(c, "vtlha_invalid_messages_total")
    want = dict(base)
    msgs = []
    for subject, model in _targets(subjects):
        cases = _draw(_semantic(model), 3)
        msgs += [(subject, p) for p in cases]
        for svc, per_msg in subscribers[subject].items():
            want[svc] += per_msg * len(cases)
    _publish(url, msgs)
    _wait_counted(c, want)

    # Replays: real messages of node-a's heartbeat and lease holder, captured and sent
    # again later (old sequence numbers, lapsed notices): ignored.
    _publish(url, [m for m in _capture(url, [subjects.hb("node-a"), subjects.lease("node-a")],
                                       8) for _ in range(3)])

    # nothing crashed, nothing moved, no event but rejections (and refusals of commands
    # with stale fencing tokens), from every subscriber
    assert _all_healthy(c)
    assert _metric_sum(c, "vtlha_loop_errors_total") == errors_before
    assert _state(c) == before
    new = c.events()[events_before:]
    assert {e.kind for e in new} <= {"input.rejected", "command.refused"}, [
        (e.kind, e.reason) for e in new]
    print([(e.kind, e.reason) for e in new if e.kind != "input.rejected"])
    assert {e.node for e in new} == set(HOSTS), "input.rejected from every host"
    rejected_subjects = {e.data.get("subject") for e in new}
    assert {s for s, _ in _targets(subjects)} <= rejected_subjects


PATHS = ["/healthz", "/readyz", "/metrics", "/status", "/nats"]


def _http_cases(n: int) -> list[tuple[str, str, bytes]]:
    path = st.one_of(
        st.sampled_from(PATHS),
        st.tuples(st.sampled_from(PATHS), st.text(
            st.characters(min_codepoint=33, max_codepoint=126), max_size=40)).map(
                lambda t: f"{t[0]}?{t[1]}"),
        st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60).map(
            lambda s: "/" + s),
        st.integers(1, 20).map(lambda k: "/" + "../" * k + "etc/passwd"),
        st.just("/" + "a" * 9000))  # longer than aiohttp's request line limit
    method = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    body = st.one_of(st.just(b""), st.binary(max_size=2000),
                     st.integers(1, 4).map(lambda k: b"x" * (k * 1024 * 1024)))
    out: list[tuple[str, str, bytes]] = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(method, path, body)
    def collect(m: str, p: str, b: bytes) -> None:
        out.append((m, p, b))

    collect()
    return out


def _send(port: int, method: str, path: str, body: bytes) -> int | None:
    """The status answered, or None if the server closed the connection (a request it
    refused to parse)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body:
            conn.send(body)
        r = conn.getresponse()
        r.read()
        return r.status
    except (ConnectionError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def test_every_http_endpoint_survives_random_requests(cluster: LocalCluster) -> None:
    """Random methods, paths, queries and bodies to every service's HTTP server: never
    an error of the server's own (5xx), nothing moved, every service still healthy."""
    c = cluster
    before = _state(c)
    cases = _http_cases(60)
    statuses: dict[int | None, int] = {}
    for host, services in HOSTS.items():
        for svc in services:
            port = c.cfg.port(host, svc)
            for method, path, body in cases:
                status = _send(port, method, path, body)
                statuses[status] = statuses.get(status, 0) + 1
                assert status is None or status < 500, (host, svc, method, path[:80], status)
    print(f"\n{sum(statuses.values())} requests: {statuses}")
    assert 200 in statuses and 404 in statuses  # the cases reached real and unknown routes
    assert _all_healthy(c)
    assert _state(c) == before
