"""The house's shape (docs/architecture.md), read from every module's imports with ``ast``:

(a) no import cycle between modules (module-level imports; ``if TYPE_CHECKING:`` blocks and imports
    inside functions are not run at import time and do not count);
(b) no private name (``_x``) imported from another module;
(c) the dependency direction, never the other way (module-level imports):
    ``flows, cli -> app -> stores, audit, train, engine -> models, degrade, io -> image, config``;
(d) no module over 400 lines unless its docstring has a line starting with ``Size:`` saying why.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400

#: Layers, lowest first; a module may import its own layer and those below. A module's layer is
#: that of its longest listed prefix.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("domainsr", "domainsr.errors", "domainsr.config", "domainsr.image", "domainsr.bands", "domainsr.limits",
     "domainsr.malloc", "domainsr.retry"),
    ("domainsr.models", "domainsr.degrade", "domainsr.io"),
    ("domainsr.stores", "domainsr.audit", "domainsr.train", "domainsr.engine", "domainsr.data"),
    ("domainsr.app",),
    ("flows", "domainsr.cli", "domainsr.demo", "domainsr.orchestration", "domainsr.prefect_server",
     "domainsr.warm_runner"),
)

#: Layer violations kept on purpose, each with its reason: (importer, imported). Keep it short.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for top in ("domainsr", "flows") for p in (ROOT / top).rglob("*.py")}
SCANNED = {**MODULES, **{_module_name(p): p for p in (ROOT / "benchmarks").glob("*.py")}}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(body: list[ast.stmt], module_level: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements in ``body``; with ``module_level``, only those run at import time."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif module_level and isinstance(node, ast.If) and _is_type_checking(node):
            yield from _import_nodes(node.orelse, module_level)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    yield from _import_nodes([child], module_level)
                elif isinstance(child, ast.ExceptHandler):
                    yield from _import_nodes(child.body, module_level)


def _imports(module: str, *, module_level: bool) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` of each import in ``module`` (relative ones resolved)."""
    path = SCANNED[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in _import_nodes(tree.body, module_level):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        out.append((base, [a.name for a in node.names]))
    return out


def _targets(imported: str, names: list[str]) -> set[str]:
    """The project modules an import loads: ``from a.b import c`` is ``a.b.c`` when that is a module."""
    found = {f"{imported}.{n}" for n in names if f"{imported}.{n}" in MODULES}
    if imported in MODULES and (len(found) < len(names) or not names):
        found.add(imported)
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {t for imp, names in _imports(m, module_level=True) for t in _targets(imp, names)} - {m}
            for m in MODULES}


def _layer(module: str) -> int:
    best, layer = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer >= 0, f"{module} is in no layer: add it to LAYERS"
    return layer


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``a -> b -> a``), or ``None``."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if state.get(node) == "open":
            return [*trail[trail.index(node):], node]
        if state.get(node) == "done":
            return None
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if (found := visit(dep, [*trail, node])) is not None:
                return found
        state[node] = "done"
        return None

    return next((c for m in sorted(graph) if (c := visit(m, [])) is not None), None)


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


#: Packages without a cycle even through imports inside functions (one loop, two pairings).
STRICT_PACKAGES = ("domainsr.train",)


def test_no_import_cycle_inside_a_strict_package_even_through_lazy_imports():
    for package in STRICT_PACKAGES:
        inside = [m for m in MODULES if m.startswith(package + ".")]
        graph = {m: {t for imp, names in _imports(m, module_level=False) for t in _targets(imp, names)
                     if t in inside} - {m} for m in inside}
        cycle = _cycle(graph)
        assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_no_private_name_is_imported_from_another_module():
    private = [f"{m}: from {imp} import {n}" for m in sorted(SCANNED) for imp, names in _imports(m, module_level=False)
               if imp.split(".")[0] in ("domainsr", "flows") for n in names if n.startswith("_") and n != "__version__"]
    assert not private, private


def test_dependencies_point_down():
    upward = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m, deps in sorted(_graph().items())
              for t in sorted(deps) if _layer(t) > _layer(m) and (m, t) not in ALLOWED_UPWARD]
    assert not upward, upward


def test_modules_stay_readable_or_say_why():
    long = []
    for module, path in sorted(MODULES.items()):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.strip().startswith("Size:") for line in doc.splitlines()):
            long.append(f"{module}: {len(text.splitlines())} lines")
    assert not long, long


def test_the_checks_see_the_layers():
    """The checks are not vacuous: the application layer exists and is found, and the flows use it."""
    assert "domainsr.app.enhance" in MODULES and "domainsr.pipeline" not in MODULES
    assert _layer("domainsr.app.runs") == 3 and _layer("domainsr.image") == 0 and _layer("flows.enhance") == 4
    assert "domainsr.app" in _graph()["flows.enhance"]
