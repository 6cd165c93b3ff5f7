"""A decision over many pairs: each pair is decided from its own part of the snapshot
(``Snapshot.for_pairs``), which is what a decision event carries as its inputs, and the
config's lookups (built once for a frozen cluster file) answer as the scans did."""

from __future__ import annotations

import orjson

from tests.conftest import EXAMPLE
from vtlha.config import load_config
from vtlha.policy import (
    GroupView,
    MarkDown,
    NodeView,
    PairView,
    Snapshot,
    StorageView,
    Takeover,
    decide,
    explain,
)

NOW = 1000.0
PAIRS = 3


def _snapshot(dead: str) -> Snapshot:
    """Three pairs, every group held at home, every node heard just now but ``dead``."""
    pairs, nodes, groups, storage = [], {}, {}, {}
    for p in range(1, PAIRS + 1):
        a, b = f"p{p}a", f"p{p}b"
        pairs.append(PairView(f"pair-{p}", (a, b)))
        for n in (a, b):
            heard = NOW - 5.0 if n == dead else NOW - 0.01
            nodes[n] = NodeView(n, heard, "i", healthy_since=NOW - 100,
                                mgmt_ok_since=NOW - 100, storage_ok_since=NOW - 100)
            groups[f"{n}-data"] = GroupView(f"{n}-data", n, "data", n, 1, "held", 7)
            groups[f"{n}-mgmt"] = GroupView(f"{n}-mgmt", n, "mgmt", n, 1, "held", 8)
            storage[n] = StorageView(n, NOW - 0.1, {})
    return Snapshot(dead_after=0.3, started_at=NOW - 100, pairs=tuple(pairs), nodes=nodes,
                    groups=groups, storage=storage, in_flight=frozenset({"p3a-data"}))


def test_a_pair_is_decided_from_its_own_part_alone() -> None:
    s = _snapshot(dead="p2a")
    whole = decide(s, NOW)
    part = s.for_pairs(["pair-2"])
    assert [p.name for p in part.pairs] == ["pair-2"]
    assert set(part.nodes) == {"p2a", "p2b"} and set(part.storage) == {"p2a", "p2b"}
    assert set(part.groups) == {"p2a-data", "p2a-mgmt", "p2b-data", "p2b-mgmt"}
    assert part.in_flight == frozenset()  # p3a-data is another pair's
    mine = decide(part, NOW)
    assert mine.actions == whole.actions  # only pair-2 had anything to do
    assert isinstance(mine.actions[0], MarkDown) and mine.actions[0].node == "p2a"
    assert {a.group for a in mine.actions if isinstance(a, Takeover)} == {"p2a-data",
                                                                          "p2a-mgmt"}
    # what the event carries replays to the same sentence, and is a pair's size
    inputs = orjson.loads(orjson.dumps({"snapshot": part.to_inputs(), "now": NOW}))
    assert explain(inputs) == whole.status
    assert len(orjson.dumps(part.to_inputs())) * 2 < len(orjson.dumps(s.to_inputs()))
    assert s.for_pairs(["pair-3"]).in_flight == frozenset({"p3a-data"})
    assert s.for_pairs(["no-such-pair"]).pairs == ()


def test_the_config_lookups_answer_as_the_scans_did() -> None:
    cfg = load_config(EXAMPLE)
    nodes = [n for p in cfg.pairs for n in p.nodes]
    assert cfg.nodes == nodes
    assert cfg.hosts == [n.name for n in nodes] + [cfg.witness.host]
    for n in nodes:
        assert cfg.node(n.name) is n and cfg.has_node(n.name)
        assert cfg.pair_of(n.name).name == cfg.pair(cfg.pair_of(n.name).name).name
        assert cfg.companion(n.name).name != n.name
        assert cfg.groups()[n.data_group] == (n.name, "data")
        assert cfg.groups()[n.mgmt_group] == (n.name, "mgmt")
    assert cfg.host_index(cfg.witness.host) == len(nodes)
    assert not cfg.has_node("nobody")
    # a copy with other pairs indexes its own pairs, not the original's
    one = cfg.model_copy(update={"pairs": cfg.pairs[:1]})
    assert one.groups() == cfg.groups()  # the example has one pair
    renamed = cfg.pairs[0].model_copy(update={"name": "renamed"})
    other = cfg.model_copy(update={"pairs": [renamed]})
    assert other.pair("renamed").name == "renamed" and "renamed" not in cfg.lookups.pair


def test_an_owner_still_renewing_its_lease_is_not_taken_over() -> None:
    """Heartbeats stopped but the KV shows the owner renewing (an arbiter whose own
    server was cut off gets the renewals made meanwhile at once, the heartbeats never):
    no takeover until dead_after has passed since the last renewal it saw; the node
    is still declared down (the mark is about its heartbeats)."""
    from dataclasses import replace

    s = _snapshot(dead="p2a")
    groups = dict(s.groups)
    for g in ("p2a-data", "p2a-mgmt"):
        groups[g] = replace(groups[g], renewed_at=NOW - 0.1)
    renewing = replace(s, groups=groups)
    d = decide(renewing, NOW)
    assert [type(a) for a in d.actions] == [MarkDown]
    for g in ("p2a-data", "p2a-mgmt"):  # the last renewal seen dead_after ago
        groups[g] = replace(groups[g], renewed_at=NOW - s.dead_after - 0.01)
    later = decide(replace(s, groups=groups), NOW)
    assert {a.group for a in later.actions if isinstance(a, Takeover)} == {"p2a-data",
                                                                           "p2a-mgmt"}
    # the event's inputs carry it: the replay holds back as the decision did
    inputs = orjson.loads(orjson.dumps({"snapshot": renewing.for_pairs(["pair-2"])
                                        .to_inputs(), "now": NOW}))
    assert explain(inputs) == d.status
