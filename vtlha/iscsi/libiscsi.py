"""The slice of libiscsi (Debian ``libiscsi7``, soname ``libiscsi.so.7``) that vtl-ha
uses, through ctypes: no compiled extension.

Only what :mod:`vtlha.iscsi.session` calls is declared. Structures are read, never
written, and only ``struct scsi_task`` (status, sense, data in) and ``struct
scsi_sense`` are declared; their field offsets are asserted against the C layout of
libiscsi 1.19 on LP64 when this module is imported (:func:`check_layout`), and the sense
layout is checked once more against the library itself: :func:`check_sense_parser`
lets ``scsi_parse_sense_data`` decode a known sense buffer into our structure.

The one trap (``PLATFORM.md``): ``struct scsi_sense`` has three one-bit ``unsigned``
fields that gcc packs into one byte, followed by an ``unsigned char``. Declared as three
``c_uint`` bit fields, ctypes would give them a 4-byte unit and move every later field;
here they are one ``c_ubyte`` (``flags``).

Every function here blocks; a context must only ever be used by one thread at a time
(:class:`vtlha.iscsi.session.Session` gives each context a thread of its own).
"""

from __future__ import annotations

import ctypes
import functools
from ctypes import (
    POINTER,
    Structure,
    c_char_p,
    c_int,
    c_size_t,
    c_ubyte,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any

SONAME = "libiscsi.so.7"

# libiscsi's own status values (task->status): SCSI status bytes plus its own codes.
STATUS_GOOD = 0x00
STATUS_CHECK_CONDITION = 0x02
STATUS_CONDITION_MET = 0x04
STATUS_BUSY = 0x08
STATUS_RESERVATION_CONFLICT = 0x18
STATUS_TASK_SET_FULL = 0x28
STATUS_ACA_ACTIVE = 0x30
STATUS_TASK_ABORTED = 0x40
STATUS_REDIRECT = 0x101
STATUS_CANCELLED = 0x0F000000
STATUS_ERROR = 0x0F000001
STATUS_TIMEOUT = 0x0F000002

SESSION_NORMAL = 2


class ScsiSense(Structure):
    """``struct scsi_sense`` (decoded by libiscsi). ``flags`` holds the three one-bit
    fields ``sense_specific``, ``ill_param_in_cdb`` and ``bit_pointer_valid``."""

    _fields_ = [
        ("error_type", c_ubyte),
        ("key", c_int),           # enum scsi_sense_key
        ("ascq", c_int),          # (ASC << 8) | ASCQ
        ("flags", c_ubyte),       # three 1-bit fields, one byte (gcc)
        ("bit_pointer", c_ubyte),
        ("field_pointer", c_uint16),
    ]


class ScsiData(Structure):
    _fields_ = [("size", c_int), ("data", POINTER(c_ubyte))]


class ScsiTask(Structure):
    """The head of ``struct scsi_task``, up to and including ``datain``: all we read.
    Never allocated by us (pointers from libiscsi only), so the rest may stay
    undeclared."""

    _fields_ = [
        ("status", c_int),
        ("cdb_size", c_int),
        ("xfer_dir", c_int),
        ("expxferlen", c_int),
        ("cdb", c_ubyte * 16),
        ("residual_status", c_int),
        ("residual", c_size_t),
        ("sense", ScsiSense),
        ("datain", ScsiData),
    ]


class PrOutBasic(Structure):
    """``struct scsi_persistent_reserve_out_basic``: the PR OUT parameter list that
    libiscsi marshals (keys in host order; it writes them big-endian)."""

    _fields_ = [
        ("reservation_key", c_uint64),
        ("service_action_reservation_key", c_uint64),
        ("spec_i_pt", c_uint8),
        ("all_tg_pt", c_uint8),
        ("aptpl", c_uint8),
    ]


# The C layout of libiscsi 1.19 (scsi-lowlevel.h) on LP64 (x86-64, arm64), by hand from
# the header: field -> (offset, size).
EXPECTED_LAYOUT: dict[type[Structure], dict[str, tuple[int, int]]] = {
    ScsiSense: {"error_type": (0, 1), "key": (4, 4), "ascq": (8, 4), "flags": (12, 1),
                "bit_pointer": (13, 1), "field_pointer": (14, 2)},
    ScsiData: {"size": (0, 4), "data": (8, 8)},
    ScsiTask: {"status": (0, 4), "cdb_size": (4, 4), "xfer_dir": (8, 4),
               "expxferlen": (12, 4), "cdb": (16, 16), "residual_status": (32, 4),
               "residual": (40, 8), "sense": (48, 16), "datain": (64, 16)},
    PrOutBasic: {"reservation_key": (0, 8), "service_action_reservation_key": (8, 8),
                 "spec_i_pt": (16, 1), "all_tg_pt": (17, 1), "aptpl": (18, 1)},
}
EXPECTED_SIZES = {ScsiSense: 16, ScsiData: 16, PrOutBasic: 24}


def check_layout() -> None:
    """Raise ``ImportError`` unless every declared field sits where the C compiler
    puts it (a mismatch would read the wrong bytes silently)."""
    if ctypes.sizeof(c_void_p) != 8:
        raise ImportError("vtlha.iscsi supports 64-bit platforms only (LP64 layout)")
    for struct, fields in EXPECTED_LAYOUT.items():
        for name, (offset, size) in fields.items():
            field = getattr(struct, name)
            if (field.offset, field.size) != (offset, size):
                raise ImportError(f"ctypes layout of {struct.__name__}.{name} is "
                                  f"{(field.offset, field.size)}, libiscsi's is "
                                  f"{(offset, size)}")
    for struct, size in EXPECTED_SIZES.items():
        if ctypes.sizeof(struct) != size:
            raise ImportError(f"sizeof({struct.__name__}) is {ctypes.sizeof(struct)}, "
                              f"libiscsi's is {size}")


def check_sense_parser(lib: Any) -> None:
    """Let libiscsi decode a fixed-format sense buffer (UNIT ATTENTION, 2A/03) into a
    :class:`ScsiSense`; raise ``ImportError`` unless the fields land where we read them."""
    sb = (c_ubyte * 18)(0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x2A, 0x03, 0, 0, 0, 0)
    sense = ScsiSense()
    lib.scsi_parse_sense_data(ctypes.byref(sense), sb)
    got = (sense.error_type, sense.key, sense.ascq)
    if got != (0x70, 0x06, 0x2A03):
        raise ImportError(f"libiscsi decoded a known sense buffer to {got}: "
                          "struct scsi_sense's layout differs from ours")


_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "iscsi_create_context": (c_void_p, [c_char_p]),
    "iscsi_destroy_context": (c_int, [c_void_p]),
    "iscsi_get_error": (c_char_p, [c_void_p]),
    "iscsi_set_targetname": (c_int, [c_void_p, c_char_p]),
    "iscsi_set_isid_random": (c_int, [c_void_p, c_uint32, c_uint32]),
    "iscsi_set_session_type": (c_int, [c_void_p, c_int]),
    "iscsi_set_header_digest": (c_int, [c_void_p, c_int]),
    "iscsi_set_timeout": (c_int, [c_void_p, c_int]),
    "iscsi_set_noautoreconnect": (None, [c_void_p, c_int]),
    "iscsi_set_reconnect_max_retries": (None, [c_void_p, c_int]),
    "iscsi_set_tcp_user_timeout": (None, [c_void_p, c_int]),
    "iscsi_set_tcp_syncnt": (None, [c_void_p, c_int]),
    "iscsi_full_connect_sync": (c_int, [c_void_p, c_char_p, c_int]),
    "iscsi_logout_sync": (c_int, [c_void_p]),
    "iscsi_disconnect": (c_int, [c_void_p]),
    "iscsi_is_logged_in": (c_int, [c_void_p]),
    "iscsi_testunitready_sync": (POINTER(ScsiTask), [c_void_p, c_int]),
    "iscsi_readcapacity16_sync": (POINTER(ScsiTask), [c_void_p, c_int]),
    "iscsi_read16_sync": (POINTER(ScsiTask), [c_void_p, c_int, c_uint64, c_uint32, c_int,
                                              c_int, c_int, c_int, c_int, c_int]),
    "iscsi_write16_sync": (POINTER(ScsiTask), [c_void_p, c_int, c_uint64, c_void_p,
                                               c_uint32, c_int, c_int, c_int, c_int, c_int,
                                               c_int]),
    "iscsi_persistent_reserve_in_sync": (POINTER(ScsiTask), [c_void_p, c_int, c_int,
                                                             c_uint16]),
    "iscsi_persistent_reserve_out_sync": (POINTER(ScsiTask), [c_void_p, c_int, c_int, c_int,
                                                              c_int, c_void_p]),
    "scsi_free_scsi_task": (None, [POINTER(ScsiTask)]),
    "scsi_parse_sense_data": (None, [c_void_p, c_void_p]),
    "scsi_task_get_status": (c_int, [POINTER(ScsiTask), c_void_p]),
}


@functools.cache
def load() -> Any:
    """The library with every prototype declared and the layout checked; raises
    ``OSError`` when ``libiscsi.so.7`` is not installed (Debian: ``libiscsi7``)."""
    check_layout()
    lib = ctypes.CDLL(SONAME, use_errno=True)
    for name, (restype, argtypes) in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    check_sense_parser(lib)
    return lib
