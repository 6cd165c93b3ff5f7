"""Every message on the bus, as typed schemas, encoded with orjson.

Open world (nats.py's ``from_response``): unknown fields are ignored so nodes on
different versions interoperate during a rolling upgrade; missing or ill-typed
required fields are rejected. ``decode`` never raises anything but InvalidMessage.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)

from vtlha.errors import InvalidMessage

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024

NameStr = str  # validated against the config by receivers (unknown node -> invalid)


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=False, allow_inf_nan=False)


class Envelope(_Open):
    v: int = Field(SCHEMA_VERSION, ge=1)
    cluster: str
    node: str
    sent_at: float = Field(default_factory=time.time)  # wall clock, for humans only


class CheckResult(_Open):
    name: str
    ok: StrictBool
    fatal: StrictBool = False
    detail: str = ""


class StorageVerdict(_Open):
    """The node's own storage verdict, carried in its heartbeat (the manual)."""

    ok: StrictBool
    failed_devices: list[str] = Field(default_factory=list)
    age: float | None = None  # seconds since the storage report it summarises


class LeaseState(_Open):
    """One group's lease as the node's own lease holder sees it, for operators
    (``vtlha status``): durations only, since clocks differ between hosts. No decision
    reads it."""

    group: str
    epoch: int = Field(ge=0)
    phase: Literal["acquiring", "holding"]
    #: seconds of validity left (0: none; the executors hold the group while > 0)
    valid_for: float = Field(ge=0)
    #: seconds since the renewal (or promise request) its validity counts from was sent;
    #: None while acquiring
    age: float | None = Field(None, ge=0)


class Heartbeat(Envelope):
    incarnation: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0)
    interval: float = Field(gt=0)
    checks: list[CheckResult] = Field(default_factory=list)
    storage: StorageVerdict | None = None
    #: the groups its lease holder renews or acquires (an older node sends none)
    leases: list[LeaseState] = Field(default_factory=list)


class PathHealth(_Open):
    device: str
    path: int = Field(ge=0)
    reachable: StrictBool
    latency: float | None = None  # seconds, of the last probe
    error: str | None = None


class GroupStorage(_Open):
    """A data group's storage on the node that holds it (the storage-monitor as
    executor): ``starting`` (reservations and resource agents under way), ``served``
    (every reservation held and every resource started), ``failed`` (a reservation or
    an agent failed: the group is not served; ``reason`` says why), ``stopping``."""

    group: str
    epoch: int = Field(ge=0)
    state: Literal["starting", "served", "failed", "stopping"]
    reason: str = ""


class StorageReport(Envelope):
    seq: int = Field(ge=0)
    paths: list[PathHealth] = Field(default_factory=list)
    groups: list[GroupStorage] = Field(default_factory=list)


class MgmtReport(Envelope):
    link_up: StrictBool
    gateway_ok: StrictBool | None = None
    latency: float | None = None
    healthy: StrictBool
    #: False when nothing was measured (loopback mode): ``healthy`` is then assumed
    monitored: StrictBool = True
    detail: str = ""  # a sentence for humans: what was seen, or why nothing was


Action = Literal["acquire", "release", "term", "cleanup"]


class Pong(Envelope):
    """An executor's answer to a liveness request (``Subjects.ping``)."""

    service: str
    pid: int = Field(ge=0)
    uptime: float = Field(ge=0)  # seconds since the process started taking commands
    ready: StrictBool = True  # its /readyz verdict (connected and reconciled)


class Command(Envelope):
    term: int = Field(ge=0)
    epoch: int = Field(ge=0)
    group: str
    action: Action
    #: acquire, to the new owner's lease holder: start serving no sooner than this many
    #: seconds after receipt (0 when every executor of the old owner acknowledged the
    #: release). A duration, never a clock reading: clocks differ between hosts.
    wait: float | None = Field(None, ge=0)
    #: the identity of the KV bucket the term and epoch are from (``vtlha.bus.kv_identity``):
    #: a recreated bucket starts its revisions again, so tokens compare only within one
    #: bucket. "" means unknown (an older arbiter): checked against the executor's
    #: persisted bucket's tokens, never resets them (``vtlha.fencing``).
    bucket: str = Field("", max_length=128)


class LeaseNotice(Envelope):
    """Lease holder -> its node's executors, on ``ha.<c>.lease.<node>`` (one host)."""

    group: str
    epoch: int = Field(ge=1)
    #: CLOCK_MONOTONIC of this host (one clock for every process on it): the lease is
    #: valid until then, counted from when the renewal (or promise request) was sent.
    valid_until: float = Field(ge=0)
    revoked: StrictBool = False  # the group was taken: drop it now
    reason: str = ""
    #: CLOCK_MONOTONIC of this host when what the notice says was decided (the renewal
    #: or promise request sent, or the drop): a revoke is final only for notices of its
    #: epoch decided before it. 0: unknown (an older lease holder).
    since: float = Field(0.0, ge=0)
    #: the KV bucket's identity (``vtlha.bus.kv_identity``) the lease holder's records
    #: come from; an executor of another bucket ignores the notice (its epochs count in
    #: another bucket). "": unknown (an older lease holder, or before it learnt it).
    bucket: str = ""


class PromiseRequest(Envelope):
    """A cut-off owner asks its companion: do not start serving these groups for
    ``duration`` seconds (a duration, never a clock reading)."""

    groups: list[str] = Field(min_length=1)
    duration: float = Field(gt=0)
    #: the requester accepts a grant of some of ``groups`` (the reply lists them); an
    #: older requester does not ask for it and gets all or nothing
    partial: StrictBool = False


class PromiseReply(Envelope):
    granted: StrictBool
    duration: float = Field(0.0, ge=0)
    reason: str = ""
    #: the groups granted when the request was ``partial``; None: every group asked for
    groups: list[str] | None = None


class HandbackRequest(Envelope):
    """The preferred arbiter (``node``, this process ``incarnation``) asks the active one
    to give the leader key up (``vtlha_arbiter.handback``)."""

    incarnation: str = Field(min_length=1, max_length=64)


class HandbackReply(Envelope):
    ok: StrictBool
    reason: str = ""
    term: int = Field(0, ge=0)


class Ack(Envelope):
    ok: StrictBool
    reason: str = ""
    term: int = Field(ge=0)
    epoch: int = Field(ge=0)
    group: str = ""
    service: str = ""
    held: list[str] = Field(default_factory=list)
    #: a cleanup: the storage-monitor started the failed group again
    restarted: StrictBool = False


def new_event_id() -> str:
    """A unique event id (random, 32 hex digits)."""
    return uuid.uuid4().hex


class Event(Envelope):
    """One event on ``ha.<c>.events.<kind>`` (docs/events.md). ``id`` is unique per
    event and is also its JetStream message id: the stream drops a second copy within
    its duplicate window, readers drop any later copy by ``id``. An event from a sender
    older than ids gets a fresh one when read (it was published once, without retries)."""

    id: str = Field(default_factory=new_event_id, min_length=1, max_length=64,
                    pattern=r"^[A-Za-z0-9_.-]+$",
                    description="unique per event; also its JetStream message id")
    kind: str = Field(description="what happened (docs/events.md); the subject's tail")
    pair: str | None = Field(None, description="the pair it is about")
    group: str | None = Field(None, description="the group it is about")
    old: str | None = Field(None, description="the node a group or role leaves (or: is about)")
    new: str | None = Field(None, description="the node a group or role goes to")
    term: int | None = Field(None, description="the active arbiter's term that decided it")
    epoch: int | None = Field(None, description="the group's epoch it is about")
    reason: str = Field(description="one sentence for humans (a decision's status)")
    inputs: dict[str, Any] = Field(
        default_factory=dict, description="a decision's inputs {snapshot, now[, request]}: "
        "`vtlha explain` re-runs the policy on them")
    data: dict[str, Any] = Field(default_factory=dict, description="the kind's own fields")


def event_json_schema() -> str:
    """The event envelope as a JSON Schema, as docs/events.md shows it."""
    schema = Event.model_json_schema()
    schema["properties"]["sent_at"].pop("default", None)
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode()


# ---- operator requests (``ha.<c>.admin.<verb>``, request/reply) --------------------

AdminVerb = Literal["switchover", "failback", "maintenance", "clear-hold", "standby",
                    "failback-mode", "cleanup"]
#: what each verb needs besides ``verb`` (the policy's request, ``policy.answer``)
ADMIN_FIELDS: dict[str, tuple[str, ...]] = {
    "switchover": ("group",),
    "failback": ("pair",),
    "maintenance": ("pair", "on"),
    "clear-hold": ("pair", "target_node"),
    "standby": ("pair", "target_node", "on"),
    "failback-mode": ("pair", "mode"),
    "cleanup": ("group",),
}
#: what a verb may carry besides (the request names it only when given)
ADMIN_OPTIONAL: dict[str, tuple[str, ...]] = {"cleanup": ("target_node",)}


class AdminRequest(Envelope):
    """An operator's request to the active arbiter. ``node`` is the envelope's sender
    (the host the request came from); ``target_node`` is the node a request is about
    (clear-hold, standby); ``operator`` says who asked (for the events)."""

    verb: AdminVerb
    operator: str = Field(min_length=1, max_length=128)
    group: str | None = None
    pair: str | None = None
    target_node: str | None = None
    on: StrictBool | None = None
    mode: Literal["manual", "auto"] | None = None  # failback-mode

    @model_validator(mode="after")
    def _fields_for_verb(self) -> AdminRequest:
        missing = [f for f in ADMIN_FIELDS[self.verb] if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{self.verb} needs {', '.join(missing)}")
        return self

    def policy_request(self) -> dict[str, Any]:
        """The request as ``policy.answer`` takes it and events carry it."""
        out: dict[str, Any] = {"verb": self.verb}
        for f in ADMIN_FIELDS[self.verb]:
            out["node" if f == "target_node" else f] = getattr(self, f)
        for f in ADMIN_OPTIONAL.get(self.verb, ()):
            if getattr(self, f) is not None:
                out["node" if f == "target_node" else f] = getattr(self, f)
        return out


class AdminTakeover(_Open):
    """One takeover an operator request started (claimed at ``epoch``); its progress is
    the events ``<kind>.completed`` / ``<kind>.failed`` for this group and epoch."""

    group: str
    old: str
    new: str
    epoch: int = Field(ge=1)
    kind: str  # event family: switchover, failback
    #: no longer set (an event's number is not known when it is recorded): kept so that
    #: older clients still read the reply; see ``started_id``
    started: int | None = None
    started_id: str | None = None  # the id of its ``<kind>.started`` event


class AdminReply(Envelope):
    """The active arbiter's answer: ``ok`` False for a refusal (``status`` says why) or
    a request it could not carry out; ``status`` is the policy's sentence."""

    ok: StrictBool
    verb: str
    status: str
    request: dict[str, Any] = Field(default_factory=dict)
    term: int = Field(0, ge=0)
    #: no longer set (see ``event_ids``): kept so that older clients still read the reply
    events: list[int] = Field(default_factory=list)
    event_ids: list[str] = Field(default_factory=list)  # the ids of its events
    takeovers: list[AdminTakeover] = Field(default_factory=list)
    #: per node, what it answered (cleanup: what it forgot, whether it restarted)
    details: list[str] = Field(default_factory=list)
    #: cleanup: the nodes that started the group again (its outcome is in the events)
    restarted: list[str] = Field(default_factory=list)


# ---- KV values (DESIGN.md "Contracts") ---------------------------------------

GroupState = Literal["acquiring", "held", "releasing"]


class MoveNote(_Open):
    """Written with a takeover's claim (``GroupRecord.move``) and kept by every renewal:
    which move gave the owner this epoch, and the id its ``<kind>.started`` event has
    (or will have). An active arbiter that finds such a move never announced (its
    predecessor died between the claim and the event) announces and ends it."""

    kind: str = Field(min_length=1, max_length=32)  # failover, failback, switchover
    old: str
    started: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    term: int = Field(ge=0)
    reason: str = ""


class GroupRecord(_Open):
    owner: str
    term: int = Field(ge=0)
    epoch: int = Field(ge=1)
    state: GroupState
    renewed_by: str | None = None
    since: float = Field(default_factory=time.time)
    move: MoveNote | None = None
    #: a claim's (state ``acquiring``) bound on what may remain of the old owner's lease,
    #: in seconds from when the arbiter wrote the claim; the new owner's lease holder
    #: counts it from when it sees the claim — later, so it never waits less than the
    #: arbiter computed — and may serve no sooner (``vtlha.protocol.lease``, the acquire
    #: gate). None: the whole ``lease_ttl + margin``. A renewal drops it.
    wait: float | None = Field(None, ge=0, allow_inf_nan=False)


class LeaderRecord(_Open):
    """``arbiter.leader``: who is the active arbiter. Its term is the revision at which it
    won the key; renewals carry it in ``term`` (0 in the winning write itself, which does
    not know its revision yet: then the term is that write's revision)."""

    node: str
    since: float = Field(default_factory=time.time)  # wall clock when it won, for humans
    #: one per arbiter process: a restarted arbiter on the same node is someone else
    incarnation: str = ""
    term: int = Field(0, ge=0)


class PairRecord(_Open):
    """``pair.<pair>``: the pair's operator state. ``hold``: nodes held down (given no
    group automatically until an operator clears them). ``failures``: per node, the
    wall-clock times (``time.time()``) of its recent failures, kept across arbiters;
    the arbiter turns them into its monotonic clock for the policy."""

    maintenance: StrictBool = False
    hold: list[str] = Field(default_factory=list)
    failback: Literal["manual", "auto"] = "manual"
    failures: dict[str, list[float]] = Field(default_factory=dict)
    standby: list[str] = Field(default_factory=list)  # nodes an operator put in standby


M = TypeVar("M", bound=BaseModel)


def encode(msg: BaseModel) -> bytes:
    return orjson.dumps(msg.model_dump(mode="json"))


def decode(model: type[M], data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Parse and validate one message; the only error it raises is InvalidMessage."""
    return validate(model, parse(model, data, max_bytes))


def parse(model: type[BaseModel], data: bytes,
          max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """``decode``'s first half: the message's JSON object, not validated yet (for a
    handler that also compares the raw content with the last message's). Its errors
    are ``decode``'s, named after ``model``."""
    if len(data) > max_bytes:
        raise InvalidMessage(f"{model.__name__}: {len(data)} bytes exceeds the {max_bytes} limit")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"{model.__name__}: not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidMessage(f"{model.__name__}: expected a JSON object, got {type(obj).__name__}")
    return obj


def validate(model: type[M], obj: dict[str, Any]) -> M:
    """``decode``'s second half: ``model`` validated from a parsed object."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise InvalidMessage(
            f"{model.__name__}: {where}: {first['msg']} ({exc.error_count()} problem(s))"
        ) from None
