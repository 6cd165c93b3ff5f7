"""Container files cannot be built here (no container engine); check what can be:
the compose files parse and name services that exist, each with a Containerfile whose
entrypoint is a console script the package installs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_every_service_has_a_containerfile_with_an_installed_entrypoint() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for svc in ("heartbeat", "arbiter", "storage-monitor", "ip-manager"):
        text = (ROOT / "services" / svc / "Containerfile").read_text()
        assert text.startswith("# vtl-ha") and "\nFROM python:3.11" in text
        m = re.search(r'exec (vtlha-[a-z-]+) --config', text)
        assert m and m.group(1) == f"vtlha-{svc}" and m.group(1) in scripts


def test_compose_files_parse_and_point_at_existing_containerfiles() -> None:
    for name in ("compose.node.yaml", "compose.witness.yaml"):
        doc = yaml.safe_load((ROOT / "deploy" / name).read_text())
        assert doc["services"], name
        for svc, spec in doc["services"].items():
            assert (ROOT / "deploy" / spec["build"]["context"] /
                    spec["build"]["dockerfile"]).is_file(), (name, svc)
