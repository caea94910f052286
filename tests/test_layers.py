"""The shape of the package: one-way layers (.importlinter), no import cycles, imports at the top, small files.

The layer contract is checked by import-linter itself (the same check `lint-imports` runs by hand);
cycles are found with grimp, the import graph import-linter builds, over every import in the package
(function-local ones too).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmstack"
LAZY_OK = {"llmstack/__init__.py"}  # `llmstack.load_model` is resolved lazily: `import llmstack.io` stays light
MAX_LINES, MAX_CLI_LINES = 500, 300


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (an import cycle each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_strongly_connected_finds_a_cycle_and_only_cycles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_layer_contract_is_kept():
    # in a process of its own: import-linter configures logging, which would silence this process's loggers
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(sys.argv[1], no_cache=True))"
    run = subprocess.run([sys.executable, "-c", code, str(ROOT / ".importlinter")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr  # it names each import that points up a layer
    assert "KEPT" in run.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("llmstack")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = strongly_connected(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_llmstack_imports_are_at_the_top():
    """A function-local import of our own code hides a dependency (or a cycle); only the lazy root is allowed."""
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        for fn in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                mod = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [mod or ""]
                if any(n == "llmstack" or n.startswith("llmstack.") for n in names) and rel not in LAZY_OK:
                    found.append(f"{rel}:{node.lineno} (in {fn.name})")
    assert not found, "function-local imports of llmstack modules:\n" + "\n".join(found)


def test_modules_stay_small():
    too_big = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        limit = MAX_CLI_LINES if rel.startswith("llmstack/cli/") else MAX_LINES
        n = len(f.read_text(encoding="utf-8").splitlines())
        if n > limit:
            too_big.append(f"{rel}: {n} lines (limit {limit})")
    assert not too_big, "\n".join(too_big)
