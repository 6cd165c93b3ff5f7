"""Invalid input, reported without flooding anything.

Every invalid message is counted (``vtlha_invalid_messages_total``). Beyond that, a
service logs it and reports it as an ``input.rejected`` event **once per source per
interval** (a source: the kind of input and the subject it came on), saying how many
were dropped since the last report; and it makes at most ``budget`` reports per
interval over all sources, so a flood on many subjects costs a bounded number of log
lines and events. A source whose report is held back is reported, with its count,
by its next invalid message once the interval and the budget allow. Sources are kept
in a bounded table (oldest dropped first): random subjects cannot grow memory."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: seconds between two reports of one source
INTERVAL = 10.0
#: reports per interval over all sources
BUDGET = 20
#: sources remembered
MAX_SOURCES = 1000
#: an error text is cut to this many characters (it may quote the hostile input)
MAX_ERROR = 300


@dataclass
class Report:
    kind: str
    subject: str
    error: str
    #: invalid messages from this source since its last report, this one included
    dropped: int


@dataclass
class _Source:
    last_report: float | None = None
    pending: int = 0
    error: str = ""


class RejectLog:
    def __init__(self, interval: float = INTERVAL, budget: int = BUDGET,
                 max_sources: int = MAX_SOURCES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.budget = budget
        self.max_sources = max_sources
        self.clock = clock
        self._sources: OrderedDict[tuple[str, str], _Source] = OrderedDict()
        self._window_start = clock()
        self._reports_in_window = 0

    def note(self, kind: str, subject: str, error: str) -> Report | None:
        """One invalid message: the report to make now, or None (counted for later)."""
        now = self.clock()
        key = (kind, subject[:200])
        src = self._sources.get(key)
        if src is None:
            src = self._sources[key] = _Source()
            while len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(key)
        src.pending += 1
        src.error = error[:MAX_ERROR]
        return self._due(key, src, now)

    def _due(self, key: tuple[str, str], src: _Source, now: float) -> Report | None:
        if src.last_report is not None and now - src.last_report < self.interval:
            return None
        if now - self._window_start >= self.interval:
            self._window_start, self._reports_in_window = now, 0
        if self._reports_in_window >= self.budget:
            return None
        self._reports_in_window += 1
        src.last_report = now
        report = Report(kind=key[0], subject=key[1], error=src.error, dropped=src.pending)
        src.pending = 0
        return report

    def held_back(self) -> int:
        """Invalid messages counted but not yet reported (all sources)."""
        return sum(s.pending for s in self._sources.values())
