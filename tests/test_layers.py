"""The house rules, read from the source: imports point downwards only, no
import cycles, every store key comes from the layout module, no file beyond
400 lines. Imports are read with `ast` (module level and inside functions),
so a lazy import counts as much as a top-level one."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cropi", "services", "operators")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


MODULES = {module_name(p): p for p in source_files()}


def imports_of(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every first-party module that module `name` (source text `source`) imports, with
    `importlib.import_module("...")` calls."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        found.update(t for t in targets if t.split(".")[0] in PACKAGES)
    return found


GRAPH = {name: imports_of(path.read_text(), name, path.name == "__init__.py") for name, path in MODULES.items()}


def importers_of(prefix: str, importing: str) -> list[str]:
    """Modules under `importing` that import something under `prefix`."""
    def under(module: str, package: str) -> bool:
        return module == package or module.startswith(package + ".")

    return sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if under(m, importing)
                  for t in targets if under(t, prefix))


@pytest.mark.parametrize("lower, higher", [
    ("cropi.runtime", "cropi.curriculum"),
    ("cropi.runtime", "cropi.executors"),
    ("cropi.runtime", "services"),
    ("cropi.runtime", "operators"),
    ("cropi.curriculum", "cropi.executors"),
    ("cropi.influence", "cropi.curriculum"),
    ("cropi.rl", "cropi.curriculum"),
    ("cropi.rl", "cropi.executors"),
    ("cropi.influence", "cropi.executors"),
    ("cropi", "services"),
    ("cropi", "operators"),
])
def test_lower_layers_never_import_higher_ones(lower, higher):
    assert importers_of(higher, lower) == []


def test_the_layer_rules_see_imports_inside_functions_and_through_importlib():
    # The reader itself must catch what the rules forbid, or the rules above cannot fail.
    sample = ("def f():\n    from cropi.curriculum import layout\n    from .queue import TaskBus\n"
              "    import importlib\n    importlib.import_module('services.controller.api')\n")
    assert imports_of(sample, "cropi.runtime.probe") == {
        "cropi.curriculum", "cropi.curriculum.layout", "cropi.runtime.queue", "services.controller.api"}


def test_there_are_no_import_cycles():
    # Edges between modules (a package's __init__ counts as the package's module).
    edges = {m: {t for t in targets if t in MODULES and t != m} for m, targets in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert cycles == []


def test_every_store_key_of_a_job_is_built_by_the_layout_module():
    offenders = defaultdict(list)
    for name, path in MODULES.items():
        if name == "cropi.curriculum.layout":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                head = node.values[0] if node.values else None
                if isinstance(head, ast.Constant) and str(head.value).startswith("jobs/"):
                    offenders[name].append(node.lineno)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("jobs/"):
                offenders[name].append(node.lineno)
    assert dict(offenders) == {}


def test_the_benchmarks_read_the_store_through_the_layout_module():
    assert "cropi.curriculum.layout" in GRAPH["cropi.bench.acceleration"]


def test_no_source_file_is_longer_than_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in source_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
