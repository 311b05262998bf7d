"""The package's shape, checked on its source: one direction for every request (surface -> task
-> engine -> backend), no module outside ``engine``/``backends`` holding a backend, and no
import cycle between files or folders."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "allinone"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports at run time (type-checking imports left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                root = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(root + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def folder(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_import_cycle_between_files():
    assert cycles(graph()) == []


def test_no_import_cycle_between_folders():
    edges: dict[str, set[str]] = {}
    for name, targets in graph().items():
        edges.setdefault(folder(name), set()).update(folder(t) for t in targets if folder(t) != folder(name))
    # the package root re-exports the public API; leave it out
    edges.pop("allinone", None)
    for targets in edges.values():
        targets.discard("allinone")
    assert cycles(edges) == []


def test_only_the_engine_and_the_backends_hold_a_backend():
    surfaces = [p for p in PACKAGE.rglob("*.py")
                if p.relative_to(PACKAGE).parts[0] in ("tasks", "server", "ui", "eval")
                or p.name in ("cli.py", "api.py")]
    offending = re.compile(r"\bfrom \.+backends\b|\ballinone\.backends\b|\._backend\b|\bai\.engine\b|\.engine\.backend\b")
    found = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}"
             for p in surfaces for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if offending.search(line)]
    assert found == []


def test_the_checks_above_can_fail():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert folder("allinone.tasks.kinds.base") == "tasks"
    g = graph()
    assert "allinone.engine" in g["allinone.api"] and "allinone.tasks.prompting" in g["allinone.tasks.kinds.classify"]
