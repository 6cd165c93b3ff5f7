"""The runtime package and the services never import the lab package (``vtlha_lab``):
a service image carries none of it. Checked on every import statement of their sources."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = [ROOT / "vtlha", *sorted((ROOT / "services").glob("*/vtlha_*"))]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _sources() -> list[Path]:
    return [p for d in RUNTIME for p in sorted(d.rglob("*.py"))]


def test_runtime_sources_are_found() -> None:
    names = {p.parent.name for p in _sources()}
    assert {"vtlha", "vtlha_arbiter", "vtlha_heartbeat", "vtlha_ip_manager",
            "vtlha_storage_monitor"} <= names


def test_runtime_never_imports_the_lab() -> None:
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in _sources() for m in sorted(_imports(p))
           if m == "vtlha_lab" or m.startswith("vtlha_lab.")]
    assert not bad, "the runtime imports the lab package:\n" + "\n".join(bad)


def test_runtime_never_runs_the_lab_as_a_module() -> None:
    bad = [str(p.relative_to(ROOT)) for p in _sources() if '"vtlha_lab' in p.read_text()]
    assert not bad, f"the runtime starts lab modules: {bad}"
