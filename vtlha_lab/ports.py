"""Free TCP ports for labs and tests, chosen **below the kernel's ephemeral range**.

A port that is free when checked can still be taken before the service binds it. The
likeliest thief is the kernel itself: every outgoing connection (a NATS client, a probe,
an HTTP poll) takes a local port from ``net.ipv4.ip_local_port_range`` (32768-60999 by
default). A whole test suite makes thousands of those, so a port picked inside that
range now and then goes to a client socket before the service starts, and the service
fails to bind ("address already in use"; seen in a CI run). Ports below the range are
never handed out that way, so those are the ones picked here."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10000  # above the well-known and registered ports a host's daemons may use
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL = (32768, 60999)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (inclusive), or Linux's default if unreadable."""
    try:
        lo, hi = (int(x) for x in _RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return lo, hi


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def below_ephemeral() -> int:
    """One past the highest port to pick from: the start of the ephemeral range, but
    never less than ``LOWEST + 2000`` (a host whose range starts low leaves little room:
    there, collisions stay possible, as before)."""
    return max(ephemeral_range()[0], LOWEST + 2000)


def free_block(n: int = 1, tries: int = 500) -> int:
    """The first of ``n`` consecutive free ports below the ephemeral range."""
    top = below_ephemeral() - n
    for _ in range(tries):
        base = random.randrange(LOWEST, top)
        if all(port_free(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports between {LOWEST} and {top + n}")


def free_port() -> int:
    return free_block(1)
