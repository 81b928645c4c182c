"""Digests of the source code that computes a cached value, for the cache keys.

A cached value (an encoder's features, a protocol's per-model fits) is keyed by the code that computed it: the
modules it starts from and every module of this project they import, anywhere in their source (top level or
inside a function; not under ``if TYPE_CHECKING:``, which runs nothing), followed transitively. Modules that compute no cached value are neither
digested nor followed (`NOT_COMPUTING`, `NOT_COMPUTING_PACKAGES`: rendering, logging, file names, the registration tables, the tasks, whose
data enter every key by content), so an edit to a figure, a leaderboard layout or a log line keeps every entry.
Third-party code enters by version: the caller names the libraries whose version can change its numbers.

Sources are read once per process: the code of a running harness does not change under it.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import logging
import sys
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

from harness.common.hashing import sha256_file, sha256_text

log = logging.getLogger(__name__)

#: Top-level packages of this project: their modules enter a digest by their source.
PROJECT = ("baselines", "harness", "trainer")
#: Modules that compute no cached value: what renders, logs, names or writes the results; the registration tables
#: (harness.probes is the protocol table, the protocols under it are not excluded); the hashing that makes the keys
#: themselves; the split, whose output enters every key by content.
NOT_COMPUTING = ("baselines.registry", "harness.common.atomic", "harness.common.hashing", "harness.common.paths",
                 "harness.common.sources", "harness.leaderboard", "harness.log", "harness.probes", "harness.registry",
                 "harness.splits", "harness.tidy")
#: Packages none of whose modules computes a cached value: the figures, and the tasks, whose data (images, labels,
#: masks, sex, age, patients) enter every key by content.
NOT_COMPUTING_PACKAGES = ("harness.figures", "harness.tasks")


def _excluded(module: str) -> bool:
    return module in NOT_COMPUTING or any(module == p or module.startswith(p + ".") for p in NOT_COMPUTING_PACKAGES)


def source_file(module: str) -> Path | None:
    """The source file of `module` (a package: its ``__init__.py``), found without importing it; None for code
    with no file (``python -c``, a notebook's ``__main__``)."""
    path = getattr(sys.modules.get(module), "__file__", None)
    if path is None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):  # ValueError: a module whose __spec__ is None (__main__ of python -c)
            spec = None
        path = spec.origin if spec is not None else None
    return Path(path) if path and path.endswith(".py") and Path(path).is_file() else None


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under `node` except the bodies of ``if TYPE_CHECKING:`` (type-only imports run no code)."""
    for child in ast.iter_child_nodes(node):
        yield child
        if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for other in child.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield from _runtime_nodes(child)


@cache
def imports(module: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(project modules, other top-level packages) that `module`'s source imports anywhere."""
    path = source_file(module)
    if path is None:
        return (), ()
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:  # `from harness import stats` imports the module harness.stats
                candidate = f"{base}.{alias.name}"
                found.add(candidate if base.partition(".")[0] in PROJECT and _is_module(candidate) else base)
    ours = tuple(sorted(m for m in found if m.partition(".")[0] in PROJECT))
    others = tuple(sorted({m.partition(".")[0] for m in found} - set(PROJECT) - {"__future__"}))
    return ours, others


def closure(roots: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(project modules, other top-level packages) reachable from `roots` through imports, skipping (and not
    following) the `NOT_COMPUTING` modules; the roots themselves are always included."""
    roots = list(dict.fromkeys(roots))
    seen, others, todo = set(roots), set(), list(roots)
    while todo:
        ours, theirs = imports(todo.pop())
        others.update(theirs)
        for m in ours:
            if m not in seen and not _excluded(m):
                seen.add(m)
                todo.append(m)
    return tuple(sorted(seen)), tuple(sorted(others))


@cache
def source_digest(item: str) -> str:
    """sha256 of a module's source file, or for ``module:qualname`` of that one object's source. Code with no
    source to read (defined in ``python -c`` or a notebook) is digested by its name only, with a warning: an edit
    to it cannot change a key."""
    module, _, qualname = item.partition(":")
    path = source_file(module)
    if path is not None and not qualname:
        return sha256_file(path)
    if path is not None:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return sha256_text(inspect.getsource(obj))
    log.warning(f"the source of {module} cannot be read: cached features and results computed by its code are not "
                "recomputed when it changes (put that code in a .py file to have them keyed by it)")
    return sha256_text(f"no source: {item}")


@cache
def library_version(package: str) -> str:
    """The installed version of the distribution providing top-level package `package` (``open_clip`` ->
    open_clip_torch's), or "absent"."""
    names = metadata.packages_distributions().get(package, [package])
    try:
        return metadata.version(names[0])
    except metadata.PackageNotFoundError:
        return "absent"


def sources_digest(items: Iterable[str], libraries: Iterable[str] = ()) -> str:
    """sha256 over the sources of `items` (modules, or ``module:qualname`` objects) and the versions of
    `libraries` (top-level package names), whatever their order or repetitions."""
    return sha256_text(json.dumps({"sources": {i: source_digest(i) for i in sorted(set(items))},
                                   "libraries": {p: library_version(p) for p in sorted(set(libraries))}},
                                  sort_keys=True))
