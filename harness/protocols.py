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
from harness.tasks.base import Task


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


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str, *, default: bool = True, description: str = ""
                      ) -> Callable[[ProtocolFn], ProtocolFn]:
    """`default`: part of a task's protocols when the task spec names none."""

    def deco(fn: ProtocolFn) -> ProtocolFn:
        if name in PROTOCOLS:
            raise ValueError(f"protocol {name!r} registered twice")
        PROTOCOLS[name] = Protocol(name, fn, default, description)
        return fn

    return deco
