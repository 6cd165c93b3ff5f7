"""Leader placement: keep the KV's and the event stream's raft leaders on the witness,
so that a node's crash never waits for an election (DESIGN.md, "Raft elections are
slow"). Only the active arbiter does it."""

from __future__ import annotations

from collections.abc import Callable

import nats.errors
from nats.js import JetStreamContext
from prometheus_client import Counter

from vtlha import bus
from vtlha_arbiter.host import Host

LEADER_CHECK_INTERVAL = 1.0  # seconds between checks that stream leaders sit on the witness


class LeaderPlacement:
    def __init__(self, host: Host, js: Callable[[], JetStreamContext],
                 is_active: Callable[[], bool]) -> None:
        self.host = host
        self.js = js
        self.is_active = is_active
        self.moves = Counter("vtlha_stream_leader_stepdowns_total",
                             "Step-downs asked for to move a stream leader to the witness",
                             registry=host.registry)

    def wanted(self) -> bool:
        cfg = self.host.config
        return cfg.witness.host in cfg.nats.servers and cfg.nats.keep_leaders_on_witness

    async def check(self) -> None:
        if not self.is_active():
            return
        host = self.host
        witness = host.config.witness.host
        for stream in (bus.kv_stream(host.subjects), host.subjects.events_stream):
            try:
                was = await bus.prefer_leader(host.nc, self.js(), stream, witness)
            except (nats.errors.Error, TimeoutError) as exc:
                host.log.info("leader check failed", extra={"stream": stream,
                                                            "error": repr(exc)})
                continue
            if was is not None and was != witness:
                self.moves.inc()
                host.log.info("asked the stream leader to step down towards the witness",
                              extra={"stream": stream, "leader": was, "preferred": witness})
