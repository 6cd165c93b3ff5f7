"""The kernel fence (DESIGN.md "Safety", the two-layer kernel lease, layer 1).

Per node, two nftables tables named ``vtlha_fence`` in the node's namespace:

    table inet vtlha_fence   inbound packets to a floating address are dropped
    table arp  vtlha_fence   ARP replies from it (and requests for it) are dropped

unless the address is in the table's ``held`` set, whose elements time out (millisecond
precision). The ip-manager adds or refreshes an element only when a valid lease notice
arrives, with the timeout ``valid_until - margin - now`` computed right before the write;
when notices stop (lease holder dead, node cut off) or the ip-manager itself is killed or
frozen, nothing refreshes and the node stops answering within the lease, even with the
address still configured.

Every refresh is ONE batch covering both tables (``timeout T expires T`` refreshes an
element in place; no instant without it), run in-process through libnftables (ctypes),
not by forking ``nft`` (~16-20 ms a call). PLATFORM.md records the measurements."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import threading

from vtlha.errors import FatalError, VtlhaError

TABLE = "vtlha_fence"
FAMILIES = ("inet", "arp")
NFT_CTX_OUTPUT_JSON = 1 << 4


class FenceError(VtlhaError):
    pass


class Nft:
    """A libnftables context (one per process; calls are serialised)."""

    def __init__(self) -> None:
        name = os.environ.get("VTLHA_LIBNFTABLES") or ctypes.util.find_library("nftables") \
            or "libnftables.so.1"  # the variable exists for the "refuses unfenced" test
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise FatalError("nftables is not installed (libnftables missing): the fence "
                             "cannot be enforced and the ip-manager refuses to run unfenced; "
                             "install it with: apt-get install -y nftables") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_int
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        if not self.ctx:
            raise FatalError("libnftables: cannot create a context")
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)
        self.lock = threading.Lock()

    def run(self, cmd: str, json_output: bool = False) -> str:
        with self.lock:
            self.lib.nft_ctx_output_set_flags(self.ctx, NFT_CTX_OUTPUT_JSON if json_output else 0)
            rc = self.lib.nft_run_cmd_from_buffer(self.ctx, cmd.encode())
            out = self.lib.nft_ctx_get_output_buffer(self.ctx) or b""
            err = self.lib.nft_ctx_get_error_buffer(self.ctx) or b""
        if rc != 0:
            raise FenceError(f"nft failed ({rc}): {err.decode(errors='replace').strip()}")
        return out.decode(errors="replace")

    def close(self) -> None:
        if self.ctx:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None


def ruleset(floating: list[str]) -> str:
    """The fence tables for these floating addresses (IPv4, no prefix)."""
    elems = ", ".join(floating)
    fl = f"elements = {{ {elems} }}" if floating else ""
    return f"""table inet {TABLE} {{
  set floating {{ type ipv4_addr; {fl} }}
  set held {{ type ipv4_addr; flags timeout; }}
  chain input {{ type filter hook input priority -200; policy accept;
    ip daddr @floating ip daddr != @held drop; }}
}}
table arp {TABLE} {{
  set floating {{ type ipv4_addr; {fl} }}
  set held {{ type ipv4_addr; flags timeout; }}
  chain output {{ type filter hook output priority -200; policy accept;
    arp operation reply arp saddr ip @floating arp saddr ip != @held drop; }}
  chain input {{ type filter hook input priority -200; policy accept;
    arp operation request arp daddr ip @floating arp daddr ip != @held drop; }}
}}
"""


class Fence:
    def __init__(self, floating: list[str], nft: Nft | None = None) -> None:
        self.floating = sorted(floating)
        self.nft = nft or Nft()

    def install(self) -> None:
        """(Re)create both tables atomically (their held sets start empty)."""
        drop = "".join(f"add table {f} {TABLE}\ndelete table {f} {TABLE}\n" for f in FAMILIES)
        self.nft.run(drop + ruleset(self.floating))

    def is_installed(self) -> bool:
        try:
            for f in FAMILIES:
                self.nft.run(f"list chain {f} {TABLE} input")
        except FenceError:
            return False
        return True

    def refresh(self, addresses: list[str], timeout_ms: float) -> None:
        """Put (or refresh in place) the addresses in both held sets for ``timeout_ms``:
        one batch, so there is no instant without them."""
        if not addresses:
            return
        t = max(1, int(timeout_ms))  # truncated: never longer than the lease allows
        elems = ", ".join(f"{a} timeout {t}ms expires {t}ms" for a in addresses)
        self.nft.run("".join(f"add element {f} {TABLE} held {{ {elems} }}\n" for f in FAMILIES))

    def remove(self, addresses: list[str]) -> None:
        """Take the addresses out of both held sets (those present), in one batch."""
        present = set(self.held())
        gone = [a for a in addresses if a in present]
        if not gone:
            return
        elems = ", ".join(gone)
        try:
            self.nft.run("".join(f"delete element {f} {TABLE} held {{ {elems} }}\n"
                                 for f in FAMILIES))
        except FenceError:
            # An element timed out between the listing and the delete (the two sets'
            # elements expire apart; the batch is all or nothing): delete one by one,
            # and fail only if one is still listed afterwards (nft 1.0.6 has no
            # ``destroy``).
            for f in FAMILIES:
                for a in gone:
                    with contextlib.suppress(FenceError):
                        self.nft.run(f"delete element {f} {TABLE} held {{ {a} }}\n")
            left = [a for a in gone if a in self.held()]
            if left:
                raise FenceError(f"cannot take {', '.join(left)} out of the fence") from None

    def held(self) -> dict[str, float]:
        """Address -> seconds left, from the inet table's held set (expired elements are
        not listed by the kernel)."""
        try:
            out = self.nft.run(f"list set inet {TABLE} held")
        except FenceError:
            return {}
        return parse_held(out)


_ELEMS = re.compile(r"elements\s*=\s*\{([^}]*)\}", re.S)
_ELEM = re.compile(r"(\d+\.\d+\.\d+\.\d+)(?:\s+timeout\s+\S+)?(?:\s+expires\s+(\S+))?")


def _seconds(text: str | None) -> float:
    """nft durations such as 1s288ms, 288ms, 2m3s."""
    if not text:
        return 0.0
    total = 0.0
    for value, unit in re.findall(r"(\d+)(ms|s|m|h|d)", text):
        total += int(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    return total


def parse_held(out: str) -> dict[str, float]:
    """Parse ``nft list set`` text output (libnftables' JSON output has crashed on an
    internal assertion here, so the plain text is the stable interface)."""
    m = _ELEMS.search(out)
    if not m:
        return {}
    return {ip: _seconds(exp) for ip, exp in _ELEM.findall(m.group(1))}
