"""Small helpers to act inside a named network namespace from this process.

``socket_in(ns, ...)`` creates a socket inside the namespace (setns in a short-lived
thread: a thread's network namespace is its own, and a socket keeps the namespace it
was created in), so the test process and the CLI can talk to services inside the lab
without forking ``ip netns exec`` for every request."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns: str, fn: Callable[[], T], timeout: float = 5.0) -> T:
    """Run ``fn`` in a thread that has joined namespace ``ns``; return its result."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(os.path.join(NETNS_RUN_DIR, ns), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"operation in namespace {ns} did not finish in {timeout} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def socket_in(ns: str, family: int = socket.AF_INET,
              kind: int = socket.SOCK_STREAM) -> socket.socket:
    return in_netns(ns, lambda: socket.socket(family, kind))


def http_get(ns: str, host: str, port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """A plain HTTP/1.0 GET from inside ``ns``: (status, body)."""
    s = socket_in(ns)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    finally:
        s.close()
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def exists(ns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_RUN_DIR, ns))


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []
