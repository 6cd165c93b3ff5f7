"""The arbiter's side of ``vtlha.eventstate``: what it has announced (nodes declared
down, alarms raised, storage episodes open, moves started and not ended) as
``events.<pair>`` in the KV, so that a new active arbiter re-emits none of it and ends
every move it finds started.

``current`` reads the arbiter's memory (the cluster view, the mover's started moves);
``adopt`` replaces that memory with what the KV says, before a new active arbiter
decides anything, and hands the unfinished moves to the mover to end."""

from __future__ import annotations

from vtlha import bus
from vtlha.config import ClusterConfig
from vtlha.eventstate import EventState, EventStateStore, make_state, unfinished
from vtlha_arbiter.host import Host
from vtlha_arbiter.mover import Mover
from vtlha_arbiter.view import ClusterView


class EventBook:
    def __init__(self, host: Host, view: ClusterView, mover: Mover) -> None:
        self.host = host
        self.config: ClusterConfig = host.config
        self.view = view
        self.mover = mover
        self.store: EventStateStore | None = None
        groups = self.config.groups()
        self.pair_nodes = {p.name: [n.name for n in p.nodes] for p in self.config.pairs}
        self.pair_groups = {p: {g for g, (home, _) in groups.items() if home in nodes}
                            for p, nodes in self.pair_nodes.items()}

    def current(self) -> dict[str, EventState]:
        """Per pair, what this arbiter has announced and not yet ended."""
        out = {}
        for pair, nodes in self.pair_nodes.items():
            groups = self.pair_groups[pair]
            out[pair] = make_state(
                (n for n in nodes if self.view.nodes[n].declared_down),
                {n: self.view.nodes[n].alarms for n in nodes},
                (g for g in self.view.storage_alarms if g in groups),
                (m for g, m in self.mover.started.items() if g in groups),
                {g: e for g, e in self.mover.announced.items() if g in groups})
        return out

    async def adopt(self, deadline: float) -> int:
        """Take the KV's state as this arbiter's own (a new active arbiter, before it
        decides) for every pair whose key another arbiter changed since this one last
        wrote or read it (for the others its memory is as new, and may hold what it could
        not write yet). Returns how many moves are left unfinished (``end_unfinished``
        ends them once this arbiter acts); -1 when the KV could not be read within
        ``deadline`` seconds (this arbiter then goes on with what it knows, and may
        repeat an event)."""
        assert self.store is not None
        try:
            states = await bus.retry_js("event state", self.store.load_changed,
                                        deadline=deadline)
        except Exception as exc:
            self.host.log.warning("event state not read: events may repeat", extra={
                "error": repr(exc)})
            return -1
        for pair, st in states.items():
            for n in self.pair_nodes[pair]:
                self.view.nodes[n].declared_down = n in st.down
                self.view.nodes[n].alarms = set(st.alarms.get(n, ()))
            groups = self.pair_groups[pair]
            self.view.storage_alarms = ({g for g in self.view.storage_alarms
                                         if g not in groups} | set(st.storage_alarms))
            for g, epoch in st.announced.items():
                if g in groups:
                    self.mover.announced[g] = max(epoch, self.mover.announced.get(g, 0))
        for pair in states:  # the moves of those pairs are the KV's
            for g in self.pair_groups[pair]:
                self.mover.started.pop(g, None)
        self.mover.started.update({m.group: m for m in unfinished(states)})
        moves = sorted(self.mover.started.values(), key=lambda m: m.group)
        self.host.log.info("event state adopted", extra={
            "from_kv": sorted(states),
            "down": sorted(n for n, st in self.view.nodes.items() if st.declared_down),
            "unfinished": [f"{m.kind} {m.group} epoch {m.epoch}" for m in moves]})
        return len(moves)

    def end_unfinished(self) -> None:
        """Once acting: end every move started and not ended (adopted from the KV, or
        its own from before it lapsed); a move a run of this arbiter still drives is
        left to that run (``Mover.end_adopted``)."""
        for m in sorted(self.mover.started.values(), key=lambda m: m.group):
            self.host.spawn(self.mover.end_adopted(m), f"adopted-{m.group}", critical=False)
