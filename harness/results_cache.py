"""The results cache: a protocol's per-model work (probe fits, their cross-validation, segmentation heads, the
bootstrap of the model's own metrics) saved on disk, so that a rerun with nothing changed recomputes none of it, and
adding a model to a finished run computes only that model's work and the paired comparisons.

An entry is keyed by the sha256 of everything the work depends on, assembled here (`ProtocolCache`) from what the
evaluation gives it: the protocol, the content digest of the model's features (`feature_key`; for dense grids,
with their feature-cache key), the task's labels, patients and split, the bootstrap resamples, the seed and the
evaluable-label rule (`data_digest`), the protocol's settings, and the protocol's code (`code_digest`): the sources
its module runs (`harness.common.sources`) and the versions of the numerical `LIBRARIES`. Change any of them and
the entry is simply not found. What is stored is a tree of JSON values and numpy arrays with the entry's own key (one
``.npz`` per entry, read with ``allow_pickle=False``: no pickled code ever runs), written atomically, so an
interrupted write never leaves an entry that is read afterwards; an entry that cannot be read back, for any
reason, or that holds another key, is recomputed with a warning.
"""
from __future__ import annotations

import errno
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from shutil import disk_usage
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from harness.common.atomic import atomic_path
from harness.common.hashing import array_digest, sha256_chunks, sha256_text
from harness.common.sources import closure, sources_digest

if TYPE_CHECKING:
    from harness.features import FeatureSet
    from harness.tasks.base import Task

log = logging.getLogger(__name__)

#: Bumped when the entry layout changes.
FORMAT = "2"
#: Libraries whose version can change a fitted number (statsmodels: the age probe's calibration).
LIBRARIES = ("numpy", "scipy", "scikit-learn", "torch", "polars", "statsmodels")


class ResultsCacheFull(OSError):
    """The results cache's disk cannot take an entry; the message names the folder and the space needed."""

    def __str__(self) -> str:
        return str(self.strerror)


@cache
def code_version() -> str:
    """sha256 over all of the harness's own sources and the numerical libraries' versions (what drawn figures are
    stamped with; a results-cache entry is keyed by its protocol's sources only, see `harness.protocols`)."""
    root = Path(__file__).resolve().parent
    chunks = []
    for path in sorted(root.rglob("*.py")):
        chunks += [str(path.relative_to(root)).encode(), path.read_bytes()]
    for lib in LIBRARIES:
        try:
            chunks.append(f"{lib}=={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            chunks.append(f"{lib} absent".encode())
    return sha256_chunks(chunks)


def _encode(obj: Any, arrays: list[np.ndarray]) -> Any:
    """`obj` as JSON, each numpy array replaced by ``{"__array__": i}`` and appended to `arrays`."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "O":
            raise TypeError("an object array cannot be cached (it would need pickle)")
        arrays.append(obj)
        return {"__array__": len(arrays) - 1}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"cached dict keys must be strings, got {list(obj)[:3]}")
        return {k: _encode(v, arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot cache a {type(obj).__name__}")


def _decode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[f"a{obj['__array__']}"]
        return {k: _decode(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    return obj


def dump(tree: Any) -> bytes:
    """A tree of dicts, lists, JSON scalars (NaN included) and numpy arrays as the bytes of one ``.npz``."""
    arrays: list[np.ndarray] = []
    text = json.dumps(_encode(tree, arrays))
    buf = io.BytesIO()
    np.savez(buf, tree=np.array(text), **{f"a{i}": a for i, a in enumerate(arrays)})
    return buf.getvalue()


def load(blob: bytes) -> Any:
    """The tree `dump` wrote (tuples come back as lists)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "tree"}
        return _decode(json.loads(str(z["tree"][()])), arrays)


class ResultsCache:
    """Entries under `root` (``<--cache-dir>/results``). `recompute`: never read an entry (but write them), for
    ``--recompute``. `hits` and `misses` count this process's lookups."""

    def __init__(self, root: Path, recompute: bool = False):
        self.root = Path(root)
        self.recompute = recompute
        self.hits = 0
        self.misses = 0

    def key(self, parts: dict) -> str:
        return sha256_text(json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str))

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> Any | None:
        path = self.path(key)
        if self.recompute or not path.is_file():
            return None
        try:
            entry = load(path.read_bytes())
            if not isinstance(entry, dict) or entry.get("key") != key or "value" not in entry:
                raise ValueError(f"not the entry of key {key[:12]} (a file from elsewhere, or another version)")
        # Any error at all (a disk error, a truncated or zeroed zip, an empty file, bad JSON): recompute, and say so.
        except Exception as e:
            log.warning(f"results cache: {path} unreadable ({type(e).__name__}: {e}); recomputing it")
            return None
        return entry["value"]

    def put(self, key: str, blob: bytes) -> None:
        """Write one entry's bytes (`store` makes them) atomically."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        free = disk_usage(path.parent).free
        if len(blob) > free:
            raise ResultsCacheFull(errno.ENOSPC, f"the results cache {self.root} needs {len(blob) / 1e6:.1f} MB "
                                   f"for an entry and its disk has {free / 1e6:.1f} MB free: free some space or "
                                   "give another --cache-dir")
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(blob)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise ResultsCacheFull(errno.ENOSPC, f"the results cache {self.root} ran out of disk space writing a "
                                   f"{len(blob) / 1e6:.1f} MB entry (nothing half-written is kept): free some "
                                   "space or give another --cache-dir") from None

    def lookup(self, parts: dict) -> Any | None:
        """The stored result of the work `parts` describe, or None (counted as a hit or a miss)."""
        found = self.get(self.key(parts))
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found


def store(cache: ResultsCache | None, parts: dict, tree: Any) -> Any:
    """`tree` stored under `parts` (when there is a cache) and returned as it will be read back (through
    `dump`/`load`), so that the first run and a rerun see identical values and types, cache or no cache."""
    key = cache.key(parts) if cache is not None else ""
    blob = dump({"key": key, "value": tree})  # the key inside: a file copied under another name is not served
    if cache is not None:
        cache.put(key, blob)
    return load(blob)["value"]


# ---------------------------------------------------------------------------------------------- what a key holds

def feature_key(fs: FeatureSet) -> str:
    """What identifies features in a key: the digest of the global features' content (milliseconds; computed once
    per feature set), so a result is reused only for the very features it was computed from, however they were
    made. Dense grids (10 MB an image) are not hashed: they are identified by their feature-cache key (encoder,
    weights and code, extraction code, precision, images) together with the content of the global features written
    by the same pass."""
    if fs.patch is None:
        return fs.global_digest
    dense = fs.key or array_digest(*(np.asarray(g) for g in (fs.patch, *fs.layers)))  # in memory: small, hashed
    return sha256_text(f"{fs.global_digest}:{dense}")


def data_digest(task: Task, split: np.ndarray, weights: np.ndarray, seed: int, min_positive_patients: int) -> str:
    """What every protocol's result on `task` depends on besides the features: the labels, the patients, the split,
    the bootstrap resamples (`weights`), the seed and the evaluable-label rule."""
    t = task.table
    return sha256_text(json.dumps({
        "labels": array_digest(np.asarray(t.labels)), "label_names": list(t.label_names),
        "patients": sha256_text("\0".join(t.patient_ids)), "split": array_digest(np.asarray(split).astype(str)),
        "weights": array_digest(weights), "seed": seed, "min_positive_patients": min_positive_patients},
        sort_keys=True))


def code_digest(module: str) -> str:
    """Digest of the code a protocol's per-model work runs, from the module its function lives in: the sources of
    that module and of the project modules it imports (`harness.common.sources`: rendering, figures, logging and
    the tasks excepted) and the numerical libraries' versions. An edit to a figure or to another protocol leaves
    its entries valid."""
    return sources_digest(closure([module])[0], LIBRARIES)


@dataclass(frozen=True)
class ProtocolCache:
    """The results cache as the protocols of one evaluated task use it: `cache` (None: compute everything), the
    task's `data` digest (`data_digest`) and each protocol's `code` digest (`code_digest`), as the evaluation
    computed them. A protocol gives the rest of the key: its name, the features it read and its settings."""

    cache: ResultsCache | None = None
    data: str = ""
    code: Mapping[str, str] = field(default_factory=dict)

    def parts(self, protocol: str, features: FeatureSet, settings: dict) -> dict:
        """Everything one model's work in `protocol` depends on (the key is their digest, `ResultsCache.key`)."""
        return {"protocol": protocol, "code": self.code[protocol], "features": feature_key(features),
                "data": self.data, "settings": settings}

    def cached(self, protocol: str, features: FeatureSet, settings: dict) -> Any | None:
        """One model's work in `protocol`, computed before by the same code from the same features, data and
        `settings`; None when it was not (or when there is no cache)."""
        if self.cache is None:
            return None
        return self.cache.lookup(self.parts(protocol, features, settings))

    def store(self, protocol: str, features: FeatureSet, settings: dict, tree: Any) -> Any:
        """`tree` (JSON values and arrays) stored as that work's result, and returned as a rerun will read it."""
        return store(self.cache, self.parts(protocol, features, settings) if self.cache is not None else {}, tree)

    def memo(self, protocol: str, features: FeatureSet, settings: dict, compute: Callable[[], Any]) -> Any:
        """`cached(...)`, or `compute()` stored."""
        found = self.cached(protocol, features, settings)
        return found if found is not None else self.store(protocol, features, settings, compute())
