"""The package's layout keeps its layers (docs/architecture.md): no import cycle, the torch front
end independent of the NumPy solvers, no private name used across modules, modules of one
concern and a readable size."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rankopt"

#: modules allowed above MAX_LINES, each with its reason (none today)
LONG_MODULES: dict[str, str] = {}
MAX_LINES = 600


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _target(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``module -> modules it imports`` over every import statement of ``rankopt`` (function
    level too). ``from B import x`` with ``B.x`` a module is an edge to ``B.x``; a package's
    ``__init__`` that Python runs on the way is not an edge (every submodule would otherwise
    form a cycle with its package)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, (f, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _target(m, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]  # fmt: skip
            else:
                continue
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m:
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_rankopt():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the graph was read
    assert cycles(graph) == []


def test_torch_front_end_does_not_import_the_numpy_solvers():
    pytest.importorskip("torch", reason="PyTorch not installed")
    code = (
        "import sys, json, rankopt.torch\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('rankopt.solvers'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    assert "rankopt.solvers" not in {t for m, ts in import_graph().items()
                                     if m.startswith("rankopt.torch") for t in ts}  # fmt: skip


def test_no_private_name_imported_from_another_module():
    """No ``from X import _name`` of a function, class or constant; a package's private
    submodule (``from . import _spectral``) is imported only inside its package."""
    mods = _modules()
    found = []
    for m, (f, is_pkg) in mods.items():
        package = m if is_pkg else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.module == "__future__":
                continue
            base = _target(m, is_pkg, node)
            for a in node.names:
                if not a.name.startswith("_") or a.name.startswith("__"):
                    continue
                if f"{base}.{a.name}" in mods and base == package:
                    continue  # a private submodule of the importer's own package
                found.append(f"{m}: {a.name}")
    assert found == []


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_no_private_member_access_in_rankopt():
    """ruff's flake8-self rules (SLF001: ``obj._name`` of another object), without ``noqa``."""
    out = subprocess.run(
        ["ruff", "check", "--select", "SLF", "--no-cache", str(PACKAGE)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-2000:]
    assert "noqa: SLF" not in "".join(f.read_text() for f, _ in _modules().values())


def test_modules_are_of_a_readable_size():
    long = {m: len(f.read_text().splitlines()) for m, (f, _) in _modules().items()}
    long = {m: n for m, n in long.items() if n > MAX_LINES and m not in LONG_MODULES}
    assert long == {}
