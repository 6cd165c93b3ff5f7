"""The lab's ports are picked below the kernel's ephemeral range: a port inside it can be
handed to some client's outgoing connection between the check and the service's bind
(a CI run lost its witness arbiter that way: "address already in use")."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import EXAMPLE
from vtlha.config import load_config
from vtlha_lab.localcluster import all_ports, prepare_config, san_ports
from vtlha_lab.ports import LOWEST, below_ephemeral, ephemeral_range, free_block, port_free


def test_the_ephemeral_range_is_the_kernels() -> None:
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert ephemeral_range() == (lo, hi)


def test_a_free_block_is_free_and_below_the_ephemeral_range() -> None:
    for _ in range(50):
        base = free_block(3)
        assert base >= LOWEST and base + 3 <= below_ephemeral()
        assert all(port_free(p) for p in range(base, base + 3))


def test_a_local_clusters_ports_are_all_below_the_ephemeral_range(tmp_path: Path) -> None:
    for i in range(20):
        cfg = load_config(prepare_config(EXAMPLE, tmp_path / str(i)))
        ports = all_ports(cfg) + san_ports(cfg)
        assert min(ports) >= LOWEST
        assert max(ports) < below_ephemeral(), ports
        assert len(set(ports)) == len(ports)
