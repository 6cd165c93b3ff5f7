"""Bad input never crashes a service and never causes an action."""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

import orjson

from tests.integration.natsutil import events, kv_groups, metric, publish_raw, request
from vtlha.messages import Ack, Command, Heartbeat, decode, encode
from vtlha.subjects import Subjects
from vtlha_lab.localcluster import LocalCluster


def _good_hb(cluster: str, node: str, seq: int) -> dict[str, object]:
    return Heartbeat(cluster=cluster, node=node, incarnation="forged", seq=seq,
                     interval=0.1).model_dump(mode="json")


def _bad_heartbeats(cluster: str) -> list[tuple[str, bytes]]:
    s = Subjects(cluster)
    good = _good_hb(cluster, "node-a", 10_000)
    return [
        (s.hb("node-a"), b"not json at all"),
        (s.hb("node-a"), b"[1, 2, 3]"),
        (s.hb("node-a"), orjson.dumps({**good, "seq": "x"})),
        (s.hb("node-a"), orjson.dumps({**good, "interval": -1})),
        (s.hb("node-a"), orjson.dumps({k: v for k, v in good.items() if k != "incarnation"})),
        (s.hb("node-a"), orjson.dumps({**good, "checks": [{"name": "x", "ok": "yes"}]})),
        (s.hb("node-z"), orjson.dumps(_good_hb(cluster, "node-z", 1))),  # unknown node
        (s.hb("node-a"), orjson.dumps({**good, "cluster": "other"})),  # wrong cluster
        (s.hb("node-b"), orjson.dumps(good)),  # node-a's heartbeat on node-b's subject
        (s.hb("node-a"), b'{"pad": "' + b"x" * 200_000 + b'"}'),  # huge
    ]


def _metrics(c: LocalCluster, host: str, service: str) -> str:
    port = c.cfg.port(host, service)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return r.read().decode()


def _healthy(c: LocalCluster, host: str, service: str) -> bool:
    port = c.cfg.port(host, service)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
        return r.status == 200


def test_malformed_heartbeats_are_counted_and_change_nothing(local_cluster: LocalCluster) -> None:
    c = local_cluster
    url = c.external_nats[0]  # type: ignore[index]
    c.start()
    c.wait_for(c.home_held, 30, what="initial ownership")
    # The start-up events trail the KV's "held" by a few ms: baseline once they are in.
    c.wait_for(lambda: all(sum(e.kind == k for _, e in events(url, c.cfg.cluster)) == 4
                           for k in ("group.assigned", "lease.acquired")), 5,
               what="the start-up events")

    def ownership() -> dict[str, tuple[str, int, str]]:  # revisions move with renewals
        return {g: (r.owner, r.epoch, r.state) for g, (r, _) in
                kv_groups(url, c.cfg.cluster).items()}

    before = ownership()
    n_events = len(events(url, c.cfg.cluster))

    bad = _bad_heartbeats(c.cfg.cluster)
    for subject, payload in bad:
        publish_raw(url, subject, [payload])

    c.wait_for(lambda: metric(_metrics(c, "witness", "arbiter"), "vtlha_invalid_messages_total",
                              kind="heartbeat") == len(bad), 5,
               what=f"{len(bad)} invalid heartbeats counted")
    assert c.procs.find("witness", "arbiter").alive
    assert _healthy(c, "witness", "arbiter")
    assert ownership() == before
    # reported, not acted on: one input.rejected event (and one log line) per source
    # (subject) and service, saying how many were dropped
    subjects = {s for s, _ in bad}

    def witness_reports() -> set[str]:
        return {e.data.get("subject") for _, e in events(url, c.cfg.cluster)[n_events:]
                if e.node == "witness" and e.kind == "input.rejected"}
    c.wait_for(lambda: witness_reports() == subjects, 5,
               what="the witness's arbiter to report a rejection per subject")
    new = [e for _, e in events(url, c.cfg.cluster)[n_events:]]
    assert {e.kind for e in new} == {"input.rejected"}
    mine = [e for e in new if e.node == "witness"]
    assert {e.data["subject"] for e in mine} == subjects
    assert sum(e.data["dropped"] for e in mine) <= len(bad)  # later ones held back
    log = c.procs.find("witness", "arbiter").log_path.read_text().splitlines()
    dropped = [orjson.loads(line) for line in log if '"invalid message dropped"' in line]
    assert {d["subject"] for d in dropped} == subjects
    assert any("node 'node-z' is not a host" in d["error"] for d in dropped)


def test_garbage_claiming_to_be_a_dead_node_does_not_keep_it_alive(
        local_cluster: LocalCluster) -> None:
    """Only node-a's heartbeat service dies; a stream of invalid heartbeats 'from node-a'
    must not count as liveness. node-a's ip-manager is alive, so it acknowledges the
    release and its recorded addresses are gone."""
    c = local_cluster
    url = c.external_nats[0]  # type: ignore[index]
    c.start()
    c.wait_for(c.home_held, 30, what="initial ownership")
    stop = threading.Event()
    bad = [p for s, p in _bad_heartbeats(c.cfg.cluster) if s.endswith(".node-a")]

    def flood() -> None:
        while not stop.is_set():
            publish_raw(url, Subjects(c.cfg.cluster).hb("node-a"), bad)
            time.sleep(0.02)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        c.procs.find("node-a", "heartbeat").signal(9)
        c.wait_for(lambda: all(kv_groups(url, c.cfg.cluster)[g][0].owner == "node-b"
                               and kv_groups(url, c.cfg.cluster)[g][0].state == "held"
                               for g in ("node-a-data", "node-a-mgmt")), 10, what="failover")
        c.wait_for(lambda: {e.group for _, e in events(url, c.cfg.cluster)
                            if e.kind == "failover.completed"} == {"node-a-data", "node-a-mgmt"},
                   15, what="both takeovers to complete (node-a-data's storage served)")
    finally:
        stop.set()
        t.join(5)
    completed = {e.group: e for _, e in events(url, c.cfg.cluster)
                 if e.kind == "failover.completed"}
    # node-a's executors, alive, acknowledge the release; with heartbeats stopped for
    # dead_after >= lease_ttl the arbiter may also find node-a's lease already run out
    # (level-triggered executors need neither): either ends the move.
    reason = completed["node-a-mgmt"].reason
    assert "release acknowledged" in reason or "lease ran out" in reason, reason
    assert c.recorded_addresses("node-a") == []
    assert c.status("node-a", "ip-manager")["held"] == {}  # type: ignore[index]


def test_executor_refuses_stale_and_malformed_commands(local_cluster: LocalCluster) -> None:
    c = local_cluster
    url = c.external_nats[0]  # type: ignore[index]
    c.start()
    c.wait_for(c.home_held, 30, what="initial ownership")
    s = Subjects(c.cfg.cluster)
    def recorded() -> dict[str, Any] | None:  # the acquire command's epoch is recorded
        st = c.status("node-a", "ip-manager")
        return st if st and "node-a-data" in st.get("epochs", {}) else None

    st = c.wait_for(recorded, 10, what="node-a's ip-manager to record node-a-data's epoch")
    term, epoch = st["term"], st["epochs"]["node-a-data"]
    assert term >= 1 and epoch == 1

    def send(**kw: object) -> Ack:
        fields: dict[str, object] = {"cluster": c.cfg.cluster, "node": "witness", "term": term,
                                     "epoch": epoch, "group": "node-a-data",
                                     "action": "release"}
        fields.update(kw)
        return decode(Ack, request(url, s.cmd("node-a", "ip-manager"),
                                   encode(Command.model_validate(fields))))

    stale_term = send(term=term - 1)
    assert not stale_term.ok and "stale term" in stale_term.reason
    stale_epoch = send(epoch=epoch - 1)
    assert not stale_epoch.ok and "stale epoch" in stale_epoch.reason
    other_pair = send(group="node-q-data")
    assert not other_pair.ok and "not of this node's pair" in other_pair.reason
    garbage = decode(Ack, request(url, s.cmd("node-a", "ip-manager"), b"{]"))
    assert not garbage.ok and "not JSON" in garbage.reason
    stranger = send(node="operator")  # commands come from arbiters, on hosts
    assert not stranger.ok and "not a host of the cluster" in stranger.reason
    # Nothing was released: the address is still held, and the refusals are events.
    c.wait_for(lambda: c.recorded_addresses("node-a") == ["198.51.100.101/32",
                                                          "203.0.113.101/32"], 5,
               what="node-a serving its addresses")
    c.wait_for(lambda: len([e for _, e in events(url, c.cfg.cluster)
                            if e.kind == "command.refused"]) == 2, 5,
               what="two command.refused events")
    assert metric(_metrics(c, "node-a", "ip-manager"), "vtlha_commands_total",
                  action="release", result="refused") == 2.0
