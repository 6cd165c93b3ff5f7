"""Unit tests of the bus messages: round trips, the open world, strict rejection,
and the promise that ``decode`` never raises anything but InvalidMessage."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from vtlha.errors import InvalidMessage, VtlhaError
from vtlha.messages import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    Ack,
    AdminReply,
    AdminRequest,
    AdminTakeover,
    CheckResult,
    Command,
    Event,
    GroupRecord,
    Heartbeat,
    LeaderRecord,
    MgmtReport,
    PairRecord,
    PathHealth,
    StorageReport,
    StorageVerdict,
    decode,
    encode,
)

ENV = {"cluster": "demo", "node": "node-a", "sent_at": 1_700_000_000.5}


def samples() -> list[BaseModel]:
    """One fully populated instance of every message and KV value type."""
    return [
        Heartbeat(
            **ENV,
            incarnation="9f1c2e",
            seq=42,
            interval=0.1,
            checks=[
                CheckResult(name="vtl-daemon", ok=True, fatal=True),
                CheckResult(name="vtl-port", ok=False, detail="connection refused"),
            ],
            storage=StorageVerdict(ok=False, failed_devices=["vtl-a1"], age=0.4),
        ),
        Heartbeat(**ENV, incarnation="x", seq=0, interval=1.0),
        StorageReport(
            **ENV,
            seq=7,
            paths=[
                PathHealth(device="vtl-a0", path=0, reachable=True, latency=0.002),
                PathHealth(device="vtl-a0", path=1, reachable=False, error="EIO"),
            ],
        ),
        MgmtReport(**ENV, link_up=True, gateway_ok=None, latency=0.001, healthy=True),
        Command(**ENV, term=3, epoch=12, group="node-b-data", action="acquire"),
        Command(**ENV, term=0, epoch=0, group="node-b-mgmt", action="release"),
        Ack(**ENV, ok=False, reason="stale epoch", term=3, epoch=11, group="node-b-data",
            service="ip-manager", held=["node-a-data"]),
        Event(
            **ENV,
            kind="node.down",
            pair="pair-1",
            group="node-a-data",
            old="node-a",
            new="node-b",
            term=3,
            epoch=13,
            reason="node-b takes over node-a-data: heartbeats from node-a stopped 0.50 s ago",
            inputs={"dead_after": 0.3, "nodes": {"node-a": {"last_heartbeat": None}}},
            data={"n": [1, 2, 3]},
        ),
        Event(**ENV, kind="arbiter.leader", reason="node-a is the active arbiter"),
        GroupRecord(owner="node-a", term=2, epoch=5, state="held", renewed_by="node-a",
                    since=12.5),
        LeaderRecord(node="witness", since=3.25),
        PairRecord(maintenance=True, hold=["node-b"], failback="auto",
                   failures={"node-b": [1_700_000_000.0, 1_700_000_100.5]}),
        PairRecord(),
        AdminRequest(**ENV, verb="clear-hold", operator="ops@console", pair="pair-1",
                     target_node="node-b"),
        AdminReply(**ENV, ok=True, verb="switchover", status="node-b takes over node-a-data "
                   "from node-a: switchover requested by an operator",
                   request={"verb": "switchover", "group": "node-a-data"}, term=7,
                   events=[41], takeovers=[AdminTakeover(group="node-a-data", old="node-a",
                                                         new="node-b", epoch=4,
                                                         kind="switchover", started=41)]),
        AdminTakeover(group="node-a-mgmt", old="node-b", new="node-a", epoch=2,
                      kind="failback"),
        CheckResult(name="c", ok=True),
        StorageVerdict(ok=True),
        PathHealth(device="vtl-b0", path=3, reachable=True),
    ]


SAMPLES = samples()
MODELS: list[type[BaseModel]] = sorted({type(m) for m in SAMPLES}, key=lambda t: t.__name__)


def sample_of(model: type[BaseModel]) -> BaseModel:
    return next(m for m in SAMPLES if type(m) is model)


def as_dict(msg: BaseModel) -> dict[str, Any]:
    d = orjson.loads(encode(msg))
    assert isinstance(d, dict)
    return d


def invalid(model: type[BaseModel], payload: bytes) -> str:
    with pytest.raises(InvalidMessage) as exc:
        decode(model, payload)
    return str(exc.value)


# ---- round trips -------------------------------------------------------------


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: BaseModel) -> None:
    data = encode(msg)
    assert isinstance(data, bytes)
    back = decode(type(msg), data)
    assert back == msg
    assert encode(back) == data


@pytest.mark.parametrize("model", MODELS, ids=lambda t: t.__name__)
def test_encode_is_one_json_object(model: type[BaseModel]) -> None:
    assert isinstance(json.loads(encode(sample_of(model))), dict)


@pytest.mark.parametrize("model", [Heartbeat, StorageReport, MgmtReport, Command, Ack, Event,
                                   AdminRequest, AdminReply])
def test_envelope_fields(model: type[BaseModel]) -> None:
    d = as_dict(sample_of(model))
    assert d["v"] == SCHEMA_VERSION
    assert d["cluster"] == "demo"
    assert d["node"] == "node-a"
    assert d["sent_at"] == 1_700_000_000.5


def test_sent_at_defaults_to_the_wall_clock() -> None:
    hb = Heartbeat(cluster="demo", node="node-a", incarnation="i", seq=0, interval=0.1)
    assert hb.sent_at > 1_600_000_000
    assert hb.v == SCHEMA_VERSION


def test_messages_are_frozen() -> None:
    msg = sample_of(Command)
    with pytest.raises(ValueError, match="frozen"):
        msg.term = 99  # type: ignore[attr-defined]


# ---- open world --------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS, ids=lambda t: t.__name__)
def test_unknown_fields_are_ignored(model: type[BaseModel]) -> None:
    msg = sample_of(model)
    d = as_dict(msg)
    d["added_in_v2"] = {"anything": [1, "two", None]}
    d["zz"] = "ignored"
    back = decode(model, orjson.dumps(d))
    assert back == msg
    assert not hasattr(back, "added_in_v2")


def test_unknown_nested_fields_are_ignored() -> None:
    d = as_dict(sample_of(Heartbeat))
    d["checks"][0]["severity"] = "high"
    d["storage"]["vendor"] = "x"
    back = decode(Heartbeat, orjson.dumps(d))
    assert back == sample_of(Heartbeat)


def test_newer_schema_version_is_accepted() -> None:
    d = as_dict(sample_of(Heartbeat))
    d["v"] = SCHEMA_VERSION + 1
    assert decode(Heartbeat, orjson.dumps(d)).v == SCHEMA_VERSION + 1


def test_optional_fields_may_be_missing() -> None:
    d = {"cluster": "demo", "node": "node-a", "incarnation": "i", "seq": 1, "interval": 0.1}
    hb = decode(Heartbeat, orjson.dumps(d))
    assert hb.checks == []
    assert hb.storage is None
    assert hb.v == SCHEMA_VERSION


# ---- required fields ---------------------------------------------------------


def _required() -> list[tuple[type[BaseModel], str]]:
    return [
        (model, name)
        for model in MODELS
        for name, info in model.model_fields.items()
        if info.is_required()
    ]


@pytest.mark.parametrize(
    ("model", "field"), _required(), ids=lambda x: x.__name__ if isinstance(x, type) else x
)
def test_missing_required_field_is_named(model: type[BaseModel], field: str) -> None:
    d = as_dict(sample_of(model))
    del d[field]
    text = invalid(model, orjson.dumps(d))
    assert text.startswith(f"{model.__name__}: {field}: Field required")


def test_contract_required_fields() -> None:
    """The envelope and the command/ack fields DESIGN.md names are required."""

    def required(model: type[BaseModel]) -> set[str]:
        return {n for n, i in model.model_fields.items() if i.is_required()}

    for model in (Heartbeat, StorageReport, MgmtReport, Command, Ack, Event):
        assert {"cluster", "node"} <= required(model)
    assert {"term", "epoch", "group", "action"} <= required(Command)
    assert {"ok", "term", "epoch"} <= required(Ack)
    assert {"kind", "reason"} <= required(Event)
    assert {"owner", "term", "epoch", "state"} <= required(GroupRecord)


def test_every_problem_is_counted() -> None:
    text = invalid(Command, orjson.dumps({"cluster": "demo"}))
    assert "(5 problem(s))" in text  # node, term, epoch, group, action


# ---- wrong types and values ----------------------------------------------------


def _with(model: type[BaseModel], **changes: Any) -> bytes:
    d = as_dict(sample_of(model))
    d.update(changes)
    return orjson.dumps(d)


WRONG: list[tuple[str, type[BaseModel], dict[str, Any], str]] = [
    ("seq-string", Heartbeat, {"seq": "x"}, "seq: Input should be a valid integer"),
    ("seq-negative", Heartbeat, {"seq": -1}, "seq: Input should be greater than or equal to 0"),
    ("seq-float", Heartbeat, {"seq": 1.5}, "seq: Input should be a valid integer"),
    ("interval-zero", Heartbeat, {"interval": 0}, "interval: Input should be greater than 0"),
    ("incarnation-empty", Heartbeat, {"incarnation": ""}, "incarnation: String should have"),
    ("check-ok-yes", Heartbeat, {"checks": [{"name": "c", "ok": "yes"}]},
     "checks.0.ok: Input should be a valid boolean"),
    ("check-ok-int", Heartbeat, {"checks": [{"name": "c", "ok": 1}]},
     "checks.0.ok: Input should be a valid boolean"),
    ("storage-ok-string", Heartbeat, {"storage": {"ok": "true"}},
     "storage.ok: Input should be a valid boolean"),
    ("checks-not-list", Heartbeat, {"checks": {"name": "c"}},
     "checks: Input should be a valid list"),
    ("v-zero", Heartbeat, {"v": 0}, "v: Input should be greater than or equal to 1"),
    ("cluster-int", Heartbeat, {"cluster": 5}, "cluster: Input should be a valid string"),
    ("node-null", StorageReport, {"node": None}, "node: Input should be a valid string"),
    ("path-reachable-string", StorageReport, {"paths": [
        {"device": "d", "path": 0, "reachable": "no"}]},
     "paths.0.reachable: Input should be a valid boolean"),
    ("mgmt-healthy-int", MgmtReport, {"healthy": 0}, "healthy: Input should be a valid boolean"),
    ("ack-ok-yes", Ack, {"ok": "yes"}, "ok: Input should be a valid boolean"),
    ("ack-term-negative", Ack, {"term": -1}, "term: Input should be greater than or equal to 0"),
    ("command-action", Command, {"action": "explode"}, "action: Input should be 'acquire'"),
    ("command-epoch-string", Command, {"epoch": "many"}, "epoch: Input should be a valid integer"),
    ("event-inputs-list", Event, {"inputs": [1]}, "inputs: Input should be a valid dictionary"),
    ("group-epoch-zero", GroupRecord, {"epoch": 0},
     "epoch: Input should be greater than or equal to 1"),
    ("group-state", GroupRecord, {"state": "lost"}, "state: Input should be 'acquiring'"),
    ("pair-maintenance-string", PairRecord, {"maintenance": "yes"},
     "maintenance: Input should be a valid boolean"),
    ("pair-failback", PairRecord, {"failback": "never"}, "failback: Input should be 'manual'"),
    ("admin-verb", AdminRequest, {"verb": "reboot"}, "verb: Input should be 'switchover'"),
    ("admin-operator-empty", AdminRequest, {"operator": ""}, "operator: String should have"),
    ("admin-on-string", AdminRequest, {"verb": "maintenance", "on": "yes"},
     "on: Input should be a valid boolean"),
    ("admin-clear-hold-no-node", AdminRequest, {"target_node": None},
     "(top level): Value error, clear-hold needs target_node"),
    ("admin-maintenance-no-on", AdminRequest, {"verb": "maintenance"},
     "(top level): Value error, maintenance needs on"),
    ("admin-switchover-no-group", AdminRequest, {"verb": "switchover"},
     "(top level): Value error, switchover needs group"),
    ("admin-reply-ok-int", AdminReply, {"ok": 1}, "ok: Input should be a valid boolean"),
    ("admin-takeover-epoch", AdminReply, {"takeovers": [{"group": "g", "old": "a", "new": "b",
                                                          "epoch": 0, "kind": "switchover"}]},
     "takeovers.0.epoch: Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize(
    ("model", "changes", "expected"), [pytest.param(m, c, e, id=i) for i, m, c, e in WRONG]
)
def test_wrong_type_or_value(
    model: type[BaseModel], changes: dict[str, Any], expected: str
) -> None:
    text = invalid(model, _with(model, **changes))
    assert text.startswith(f"{model.__name__}: {expected}"), text


@pytest.mark.parametrize(("fields", "policy_request"), [
    ({"verb": "switchover", "group": "node-a-data"},
     {"verb": "switchover", "group": "node-a-data"}),
    ({"verb": "failback", "pair": "pair-1", "group": "ignored"},
     {"verb": "failback", "pair": "pair-1"}),
    ({"verb": "maintenance", "pair": "pair-1", "on": False},
     {"verb": "maintenance", "pair": "pair-1", "on": False}),
    ({"verb": "clear-hold", "pair": "pair-1", "target_node": "node-a"},
     {"verb": "clear-hold", "pair": "pair-1", "node": "node-a"}),
])
def test_admin_request_as_the_policy_takes_it(fields: dict[str, Any],
                                              policy_request: dict[str, Any]) -> None:
    """What ``policy.answer`` takes and events carry: the verb's own fields, the target
    node as ``node`` (the envelope's ``node`` is the sender)."""
    req = AdminRequest(**ENV, operator="ops", **fields)
    assert req.policy_request() == policy_request
    assert req.node == "node-a"


# ---- not a message at all ------------------------------------------------------


@pytest.mark.parametrize(
    "payload", [b"", b"not json", b"{", b"{'a': 1}", b"\xff\xfe", b'{"a": NaN}', b"{} {}"]
)
def test_not_json(payload: bytes) -> None:
    assert invalid(Heartbeat, payload).startswith("Heartbeat: not JSON: ")


@pytest.mark.parametrize(
    ("payload", "got"),
    [(b"[]", "list"), (b'[{"cluster": "demo"}]', "list"), (b'"text"', "str"), (b"3", "int"),
     (b"null", "NoneType"), (b"true", "bool")],
)
def test_json_but_not_an_object(payload: bytes, got: str) -> None:
    assert invalid(Command, payload) == f"Command: expected a JSON object, got {got}"


def _padded_to(size: int) -> bytes:
    base = as_dict(CheckResult(name="c", ok=True, detail=""))
    empty = len(orjson.dumps(base))
    base["detail"] = "x" * (size - empty)
    data = orjson.dumps(base)
    assert len(data) == size
    return data


def test_payload_at_the_limit_is_accepted() -> None:
    assert decode(CheckResult, _padded_to(MAX_MESSAGE_BYTES)).ok is True


def test_oversized_payload() -> None:
    text = invalid(CheckResult, _padded_to(MAX_MESSAGE_BYTES + 1))
    assert text == (
        f"CheckResult: {MAX_MESSAGE_BYTES + 1} bytes exceeds the {MAX_MESSAGE_BYTES} limit"
    )


def test_oversized_garbage_is_rejected_before_parsing() -> None:
    text = invalid(Event, b"\xff" * (MAX_MESSAGE_BYTES + 10))
    assert "exceeds the" in text


def test_custom_size_limit() -> None:
    data = encode(sample_of(Heartbeat))
    with pytest.raises(InvalidMessage, match="exceeds the 10 limit"):
        decode(Heartbeat, data, max_bytes=10)
    assert decode(Heartbeat, data, max_bytes=len(data)) == sample_of(Heartbeat)


def test_invalid_message_is_a_project_error() -> None:
    assert issubclass(InvalidMessage, VtlhaError)


# ---- decode never raises anything but InvalidMessage ---------------------------


def _decode_or_invalid(model: type[BaseModel], payload: bytes) -> None:
    try:
        msg = decode(model, payload)
    except InvalidMessage as exc:
        assert str(exc).startswith(f"{model.__name__}: ")
    else:
        assert isinstance(msg, model)


@settings(max_examples=200, deadline=None)
@given(model=st.sampled_from(MODELS), payload=st.binary(max_size=512))
def test_decode_arbitrary_bytes(model: type[BaseModel], payload: bytes) -> None:
    _decode_or_invalid(model, payload)


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()  # includes integers beyond 64 bits
    | st.floats()  # includes NaN and infinities, which json.dumps writes as non-JSON
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
FIELD_NAMES = sorted({name for model in MODELS for name in model.model_fields})
KEYS = st.sampled_from(FIELD_NAMES) | st.text(max_size=12)


@settings(max_examples=200, deadline=None)
@given(model=st.sampled_from(MODELS), obj=st.dictionaries(KEYS, JSON_VALUES, max_size=10))
def test_decode_arbitrary_json_dicts(model: type[BaseModel], obj: dict[str, Any]) -> None:
    _decode_or_invalid(model, json.dumps(obj).encode())


@settings(max_examples=200, deadline=None)
@given(
    msg=st.sampled_from(SAMPLES),
    changes=st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, min_size=1, max_size=3),
)
def test_decode_valid_message_with_random_fields(
    msg: BaseModel, changes: dict[str, Any]
) -> None:
    d = as_dict(msg)
    d.update(changes)
    _decode_or_invalid(type(msg), json.dumps(d).encode())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_floats_are_rejected_when_built(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        PathHealth(device="vtl-a0", path=0, reachable=True, latency=bad)
