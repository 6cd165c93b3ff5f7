"""The network lab with every host in containers (root, podman; ``make test-containers``
builds the image first; ``vtlha_lab.containerlab``): node-a, node-b and the witness run
the image's containers from the rendered compose files, each joined to its host's
namespace, with the rendered credentials and TLS. The ip-manager moves the floating
addresses with its netlink backend and applies the nftables fence from inside its
container. Killing every container of node-a (its links up, the appliance's data
service on it still running): node-b answers node-a's address to the client (TCP and
ARP from the client namespace), node-a's fence stops it answering within its lease,
never both at once; the client's outage is measured. Nothing is left behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vtlha_lab.containerlab import ContainerLab
from vtlha_lab.containers import compose_command, default_image, not_ready
from vtlha_lab.lab import OverlapObserver, leftovers
from vtlha_lab.probes import answered_by, arp_responders, outage, read_timeline

pytestmark = [pytest.mark.root, pytest.mark.containers, pytest.mark.timeout(600)]

PORT = 7000
A_DATA = "198.51.100.101"
A_MGMT = "203.0.113.101"
CLIENT_IP = "198.51.100.200"
A_GROUPS = ("node-a-data", "node-a-mgmt")


def _serving(lab: ContainerLab) -> Path:
    """Every group at home, node-a holding (configured and fenced in) its addresses,
    a TCP service on each node (the appliance's: not a container, it outlives the HA
    stack), and the client probing node-a's data address every 5 ms."""
    try:
        lab.wait_for(lambda: lab.home_held() and lab.floating_on("node-a") == [
            f"{A_DATA}/32", f"{A_MGMT}/32"] and lab.fenced("node-a") == [A_DATA, A_MGMT],
            60, what="node-a serving (configured and fenced in) its addresses")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: held {lab.held_by()}, node-a configured "
                           f"{lab.floating_on('node-a')}, fenced {lab.fenced('node-a')}") from None
    return lab.probe_service(A_DATA, PORT, duration=120)


def test_node_a_containers_killed_node_b_answers_and_node_a_is_fenced(
        tmp_path: Path) -> None:
    missing = not_ready()
    if missing:
        pytest.fail(missing)
    lab = ContainerLab(tmp_path, default_image(), compose_command() or "")
    f: dict[str, object] = {"cluster": lab.cfg.cluster}
    try:
        t0 = time.monotonic()
        lab.start()
        f["up_s"] = round(time.monotonic() - t0, 2)
        lab.wait_healthy(180)
        f["start_to_healthy_s"] = round(time.monotonic() - t0, 2)
        # Nothing of the lab's own runs in the hosts' namespaces yet: what configures
        # the addresses and the fence below is the containers.
        assert lab.procs.children == []
        timeline = _serving(lab)
        f["start_to_serving_s"] = round(time.monotonic() - t0, 2)
        ipm = lab.status("node-a", "ip-manager")
        assert ipm is not None and ipm["backend_kind"] == "netlink"
        assert ipm["fence"] == [A_DATA, A_MGMT]
        assert lab.neighbour("client", A_DATA) == lab.mac("node-a")

        ttl = lab.cfg.timings.lease_ttl
        with OverlapObserver(lab) as obs:
            t_kill = time.monotonic()
            f["killed"] = lab.crash("node-a")  # every container; links stay up
            t_crashed, t_kill = time.monotonic(), lab.crashed_at["node-a"]
            lab.wait_for(lambda: all(lab.held_by().get(g) == "node-b" for g in A_GROUPS),
                         30, what="node-b to hold node-a's groups")
            lab.wait_for(lambda: answered_by(timeline, "node-b", t_kill), 15,
                         what="the client reaching node-a's address on node-b")
            lab.wait_for(lambda: set(lab.fenced("node-b")) >= {A_DATA, A_MGMT}, 10,
                         what="node-b's fence holding node-a's addresses")
            # exactly one MAC answers ARP for node-a's address now: node-b's
            assert arp_responders(lab.ns("client"), CLIENT_IP, A_DATA) == {lab.mac("node-b")}
            assert lab.neighbour("client", A_DATA) == lab.mac("node-b")  # gratuitous ARP
            time.sleep(2 * ttl)  # keep observing two more leases
        assert obs.overlaps == [], obs.overlaps[:3]
        a_stop = obs.stopped_answering_at(f"{A_DATA}/32", "node-a", t_kill)
        b_starts = [t for t, who in obs.holders.get(f"{A_DATA}/32", []) if who == "node-b"]
        gap = outage(read_timeline(str(timeline)), "node-a", "node-b", t_kill)
        assert a_stop is not None and b_starts and gap is not None
        f.update({"stop_to_podman_kill_done_s": round(t_crashed - t_kill, 2),
                  "a_stopped_answering_ms": round((a_stop - t_kill) * 1000),
                  "b_serves_ms": round((b_starts[0] - t_kill) * 1000),
                  "client_outage_ms": round(gap[2] * 1000),
                  "client_first_answer_from_b_ms": round((gap[1] - t_kill) * 1000),
                  "observer_samples": obs.samples,
                  "observer_max_gap_ms": round(obs.max_gap * 1000, 1)})
        print("\n" + json.dumps(f, indent=1))
        # node-a's fence stopped it answering within a lease of its stack's death (the
        # kernel lifetime of the address is a second or two longer)
        assert a_stop - t_kill <= ttl + obs.max_gap + 0.05
        t = lab.cfg.timings
        assert b_starts[0] - t_kill <= t.dead_after + t.lease_ttl + t.margin + 1.0
        states = {c.name: lab.ctr.inspect(c.name)["State"]["Status"]
                  for c in lab.ctr.containers("node-a")}
        assert set(states.values()) == {"exited"}, states  # podman kill: no restart
        kinds = {(e.kind, e.group) for e in lab.events()}
        assert ("failover.completed", "node-a-data") in kinds
    finally:
        lab.stop()
    assert lab.left_behind() == []
    assert leftovers(only_created_here=True) == []
