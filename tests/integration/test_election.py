"""The active-arbiter election, end to end: an arbiter on every node and the witness,
one real nats-server per module (loopback), real SIGKILL/SIGSTOP of the active one.

The cluster file is the example's with a short leader key: ``leader_ttl`` 1.0 s and
``leader_standby_delay`` 0.5 s, so a standby takes over between ~1.2 s and ~1.7 s after
the active arbiter died (the key is renewed every ttl/3 and polled every ttl/6)."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import nats
import pytest
import yaml

from tests.integration.natsutil import events, kv_groups, request
from vtlha.config import load_config
from vtlha.messages import Ack, Command, LeaderRecord, decode, encode
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster

LEADER_TTL, STANDBY_DELAY = 1.0, 0.5
BOUND = 0.5  # what a takeover of the leader key may take beyond ttl + delay
NODES = ("node-a", "node-b")


@pytest.fixture
def cluster(local_cluster: LocalCluster) -> LocalCluster:
    c = local_cluster
    raw = yaml.safe_load(c.config_path.read_text())
    raw["timings"].update(leader_ttl=LEADER_TTL, leader_standby_delay=STANDBY_DELAY)
    c.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    c.cfg = load_config(c.config_path)
    return c


def url_of(c: LocalCluster) -> str:
    return c.external_nats[0]  # type: ignore[index]


def leader_key(c: LocalCluster) -> tuple[LeaderRecord, int]:
    """The leader key as it is in the KV now: (record, revision)."""

    async def _go() -> tuple[LeaderRecord, int]:
        nc = await nats.connect(url_of(c))
        try:
            s = Subjects(c.cfg.cluster)
            kv = await nc.jetstream().key_value(s.kv_bucket)
            e = await kv.get(s.LEADER_KEY)
            assert e.value is not None and e.revision is not None
            return decode(LeaderRecord, e.value), e.revision
        finally:
            await nc.close()

    return asyncio.run(_go())


def arbiter(c: LocalCluster, host: str) -> dict[str, Any]:
    """The host's arbiter's /status; OSError when it does not answer (which
    ``wait_for`` polls through, e.g. a process just resumed from SIGSTOP)."""
    st = c.status(host, "arbiter")
    if st is None:
        raise OSError(f"{host}'s arbiter does not answer")
    return st


def standbys_see(c: LocalCluster, leader: str, hosts: tuple[str, ...] = NODES) -> bool:
    """Every arbiter of ``hosts`` answers, stands by, and has read ``leader`` on the key."""
    sts = [c.status(h, "arbiter") for h in hosts]
    return all(st is not None and st["role"] == "standby" and st["leader"] == leader
               for st in sts)


def wait_new_active(c: LocalCluster, old: str, t0: float,
                    timeout: float) -> tuple[str, dict[str, Any], float]:
    """Poll every arbiter but ``old`` until one reports itself active: (host, status,
    seconds since t0)."""
    others = [h for h in c.cfg.hosts if h != old]

    def _active() -> tuple[str, dict[str, Any]] | None:
        for h in others:
            st = c.status(h, "arbiter")
            if st is not None and st["role"] == "active":
                return h, st
        return None

    host, st = c.wait_for(_active, timeout, interval=0.01, what="a standby to become active")
    return host, st, time.monotonic() - t0


def epochs(c: LocalCluster) -> dict[str, tuple[str, int]]:
    return {g: (r.owner, r.epoch) for g, (r, _) in kv_groups(url_of(c), c.cfg.cluster).items()}


def start_and_settle(c: LocalCluster) -> int:
    """Start the cluster, wait for home ownership and warm standbys; the witness's term."""
    c.start()
    c.wait_for(c.home_held, 30, what="every group held by its home node")
    c.wait_for(lambda: standbys_see(c, "witness"), 10, what="standbys that read the key")
    term = arbiter(c, "witness")["term"]
    assert isinstance(term, int) and term >= 1
    return term


def test_one_active_arbiter_and_it_is_the_witness(cluster: LocalCluster) -> None:
    c = cluster
    term = start_and_settle(c)
    roles = {h: arbiter(c, h)["role"] for h in c.cfg.hosts}
    assert roles == {"node-a": "standby", "node-b": "standby", "witness": "active"}
    assert c.active_arbiters() == ["witness"]
    rec, rev = leader_key(c)
    assert rec.node == "witness" and rec.incarnation
    assert (rec.term or rev) == term  # the record carries the term it was won with
    w = arbiter(c, "witness")
    assert w["acting"] is True and w["leader"] == "witness" and w["active_since"] is not None
    assert w["election"]["preferred"] is True
    for h in NODES:
        st = arbiter(c, h)
        assert st["term"] == 0 and st["active_since"] is None and st["acting"] is False
        assert st["election"]["seen"]["node"] == "witness"
        assert st["election"]["seen"]["term"] == term
    # Every arbiter is warm: it hears the heartbeats of both nodes.
    for h in c.cfg.hosts:
        c.wait_for(lambda h=h: all(n["alive"] for n in arbiter(c, h)["nodes"].values()), 5,
                   what=f"{h}'s arbiter to hear both nodes")
    # The executors heard the term.
    for n in NODES:
        c.wait_for(lambda n=n: (c.status(n, "ip-manager") or {}).get("term") == term, 5,
                   what=f"{n}'s ip-manager to report term {term}")
    evs = [e for _, e in events(url_of(c), c.cfg.cluster) if e.kind.startswith("arbiter.")]
    assert [(e.kind, e.node, e.term) for e in evs] == [("arbiter.active", "witness", term)]


def test_killed_active_arbiter_is_replaced_and_nothing_fails_over(
        cluster: LocalCluster) -> None:
    c = cluster
    url = url_of(c)
    old_term = start_and_settle(c)
    before = epochs(c)

    c.procs.find("witness", "arbiter").signal(signal.SIGKILL)
    t0 = time.monotonic()
    host, st, took = wait_new_active(c, "witness", t0, LEADER_TTL + STANDBY_DELAY + 5)
    print(f"\nleader key taken over by {host} {took:.3f} s after SIGKILL of the active "
          f"arbiter (leader_ttl {LEADER_TTL} s + standby delay {STANDBY_DELAY} s)")
    assert took <= LEADER_TTL + STANDBY_DELAY + BOUND
    assert host in NODES and st["term"] > old_term
    rec, _ = leader_key(c)
    assert rec.node == host and rec.term in (0, st["term"])
    new_term = st["term"]

    # It announced its term to the executors, then said so in the event stream.
    for n in NODES:
        c.wait_for(lambda n=n: (c.status(n, "ip-manager") or {}).get("term") == new_term, 5,
                   what=f"{n}'s ip-manager to hear term {new_term}")
    c.wait_for(lambda: any(e.kind == "arbiter.active" and e.node == host and e.term == new_term
                           and e.old == "witness" for _, e in events(url, c.cfg.cluster)),
               5, what="the new arbiter's arbiter.active event")
    others = [h for h in NODES if h != host]
    assert arbiter(c, others[0])["role"] == "standby"

    # Nothing failed over: the nodes are alive, and a new arbiter makes no takeover
    # (checked past lease_ttl after it became active: poll for a change that must not come).
    def moved() -> bool:
        evs = events(url, c.cfg.cluster)
        return epochs(c) != before or any(e.kind.startswith(("failover.", "group."))
                                          and e.term == new_term for _, e in evs)

    with pytest.raises(TimeoutError):
        c.wait_for(moved, c.cfg.timings.lease_ttl + 1.0, interval=0.1, what="no failover")
    kinds = [e.kind for _, e in events(url, c.cfg.cluster)]
    assert not [k for k in kinds if k.startswith("failover.")]
    assert epochs(c) == before


def test_frozen_active_arbiter_is_replaced_failover_works_and_it_returns_by_hand_back(
        cluster: LocalCluster) -> None:
    c = cluster
    url = url_of(c)
    old_term = start_and_settle(c)
    old = c.procs.find("witness", "arbiter")

    old.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        host, st, took = wait_new_active(c, "witness", t0, LEADER_TTL + STANDBY_DELAY + 5)
        print(f"\nleader key taken over by {host} {took:.3f} s after SIGSTOP of the active "
              "arbiter")
        assert took <= LEADER_TTL + STANDBY_DELAY + BOUND
        new_term = st["term"]
        assert new_term > old_term
        # Past the hold-off: acting, and lease_ttl after it became active.
        lease_ttl = c.cfg.timings.lease_ttl
        c.wait_for(lambda: arbiter(c, host)["acting"] and
                   arbiter(c, host)["election"]["active_for_s"] >= lease_ttl, 5,
                   what=f"{host}'s arbiter acting, lease_ttl after it became active")

        # Failover still works. If node-a's arbiter was the active one, it dies with node-a
        # and node-b's takes over the key first (another leader_ttl + delay).
        killed_at = time.monotonic()
        c.procs.kill_host("node-a")

        def b_owns_a() -> bool:
            recs = kv_groups(url, c.cfg.cluster)
            return all(recs[g][0].owner == "node-b" and recs[g][0].state == "held"
                       for g in ("node-a-data", "node-a-mgmt"))

        c.wait_for(b_owns_a, 15, what="node-b to hold node-a's groups in the KV")
        print(f"node-a's groups held by node-b {time.monotonic() - killed_at:.3f} s after "
              f"node-a was killed (active arbiter: {host})")
        # The KV shows held (the lease holder's first renewal) a moment before the arbiter
        # sees it and publishes failover.completed.
        def completed() -> list[Any] | None:
            got = [e for _, e in events(url, c.cfg.cluster) if e.kind == "failover.completed"]
            return got if len(got) >= 2 else None

        done = c.wait_for(completed, 10, what="two failover.completed events")
        assert {e.group for e in done} == {"node-a-data", "node-a-mgmt"}
        assert all(e.term is not None and e.term >= new_term for e in done)
        assert all(e.node != "witness" for e in done)
    finally:
        old.signal(signal.SIGCONT)

    # Resumed, the old arbiter finds its renewal refused by compare-and-set: standby,
    # with its old (lower) term, which never comes back.
    def old_stands_by() -> bool:
        st = arbiter(c, "witness")
        return st["role"] == "standby" and st["election"]["state"] == "standby"

    c.wait_for(old_stands_by, 5, what="the resumed arbiter to stand by")
    c.wait_for(lambda: any(e.kind == "arbiter.standby" and e.node == "witness"
                           and e.term == old_term for _, e in events(url, c.cfg.cluster)),
               5, what="the old arbiter's arbiter.standby event")
    # Its old term never comes back: it is active again only by a hand-back (handback.py),
    # with a term above the node arbiter's, after that one resigned.
    c.wait_for(lambda: arbiter(c, "witness")["role"] == "active", 10 * LEADER_TTL,
               what="the active role handed back to the witness's arbiter")
    w = arbiter(c, "witness")
    assert w["term"] > new_term > old_term
    assert c.active_arbiters() == ["witness"]
    c.wait_for(lambda: any(e.kind == "arbiter.standby" and e.node in NODES
                           and "handed the active role back" in e.reason
                           for _, e in events(url, c.cfg.cluster)),
               5, what="the node arbiter's arbiter.standby event: it handed back")


def test_the_active_role_is_handed_back_to_the_witness_once_its_arbiter_is_back(
        cluster: LocalCluster) -> None:
    """A node's arbiter that took over from a dead witness arbiter hands the role back
    when it returns: otherwise a later cut of that node waits leader_ttl for a failover."""
    c = cluster
    url = url_of(c)
    start_and_settle(c)
    before = epochs(c)
    c.procs.find("witness", "arbiter").signal(signal.SIGKILL)
    host, st, _ = wait_new_active(c, "witness", time.monotonic(),
                                  LEADER_TTL + STANDBY_DELAY + 5)
    node_term = st["term"]
    c.wait_for(lambda: arbiter(c, host)["acting"], 5, what=f"{host}'s arbiter acting")

    c.start_service("witness", "arbiter")
    t0 = time.monotonic()
    c.wait_for(lambda: (c.status("witness", "arbiter") or {}).get("acting") is True,
               30, what="the witness's arbiter active and acting again")
    print(f"\nactive role back on the witness {time.monotonic() - t0:.2f} s after its "
          "arbiter was started again")
    w = arbiter(c, "witness")
    assert w["term"] > node_term
    c.wait_for(lambda: standbys_see(c, "witness"), 5, what="both node arbiters standing by")
    assert c.active_arbiters() == ["witness"]
    def said() -> list[Any] | None:
        evs = [e for _, e in events(url, c.cfg.cluster)]
        gave = [e for e in evs if e.kind == "arbiter.standby" and e.node == host
                and "handed the active role back to witness" in e.reason]
        took = [e for e in evs if e.kind == "arbiter.active" and e.node == "witness"
                and e.term == w["term"] and e.old == host]
        return evs if gave and took else None

    evs = c.wait_for(said, 5, what="arbiter.standby (handed back) and arbiter.active events")
    # A hand-back moves no group.
    assert epochs(c) == before
    assert not [e.kind for e in evs if e.kind.startswith("failover.")]


def test_the_old_arbiters_term_is_refused_once_the_new_one_announced(
        cluster: LocalCluster) -> None:
    c = cluster
    url = url_of(c)
    old_term = start_and_settle(c)
    c.procs.find("witness", "arbiter").signal(signal.SIGSTOP)
    try:
        _, st, _ = wait_new_active(c, "witness", time.monotonic(),
                                      LEADER_TTL + STANDBY_DELAY + 5)
        new_term = st["term"]
        assert new_term > old_term
        c.wait_for(lambda: (c.status("node-b", "ip-manager") or {}).get("term") == new_term,
                   5, what="node-b's ip-manager to hear the new term")
        epoch = kv_groups(url, c.cfg.cluster)["node-b-data"][0].epoch
        n_refused = len([e for _, e in events(url, c.cfg.cluster)
                         if e.kind == "command.refused"])
        # What the frozen arbiter would send if it woke up and did not know it lost.
        cmd = Command(cluster=c.cfg.cluster, node="witness", term=old_term, epoch=epoch,
                      group="node-b-data", action="release")
        ack = decode(Ack, request(url, Subjects(c.cfg.cluster).cmd("node-b", "ip-manager"),
                                  encode(cmd)))
        assert not ack.ok and "stale term" in ack.reason
        c.wait_for(lambda: [e for _, e in events(url, c.cfg.cluster)
                            if e.kind == "command.refused"][n_refused:], 5,
                   what="a command.refused event")
        refused = [e for _, e in events(url, c.cfg.cluster) if e.kind == "command.refused"]
        assert refused[-1].term == old_term and refused[-1].node == "node-b"
        assert "stale term" in refused[-1].reason
        assert "198.51.100.102/32" in c.recorded_addresses("node-b")  # nothing released
    finally:
        c.procs.find("witness", "arbiter").signal(signal.SIGCONT)
