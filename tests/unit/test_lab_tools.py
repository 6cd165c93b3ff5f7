"""The network lab refuses to come up without the tools it runs (a lab without nft has
no fence, without tgtd no iSCSI target), naming each missing command and its package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vtlha.errors import FatalError
from vtlha_lab.lab import require_tools


def _only(tmp_path: Path, *commands: str) -> str:
    for c in commands:
        exe = tmp_path / c
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    return str(tmp_path)


def test_missing_tools_are_named_with_their_packages(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _only(tmp_path, "ip", "setpriv"))
    with pytest.raises(FatalError) as err:
        require_tools(iscsi=True)
    msg = str(err.value)
    assert "nft (Debian package nftables)" in msg and "tgtd (Debian package tgt)" in msg
    assert "ip (" not in msg and "make sysdeps" in msg
    with pytest.raises(FatalError, match="nft") as err2:
        require_tools(iscsi=False)
    assert "tgtd" not in str(err2.value)


def test_all_tools_present_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _only(tmp_path, "ip", "nft", "setpriv", "tgtd", "tgtadm"))
    require_tools(iscsi=True)
    assert os.environ["PATH"] == str(tmp_path)


def test_use_iscsi_makes_a_valid_cluster_file_on_the_labs_tgtd() -> None:
    """The chaos suite's `--san iscsi` (and the iSCSI lab tests): the example's devices
    become LUNs 1..n of the lab's target, a portal per path on the witness's address."""
    import yaml

    from tests.conftest import EXAMPLE
    from vtlha.config import parse_config
    from vtlha_lab.tgt import LAB_IQN, use_iscsi

    raw = yaml.safe_load(EXAMPLE.read_text())
    use_iscsi(raw)
    cfg = parse_config(raw)
    assert cfg.san.kind == "iscsi" and cfg.san.iqn == LAB_IQN
    assert cfg.san.portals == ["198.51.100.9:3260", "198.51.100.9:3261"]
    assert [d.lun for d in cfg.devices.values()] == [1, 2, 3, 4]
