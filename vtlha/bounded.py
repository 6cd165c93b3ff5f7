"""One way to bound a call on the bus: ``await bounded(call, seconds)``.

Every KV and stream call that a service awaits goes through here. It uses
``asyncio.timeout`` rather than ``asyncio.wait_for``: Python 3.11's ``wait_for`` runs
the call as a task of its own, and when the caller is cancelled (a SIGTERM, a lost
leadership) just as that task ends with an error (``KeyNotFoundError``, a conflict), the
error is never retrieved and asyncio logs it at shutdown as if something had failed.
``asyncio.timeout`` runs the call in the caller's task, so the error, or the
cancellation, reaches the caller and nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def bounded(call: Awaitable[T], seconds: float) -> T:
    """``await call``, raising ``TimeoutError`` after ``seconds`` (the call is
    cancelled). A write that timed out may still have committed: callers that write
    treat a timeout as "unknown", never as "not done"."""
    async with asyncio.timeout(seconds):
        return await call
