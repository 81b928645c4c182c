"""The house's one-way layers, read from the code: every import (top-level or inside a function) of every module of
the four packages and bench/, found with `ast`, checked against the layer map below. A new upward import, an import
circle between modules or an import of a command-line module fails here, with the offending modules named.

Layers, bottom to top (a module may import its own layer and the layers below it):

0. floor: `harness.common` (atomic writes, hashing, devices, imaging, errors, options, sources) and
   `harness.registry` (the generic lazy registry). The trainer and the baselines stand on it too; its name says
   harness because the harness is its first user, and this test is what keeps it a floor.
1. trainer core: `trainer.*` except its commands: the model, heads, losses, crops, data, checkpoints, configs.
2. baselines: `baselines.*` (encoders build on the trainer's ViT, converters and checkpoints).
3. harness core: `harness.*` except its commands: tasks, features, protocols, probes, statistics, `evaluate`,
   `outputs`, figures, leaderboard.
4. commands: `harness.run`, `harness.cli`, `harness.ablate`, `trainer.train` (the loop and its CLI: its in-training
   probe is the harness's validation probe), `trainer.monitor`, `slurm.*`.
5. `bench.*`.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "baselines", "harness", "slurm", "bench")
COMMANDS = ("harness.run", "harness.cli", "harness.ablate", "trainer.train", "trainer.monitor", "slurm")
#: (layer, prefixes): the first matching prefix (most specific first) decides a module's layer
LAYERS = (
    (0, ("harness.common", "harness.registry")),
    (4, COMMANDS),
    (1, ("trainer",)),
    (2, ("baselines",)),
    (3, ("harness",)),
    (5, ("bench",)),
)
#: modules nothing may import: their arguments are parsed for a person, not for a caller
CLI_ONLY = ("harness.run", "harness.cli")


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int:
    for layer, prefixes in LAYERS:
        if any(_matches(module, p) for p in prefixes):
            return layer
    raise KeyError(module)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only: never imported at run time)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports at run time (an `from a import b` names `a.b` when that is a module,
    else `a`)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, node, path.name == "__init__.py")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import harness.common.atomic` -> that module
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


MODULES = project_modules()
GRAPH = imports(MODULES)


def test_every_module_has_a_layer():
    assert [m for m in MODULES if not any(_matches(m, p) for _, ps in LAYERS for p in ps)] == []


def test_no_upward_import():
    upward = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                    for a, targets in GRAPH.items() for b in targets if layer_of(b) > layer_of(a))
    assert upward == []


def test_no_module_imports_a_command_line():
    offenders = sorted(f"{a} imports {b}" for a, targets in GRAPH.items() for b in targets
                       if any(_matches(b, c) for c in CLI_ONLY) and not _matches(a, b))
    assert offenders == []


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module: each is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle():
    # a package's __init__ importing its own modules (re-exports) is not a circle between layers' modules
    graph = {a: {b for b in bs if not _matches(a, b) and not _matches(b, a)} for a, bs in GRAPH.items()}
    assert strongly_connected(graph) == []


@pytest.mark.parametrize("graph, circles", [
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}, [["a", "b", "c"]]),
])
def test_circle_finder(graph, circles):
    assert strongly_connected(graph) == circles


def test_the_checks_see_a_violation(tmp_path):
    """The map and the parser can fail: an upward import planted in a copy of the floor is found."""
    floor = ROOT / "harness" / "common" / "atomic.py"
    planted = tmp_path / "harness" / "common" / "atomic.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(floor.read_text() + "\n\ndef _late():\n    from harness.run import main  # noqa: F401\n")
    graph = imports({"harness.common.atomic": planted, "harness.run": ROOT / "harness" / "run.py"})
    assert "harness.run" in graph["harness.common.atomic"]
    assert layer_of("harness.run") > layer_of("harness.common.atomic")
