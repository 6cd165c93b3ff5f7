"""Wire protocol of the reference SAN target (test and demo infrastructure standing in
for a real SAN; see ``vtlha.san``).

A frame is::

    u32 header_len | u32 payload_len | header (JSON object, UTF-8) | payload (bytes)

both lengths big-endian. The header of a request names its ``op``; only ``write``
requests carry a payload (the blocks to write) and only ``read`` replies do (the
blocks read). Replies are ``{"ok": bool, "reason": str, ...}``; a request may carry an
integer ``id`` that its reply echoes.

Requests (every field checked; unknown fields are refused)::

    hello    {node, path}                 first on a connection: one path of one node
    register {device}
    reserve  {device, epoch}
    preempt  {device, epoch}              moves the reservation if epoch > current epoch
    release  {device, epoch}              only the holder, at its epoch
    read     {device, lba, count}         reply payload: count blocks
    write    {device, lba, epoch} + payload (whole blocks)
    status   {}                           allowed before hello

A frame whose header or payload is longer than the limits below is *oversized*: the
reader raises :class:`FrameTooLarge` before reading its body, and the target closes
the connection (it cannot find the next frame boundary without reading the body).
Anything else wrong with a frame is :class:`InvalidFrame`: the target replies with an
error and goes on.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError

from vtlha.config import Name
from vtlha.errors import VtlhaError

PREFIX = struct.Struct(">II")
MAX_HEADER = 16 * 1024
MAX_PAYLOAD = 4 * 1024 * 1024
MAX_EPOCH = 2**62

NonNeg = Annotated[StrictInt, Field(ge=0, le=MAX_EPOCH)]


class ProtocolError(VtlhaError):
    """A frame could not be read or understood."""


class FrameTooLarge(ProtocolError):
    """A frame's declared header or payload length is over the limit; the connection
    cannot be resynchronised and is closed."""


class InvalidFrame(ProtocolError):
    """A frame was read whole but its header is not a valid request/reply."""


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: NonNeg | None = None


class Hello(_Req):
    op: Literal["hello"]
    node: Name
    path: Annotated[StrictInt, Field(ge=0, le=63)]


class Register(_Req):
    op: Literal["register"]
    device: Name


class Reserve(_Req):
    op: Literal["reserve"]
    device: Name
    epoch: NonNeg


class Preempt(_Req):
    op: Literal["preempt"]
    device: Name
    epoch: NonNeg


class Release(_Req):
    op: Literal["release"]
    device: Name
    epoch: NonNeg


class Read(_Req):
    op: Literal["read"]
    device: Name
    lba: NonNeg
    count: Annotated[StrictInt, Field(ge=1, le=1024)]


class Write(_Req):
    op: Literal["write"]
    device: Name
    lba: NonNeg
    epoch: NonNeg
    fua: bool = Field(False, description="fdatasync before the reply (forced unit access)")


class Status(_Req):
    op: Literal["status"]


Request = Annotated[
    Hello | Register | Reserve | Preempt | Release | Read | Write | Status,
    Field(discriminator="op"),
]
_REQUEST: TypeAdapter[Request] = TypeAdapter(Request)
OPS = ("hello", "register", "reserve", "preempt", "release", "read", "write", "status")


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = orjson.dumps(header)
    if len(head) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
        raise FrameTooLarge(f"frame too large to send: header {len(head)} B, "
                            f"payload {len(payload)} B")
    return PREFIX.pack(len(head), len(payload)) + head + payload


def check_prefix(prefix: bytes, max_header: int = MAX_HEADER,
                 max_payload: int = MAX_PAYLOAD) -> tuple[int, int]:
    """The two lengths of a frame prefix; :class:`FrameTooLarge` over the limits."""
    hlen, plen = PREFIX.unpack(prefix)
    if hlen > max_header:
        raise FrameTooLarge(f"header of {hlen} B is over the limit of {max_header} B")
    if plen > max_payload:
        raise FrameTooLarge(f"payload of {plen} B is over the limit of {max_payload} B")
    return hlen, plen


def decode_header(raw: bytes) -> dict[str, Any]:
    """A header's JSON object; :class:`InvalidFrame` if it is not one."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidFrame(f"header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidFrame(f"header must be a JSON object, got {type(obj).__name__}")
    return obj


async def read_frame(reader: asyncio.StreamReader, max_header: int = MAX_HEADER,
                     max_payload: int = MAX_PAYLOAD) -> tuple[bytes, bytes]:
    """One frame's raw header and payload. Raises ``asyncio.IncompleteReadError`` at
    end of stream (clean if nothing of the frame was read: ``partial`` is empty) and
    :class:`FrameTooLarge`. Callers put their own timeout around it."""
    prefix = await reader.readexactly(PREFIX.size)
    hlen, plen = check_prefix(prefix, max_header, max_payload)
    head = await reader.readexactly(hlen)
    payload = await reader.readexactly(plen) if plen else b""
    return head, payload


def _first_error(exc: ValidationError) -> str:
    errs = exc.errors()
    parts = []
    for e in errs[:3]:
        loc = ".".join(str(p) for p in e["loc"]) or "(header)"
        parts.append(f"{loc}: {e['msg']}")
    more = f" (+{len(errs) - 3} more)" if len(errs) > 3 else ""
    return "; ".join(parts) + more


def parse_request(header: dict[str, Any], payload: bytes = b"") -> Request:
    """Validate a request header (and whether it may carry a payload);
    :class:`InvalidFrame` with a readable reason otherwise."""
    op = header.get("op")
    if not isinstance(op, str):
        raise InvalidFrame("header has no string 'op'")
    if op not in OPS:
        raise InvalidFrame(f"unknown op {op[:40]!r} (known: {', '.join(OPS)})")
    try:
        req = _REQUEST.validate_python(header)
    except ValidationError as exc:
        raise InvalidFrame(f"invalid {op} request: {_first_error(exc)}") from None
    if isinstance(req, Write):
        if not payload:
            raise InvalidFrame("write request without data (payload)")
    elif payload:
        raise InvalidFrame(f"{op} request must not carry a payload ({len(payload)} B)")
    return req


def request_header(req: Request) -> dict[str, Any]:
    """The header a client sends for ``req`` (``id`` left out when unset)."""
    return req.model_dump(exclude_none=True)
