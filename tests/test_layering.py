"""The package's import graph, read from the source with `ast` (module-level and function-level imports alike):
no import cycle among comask modules, and no arrow from a lower layer to a higher one
(errors, config, checkpoint_io < data, modeling < engine < export / serve / bench / demo < cli; docs/DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "comask"

HIGHER_THAN_ENGINE = ("comask.export", "comask.serve", "comask.bench", "comask.demo", "comask.cli")
BASE = ("comask.errors", "comask.config", "comask.checkpoint_io")
FORBIDDEN = {
    "comask.data": ("comask.modeling", "comask.engine", *HIGHER_THAN_ENGINE),
    "comask.modeling": ("comask.engine", *HIGHER_THAN_ENGINE),
    "comask.engine": HIGHER_THAN_ENGINE,
    **{m: ("comask.data", "comask.modeling", "comask.engine", *HIGHER_THAN_ENGINE) for m in BASE},
}

# Arrows that still break the layering, each to be removed by moving code (issue 25). Every other arrow is
# guarded; an arrow listed here that no longer exists fails the test, so the list only shrinks.
ALLOWED: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The comask module an import names: the module itself, or the package holding the imported name."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets.add(mod)
                # `from comask.engine import dist` imports the module comask.engine.dist
                targets.update(f"{mod}.{a.name}" for a in node.names)
        deps = {d for t in targets if t.startswith("comask") and (d := _resolve(t, modules))}
        deps.discard(name)
        graph[name] = deps
    return graph


def _package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop the arrows from a module to its own parent packages: `import comask.x.y` runs comask/__init__.py and
    comask/x/__init__.py first, but that is Python's import order, not a dependency the module's code has."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(m, d) for m, deps in graph.items() for d in deps
            for low, high in FORBIDDEN.items() if _in(m, low) and any(_in(d, h) for h in high)}


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    graph = import_graph()
    assert "comask.engine.train" in graph and "comask.modeling.build" in graph
    assert "comask.engine.dist" in graph["comask.engine.train"]  # `from comask.engine import dist`
    sample = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(sample) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    cycles = _cycles(_package_inits(import_graph()))
    assert not cycles, "import cycles among comask modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_lower_layers_never_import_higher_ones() -> None:
    found = _violations(import_graph())
    new = sorted(found - ALLOWED)
    assert not new, "arrows against the layering (data, modeling < engine < export/serve/bench < cli): " + ", ".join(
        f"{a} -> {b}" for a, b in new)
    cli_users = sorted(m for m, deps in import_graph().items() if "comask.cli" in deps and m != "comask.__main__")
    assert not cli_users, f"only comask.__main__ imports comask.cli: {cli_users}"
    gone = sorted(ALLOWED - found)
    assert not gone, "ALLOWED lists arrows that no longer exist; remove them: " + ", ".join(f"{a} -> {b}" for a, b in gone)
