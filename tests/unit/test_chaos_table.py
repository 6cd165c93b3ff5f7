"""The chaos fault table is the one copy of the faults' expectations: the docs generated
from it are equal to it, every formula evaluates with the example timings, every kind has
an injector, and the chaos observer shares no code with the services."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vtlha_lab.chaos import faults as ft
from vtlha_lab.chaos.docs import rendered
from vtlha_lab.chaos.inject import INJECT
from vtlha_lab.chaos.runner import plan

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_the_generated_docs_are_equal_to_the_fault_table() -> None:
    for path, text in rendered(DOCS).items():
        assert path.read_text() == text, (
            f"{path.name} differs from the fault table: run `vtlha-lab chaos docs`")


def test_the_docs_show_every_fault_and_the_bound() -> None:
    policy = (DOCS / "policy.md").read_text()
    for f in ft.FAULTS:
        assert f"| `{f.kind}` |" in policy
    assert ft.BASELINE_BOUND in (DOCS / "safety.md").read_text()


def test_every_formula_evaluates_and_every_kind_has_an_injector() -> None:
    timings = {"heartbeat_interval": 0.1, "dead_after": 0.3, "lease_ttl": 0.3,
               "margin": 0.03, "leader_ttl": 3.0, "leader_standby_delay": 1.0,
               "check_interval": 0.2, "probe_interval": 0.2, "probe_timeout": 1.0,
               "storage_settle": 2.0, "storage_stale_after": 0.6, "rise": 2, "fall": 2}
    for f in ft.FAULTS:
        if f.kind != "double":
            assert f.kind in INJECT
            for formula in (f.address_bound, f.data_bound, f.duration):
                assert ft.evaluate(formula, timings) >= 0
    assert ft.expectation(("kill-heartbeat",), timings).address_bound == pytest.approx(1.13)
    two = ft.expectation(("kill-nats", "cut-links"), timings)
    assert two.moves is ft.Moves.MAY and two.events == () and two.address_bound == \
        pytest.approx(1.13)


def test_formulas_refuse_anything_but_arithmetic_over_known_names() -> None:
    for bad in ("__import__('os')", "lease_ttl ** 2", "unknown + 1", "max of the two"):
        with pytest.raises(ValueError):
            ft.evaluate(bad, {"lease_ttl": 0.3})


def test_one_seed_is_one_sequence_and_every_kind_comes_first() -> None:
    kinds = [f.kind for f in ft.FAULTS]
    p = plan(42, len(kinds) + 10, kinds)
    assert p == plan(42, len(kinds) + 10, kinds)
    assert p != plan(43, len(kinds) + 10, kinds)
    firsts = {k[0] if len(k) == 1 else "double" for k in p[:len(kinds)]}
    assert firsts == set(kinds)
    assert all(len(k) == 2 and k[0] != k[1] for k in p if len(k) > 1)


def test_the_chaos_observer_imports_nothing_of_the_runtime() -> None:
    tree = ast.parse((ROOT / "vtlha_lab" / "chaos" / "observer.py").read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in modules if m.split(".")[0] in ("vtlha", "vtlha_lab")], modules
