"""Is a KV watch still delivering? Sans-I/O (issue 14: a stalled ``group.>`` watch must
not strand a group).

A watch's ordered consumer lives on one server; when that server is cut off or its
consumer is lost, the watch may stop delivering without any error. The lease holder
knows writes the watch must show: its own successful renewals. So:

- every successful write of ours (group, revision) is *expected* on the watch;
- a delivery of that group at that revision or later meets the expectation;
- an expectation older than ``stall_after`` means the watch stalled: restart it
  (``stalled`` says why; ``on_restart`` clears the expectations);
- whatever the watch does, the records are also read directly every ``read_every``
  (``read_due`` / ``on_read``): the backstop for a node that writes nothing (it holds
  no group, so it has no renewals to expect) while the arbiter gives it one.
Reads and deliveries alike go through the lease holder's monotonic filter, so a
restarted watch replaying old values, or a direct read answered by a follower behind,
is harmless."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WatchMonitor:
    stall_after: float
    read_every: float
    expected: dict[str, tuple[int, float]] = field(default_factory=dict)  # rev, since
    seen: dict[str, int] = field(default_factory=dict)
    last_read: float | None = None
    restarts: int = 0

    def on_delivery(self, group: str, revision: int) -> None:
        self.seen[group] = max(self.seen.get(group, 0), revision)
        exp = self.expected.get(group)
        if exp is not None and revision >= exp[0]:
            del self.expected[group]

    def on_own_write(self, group: str, revision: int, now: float) -> None:
        """A write of ours committed at ``revision``: the watch must show it."""
        if self.seen.get(group, 0) >= revision:
            return
        exp = self.expected.get(group)
        since = exp[1] if exp is not None else now  # the oldest unmet expectation counts
        self.expected[group] = (max(revision, exp[0] if exp else 0), since)

    def stalled(self, now: float) -> str | None:
        """Why the watch must be restarted now, or None."""
        for group, (revision, since) in sorted(self.expected.items()):
            if now - since >= self.stall_after:
                return (f"the watch has not shown our own write of {group} (revision "
                        f"{revision}) for {now - since:.3f} s")
        return None

    def on_restart(self) -> None:
        self.expected.clear()
        self.restarts += 1

    def read_due(self, now: float) -> bool:
        return self.last_read is None or now - self.last_read >= self.read_every

    def on_read(self, now: float) -> None:
        self.last_read = now
