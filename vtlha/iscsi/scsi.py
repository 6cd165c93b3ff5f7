"""SCSI-3 persistent reservations for vtl-ha: keys, the reservation type, status and
sense decoding, PR IN parameter data. Pure: no I/O (``docs/storage.md``).

**Keys.** A registration key is 8 bytes, shown by ``sg_persist -i -k`` (and by
:func:`format_key`) as 16 hex digits, ``0x76TTTTTTEEEEEEEE``:

- byte 0: ``0x76`` (ASCII ``v``), so that an operator tells vtl-ha's keys from others;
- bytes 1-3: the first three bytes of SHA-256 of ``"<cluster>/<node>"`` (the node's
  tag; :func:`node_tag`);
- bytes 4-7: the group's epoch at which the node registered, big-endian.

So ``0x76a1b2c300000007`` is the node whose tag is ``a1b2c3`` registered at epoch 7. A
key is never zero (SPC reserves zero for "not registered").

**Why the epoch is in the key.** SCSI PR has no epoch, so the key carries it: the new
owner PREEMPTs exactly the key it saw hold the reservation (:func:`preempt_target`), and
only when that key's epoch is below its own. PREEMPT names the key it removes, so it
acts like a compare-and-set on the target: a PREEMPT prepared from an old read (a paused
or slow node, a retry on a second path) names a key that is no longer registered and is
refused, instead of taking the reservation from a newer owner. Likewise a paused old
owner's delayed REGISTER only adds a registration at its old epoch, which gives it
nothing under the type below.

**Type: Write Exclusive (1).** Only the reservation holder — the one I_T nexus (iSCSI
session) that reserved or preempted — may write; every other session, registered or
not, may read and gets RESERVATION CONFLICT on a write. A preempted node that registers
again (a reconnect, a paused process resuming) is a registrant, not the holder: it still
cannot write. To write again it would have to PREEMPT the new owner's key, an explicit
act that only the hold rule's permit allows. The Registrants-Only types (5, 6; Pacemaker's
``fence_scsi``) let any registrant write, so one REGISTER would undo the fence. Exclusive
Access (3) would also refuse reads by non-holders, and the companion's storage probes
must read every device to tell a local failure from a global one. The price of Write
Exclusive: a node's writes must go through the session that holds the reservation; with
several paths the holder moves to another path by PREEMPTing its own key there
(:func:`preempt_target` returns it).
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from vtlha.errors import VtlhaError

KEY_PREFIX = 0x76
MAX_EPOCH = 2**32 - 1


class PrType(enum.IntEnum):
    """PERSISTENT RESERVE OUT TYPE codes (SPC-4)."""

    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8


RESERVATION_TYPE = PrType.WRITE_EXCLUSIVE


class PrOut(enum.IntEnum):
    """PERSISTENT RESERVE OUT service actions."""

    REGISTER = 0
    RESERVE = 1
    RELEASE = 2
    CLEAR = 3
    PREEMPT = 4
    PREEMPT_AND_ABORT = 5
    REGISTER_AND_IGNORE_EXISTING_KEY = 6


class PrIn(enum.IntEnum):
    """PERSISTENT RESERVE IN service actions."""

    READ_KEYS = 0
    READ_RESERVATION = 1
    REPORT_CAPABILITIES = 2
    READ_FULL_STATUS = 3


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


# Additional sense codes worth a name in a log line (ASC, ASCQ).
ASC_NAMES: dict[tuple[int, int], str] = {
    (0x29, 0x00): "power on, reset, or bus device reset occurred",
    (0x29, 0x01): "power on occurred",
    (0x29, 0x07): "I_T nexus loss occurred",
    (0x2A, 0x01): "mode parameters changed",
    (0x2A, 0x03): "reservations preempted",
    (0x2A, 0x04): "reservations released",
    (0x2A, 0x05): "registrations preempted",
    (0x2A, 0x09): "capacity data has changed",
    (0x3F, 0x0E): "reported LUNs data has changed",
    (0x21, 0x00): "logical block address out of range",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x20, 0x00): "invalid command operation code",
    (0x26, 0x00): "invalid field in parameter list",
    (0x11, 0x00): "unrecovered read error",
    (0x03, 0x00): "peripheral device write fault",
}


@dataclass(frozen=True)
class Sense:
    key: int
    asc: int
    ascq: int

    def __str__(self) -> str:
        try:
            key = SenseKey(self.key).name
        except ValueError:
            key = f"0x{self.key:x}"
        name = ASC_NAMES.get((self.asc, self.ascq))
        code = f"{self.asc:02X}/{self.ascq:02X}"
        return f"{key} {code}" + (f" ({name})" if name else "")


class IscsiError(VtlhaError):
    """Any failure of an iSCSI call."""


class IscsiConnectError(IscsiError):
    """Connect or login failed (portal unreachable, unknown target, no such LUN)."""


class SessionLost(IscsiError):
    """The session is gone (connection failed, a call timed out, or it was closed). It
    is never re-made on its own: a new session has to be opened, and whoever opens it
    registers again only under the hold rule."""


class IscsiTimeout(SessionLost):
    """No answer within the session's timeout; the session is unusable afterwards."""


class ScsiError(IscsiError):
    """The target answered with a status other than GOOD."""

    def __init__(self, op: str, status: int, sense: Sense | None, detail: str = "") -> None:
        what = f"sense {sense}" if sense is not None else f"status 0x{status:02x}"
        super().__init__(f"{op}: {what}" + (f" ({detail})" if detail else ""))
        self.op = op
        self.status = status
        self.sense = sense


class ReservationConflict(ScsiError):
    """RESERVATION CONFLICT: another session holds the reservation, or this one's
    registration is not (or no longer) there."""


class CheckCondition(ScsiError):
    """CHECK CONDITION with sense data; ``sense`` names key, ASC and ASCQ."""


class UnitAttentionsExhausted(CheckCondition):
    """The command got a UNIT ATTENTION on every try (it never ran)."""


class NotPermitted(IscsiError):
    """A PR OUT that grants access (register, reserve, preempt) without a valid permit
    from the hold rule; nothing was sent."""


def node_tag(cluster: str, node: str) -> int:
    """The node's 3-byte tag: the first three bytes of SHA-256("<cluster>/<node>")."""
    return int.from_bytes(hashlib.sha256(f"{cluster}/{node}".encode()).digest()[:3], "big")


def make_key(cluster: str, node: str, epoch: int) -> int:
    """The registration key of ``node`` at ``epoch`` (module docstring)."""
    if not 0 < epoch <= MAX_EPOCH:
        raise ValueError(f"epoch {epoch} does not fit a key (1..{MAX_EPOCH})")
    return (KEY_PREFIX << 56) | (node_tag(cluster, node) << 32) | epoch


def key_epoch(key: int) -> int | None:
    """The epoch in a vtl-ha key; None for a key that is not vtl-ha's."""
    return key & MAX_EPOCH if key >> 56 == KEY_PREFIX else None


def key_tag(key: int) -> int | None:
    return (key >> 32) & 0xFFFFFF if key >> 56 == KEY_PREFIX else None


def format_key(key: int) -> str:
    """As ``sg_persist -i -k`` prints it: ``0x`` and 16 hex digits."""
    return f"0x{key:016x}"


def describe_key(key: int, names: dict[int, str] | None = None) -> str:
    """``0x760bfc5800000007 (node-b, epoch 7)``: the key, and whose it is when ``names``
    (tag -> node, :func:`node_tag`) knows the tag; "not vtl-ha's" for another key."""
    tag, epoch = key_tag(key), key_epoch(key)
    if tag is None:
        return f"{format_key(key)} (not vtl-ha's)"
    who = (names or {}).get(tag, f"unknown node, tag {tag:06x}")
    return f"{format_key(key)} ({who}, epoch {epoch})"


def parse_url(url: str) -> tuple[str, str, int]:
    """``iscsi://HOST:PORT/IQN/LUN`` (libiscsi's form, without credentials) ->
    (portal, IQN, LUN)."""
    prefix = "iscsi://"
    parts = url[len(prefix):].split("/") if url.startswith(prefix) else []
    if len(parts) != 3 or not all(parts) or not parts[2].isdigit():
        raise ValueError(f"not an iSCSI URL iscsi://HOST:PORT/IQN/LUN: {url!r}")
    portal = parts[0] if ":" in parts[0] else f"{parts[0]}:3260"
    return portal, parts[1], int(parts[2])


@dataclass(frozen=True)
class Keys:
    """PR IN READ KEYS: the generation and every registered key (one per registered
    I_T nexus, so a key may appear more than once)."""

    generation: int
    keys: tuple[int, ...]


@dataclass(frozen=True)
class Reservation:
    """PR IN READ RESERVATION: ``key`` is the holder's key, None when nothing is
    reserved."""

    generation: int
    key: int | None
    scope: int = 0
    type: int = 0


def parse_read_keys(data: bytes) -> Keys:
    if len(data) < 8:
        raise ValueError(f"READ KEYS data of {len(data)} bytes (header is 8)")
    generation, length = struct.unpack_from(">II", data)
    body = data[8:8 + length]
    if len(body) % 8:
        raise ValueError(f"READ KEYS list of {len(body)} bytes is not whole keys")
    keys = struct.unpack(f">{len(body) // 8}Q", body)
    return Keys(generation, tuple(keys))


def parse_read_reservation(data: bytes) -> Reservation:
    if len(data) < 8:
        raise ValueError(f"READ RESERVATION data of {len(data)} bytes (header is 8)")
    generation, length = struct.unpack_from(">II", data)
    if length == 0:
        return Reservation(generation, None)
    if len(data) < 24 or length < 16:
        raise ValueError(f"READ RESERVATION descriptor of {length} bytes (need 16)")
    (key,) = struct.unpack_from(">Q", data, 8)
    scope_type = data[21]
    return Reservation(generation, key, scope_type >> 4, scope_type & 0x0F)


@dataclass(frozen=True)
class Capabilities:
    """PR IN REPORT CAPABILITIES: ``ptpl_capable`` (APTPL: registrations survive a
    power loss or restart), ``types`` the reservation types supported."""

    ptpl_capable: bool
    ptpl_active: bool
    types: frozenset[PrType]


# REPORT CAPABILITIES' type mask (bytes 4-5, SPC-4): bit -> type
_TYPE_BITS = {15: PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
              14: PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
              13: PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, 11: PrType.EXCLUSIVE_ACCESS,
              9: PrType.WRITE_EXCLUSIVE, 0: PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS}


def parse_report_capabilities(data: bytes) -> Capabilities:
    if len(data) < 6:
        raise ValueError(f"REPORT CAPABILITIES data of {len(data)} bytes (need 6)")
    mask = int.from_bytes(data[4:6], "big") if data[3] & 0x80 else 0
    return Capabilities(bool(data[2] & 0x01), bool(data[3] & 0x01),
                        frozenset(t for bit, t in _TYPE_BITS.items() if mask >> bit & 1))


def parse_read_capacity16(data: bytes) -> tuple[int, int]:
    """(number of blocks, block size) from READ CAPACITY (16) data."""
    if len(data) < 12:
        raise ValueError(f"READ CAPACITY (16) data of {len(data)} bytes (need 12)")
    last_lba, block_size = struct.unpack_from(">QI", data)
    return last_lba + 1, block_size


class Plan(enum.Enum):
    """What a session at epoch E does to hold the reservation (:func:`preempt_target`)."""

    RESERVE = "reserve"        # nothing reserved
    HELD = "held"              # this key holds it already
    PREEMPT = "preempt"        # an older key holds it: preempt that key
    NEWER = "newer"            # a key at this epoch or later, not ours: refuse


def preempt_target(mine: int, held: int | None) -> Plan:
    """How to take the reservation with key ``mine`` when ``held`` holds it.

    A holder with an older epoch (any node, this one's own included: a path change or
    an old registration) is preempted by naming exactly that key. A holder at the same
    or a newer epoch that is not ``mine`` means a newer takeover (or a misconfigured
    peer): refused, never preempted. A key that is not vtl-ha's counts as newer, so it
    is never taken by force."""
    if held is None:
        return Plan.RESERVE
    if held == mine:
        return Plan.HELD
    held_epoch = key_epoch(held)
    if held_epoch is not None and held_epoch < (key_epoch(mine) or 0):
        return Plan.PREEMPT
    return Plan.NEWER
