"""Imports only point down: every import between the package's parts goes to a lower layer of :data:`LAYERS`, and no
modules import each other in a circle.

Read with ``ast`` (nothing is imported), every import counted, those inside functions too. A part is a subpackage or
a top-level module; ``speccascade`` itself (the package's face, which re-exports the public names) is the highest
layer, so ``from . import __version__`` in a lower module counts as an import of the top. The order is the one
docs/architecture.md documents (section 1, "Layers"); a new part has to be placed in it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "speccascade"
TOP = "speccascade"
LAYERS = ("errors", "version", "runtime", "launch", "listing", "uncertainty", "report", "outdir", "deferral", "data", "tracking", "decoding",
          "settings", "finetune", "pairs", "tracing", "evaluation", "training", "bench", "demo", "cli", TOP)  # bottom to top


def module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its ``__init__``)."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports: absolute and relative, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from X import y`: the module X.y where y is one, else X itself
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    found = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported(name, path, set(files)) for name, path in files.items()}


def part(module: str) -> str:
    """``speccascade.decoding.cascade`` -> ``decoding``; the package's face -> ``speccascade``."""
    return module.split(".")[1] if "." in module else module


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import from one part to another that is not below it in :data:`LAYERS`."""
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if part(m) != part(t) and LAYERS.index(part(t)) > LAYERS.index(part(m)))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Modules that import each other, directly or through others (strongly connected components, Tarjan).

    A module's import of a package that contains it (its package's face) is left out: importing ``..data`` from
    ``data.traces`` reads what ``data/__init__`` re-exports, and the face is checked as a module of its own."""
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

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
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_part_has_a_layer():
    parts = {part(m) for m in module_files()}
    assert parts == set(LAYERS), f"not in LAYERS: {sorted(parts - set(LAYERS))}; gone: {sorted(set(LAYERS) - parts)}"


def test_imports_between_parts_point_down():
    graph = import_graph()
    assert len(graph) > 50 and "speccascade.pairs" in graph["speccascade.tracing.log_traces"]  # the imports were read
    assert "speccascade.finetune.preset" in graph["speccascade.pairs"]  # one inside a function
    assert upward_imports(graph) == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(import_graph()) == []


def test_the_checks_see_an_upward_import_and_a_circle(tmp_path):
    """The checks can fail: a decoder module importing the tracing stage is upward, and closes a circle with it."""
    graph = import_graph()
    graph["speccascade.decoding.vocab"] = graph["speccascade.decoding.vocab"] | {"speccascade.tracing.outcome"}
    assert upward_imports(graph) == ["speccascade.decoding.vocab -> speccascade.tracing.outcome"]
    assert any("speccascade.decoding.vocab" in c and "speccascade.tracing.outcome" in c for c in circles(graph))
    source = tmp_path / "late.py"
    source.write_text("def version():\n    from .. import __version__\n    return __version__\n")
    graph = {"speccascade.data.late": imported("speccascade.data.late", source, set(module_files()))}
    assert graph == {"speccascade.data.late": {TOP}} and upward_imports(graph) == ["speccascade.data.late -> speccascade"]


def test_docs_list_the_same_layers():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("### Layers"):]
    documented = re.findall(r"^\d+\. `([\w.]+)", section, flags=re.M)
    assert tuple(documented) == LAYERS
