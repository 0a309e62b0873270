"""The package's import graph, read from the source with `ast`: no cycles, and the training code
reached only through the command line.

Every ``import latticewatch…`` / ``from latticewatch… import …`` counts, at module level or
inside a function; a ``from package import name`` that names a submodule is an edge to that
submodule. Cycles are looked for among module-level imports (a function-level import cannot make
an import fail, but it can hide a cycle, so training modules are checked with both).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "latticewatch"
ROOT = Path(__file__).resolve().parents[1] / "daemon" / PACKAGE


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path], *, functions: bool) -> set[str]:
    """Modules of this package that ``name`` imports (module level only unless ``functions``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # typing-only imports never run
            if isinstance(child, (ast.Import, ast.ImportFrom)) and (functions or not nested):
                found.update(_targets(child, package, modules))
            visit(child, nested)

    visit(tree, False)
    found.discard(name)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        return {_known(alias.name, modules) for alias in node.names} - {None}
    if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = set()
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        out.add(submodule if submodule in modules else _known(source, modules))
    return out - {None}


def _known(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is a module of this package."""
    parts = dotted.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(*, functions: bool) -> dict[str, set[str]]:
    """Module → the package modules it imports."""
    modules = all_modules()
    return {name: imports_of(name, path, modules, functions=functions) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """A concrete cycle ``a → b → … → a`` inside one strongly connected component."""
    start = min(members)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first, so the reported cycle is a shortest one through ``start``
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # cannot happen in a strongly connected component


def test_the_graph_sees_known_edges():
    module_level, everything = import_graph(functions=False), import_graph(functions=True)
    assert "latticewatch.models.manifest" in module_level["latticewatch.training.fit.profile"]
    # ``from latticewatch.models import architectures`` is an edge to the submodule
    assert "latticewatch.models.architectures" in module_level["latticewatch.models.manifest"]
    threshold = "latticewatch.training.assess.calibrate.threshold"
    assert "latticewatch.training.assess.evaluate" in everything[threshold].difference(module_level[threshold])
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph(functions=False))
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(" → ".join(c) for c in cycles)


def test_no_import_cycles_among_training_modules_even_inside_functions():
    graph = import_graph(functions=True)
    training = {k: {m for m in v if m.startswith(f"{PACKAGE}.training")} for k, v in graph.items()
                if k.startswith(f"{PACKAGE}.training")}
    cycles = find_cycles(training)
    assert not cycles, "import cycles among training modules:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_only_the_command_line_imports_training():
    graph = import_graph(functions=True)
    leaks = sorted(f"{name} imports {target}" for name, targets in graph.items() for target in targets
                   if target.startswith(f"{PACKAGE}.training")
                   and not name.startswith((f"{PACKAGE}.training", f"{PACKAGE}.cli")))
    assert not leaks, "outside latticewatch.cli and latticewatch.training:\n" + "\n".join(leaks)
