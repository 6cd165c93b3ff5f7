"""The manual's failover policy end to end on loopback, with real services and the real
``vtlha`` command line against a real nats-server (issue 7): a fatal process error
(rule 1) and a non-fatal one, failback by an operator and automatic failback with its
hold time, hold-down after repeated failures and clear-hold (rule 4), switchover to a
healthy and to a dead companion (rule 5), maintenance (rule 6), and ``vtlha explain``
replaying real events. Rule 2 (heartbeats stop) is test_failover.py; rule 3 (the
management path) needs the network lab: test_policy_lab.py."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLE, cluster_name
from tests.integration.natsutil import events, kv_groups
from vtlha.messages import Event
from vtlha_lab.localcluster import LocalCluster, prepare_config
from vtlha_lab.natsserver import NatsServer

VTLHA = str(Path(sys.executable).parent / "vtlha")
A_GROUPS = ("node-a-data", "node-a-mgmt")
Edit = Callable[[dict[str, Any]], None]


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest, nats_server: NatsServer,
                 tmp_path: Path) -> Iterator[Callable[[Edit | None], LocalCluster]]:
    """A local cluster on the module's nats-server, the example config changed by
    ``edit``; stopped afterwards."""
    made: list[LocalCluster] = []

    def make(edit: Edit | None = None) -> LocalCluster:
        cfg = prepare_config(EXAMPLE, tmp_path, cluster=cluster_name(request),
                             single_server=True)
        if edit is not None:
            raw = yaml.safe_load(cfg.read_text())
            edit(raw)
            cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
        c = LocalCluster(cfg, tmp_path, nats_urls=[nats_server.spec.url])
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.stop()


def vtlha(c: LocalCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The operator's command line, as a separate process."""
    return subprocess.run([VTLHA, *args, "--config", str(c.config_path),
                           "--nats", ",".join(c.client_urls())],
                          capture_output=True, text=True, timeout=timeout)


def evs(c: LocalCluster) -> list[tuple[int, Event]]:
    return events(c.client_urls()[0], c.cfg.cluster)


def of_kind(c: LocalCluster, kind: str, **match: Any) -> list[tuple[int, Event]]:
    return [(s, e) for s, e in evs(c) if e.kind == kind
            and all(getattr(e, k, None) == v or e.data.get(k) == v for k, v in match.items())]


def owners(c: LocalCluster) -> dict[str, tuple[str, int, str]]:
    return {g: (r.owner, r.epoch, r.state)
            for g, (r, _) in kv_groups(c.client_urls()[0], c.cfg.cluster).items()}


def held_by(c: LocalCluster, node: str, groups: tuple[str, ...] = A_GROUPS) -> bool:
    o = owners(c)
    return all(g in o and o[g][0] == node and o[g][2] == "held" for g in groups)


def arbiter_node(c: LocalCluster, node: str) -> dict[str, Any]:
    st = c.status("witness", "arbiter") or {}
    return dict(st.get("nodes", {}).get(node, {}))


def fit_for_failback(c: LocalCluster, node: str) -> bool:
    """The active arbiter sees the node alive, no fatal check failing, its storage
    reaching every device (what a failback to it needs)."""
    n = arbiter_node(c, node)
    return bool(n.get("alive")) and not n.get("fatal_failing") \
        and n.get("storage_ok_for_s") is not None and n.get("healthy_for_s") is not None


def quiet(c: LocalCluster, seconds: float, changed: Callable[[], bool], what: str) -> None:
    """Assert that nothing of the kind happens for ``seconds`` (polled)."""
    try:
        c.wait_for(changed, seconds, interval=0.1, what=what)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected: {what}")


def start(c: LocalCluster) -> None:
    c.start()
    c.wait_for(c.home_held, 30, what="every group held by its home node")
    c.wait_for(lambda: len(of_kind(c, "group.assigned")) == 4, 20,
               what="the four initial assignments (storage served)")


def explain(c: LocalCluster, seq: int) -> subprocess.CompletedProcess[str]:
    return vtlha(c, "explain", str(seq))


# ---- rule 1: process checks ----------------------------------------------------------


def test_fatal_check_moves_both_groups_nonfatal_only_alarms(
        make_cluster: Callable[[Edit | None], LocalCluster], tmp_path: Path) -> None:
    daemon_pid, ui_pid = tmp_path / "vtl.pid", tmp_path / "ui.pid"
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        daemon_pid.write_text(f"{sleeper.pid}\n")
        ui_pid.write_text(f"{sleeper.pid}\n")

        def edit(raw: dict[str, Any]) -> None:
            raw["pairs"][0]["nodes"][0]["checks"] = [
                {"name": "vtl-daemon", "kind": "pidfile", "path": str(daemon_pid),
                 "fatal": True},
                {"name": "vtl-ui", "kind": "pidfile", "path": str(ui_pid), "fatal": False}]

        c = make_cluster(edit)
        start(c)
        before = owners(c)

        # A non-fatal check fails: an alarm, and nothing moves.
        ui_pid.unlink()
        alarm = c.wait_for(lambda: of_kind(c, "check.alarm", check="vtl-ui"), 5,
                           what="check.alarm for vtl-ui")
        seq, ev = alarm[0]
        assert ev.data == {"rule": "check_failed", "node": "node-a", "check": "vtl-ui",
                           "fatal": False}
        assert ev.reason == "check vtl-ui fails on node-a (not fatal: an alarm only, no failover)"
        quiet(c, 1.0, lambda: owners(c) != before, "a group moved for a non-fatal check")
        assert not [e for _, e in evs(c) if e.kind.startswith("failover.")]
        assert explain(c, seq).stdout.splitlines()[0] == ev.reason
        ui_pid.write_text(f"{sleeper.pid}\n")
        c.wait_for(lambda: of_kind(c, "check.recovered", check="vtl-ui"), 5,
                   what="check.recovered for vtl-ui")

        # The fatal check fails: node-b takes over both of node-a's groups at once.
        t0 = time.time()
        daemon_pid.unlink()
        c.wait_for(lambda: len(of_kind(c, "failover.completed", new="node-b")) == 2, 20,
                   what="both takeovers completed")
        assert held_by(c, "node-b")
        after = owners(c)
        for g in A_GROUPS:
            assert after[g][1] == before[g][1] + 1
        for g in ("node-b-data", "node-b-mgmt"):
            assert after[g] == before[g]

        got = evs(c)
        for g in A_GROUPS:
            started = [(s, e) for s, e in got if e.kind == "failover.started" and e.group == g]
            notify = [(s, e) for s, e in got if e.kind == "failover.notify" and e.group == g]
            done = [(s, e) for s, e in got if e.kind == "failover.completed" and e.group == g]
            assert len(started) == len(notify) == len(done) == 1, (g, started, notify, done)
            (s_seq, s_ev), (n_seq, n_ev), (d_seq, d_ev) = started[0], notify[0], done[0]
            assert s_seq < n_seq < d_seq
            assert s_ev.data["rule"] == "fatal_process_error"
            assert s_ev.reason == (f"node-b takes over {g}: fatal check vtl-daemon failing on "
                                   f"node-a (a fatal process error)")
            assert (n_ev.old, n_ev.new) == ("node-a", "node-b")
            assert "assuming primary responsibility" in n_ev.reason
            assert d_ev.data["started"] == s_ev.id
            # vtlha explain replays the real event and prints the same sentence.
            out = explain(c, s_seq)
            assert out.returncode == 0, out.stderr
            assert out.stdout.splitlines()[0] == s_ev.reason
            assert "the replay matches the recorded reason" in out.stdout
            print(f"\n{g}: fatal check removed -> {g} failover.completed "
                  f"{(d_ev.sent_at - t0) * 1000:.0f} ms (takeover itself "
                  f"{d_ev.data['duration_s'] * 1000:.0f} ms; {d_ev.reason})")
        fatal_alarm = [e for _, e in got if e.kind == "check.alarm"
                       and e.data.get("check") == "vtl-daemon"]
        assert len(fatal_alarm) == 1 and fatal_alarm[0].data["fatal"] is True
        # node-a failed once (both groups are one failure): recorded in the pair's record.
        st = c.status("witness", "arbiter") or {}
        assert st["pairs"]["pair-1"]["recent_failures"] == {"node-a": 1, "node-b": 0}

        # The check passes again: alarm cleared; failback is manual: nothing moves back.
        daemon_pid.write_text(f"{sleeper.pid}\n")
        c.wait_for(lambda: of_kind(c, "check.recovered", check="vtl-daemon"), 5,
                   what="check.recovered for vtl-daemon")
        quiet(c, 1.0, lambda: not held_by(c, "node-b"), "an automatic failback")
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- rule 4: failback ------------------------------------------------------------------


def test_manual_failback_by_the_operator(
        make_cluster: Callable[[Edit | None], LocalCluster]) -> None:
    c = make_cluster(None)
    start(c)
    c.procs.kill_host("node-a")
    c.wait_for(lambda: held_by(c, "node-b"), 15, what="node-b to hold node-a's groups")

    # Too early: node-a is down, the operator is told why.
    out = vtlha(c, "failback", "pair-1")
    assert out.returncode == 1
    assert out.stderr.startswith("failback pair-1 refused: node-a-data: node-a is not alive")

    c.start_node("node-a")
    c.wait_for(lambda: of_kind(c, "node.up", new="node-a"), 15, what="node.up")
    c.wait_for(lambda: fit_for_failback(c, "node-a"), 15, what="node-a fit for failback")
    quiet(c, 0.5, lambda: not held_by(c, "node-b"), "an automatic failback (manual pair)")

    t0 = time.monotonic()
    out = vtlha(c, "failback", "pair-1")
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("node-a takes back node-a-data from node-b: failback requested by an "
                        "operator; node-a takes back node-a-mgmt from node-b: failback "
                        "requested by an operator")
    assert sum(" failback.completed: node-a now serves " in ln for ln in lines) == 2
    assert held_by(c, "node-a")
    assert {g: o[1] for g, o in owners(c).items() if g in A_GROUPS} == {g: 3 for g in A_GROUPS}
    started = of_kind(c, "failback.started")
    assert {e.group for _, e in started} == set(A_GROUPS)
    for seq, e in started:
        assert e.data["rule"] == "operator_failback" and "@" in e.data["operator"]
        assert e.inputs["request"] == {"verb": "failback", "pair": "pair-1"}
        x = explain(c, seq)
        assert x.returncode == 0 and x.stdout.splitlines()[0] == e.reason
    assert {e.group for _, e in of_kind(c, "failover.notify", old="node-b")} == set(A_GROUPS)
    print(f"\nvtlha failback pair-1 (two groups, until both completed): {took * 1000:.0f} ms")


@pytest.mark.long
def test_automatic_failback_hold_down_and_clear_hold(
        make_cluster: Callable[[Edit | None], LocalCluster]) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["pairs"][0].update(failback="auto", failback_hold_time=1.0, flap_max=2,
                               flap_window=3600.0)

    c = make_cluster(edit)
    start(c)

    # First failure: node-b takes over; node-a comes back and gets its groups back by
    # itself once it has been healthy for failback_hold_time.
    c.procs.kill_host("node-a")
    c.wait_for(lambda: held_by(c, "node-b"), 15, what="node-b to hold node-a's groups")
    c.start_node("node-a")
    up = c.wait_for(lambda: of_kind(c, "node.up", new="node-a"), 15, what="node.up")[0][1]
    done = c.wait_for(lambda: of_kind(c, "failback.completed", new="node-a")
                      if len(of_kind(c, "failback.completed", new="node-a")) == 2 else None,
                      30, what="automatic failback of both groups")
    assert held_by(c, "node-a")
    started = of_kind(c, "failback.started")
    assert {e.data["rule"] for _, e in started} == {"failback"}
    for seq, e in started:
        assert "(failback is auto): node-a has been healthy for" in e.reason
        x = explain(c, seq)
        assert x.returncode == 0 and x.stdout.splitlines()[0] == e.reason
    # Not before the hold time: node-a had been healthy for at least 1 s, as the policy
    # saw it (its inputs), and about that long after node.up (one clock: the arbiter's).
    for _, e in started:
        seen = e.inputs["snapshot"]["nodes"]["node-a"]
        assert e.inputs["now"] - seen["healthy_since"] >= 1.0
    first_back = min(e.sent_at for _, e in started)
    assert first_back - up.sent_at >= 0.9
    print(f"\nnode.up -> automatic failback started {first_back - up.sent_at:.2f} s, "
          f"-> completed {max(e.sent_at for _, e in done) - up.sent_at:.2f} s "
          f"(failback_hold_time 1 s)")

    # Second failure within flap_window: node-a is held down.
    c.procs.kill_host("node-a")
    held = c.wait_for(lambda: of_kind(c, "node.held_down", node="node-a"), 15,
                      what="node.held_down")
    assert held[0][1].data["failures"] == 2
    c.wait_for(lambda: held_by(c, "node-b"), 15, what="node-b to hold node-a's groups again")
    status = vtlha(c, "status")
    assert "pair pair-1: failback auto, maintenance off, held down: node-a" in status.stdout

    # Back and healthy, but held down: nothing goes back automatically ...
    c.start_node("node-a")
    c.wait_for(lambda: fit_for_failback(c, "node-a"), 15, what="node-a alive and healthy")
    quiet(c, 2.5, lambda: not held_by(c, "node-b"), "a failback to a held-down node")
    # ... and a switchover to it is refused with the reason.
    out = vtlha(c, "switchover", "node-a-mgmt")
    assert out.returncode == 1
    assert out.stderr.strip() == ("switchover node-a-mgmt refused: node-a is held down after "
                                  "repeated failures (clear the hold first: clear-hold "
                                  "pair-1 node-a)")

    # The operator clears the hold: failback proceeds (automatic: its hold time is over).
    out = vtlha(c, "clear-hold", "pair-1", "node-a")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("node-a is no longer held down: it may be given groups "
                                  "automatically again (its failures are forgotten)")
    c.wait_for(lambda: held_by(c, "node-a"), 15, what="failback after clear-hold")
    cleared = of_kind(c, "node.hold_cleared")
    assert len(cleared) == 1 and cleared[0][1].inputs["request"] == {
        "verb": "clear-hold", "pair": "pair-1", "node": "node-a"}
    assert "held down: -" in vtlha(c, "status").stdout
    out = vtlha(c, "clear-hold", "pair-1", "node-a")
    assert out.returncode == 1 and "node-a is not held down" in out.stderr


# ---- rule 5: switchover ------------------------------------------------------------------


def test_switchover_to_a_healthy_companion_and_refused_to_a_dead_one(
        make_cluster: Callable[[Edit | None], LocalCluster]) -> None:
    c = make_cluster(None)
    start(c)
    before = owners(c)

    t0 = time.monotonic()
    out = vtlha(c, "switchover", "node-a-data")
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("node-b takes over node-a-data from node-a: switchover requested by "
                        "an operator")
    assert " switchover.completed: node-b now serves node-a-data (epoch 2)" in lines[1]
    o = owners(c)
    assert o["node-a-data"] == ("node-b", 2, "held")
    assert o["node-a-mgmt"] == before["node-a-mgmt"]  # the management group stays
    (_, s_ev), = of_kind(c, "switchover.started")
    assert s_ev.data["rule"] == "switchover" and s_ev.inputs["request"] == {
        "verb": "switchover", "group": "node-a-data"}
    (_, n_ev), = of_kind(c, "failover.notify")
    (_, d_ev), = of_kind(c, "switchover.completed")
    assert (n_ev.group, n_ev.old, n_ev.new) == ("node-a-data", "node-a", "node-b")
    assert d_ev.data["started"] == s_ev.id
    print(f"\nvtlha switchover node-a-data: {took * 1000:.0f} ms for the command (process "
          f"start included), takeover {d_ev.data['duration_s'] * 1000:.0f} ms; {d_ev.reason}")

    # Not a group; and the move back.
    out = vtlha(c, "switchover", "node-z-data")
    assert out.returncode == 1
    assert out.stderr.strip() == "switchover node-z-data refused: there is no group node-z-data"
    (_, z_ev), = of_kind(c, "switchover.refused")
    assert z_ev.group is None and z_ev.inputs["request"] == {"verb": "switchover",
                                                             "group": "node-z-data"}
    out = vtlha(c, "switchover", "node-a-data")
    assert out.returncode == 0, out.stderr
    assert owners(c)["node-a-data"] == ("node-a", 3, "held")

    # The companion is dead: refused, with the reason; the event replays.
    c.procs.kill_host("node-b")
    c.wait_for(lambda: of_kind(c, "node.down", old="node-b"), 10, what="node.down")
    out = vtlha(c, "switchover", "node-a-mgmt")
    assert out.returncode == 1
    assert out.stderr.startswith("switchover node-a-mgmt refused: node-b is not alive "
                                 "(heartbeats from node-b stopped ")
    (r_seq, r_ev), = of_kind(c, "switchover.refused", group="node-a-mgmt")
    assert r_ev.reason == out.stderr.strip()
    x = explain(c, r_seq)
    assert x.returncode == 0 and x.stdout.splitlines()[0] == r_ev.reason
    assert owners(c)["node-a-mgmt"][0] == "node-a"


# ---- standby and the failback mode (operator verbs) ---------------------------------------


def test_standby_moves_a_nodes_groups_away_keeps_them_away_and_failback_mode_brings_them_home(
        make_cluster: Callable[[Edit | None], LocalCluster]) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["pairs"][0].update(failback="manual", failback_hold_time=1.0)

    c = make_cluster(edit)
    start(c)
    # No terminal and no --yes: not done, nothing sent.
    out = vtlha(c, "standby", "on", "pair-1", "node-a")
    assert out.returncode == 2
    assert out.stderr.strip() == ("standby on pair-1 node-a (its groups move to its "
                                  "companion): not confirmed (no terminal to ask; pass --yes)")
    assert held_by(c, "node-a") and not of_kind(c, "node.standby")

    out = vtlha(c, "standby", "on", "pair-1", "node-a", "--yes")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("node-a enters standby: it is given no group until taken "
                               "out; its 2 groups move to node-b; node-b takes over ")
    assert sum(" switchover.completed: node-b now serves " in ln for ln in lines[1:]) == 2
    assert held_by(c, "node-b")
    (_, sb), = of_kind(c, "node.standby")
    assert sb.data["on"] is True and sb.new == "node-a" and sb.inputs["request"] == {
        "verb": "standby", "pair": "pair-1", "node": "node-a", "on": True}
    assert {e.data["rule"] for _, e in of_kind(c, "switchover.started")} == {"standby"}

    # Kept away: failback and switchover to it are refused; auto failback does nothing.
    out = vtlha(c, "failback", "pair-1")
    assert out.returncode == 1 and "node-a is in standby (take it out first: standby off " \
        "pair-1 node-a)" in out.stderr
    out = vtlha(c, "failback-mode", "auto", "pair-1", "--yes")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("failback of pair-1 is now auto: a group away from home "
                                  "goes back once its home has been healthy for "
                                  "failback_hold_time (1 s)")
    (_, fm), = of_kind(c, "pair.failback_mode")
    assert fm.data["mode"] == "auto"
    quiet(c, 2.5, lambda: not held_by(c, "node-b"), "a group back on a node in standby")

    # Out of standby: with failback auto the groups come home by themselves.
    out = vtlha(c, "standby", "off", "pair-1", "node-a", "--yes")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("node-a leaves standby: it may be given groups again; its "
                                  "groups come home by themselves (failback is auto)")
    c.wait_for(lambda: held_by(c, "node-a"), 20, what="automatic failback after standby off")
    assert {e.data["rule"] for _, e in of_kind(c, "failback.started")} == {"failback"}
    assert [e.data["on"] for _, e in of_kind(c, "node.standby")] == [True, False]
    out = vtlha(c, "standby", "off", "pair-1", "node-z", "--yes")
    assert out.returncode == 1
    assert out.stderr.strip() == ("standby off pair-1 node-z refused: node-z is not a node "
                                  "of pair-1")


# ---- rule 6: maintenance -----------------------------------------------------------------


def test_maintenance_suspends_failover_and_leaving_it_acts_at_once(
        make_cluster: Callable[[Edit | None], LocalCluster]) -> None:
    c = make_cluster(None)
    start(c)
    out = vtlha(c, "maintenance", "on", "pair-1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("pair-1 enters maintenance: automatic failover suspended, "
                                  "health still reported")
    (_, m_ev), = of_kind(c, "pair.maintenance")
    assert m_ev.data["on"] is True and m_ev.pair == "pair-1"
    assert "maintenance on" in vtlha(c, "status").stdout
    again = vtlha(c, "maintenance", "on", "pair-1")
    assert again.returncode == 0 and again.stdout.strip() == "pair-1 is already in maintenance"

    c.procs.kill_host("node-a")
    c.wait_for(lambda: of_kind(c, "node.down", old="node-a"), 10,
               what="node.down (health still reported)")
    quiet(c, 1.5, lambda: not held_by(c, "node-a"), "a takeover in maintenance")
    assert not [e for _, e in evs(c) if e.kind.startswith("failover.")]

    t0 = time.time()
    out = vtlha(c, "maintenance", "off", "pair-1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("pair-1 leaves maintenance: automatic failover resumes at "
                                  "once")
    c.wait_for(lambda: held_by(c, "node-b"), 15, what="node-b to take over node-a's groups")
    started = of_kind(c, "failover.started")
    assert {e.group for _, e in started} == set(A_GROUPS)
    assert {e.data["rule"] for _, e in started} == {"heartbeats_stopped"}
    first = min(e.sent_at for _, e in started)
    (_, off), = of_kind(c, "pair.maintenance", on=False)
    print(f"\nmaintenance off (arbiter's pair.maintenance event) -> failover.started "
          f"{(first - off.sent_at) * 1000:.0f} ms; from running the command "
          f"{(first - t0) * 1000:.0f} ms")
    assert 0 <= first - off.sent_at < 1.0


def test_no_active_arbiter_is_a_clear_error(
        make_cluster: Callable[[Edit | None], LocalCluster]) -> None:
    c = make_cluster(None)  # not started: nobody answers operator requests
    out = vtlha(c, "switchover", "node-a-data", timeout=20)
    assert out.returncode == 3
    assert "no active arbiter answers on ha." in out.stderr
    out = vtlha(c, "explain", "999999")
    assert out.returncode == 3 and "event #999999 cannot be read" in out.stderr
