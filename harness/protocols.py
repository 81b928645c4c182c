"""The protocol registry, and what every protocol of one task shares.

A protocol (linear probe, segmentation, demographics, ...) is a function that takes the task's shared state
(`TaskRun`: the task, its patient-level split, the test set's bootstrap weights, the cached features) and the
encoders, and returns one leaderboard `Section`; it records per-model results in ``tr.results[model][name]``
and per-image predictions in ``tr.predictions[model]``. Adding one is a decorated function in
``harness/probes/`` plus its import line in ``harness/probes/__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from baselines.registry import Encoder
from harness.features import FeatureSet
from harness.leaderboard import Section
from harness.tasks.base import Subset, Task


@dataclass
class TaskRun:
    task: Task
    split: np.ndarray                   # 'train' / 'test' per image
    split_hash: str
    weights: np.ndarray                 # [B, n_test] patient-bootstrap weights of the test images, in row order
    features: dict[str, FeatureSet]     # encoder name -> global features of every image of the task
    summary: dict
    #: extract(task, encoders, dense) -> {name: FeatureSet}: cached extraction with the run's device and batch
    #: settings, for protocols that need other features (e.g. dense grids of the masked images only).
    extract: Callable[[Task, list[Encoder], bool], dict[str, FeatureSet]]
    seed: int = 0
    reference: str = ""
    results: dict[str, dict] = field(default_factory=dict)          # model -> protocol -> JSON-able results
    predictions: dict[str, list[dict]] = field(default_factory=dict)  # model -> rows of per-image predictions
    #: extra files to write beside the leaderboard (relative path -> bytes), e.g. PNG overlays; written
    #: atomically with everything else once every protocol has finished.
    files: dict[str, bytes] = field(default_factory=dict)


ProtocolFn = Callable[[TaskRun, list[Encoder]], Section]


@dataclass(frozen=True)
class Protocol:
    name: str
    run: ProtocolFn
    default: bool
    description: str
    #: rows of a task whose dense features (patch grids, layers) the protocol reads; None = global only
    dense_rows: Callable[[Task], np.ndarray] | None = None


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str, *, default: bool = True, description: str = "",
                      dense_rows: Callable[[Task], np.ndarray] | None = None) -> Callable[[ProtocolFn], ProtocolFn]:
    """`default`: part of a task's protocols when the task spec names none. `dense_rows`: which images the
    protocol needs dense features of, declared up front so one extraction pass can serve every protocol (and a
    SLURM sweep can extract them in its feature jobs)."""

    def deco(fn: ProtocolFn) -> ProtocolFn:
        if name in PROTOCOLS:
            raise ValueError(f"protocol {name!r} registered twice")
        PROTOCOLS[name] = Protocol(name, fn, default, description, dense_rows)
        return fn

    return deco


def dense_view(task: Task, rows: np.ndarray) -> Task:
    """The images `rows` as a task: the task itself when that is every image (so one cache entry holds its global
    and dense features), else a Subset."""
    return task if len(rows) == len(task) else Subset(task, rows, "dense")


def feature_sets(task: Task, protocols: tuple[str, ...]) -> list[tuple[Task, bool]]:
    """(task or subset, dense) pairs whose features the given protocols will read, dense ones first: the global
    features of every image always, plus each protocol's dense rows."""
    dense: dict[bytes, Task] = {}
    for name in protocols:
        fn = PROTOCOLS[name].dense_rows
        rows = np.asarray(fn(task), dtype=int) if fn is not None else np.array([], dtype=int)
        if rows.size:
            dense.setdefault(rows.tobytes(), dense_view(task, rows))
    sets = [(view, True) for view in dense.values()]
    if not any(view is task for view in dense.values()):
        sets.append((task, False))
    return sets
