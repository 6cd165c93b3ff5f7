"""No split brain, in the lab with real processes and real servers (DESIGN.md "Safety").

An observer polls every 10 ms which node answers for each floating address (read from
each node's namespace) and records any instant where two do. Until the kernel fence
exists these tests keep every executor alive, so answering = configured on a link that
is up."""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vtlha_lab.lab import Lab, OverlapObserver
from vtlha_lab.probes import read_timeline

pytestmark = pytest.mark.root

PORT = 7000
A_GROUPS = ("node-a-data", "node-a-mgmt")
ALL = ("198.51.100.101", "198.51.100.102", "203.0.113.101", "203.0.113.102")


def _serving(lab: Lab) -> bool:
    want = {"node-a": ["198.51.100.101/32", "203.0.113.101/32"],
            "node-b": ["198.51.100.102/32", "203.0.113.102/32"]}
    return lab.home_held() and all(lab.floating_on(n) == a for n, a in want.items())


def _start(lab: Lab) -> None:
    lab.start()
    lab.wait_for(lambda: _serving(lab), 40, what="every node serving its home groups")


def _metric(lab: Lab, host: str, service: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    from vtlha_lab import netns

    port = getattr(lab.cfg.ports, service.replace("-", "_"))
    _, body = netns.http_get(lab.ns(host), "127.0.0.1", port, "/metrics")
    total = 0.0
    for fam in text_string_to_metric_families(body.decode()):
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                total += smp.value
    return total


def _probes(lab: Lab, duration: float) -> dict[str, Path]:
    for n in ("node-a", "node-b"):
        lab.spawn_in(n, "serve", [sys.executable, "-m", "vtlha_lab.probes", "serve",
                                  "--port", str(PORT), "--name", n])
    out = {}
    for ip in ALL:
        out[ip] = lab.work_dir / f"probe-{ip}.jsonl"
        lab.spawn_in("client", f"probe-{ip}", [
            sys.executable, "-m", "vtlha_lab.probes", "probe", "--target", f"{ip}:{PORT}",
            "--out", str(out[ip]), "--interval", "0.01", "--duration", str(duration),
            "--timeout", "0.1"])
    return out


def _longest_gap(path: Path, since: float, until: float) -> float:
    """Longest time without a successful answer between ``since`` and ``until``."""
    ok = [float(e["t"]) for e in read_timeline(str(path))  # type: ignore[arg-type]
          if e["ok"] and since <= float(e["t"]) <= until]  # type: ignore[arg-type]
    if not ok:
        return until - since
    points = [since, *ok, until]
    return max(b - a for a, b in itertools.pairwise(points))


def _observe_on(lab: Lab) -> None:
    """Keep the observer watching for two more leases: a late second holder shows up."""
    time.sleep(2 * lab.cfg.timings.lease_ttl)


def _report(obs: OverlapObserver) -> str:
    return (f"observer: {obs.samples} samples, longest poll gap {obs.max_gap * 1000:.1f} ms, "
            f"{len(obs.overlaps)} overlap(s)")


def _handover(obs: OverlapObserver, addr: str) -> float | None:
    """Time between the old holder's last answer and the new holder's first."""
    last_a = None
    for t, who in obs.holders.get(addr, []):
        if who == "node-a":
            last_a = None
        elif last_a is None and who == "":
            last_a = t  # node-a stopped answering here
        elif who == "node-b" and last_a is not None:
            return t - last_a
    return None


def test_isolated_node_releases_within_its_lease_and_only_then_b_serves(lab: Lab) -> None:
    _start(lab)
    with OverlapObserver(lab, interval=0.005) as obs:
        t_cut = time.monotonic()
        lab.set_links("node-a", up=False)
        lab.wait_for(lambda: all(lab.held_by().get(g) == "node-b" for g in A_GROUPS), 20,
                     what="node-b to hold node-a's groups")
        lab.wait_for(lambda: lab.floating_on("node-a") == [], 5,
                     what="node-a to drop its addresses on its own")
        lab.wait_for(lambda: "198.51.100.101/32" in lab.floating_on("node-b"), 5,
                     what="node-b to configure node-a's data address")
        b_has = time.monotonic()
        _observe_on(lab)
    gap = _handover(obs, "198.51.100.101/32")
    print(f"\n{_report(obs)}; node-b serving node-a's groups {b_has - t_cut:.3f} s after the "
          f"cut; nobody answered for node-a's data address for "
          f"{gap * 1000 if gap is not None else float('nan'):.0f} ms between the two")
    # The observer's resolution: an overlap shorter than its longest poll gap could slip
    # between two polls. 20-35 ms on a quiet machine; 60-80 ms seen in CI now that each
    # node also runs its tape data service and executor pings. In the whole suite in a
    # clean clone this test's observer stalled 127 and 199 ms (alone: 23-45 ms; cause not
    # found yet): bounded by lease_ttl, the longest an overlap by a lapsed lease lasts.
    assert obs.samples > 20 and obs.max_gap < lab.cfg.timings.lease_ttl
    assert obs.overlaps == [], obs.overlaps[:5]


def test_node_cut_from_the_witness_only_is_refused_a_promise_and_releases(lab: Lab) -> None:
    """node-a still reaches node-b but not the witness. Usually: node-a's renewals fail,
    node-b (which reaches the KV) refuses it a promise, node-a releases and node-b takes
    over. In this topology JetStream leadership flaps between the two sides (node-a's
    server campaigns with a higher term; seen: "another leader with higher term"), so the
    KV is leaderless now and then for as long as the cut lasts. This test asserts safety —
    never two nodes answering — over a fixed observation window; liveness (node-b keeps
    its own groups, operator requests answered within the bound after the heal) is
    ``test_witness_lab.py``'s, and ``docs/safety.md`` explains the mechanism."""
    _start(lab)
    t_cut = time.monotonic()
    with OverlapObserver(lab, interval=0.005) as obs:
        lab.cut_path("node-a", "witness")
        try:
            lab.wait_for(lambda: all(lab.held_by().get(g) == "node-b" for g in A_GROUPS)
                         and lab.floating_on("node-a") == [], 20,
                         what="node-b to hold node-a's groups and node-a to release")
            took: float | None = time.monotonic() - t_cut
        except TimeoutError:
            took = None
        _observe_on(lab)
        refused = _metric(lab, "node-a", "heartbeat", "vtlha_promises_total",
                          direction="asked", result="refused")
    print(f"\n{_report(obs)}; promises refused to node-a: {refused:.0f}; takeover "
          + (f"complete {took:.2f} s after the cut" if took is not None else
             "NOT complete within 20 s (raft leadership flapped between the two sides)"))
    assert obs.samples > 20
    assert obs.overlaps == [], obs.overlaps[:5]


@pytest.mark.long
def test_witness_death_both_nodes_keep_serving_on_mutual_promises(secured_lab: Lab) -> None:
    """The witness (KV leader and active arbiter) dies: both nodes keep serving through
    the raft election on promises from each other; nothing fails over; renewals resume;
    a standby arbiter becomes active; when the witness is back the KV leader returns.
    On rendered credentials and TLS: the permissions allow the promise path."""
    lab = secured_lab
    _start(lab)
    lab.wait_for(lambda: lab.kv_leader() == "witness", 20,
                 what="the KV leader on the witness (the scenario kills the KV leader)")
    lab.wait_for(lambda: _active_arbiter(lab) == "witness", 20,
                 what="the witness's arbiter active")
    probes = _probes(lab, 60)
    lab.wait_for(lambda: all(read_timeline(str(p)) for p in probes.values()), 10,
                 what="client probes running")
    with OverlapObserver(lab, interval=0.005) as obs:
        t0 = time.monotonic()
        lab.crash("witness", cut_links=False)
        # Renewals fail until a new KV leader is elected among the nodes' servers.
        lab.wait_for(lambda: _metric(lab, "node-a", "heartbeat", "vtlha_promises_total",
                                     direction="asked", result="granted") > 0, 15,
                     what="node-a to be granted a promise by node-b")
        ok_then = {n: _renewals_ok(lab, n) for n in ("node-a", "node-b")}
        lab.wait_for(lambda: all(_renewals_ok(lab, n) > ok_then[n] + 5 for n in ok_then), 30,
                     what="renewals to succeed again after the election")
        t_resumed = time.monotonic()
        lab.wait_for(lambda: _active_arbiter(lab) in ("node-a", "node-b"), 30,
                     what="a standby arbiter to become active")
        time.sleep(0.5)  # a few renewal rounds on the new leader before looking at gaps
        t1 = time.monotonic()
    gaps = {ip: _longest_gap(p, t0, t1) for ip, p in probes.items()}
    granted = {n: _metric(lab, n, "heartbeat", "vtlha_promises_total", direction="asked",
                          result="granted") for n in ("node-a", "node-b")}
    print(f"\n{_report(obs)}; renewals resumed after {t_resumed - t0:.2f} s; promises "
          f"granted {granted}; longest client gap per address (ms): "
          f"{ {ip: round(g * 1000) for ip, g in gaps.items()} }")
    assert obs.overlaps == []
    assert all(lab.floating_on(n) for n in ("node-a", "node-b"))
    assert all(g < 1.0 for g in gaps.values()), gaps  # no address stopped being served
    # The witness comes back; the active arbiter moves the KV leader back to it (what
    # is waited for: the KV's, not every stream's catch-up — the event stream's stalled
    # for over a minute once under load, a nats-server matter this test is not about).
    lab.restart_nats("witness", streams=False)
    lab.start_service("witness", "arbiter")
    lab.wait_for(lambda: lab.kv_leader() == "witness", 30, what="the KV leader back on the "
                 "witness")
    owners = lab.held_by()
    assert owners == {"node-a-data": "node-a", "node-a-mgmt": "node-a",
                      "node-b-data": "node-b", "node-b-mgmt": "node-b"}
    assert not [e for e in lab.events() if e.kind.startswith("failover.")], \
        "nothing may fail over"


@pytest.mark.long
def test_restarting_each_nats_server_in_turn_fails_nothing_over(lab: Lab) -> None:
    _start(lab)
    probes = _probes(lab, 90)
    lab.wait_for(lambda: all(read_timeline(str(p)) for p in probes.values()), 10,
                 what="client probes running")
    gaps: dict[str, dict[str, float]] = {}
    with OverlapObserver(lab, interval=0.005) as obs:
        for host in ("node-a", "node-b", "witness"):
            t0 = time.monotonic()
            lab.servers[host].kill()
            time.sleep(1.0)  # the server stays down for a second: the fault under test
            lab.restart_nats(host)
            lab.wait_for(lambda: _renewing(lab, "node-a") and _renewing(lab, "node-b"), 30,
                         what=f"renewals after restarting {host}'s server",
                         diagnose=lambda: _lease_diagnosis(lab))
            t1 = time.monotonic()
            gaps[host] = {ip: round(_longest_gap(p, t0, t1) * 1000) for ip, p in
                          probes.items()}
    print(f"\n{_report(obs)}; longest client gap (ms) per restarted server: {gaps}")
    assert obs.overlaps == []
    assert lab.held_by() == {"node-a-data": "node-a", "node-a-mgmt": "node-a",
                             "node-b-data": "node-b", "node-b-mgmt": "node-b"}
    assert not [e for e in lab.events() if e.kind.startswith("failover.")]
    assert all(g < 1000 for per in gaps.values() for g in per.values()), gaps


# ---- helpers reading the nodes over their namespaces (the uplink may be down) ------


def _status(lab: Lab, host: str, service: str) -> dict[str, Any]:
    try:
        st: dict[str, Any] = lab.http_get(host, service, "/status")
        return st
    except (OSError, ValueError):
        return {}


def _renewing(lab: Lab, node: str) -> bool:
    """Every group the node's lease holder holds is valid for most of a lease."""
    lease = _status(lab, node, "heartbeat").get("lease", {})
    groups = lease.get("groups", {})
    ttl = lab.cfg.timings.lease_ttl
    return bool(groups) and all(g["phase"] == "holding" and g["valid_for_s"] > ttl / 2
                                for g in groups.values())


def _lease_diagnosis(lab: Lab) -> str:
    """What each node's lease holder says, its renewals by result and its last warnings,
    and where the KV's leader is: enough for a CI log to explain a lease that would not
    come back."""
    out = [f"KV leader: {lab.kv_leader()}"]
    for node in ("node-a", "node-b"):
        lease = _status(lab, node, "heartbeat").get("lease", {})
        results = {r: _metric(lab, node, "heartbeat", "vtlha_lease_renewals_total", result=r)
                   for r in ("ok", "conflict", "unavailable", "error")}
        log = lab.work_dir / "logs" / f"{node}-heartbeat.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        warned = [ln for ln in lines if '"level":"warning"' in ln or '"level":"error"' in ln
                  or "renewal failed" in ln or "promise" in ln][-12:]
        out += [f"{node} lease: {lease}", f"{node} renewals: {results}",
                *(f"{node} log: {ln[:300]}" for ln in warned)]
    return "\n".join(out)


def _renewals_ok(lab: Lab, node: str) -> float:
    return _metric(lab, node, "heartbeat", "vtlha_lease_renewals_total", result="ok")


def _active_arbiter(lab: Lab) -> str | None:
    for host in lab.cfg.hosts:
        if _status(lab, host, "arbiter").get("role") == "active":
            return host
    return None
