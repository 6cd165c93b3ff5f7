"""docs/events.md stays in step with the code: its list of kinds is exactly the kinds
the code emits (found by scanning the sources for emit calls), and its JSON Schema of
the envelope is the one the pydantic model generates."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from vtlha import policy
from vtlha.messages import ADMIN_FIELDS, event_json_schema

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "events.md"
#: calls whose first argument is an event kind
EMITTERS = {"emit", "emit_soon", "Note", "_served_event", "_end"}
#: names a kind is kept in before it is emitted
KIND_NAMES = {"kind", "noop_kind", "DROPPED_KIND"}
#: the values of the placeholders in f-string kinds: f"{kind}.started", f"{req.verb}.refused"
PLACEHOLDERS = {
    "kind": sorted({policy.event_kind(r) for r in policy.Rule}),
    "m.kind": sorted({policy.event_kind(r) for r in policy.Rule}),
    "req.verb": sorted(ADMIN_FIELDS),
}


def _sources() -> list[Path]:
    return sorted([*(ROOT / "vtlha").rglob("*.py"), *(ROOT / "services").rglob("*.py")])


def _kinds_of(node: ast.expr, consts: dict[str, str], where: str) -> set[str]:
    if isinstance(node, ast.IfExp):
        return _kinds_of(node.body, consts, where) | _kinds_of(node.orelse, consts, where)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Name) and node.id in consts:
        return {consts[node.id]}
    if isinstance(node, ast.JoinedStr):
        parts = node.values
        assert len(parts) == 2 and isinstance(parts[0], ast.FormattedValue) \
            and isinstance(parts[1], ast.Constant), f"{where}: {ast.unparse(node)}"
        key = ast.unparse(parts[0].value)
        assert key in PLACEHOLDERS, f"{where}: unknown placeholder in {ast.unparse(node)}"
        return {f"{v}{parts[1].value}" for v in PLACEHOLDERS[key]}
    return set()  # a variable: its values are found where they are assigned


def emitted_kinds() -> dict[str, str]:
    """kind -> the file that emits it."""
    found: dict[str, str] = {}
    for path in _sources():
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(ROOT))
        consts = {t.id: n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  for t in n.targets if isinstance(t, ast.Name)
                  and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
        for n in ast.walk(tree):
            exprs: list[ast.expr] = []
            if isinstance(n, ast.Call):
                f = n.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in EMITTERS and n.args:
                    exprs.append(n.args[0])
                if name == "Event":
                    exprs += [k.value for k in n.keywords if k.arg == "kind"]
            elif isinstance(n, ast.Assign | ast.AnnAssign) and n.value is not None:
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                if any(isinstance(t, ast.Name) and t.id in KIND_NAMES for t in targets):
                    exprs.append(n.value)
            for e in exprs:
                for k in _kinds_of(e, consts, where):
                    found.setdefault(k, where)
    return found


def documented_kinds() -> list[str]:
    text = DOC.read_text().split("## Every kind", 1)[1]
    return re.findall(r"^\| `([a-z0-9_.-]+)` \|", text, flags=re.M)


def test_the_scan_finds_the_kinds_we_know_are_emitted() -> None:
    found = emitted_kinds()
    for k in ("node.down", "failover.started", "switchover.failed", "clear-hold.refused",
              "lease.expired", "lease.acquired", "events.dropped", "storage.noop",
              "group.assigned"):
        assert k in found, k


def test_every_kind_the_code_emits_is_documented_once_and_nothing_else() -> None:
    doc = documented_kinds()
    assert len(doc) == len(set(doc)), "a kind is listed twice"
    code = emitted_kinds()
    assert sorted(set(code) - set(doc)) == [], "emitted but not in docs/events.md"
    assert sorted(set(doc) - set(code)) == [], "in docs/events.md but never emitted"


def test_every_row_has_a_severity() -> None:
    text = DOC.read_text().split("## Every kind", 1)[1]
    rows = re.findall(r"^\| `[a-z0-9_.-]+` \| ([a-z]+) \|", text, flags=re.M)
    assert len(rows) == len(documented_kinds())
    assert set(rows) <= {"critical", "error", "warning", "info"}


def test_the_documented_schema_is_the_models() -> None:
    text = DOC.read_text().split("## The envelope (JSON Schema)", 1)[1]
    (shown,) = re.findall(r"```json\n(.*?)\n```", text, flags=re.S)[:1]
    assert shown == event_json_schema(), (
        "regenerate: .venv/bin/python -c 'from vtlha.messages import event_json_schema; "
        "print(event_json_schema())'")
