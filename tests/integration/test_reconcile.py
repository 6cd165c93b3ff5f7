"""A new active arbiter reconciles every group (issue 14), end to end on loopback.

The active arbiter is frozen (SIGSTOP), the test writes the claim it would have written
(compare-and-set of ``node-a-mgmt`` to node-b at epoch + 1, with the arbiter's term), its
``switchover.started`` event and that move in the event state (``events.pair-1``, as
its sync would), then kills it: exactly what an arbiter stopped between
the claim and the acquire commands leaves behind (the interleaving forced, not raced).
node-b's lease holder turns the claim into ``held`` on its own after lease_ttl; the next
active arbiter must tell node-b's executors and end the started event. Before the
reconciliation (today's main), it found the group ``held`` and did nothing: node-b held
``node-a-mgmt`` in the KV and nothing served it."""

from __future__ import annotations

import asyncio
import signal
import time

import nats
import pytest
import yaml
from nats.js.errors import BadRequestError, KeyNotFoundError

from tests.integration.natsutil import events, kv_groups
from vtlha import bus
from vtlha.config import load_config
from vtlha.eventstate import EventState, StartedMove, end_id
from vtlha.messages import Event, GroupRecord, MoveNote, encode
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster

LEADER_TTL, STANDBY_DELAY = 1.0, 0.5
GROUP = "node-a-mgmt"


@pytest.fixture
def cluster(local_cluster: LocalCluster) -> LocalCluster:
    c = local_cluster
    raw = yaml.safe_load(c.config_path.read_text())
    raw["timings"].update(leader_ttl=LEADER_TTL, leader_standby_delay=STANDBY_DELAY)
    c.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    c.cfg = load_config(c.config_path)
    return c


def claim_as_the_arbiter(url: str, cluster: str, term: int,
                         announce: bool = True) -> tuple[int, str]:
    """Write the claim (noting its move), and with ``announce`` its started event and
    the event state, as the active arbiter would: (epoch, the event's id). Without
    ``announce``: an arbiter that died right after its claim."""

    async def _go() -> tuple[int, str]:
        nc = await nats.connect(url)
        try:
            s = Subjects(cluster)
            js = nc.jetstream()
            kv = await js.key_value(s.kv_bucket)
            ev = Event(cluster=cluster, node="witness", kind="switchover.started",
                       reason="node-b takes over node-a-mgmt from node-a: switchover "
                       "requested by an operator", pair="pair-1", group=GROUP, old="node-a",
                       new="node-b", term=term, epoch=1)
            for _ in range(50):  # node-a renews every heartbeat interval: CAS, retried
                e = await kv.get(s.group_key(GROUP))
                assert e.value is not None and e.revision is not None
                epoch = GroupRecord.model_validate_json(e.value).epoch + 1
                rec = GroupRecord(owner="node-b", term=term, epoch=epoch, state="acquiring",
                                  renewed_by="witness", move=MoveNote(
                                      kind="switchover", old="node-a", started=ev.id,
                                      term=term, reason="switchover requested"))
                try:
                    await kv.update(s.group_key(GROUP), encode(rec), last=e.revision)
                    break
                except BadRequestError:  # wrong last sequence: a renewal came first
                    continue
            else:
                raise AssertionError("the claim never won its compare-and-set")
            if not announce:
                return epoch, ev.id
            ev = ev.model_copy(update={"epoch": epoch})
            await bus.publish_event(js, s, ev, timeout=2.0)
            move = StartedMove(id=ev.id, kind="switchover", group=GROUP, pair="pair-1",
                               old="node-a", new="node-b", epoch=epoch, term=term)
            key = s.event_state_key("pair-1")
            try:
                got = await kv.get(key)
                state = EventState.model_validate_json(got.value or b"{}")
                state.started[GROUP] = move
                await kv.update(key, encode(state), last=got.revision)
            except KeyNotFoundError:
                await kv.create(key, encode(EventState(started={GROUP: move})))
            return epoch, ev.id
        finally:
            await nc.close()

    return asyncio.run(_go())


@pytest.mark.parametrize("announced", [True, False],
                         ids=["started-event-out", "died-right-after-the-claim"])
def test_an_arbiter_stopped_between_claim_and_commands_strands_nothing(
        cluster: LocalCluster, announced: bool) -> None:
    """``announced``: the started event went out before the arbiter stopped; otherwise
    only the claim did, and the next active arbiter announces the move it notes
    (``GroupRecord.move``) with the noted id, then ends it: each event once."""
    c = cluster
    url = c.external_nats[0]  # type: ignore[index]
    c.start()
    c.wait_for(c.home_held, 30, what="every group held by its home node")
    c.wait_for(lambda: (c.status("witness", "arbiter") or {}).get("acting") is True, 10,
               what="the witness's arbiter acting")
    term = (c.status("witness", "arbiter") or {})["term"]
    for node in ("node-a", "node-b"):  # the executors run and hold their home groups
        c.wait_for(lambda n=node: f"{n}-mgmt" in (c.status(n, "ip-manager") or {}).get(
            "held", {}), 15, what=f"{node}'s ip-manager holding {node}-mgmt")
    for node in ("node-a", "node-b"):  # the standby arbiters are warm
        c.wait_for(lambda n=node: (c.status(n, "arbiter") or {}).get("leader") == "witness",
                   15, what=f"{node}'s arbiter standing by")

    old = c.procs.find("witness", "arbiter")
    old.signal(signal.SIGSTOP)
    epoch, started = claim_as_the_arbiter(url, c.cfg.cluster, term, announce=announced)
    old.signal(signal.SIGKILL)
    t0 = time.monotonic()

    def served() -> bool:
        rec = kv_groups(url, c.cfg.cluster).get(GROUP)
        held = (c.status("node-b", "ip-manager") or {}).get("held", {})
        return rec is not None and rec[0].owner == "node-b" and rec[0].epoch == epoch \
            and rec[0].state == "held" and GROUP in held

    t = c.cfg.timings
    bound = LEADER_TTL + STANDBY_DELAY + 2 * t.lease_ttl + 3.0
    c.wait_for(served, bound, interval=0.05, what=f"node-b to serve {GROUP} (epoch {epoch})")
    print(f"\n{GROUP} served by node-b {time.monotonic() - t0:.3f} s after the active "
          f"arbiter died between its claim and its commands")
    assert GROUP not in (c.status("node-a", "ip-manager") or {}).get("held", {})

    def ended() -> Event | None:
        for _, e in events(url, c.cfg.cluster):
            if e.kind in ("switchover.completed", "switchover.failed") \
                    and e.data.get("started") == started:
                return e
        return None

    end = c.wait_for(ended, 5, what=f"the end of switchover.started #{started}")
    assert end.kind == "switchover.completed" and end.group == GROUP and end.epoch == epoch
    assert end.node != "witness" and (end.term or 0) > term
    evs = [e for _, e in events(url, c.cfg.cluster)]
    starts = [e for e in evs if e.kind == "switchover.started" and e.group == GROUP]
    ends = [e for e in evs if e.kind in ("switchover.completed", "switchover.failed")]
    assert [e.id for e in starts] == [started]  # once, by whoever announced it
    assert len(ends) == 1 and ends[0].id == end_id(started)
    if not announced:
        assert starts[0].node != "witness" and starts[0].epoch == epoch
        assert starts[0].term == term and starts[0].data.get("adopted") is True
