"""Imports point one way: core -> models -> data -> training -> federated -> apps.

The graph is read from the source (``ast``), with imports inside functions counted as edges (a
deferred import is still a dependency) and ``if TYPE_CHECKING:`` blocks left out (annotations
only). It must have no cycle, no edge from a lower layer to a higher one, and no import inside a
function of a fedsynth module that needs only the standard library (deferring it gains nothing).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedsynth"

#: layer of each module, by longest matching prefix (docs/CONTRIBUTING.md draws the same picture)
LAYERS: dict[str, int] = {
    # 0 core: configuration, the family registry and its light specs, errors, files, processes, PKI
    "fedsynth": 0, "fedsynth.errors": 0, "fedsynth.config_base": 0, "fedsynth.config": 0, "fedsynth.geometry": 0,
    "fedsynth.families": 0, "fedsynth.io": 0, "fedsynth.resources": 0, "fedsynth.processes": 0, "fedsynth.pki": 0,
    "fedsynth.commands": 0, "fedsynth.progress": 0, "fedsynth.lazy": 0, "fedsynth.templates": 0, "fedsynth.plans": 0,
    # 1 networks, their training recipes and their checkpoint files (torch, MONAI)
    "fedsynth.models": 1, "fedsynth.recipes": 1, "fedsynth.checkpoint": 1,
    # 2 reading images
    "fedsynth.data": 2,
    # 3 training, generation, privacy, evaluation
    "fedsynth.extensions": 3, "fedsynth.engine": 3, "fedsynth.generation": 3,
    "fedsynth.local": 3, "fedsynth.preflight": 3, "fedsynth.privacy": 3, "fedsynth.metrics": 3,
    # 4 federations (Flower, OpenFL) over the engine
    "fedsynth.federated": 4,
    # 5 what a user runs: the CLI and its command modules, the demo, the MLCube entry point
    "fedsynth.cli": 5, "fedsynth.__main__": 5, "fedsynth.demo": 5, "fedsynth.mlcube_entrypoint": 5,
    "fedsynth.metrics.cli": 5, "fedsynth.metrics.audit_cli": 5, "fedsynth.federated.cli": 5, "fedsynth.federated.flower.cli": 5,
    "fedsynth.federated.openfl.cli": 5, "fedsynth.federated.templates": 5, "fedsynth.ledger_cli": 5,
}
NAMES = ["core", "models", "data", "training", "federated", "apps"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def layer(module: str) -> int:
    name = module
    while name not in LAYERS:
        assert "." in name, f"{module} has no layer: add it to LAYERS"
        name = name.rsplit(".", 1)[0]
    return LAYERS[name]


def _target(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The fedsynth modules an import statement loads (the deepest module each name resolves to)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join([*pkg, base] if base else pkg)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        if name.split(".")[0] != "fedsynth":
            continue
        while name not in MODULES:
            name = name.rsplit(".", 1)[0]
        out.append(name)
    return out


def _imports(module: str) -> tuple[set[str], list[tuple[str, int]], set[str]]:
    """(fedsynth modules imported at module level, (module, line) imported inside functions, top-level
    third-party/stdlib roots imported at module level)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    top: set[str] = set()
    inner: list[tuple[str, int]] = []
    roots: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in _target(module, child):
                    if in_function:
                        inner.append((target, child.lineno))
                    else:
                        top.add(target)
                if not in_function and not (isinstance(child, ast.ImportFrom) and child.level):
                    heads = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                    roots.update(h.split(".")[0] for h in heads)
            else:
                visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    top.discard(module)
    return top, inner, roots


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    edges = {m: top | {t for t, _ in inner if t != m} for m, (top, inner, _) in GRAPH.items()}
    assert _cycles(edges) == []


def test_imports_point_from_higher_layers_to_lower_ones() -> None:
    upward = []
    for module, (top, inner, _) in GRAPH.items():
        for target, where in [(t, "module level") for t in top] + [(t, f"line {n}") for t, n in inner]:
            if layer(target) > layer(module):
                upward.append(f"{module} ({NAMES[layer(module)]}) imports {target} ({NAMES[layer(target)]}) at {where}")
    assert upward == []


def test_no_function_level_import_of_a_stdlib_only_module() -> None:
    """A fedsynth module that needs only the standard library is cheap: import it at the top."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    light: set[str] = set()
    changed = True
    while changed:  # a module is stdlib-only when its own imports are stdlib or stdlib-only fedsynth modules
        changed = False
        for module, (top, _, roots) in GRAPH.items():
            if module not in light and roots - {"fedsynth"} <= stdlib and top <= light:
                light.add(module)
                changed = True
    assert {"fedsynth.errors", "fedsynth.commands"} <= light  # the probe sees what it should
    deferred = [f"{m}:{n} imports {t}" for m, (_, inner, _) in GRAPH.items() for t, n in inner if t in light]
    assert deferred == []


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer(module)
