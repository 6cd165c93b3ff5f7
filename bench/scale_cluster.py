"""The cluster file of ``bench/scale.py`` (``bench/decide_cost.py`` uses it too): N pairs
declared as ``examples/cluster.yaml`` declares its pair, with the example's timings, one
nats-server on the witness; and how many pairs a renewal budget carries."""

from __future__ import annotations

from pathlib import Path

import yaml

from vtlha.config import ClusterConfig
from vtlha.iscsi.scsi import node_tag

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = "scale"
WITNESS = "witness"
GROUPS_PER_NODE = 2


def node_names(n_pairs: int) -> list[tuple[str, str, str]]:
    """(pair, node a, node b) for each pair; a node whose SCSI reservation key tag (3
    bytes of a hash, vtlha.iscsi.scsi.node_tag) collides with an earlier one's is renamed,
    as an operator would have to (the config refuses such a cluster)."""
    tags: set[int] = set()
    out = []

    def name(base: str) -> str:
        cand, k = base, 0
        while node_tag(CLUSTER, cand) in tags:
            k += 1
            cand = f"{base}x{k}"
        tags.add(node_tag(CLUSTER, cand))
        return cand

    for p in range(1, n_pairs + 1):
        out.append((f"pair-{p:04d}", name(f"n{p:04d}a"), name(f"n{p:04d}b")))
    return out


def _ip(net: int, i: int, prefix: int) -> str:
    return f"10.{net}.{i // 250}.{i % 250 + 1}/{prefix}"


def cluster_file(n_pairs: int, work: Path, client_port: int, monitor_port: int) -> Path:
    """Write the cluster file of ``n_pairs`` pairs; its timings are the example's."""
    example = yaml.safe_load((ROOT / "examples" / "cluster.yaml").read_text())
    pairs, devices = [], {}
    i = 0
    for pair, a, b in node_names(n_pairs):
        nodes = []
        for n in (a, b):
            devs = [f"d{n}{k}" for k in range(2)]
            for d in devs:
                devices[d] = {"backing": f"san/{d}.img", "paths": {a: 2, b: 2}}
            nodes.append({
                "name": n, "service_ip": _ip(1, i, 16), "mgmt_ip": _ip(3, i, 16),
                "groups": {"data": {"addresses": [_ip(2, i, 32)], "devices": devs},
                           "mgmt": {"addresses": [_ip(4, i, 32)], "gateway": "10.3.255.254"}},
                "checks": []})
            i += 1
        pairs.append({"name": pair, "failback": "manual", "nodes": nodes})
    raw = {
        "cluster": CLUSTER, "timings": example["timings"],
        "nats": {"servers": [WITNESS], "listen": {WITNESS: {
            "host": "127.0.0.1", "client_port": client_port, "cluster_port": client_port + 1,
            "monitor_port": monitor_port}}},
        "witness": {"host": WITNESS, "service_ip": "10.5.0.1/16"},
        "state_dir": str(work / "state"), "pairs": pairs,
        "san": {"host": WITNESS, "port": 3260}, "devices": devices,
    }
    path = work / "cluster.yaml"
    path.write_text(yaml.dump(raw, Dumper=yaml.CSafeDumper, sort_keys=False))
    return path


def renewed_pairs(cfg: ClusterConfig, budget: float) -> int:
    """How many pairs (from the first) the renewal budget carries at full rate."""
    per_node = GROUPS_PER_NODE / cfg.timings.heartbeat_interval
    return min(len(cfg.pairs), int(budget // (2 * per_node)))
