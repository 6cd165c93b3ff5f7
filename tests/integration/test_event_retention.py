"""The event stream's retention comes from the cluster file: the arbiter creates the
stream with ``nats.events_max_age``, ``events_max_bytes`` and ``events_max_msgs``,
brings an existing stream to changed limits when it starts again (in place, nothing
lost), and the server drops the oldest events beyond the count limit."""

from __future__ import annotations

import asyncio
import signal

import nats
import yaml
from nats.js.api import StreamConfig, StreamState

from vtlha.config import load_config
from vtlha.messages import Event, encode
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster


def stream(c: LocalCluster) -> tuple[StreamConfig, StreamState]:
    async def _go() -> tuple[StreamConfig, StreamState]:
        nc = await nats.connect(c.client_urls())
        try:
            info = await nc.jetstream().stream_info(Subjects(c.cfg.cluster).events_stream)
            return info.config, info.state
        finally:
            await nc.close()

    return asyncio.run(_go())


def retention(c: LocalCluster, **limits: float) -> None:
    raw = yaml.safe_load(c.config_path.read_text())
    raw["nats"].update(limits)
    c.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    c.cfg = load_config(c.config_path)


def fill(c: LocalCluster, n: int) -> None:
    """Store ``n`` small events, 100 publishes in flight at a time."""
    subj = Subjects(c.cfg.cluster)

    async def _go() -> None:
        nc = await nats.connect(c.client_urls())
        try:
            js = nc.jetstream(timeout=10)
            for start in range(0, n, 100):
                await asyncio.gather(*(
                    js.publish(subj.event("test.filler"), encode(Event(
                        cluster=c.cfg.cluster, node="witness", kind="test.filler",
                        reason=f"filler {i}")))
                    for i in range(start, min(n, start + 100))))
        finally:
            await nc.close()

    asyncio.run(_go())


def test_the_arbiter_applies_the_retention_of_the_cluster_file(
        local_cluster: LocalCluster) -> None:
    c = local_cluster
    retention(c, events_max_age=7200, events_max_bytes=2 * 1024 * 1024, events_max_msgs=1000)
    c.start()
    cfg, _ = stream(c)
    assert (cfg.max_age, cfg.max_bytes, cfg.max_msgs) == (7200, 2 * 1024 * 1024, 1000)

    # the oldest go beyond the count limit
    fill(c, 1100)
    _, state = stream(c)
    assert state.messages == 1000 and state.first_seq == state.last_seq - 999

    # a changed limit is applied by the arbiter's next start, in place
    retention(c, events_max_msgs=2000, events_max_age=3600)
    arbiters = [a for a in c.procs.of_host("witness") if a.service == "arbiter"]
    for a in arbiters:
        a.signal(signal.SIGTERM)
        a.proc.wait(10)
    c.start_service("witness", "arbiter")
    c.wait_for(lambda: stream(c)[0].max_msgs == 2000, 30,
               what="the restarted arbiter to apply the new count limit")
    cfg, after = stream(c)
    assert (cfg.max_age, cfg.max_bytes) == (3600, 2 * 1024 * 1024)
    # in place: the stream kept its events (any dropped meanwhile made room for newer ones
    # under the old limit, one for one)
    assert after.last_seq >= state.last_seq
    assert after.first_seq - state.first_seq <= after.last_seq - state.last_seq
