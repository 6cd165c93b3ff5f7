"""Issue 14, the node side, against a real nats-server with real services on loopback
(the recording IP backend and the reference SAN target):

- traces 1 and 3: the KV says node-b holds (acquires) a group but no acquire command
  ever reaches node-b's executors (every arbiter frozen right after the claim): node-b's
  ip-manager and storage-monitor serve it anyway, within the bound, because executors
  are level-triggered on their lease holder's notices;
- a recreated KV bucket: commands of the new bucket's arbiter are accepted, a command
  carrying the old bucket's identity is refused; running arbiters find the bucket lost,
  create it and start afresh on it, and every group is served again with no operator;
- nodes' services never create the bucket: they wait for it."""

from __future__ import annotations

import asyncio
import signal
import time

import nats
from nats.js.errors import NotFoundError

from vtlha import bus
from vtlha.messages import Ack, Command, GroupRecord, decode, encode
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster

A_GROUPS = ("node-a-data", "node-a-mgmt")
A_ADDRESSES = ["198.51.100.101/32", "203.0.113.101/32"]


def _served(c: LocalCluster, node: str, group: str) -> bool:
    st = c.status(node, "storage-monitor") or {}
    return bool(st.get("groups", {}).get(group, {}).get("state") == "served")


def _ready(c: LocalCluster) -> None:
    c.start()
    c.wait_for(c.home_held, 30, what="every group held by its home node")
    c.wait_for(lambda: all(a in c.recorded_addresses("node-a") for a in A_ADDRESSES), 10,
               what="node-a's ip-manager to hold its addresses")
    c.wait_for(lambda: _served(c, "node-a", "node-a-data"), 30,
               what="node-a's data group served")


async def _claim(c: LocalCluster, groups: tuple[str, ...], new: str) -> dict[str, int]:
    """What an arbiter's claim does, by hand: a compare-and-set of each group's key to
    ``new`` at epoch + 1, state acquiring, against the revision read just before (retried
    against the owner's renewals). Returns group -> the new epoch."""
    nc = await c.connect()
    subj = Subjects(c.cfg.cluster)
    try:
        kv = await nc.jetstream(timeout=2).key_value(subj.kv_bucket)
        out = {}
        for g in groups:
            for _ in range(50):
                e = await kv.get(subj.group_key(g))
                assert e.value is not None and e.revision is not None
                rec = decode(GroupRecord, e.value)
                new_rec = rec.model_copy(update={"owner": new, "epoch": rec.epoch + 1,
                                                 "state": "acquiring", "renewed_by": None})
                try:
                    await kv.update(subj.group_key(g), encode(new_rec), last=e.revision)
                except Exception:
                    continue  # the owner renewed in between: read again
                out[g] = new_rec.epoch
                break
        assert set(out) == set(groups), f"could not claim {groups}"
        return out
    finally:
        await nc.close()


def _create_bucket(c: LocalCluster) -> str:
    """The KV bucket, created by hand as an arbiter would; returns its identity."""
    subj = Subjects(c.cfg.cluster)

    async def _go() -> str:
        nc = await c.connect()
        try:
            await bus.ensure_kv(nc.jetstream(timeout=2), subj, replicas=1)
            return await bus.kv_identity(nc, subj)
        finally:
            await nc.close()

    return asyncio.run(_go())


async def _send_notice(c: LocalCluster, group: str, epoch: int, bucket: str = "") -> None:
    """A lease notice to node-a's executors, as its lease holder would send it (valid
    for a minute)."""
    from vtlha.messages import LeaseNotice

    subj = Subjects(c.cfg.cluster)
    nc = await c.connect()
    try:
        n = LeaseNotice(cluster=c.cfg.cluster, node="node-a", group=group, epoch=epoch,
                        valid_until=time.monotonic() + 60.0, since=time.monotonic(),
                        bucket=bucket)
        await nc.publish(subj.lease("node-a"), encode(n))
        await nc.flush()
    finally:
        await nc.close()


def test_traces_1_and_3_a_claim_with_no_command_is_served_by_the_new_owner(
        local_cluster: LocalCluster) -> None:
    """Every arbiter frozen (SIGSTOP) right after the claim, as in traces 1 and 3: no
    release or acquire command reaches anyone. node-a's renewals now conflict: it drops
    its groups; node-b's lease holder opens the acquire gate on its own after lease_ttl +
    margin, and its notices alone make node-b's ip-manager add the addresses and its
    storage-monitor take the storage. Bound: lease_ttl + margin + a renewal round trip +
    convergence; asserted with room for a loaded 2-core machine."""
    c = local_cluster
    _ready(c)
    arbiters = [c.procs.find(h, "arbiter") for h in c.cfg.hosts]
    for a in arbiters:
        a.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        epochs = asyncio.run(_claim(c, A_GROUPS, "node-b"))
        c.wait_for(lambda: all(a in c.recorded_addresses("node-b") for a in A_ADDRESSES), 5,
                   what="node-b's ip-manager to add node-a's addresses with no command")
        took_ip = time.monotonic() - t0
        c.wait_for(lambda: _served(c, "node-b", "node-a-data"), 10,
                   what="node-b's storage-monitor to serve node-a's data group")
        took_storage = time.monotonic() - t0
        c.wait_for(lambda: c.recorded_addresses("node-a") == [], 5,
                   what="node-a's ip-manager to let its addresses go")
        recs = c.kv_groups()
        for g, e in epochs.items():
            assert (recs[g][0].owner, recs[g][0].epoch, recs[g][0].state) == (
                "node-b", e, "held")
        st = c.status("node-b", "ip-manager") or {}
        assert st["leases"]["node-a-data"] == {"verdict": "hold", "epoch": epochs["node-a-data"]}
        t = c.cfg.timings
        print(f"served with no command: addresses after {took_ip:.3f} s, storage after "
              f"{took_storage:.3f} s (lease_ttl + margin = {t.lease_ttl + t.margin:.3f} s)")
        assert took_ip < t.lease_ttl + t.margin + 2.0
    finally:
        for a in arbiters:
            a.signal(signal.SIGCONT)


def test_a_stalled_watch_is_restarted_and_a_claim_still_seen(
        local_cluster: LocalCluster) -> None:
    """Every consumer of the KV stream deleted under the services (as when the server
    holding a watch's consumer is lost): the lease holders' watches go silent without an
    error. Each sees its own renewals missing from its watch and restarts it; a claim
    made after that (every arbiter frozen) is served by node-b."""
    c = local_cluster
    _ready(c)
    subj = Subjects(c.cfg.cluster)
    arbiters = [c.procs.find(h, "arbiter") for h in c.cfg.hosts]
    for a in arbiters:
        a.signal(signal.SIGSTOP)

    async def _delete_consumers() -> int:
        nc = await c.connect()
        try:
            js = nc.jetstream(timeout=2)
            infos = await js.consumers_info(bus.kv_stream(subj))
            for info in infos:
                await js.delete_consumer(bus.kv_stream(subj), info.name)
            return len(infos)
        finally:
            await nc.close()

    def restarts(node: str) -> int:
        return int(((c.status(node, "heartbeat") or {}).get("lease") or {})
                   .get("watch_restarts", 0))

    try:
        assert asyncio.run(_delete_consumers()) >= 2  # one watch per lease holder at least
        t0 = time.monotonic()
        c.wait_for(lambda: restarts("node-a") >= 1 and restarts("node-b") >= 1, 10,
                   what="both lease holders to restart their stalled watch")
        print(f"watches restarted within {time.monotonic() - t0:.3f} s")
        asyncio.run(_claim(c, ("node-a-mgmt",), "node-b"))
        c.wait_for(lambda: "203.0.113.101/32" in c.recorded_addresses("node-b"), 5,
                   what="node-b to serve the claimed group")
    finally:
        for a in arbiters:
            a.signal(signal.SIGCONT)


def test_a_recreated_bucket_is_harmless(local_cluster: LocalCluster) -> None:
    """The bucket is lost and created again by hand with nats-py's defaults (revisions
    start over: the new arbiter's term is far below what executors persisted; a bucket
    an arbiter creates starts above them, the next test). A command of the new
    bucket's arbiter (naming the new identity) is accepted; one carrying the old
    identity is refused."""
    c = local_cluster
    _ready(c)
    subj = Subjects(c.cfg.cluster)
    subject = subj.cmd("node-a", "ip-manager")

    async def _go() -> tuple[str, str, Ack, Ack, Ack]:
        nc = await c.connect()
        try:
            js = nc.jetstream(timeout=2)
            old = await bus.kv_identity(nc, subj)
            for h in c.cfg.hosts:  # nobody recreates it behind our back
                c.procs.find(h, "arbiter").signal(signal.SIGSTOP)
            high = Command(cluster=c.cfg.cluster, node="witness", term=2**62, epoch=0,
                           group="", action="term", bucket=old)
            await bus.send_command(nc, subject, high, 2.0)
            await js.delete_key_value(subj.kv_bucket)
            await js.create_key_value(bucket=subj.kv_bucket, history=bus.KV_HISTORY)
            new = await bus.kv_identity(nc, subj)
            low = Command(cluster=c.cfg.cluster, node="witness", term=3, epoch=0, group="",
                          action="term")
            legacy = await bus.send_command(nc, subject, low, 2.0)  # bucket "" : old tokens
            fresh = await bus.send_command(nc, subject, low.model_copy(
                update={"bucket": new}), 2.0)
            stale = await bus.send_command(nc, subject, high, 2.0)
            return old, new, legacy, fresh, stale
        finally:
            await nc.close()
            for h in c.cfg.hosts:  # the old bucket's arbiters die (frozen, never resumed)
                c.procs.find(h, "arbiter").signal(signal.SIGKILL)

    old, new, legacy, fresh, stale = asyncio.run(_go())
    assert old != new
    assert not legacy.ok and "stale term" in legacy.reason
    assert fresh.ok, fresh.reason
    assert not stale.ok and old in stale.reason and new in stale.reason
    st = c.status("node-a", "ip-manager") or {}
    assert st["term"] == 3

    # End to end: a new arbiter on the new bucket (its term a small revision of it) is
    # obeyed, every group is held again, and node-a serves its addresses. Events reach
    # the stream through the ip-manager's outbox, so the stale command's refusal may be
    # stored later: count from once it is there.
    c.wait_for(lambda: any(e.kind == "command.refused" and old in e.reason and new in e.reason
                           for e in c.events()), 15,
               what="the stale command's refusal in the event stream")
    n_events = len(c.events())
    witness = c.cfg.witness.host
    c.start_service(witness, "arbiter")
    c.wait_for(lambda: c.arbiter_role(witness) == "active", 30,
               what="a new arbiter to become active on the new bucket")
    c.wait_for(c.home_held, 30, what="every group held again in the new bucket")
    c.wait_for(lambda: all(a in c.recorded_addresses("node-a") for a in A_ADDRESSES), 10,
               what="node-a's ip-manager to serve its addresses again")
    term = (c.status(witness, "arbiter") or {}).get("term")
    st = c.status("node-a", "ip-manager") or {}
    assert term is not None and st["term"] == term < 10_000
    refused = [e for e in c.events()[n_events:] if e.kind == "command.refused"]
    assert refused == [], [e.reason for e in refused]


def test_running_arbiters_start_afresh_on_a_recreated_bucket(
        local_cluster: LocalCluster) -> None:
    """The bucket is lost under running arbiters (deleted, nobody frozen) and no
    operator does anything. An arbiter finds it missing and creates it (only arbiters
    create it, its revisions above the old one's); every arbiter finds the new identity
    and starts afresh on it — a new election (a term above the old one), no record or
    revision of the old one — and the active one assigns every group again; node-a
    serves its addresses, whose executors obey the new term. Then the new bucket works
    like the old one: node-a's heartbeat killed, its groups move to node-b. Before,
    the arbiters kept their view of the old bucket (their election ignored every read
    of the new leader key, their view every new group record) and nothing was assigned
    again."""
    c = local_cluster
    _ready(c)
    c.wait_for(lambda: all(c.http_get(h, "arbiter", "/readyz").get("ready")
                           for h in c.cfg.hosts), 20, what="every arbiter running")
    subj = Subjects(c.cfg.cluster)
    witness = c.cfg.witness.host
    before = c.status(witness, "arbiter") or {}
    old_term, old_since = int(before["term"]), before["active_since"]

    async def _identity() -> str:
        nc = await c.connect()
        try:
            return await bus.kv_identity(nc, subj)
        finally:
            await nc.close()

    async def _delete() -> str:
        nc = await c.connect()
        try:
            old = await bus.kv_identity(nc, subj)
            await nc.jetstream(timeout=2).delete_key_value(subj.kv_bucket)
            return old
        finally:
            await nc.close()

    def identity() -> str | None:
        try:
            return asyncio.run(_identity())
        except NotFoundError:
            return None

    old = asyncio.run(_delete())
    t0 = time.monotonic()
    c.wait_for(lambda: identity() not in (None, old), 10,
               what="an arbiter to create the missing bucket")
    new = identity()

    def active_term() -> int | None:
        """The witness's arbiter's term once it acts in an activation after the old."""
        st = c.status(witness, "arbiter") or {}
        acting = st.get("acting") and st.get("active_since") not in (None, old_since)
        return int(st["term"]) if acting else None

    c.wait_for(lambda: active_term() is not None, 20,
               what="an arbiter active on the new bucket")
    c.wait_for(c.home_held, 20, what="every group assigned again in the new bucket")
    took = time.monotonic() - t0
    c.wait_for(lambda: all(a in c.recorded_addresses("node-a") for a in A_ADDRESSES), 10,
               what="node-a's ip-manager to serve its addresses")
    term = active_term()
    st = c.status("node-a", "ip-manager") or {}
    assert term is not None and st["term"] == term, (term, st.get("term"))
    recs = c.kv_groups()
    assert all(rec.epoch == 1 for rec, _ in recs.values()), recs
    assert c.active_arbiters() == [witness]
    said = [e for e in c.events() if e.kind == "fencing.new_bucket" and e.node == witness]
    assert said and said[0].data["new"] == new, [e.reason for e in said]
    assert term > old_term  # the new bucket's revisions start above the old one's
    print(f"every group held again {took:.2f} s after the bucket was deleted "
          f"(term {old_term} -> {term})")

    c.procs.find("node-a", "heartbeat").signal(signal.SIGKILL)
    c.wait_for(lambda: c.held_by().get("node-a-data") == "node-b"
               and c.held_by().get("node-a-mgmt") == "node-b", 20,
               what="node-a's groups taken over by node-b in the new bucket")
    c.wait_for(lambda: all(a in c.recorded_addresses("node-b") for a in A_ADDRESSES), 10,
               what="node-b's ip-manager to serve node-a's addresses")


def test_node_services_wait_for_the_bucket_and_never_create_it(
        local_cluster: LocalCluster) -> None:
    """No arbiter yet: a node's heartbeat, ip-manager and storage-monitor start, say they
    wait for the bucket, and do not create it; once it exists (the arbiter's job, done
    here by hand) they become ready."""
    c = local_cluster
    c.create_devices()
    c.start_san()
    for svc in ("heartbeat", "ip-manager", "storage-monitor"):
        c.start_service("node-a", svc)
    subj = Subjects(c.cfg.cluster)
    logs = [c.procs.find("node-a", s).log_path for s in
            ("heartbeat", "ip-manager", "storage-monitor")]
    c.wait_for(lambda: all("waiting for the KV bucket" in p.read_text(errors="replace")
                           for p in logs), 20, what="every service to wait for the bucket")

    async def _exists() -> bool:
        nc = await c.connect()
        try:
            await nc.jetstream(timeout=2).key_value(subj.kv_bucket)
            return True
        except NotFoundError:
            return False
        finally:
            await nc.close()

    assert asyncio.run(_exists()) is False

    async def _create() -> None:
        nc = await nats.connect(c.client_urls())
        try:
            await bus.ensure_kv(nc.jetstream(timeout=2), subj, replicas=1)
        finally:
            await nc.close()

    asyncio.run(_create())
    services = ("heartbeat", "ip-manager", "storage-monitor")
    c.wait_for(lambda: all(c.http_get("node-a", s, "/readyz").get("ready") for s in services),
               20, what="the services to become ready once the bucket exists")


def test_the_release_floor_survives_a_restart(local_cluster: LocalCluster) -> None:
    """node-a's ip-manager alone (recording backend), its lease holder played by the test:
    a valid notice alone makes it hold (no command); a release at epoch 2 drops the group
    and a notice of epoch 1 does not bring it back — not even after a restart of the
    ip-manager (the floor is persisted with the fencing tokens); epoch 2 does."""
    c = local_cluster
    subj = Subjects(c.cfg.cluster)
    group, address = "node-a-data", "198.51.100.101/32"

    async def _notice(epoch: int) -> None:
        await _send_notice(c, group, epoch)

    async def _release(epoch: int) -> Ack:
        nc = await c.connect()
        try:
            cmd = Command(cluster=c.cfg.cluster, node="witness", term=1, epoch=epoch,
                          group=group, action="release")
            return await bus.send_command(nc, subj.cmd("node-a", "ip-manager"), cmd, 3.0)
        finally:
            await nc.close()

    def verdict() -> str:
        return str(((c.status("node-a", "ip-manager") or {}).get("leases") or {})
                   .get(group, {}).get("verdict"))

    def ready() -> bool:
        return bool(c.http_get("node-a", "ip-manager", "/readyz").get("ready"))

    _create_bucket(c)
    c.start_service("node-a", "ip-manager")
    c.wait_for(ready, 20, what="the ip-manager to be ready")
    asyncio.run(_notice(1))
    c.wait_for(lambda: address in c.recorded_addresses("node-a"), 5,
               what="the address held on a notice alone")
    assert asyncio.run(_release(2)).ok
    assert address not in c.recorded_addresses("node-a")

    child = c.procs.find("node-a", "ip-manager")
    child.signal(signal.SIGKILL)
    child.proc.wait(5)
    c.start_service("node-a", "ip-manager")
    c.wait_for(ready, 20, what="the restarted ip-manager to be ready")
    asyncio.run(_notice(1))
    c.wait_for(lambda: verdict() == "released at a newer epoch", 5,
               what="the notice of epoch 1 to be refused by the persisted floor")
    assert address not in c.recorded_addresses("node-a")
    asyncio.run(_notice(2))
    c.wait_for(lambda: address in c.recorded_addresses("node-a"), 5,
               what="a notice of epoch 2 to make it hold")


def test_a_notice_of_another_bucket_is_ignored(local_cluster: LocalCluster) -> None:
    """node-a's ip-manager alone, its lease holder played by the test: a lease notice
    naming another KV bucket than the executor's (an old bucket's, from a lease holder
    that has not noticed the recreated one) makes it hold nothing; a notice naming its
    bucket, or none (an older lease holder), does. Seed 13533 of the simulator's
    recreate histories: such an old notice, applied after the executor adopted the new
    bucket, stood above every epoch of the new one and stranded the group."""
    c = local_cluster
    group, address = "node-a-data", "198.51.100.101/32"

    def ignored() -> int:
        import urllib.request

        url = f"http://127.0.0.1:{c.cfg.port('node-a', 'ip-manager')}/metrics"
        with urllib.request.urlopen(url, timeout=2.0) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("vtlha_lease_notices_other_bucket_total "):
                return int(float(line.split()[1]))
        return 0

    identity = _create_bucket(c)
    c.start_service("node-a", "ip-manager")
    c.wait_for(lambda: c.http_get("node-a", "ip-manager", "/readyz").get("ready"), 20,
               what="the ip-manager to be ready")
    asyncio.run(_send_notice(c, group, 5, "2000-01-01T00:00:00Z"))
    c.wait_for(lambda: ignored() >= 1, 5, what="the other bucket's notice to be ignored")
    assert address not in c.recorded_addresses("node-a")
    asyncio.run(_send_notice(c, group, 1, identity))
    c.wait_for(lambda: address in c.recorded_addresses("node-a"), 5,
               what="a notice of its own bucket at epoch 1 to make it hold")
