"""What every protocol of one task shares, and what a protocol returns.

A protocol (linear probe, segmentation, demographics, ...) is a function registered in ``harness/probes/__init__.py``
that takes the task's shared state (`TaskRun`: the task, its patient-level split, the test set's bootstrap weights,
the features extracted for it, the results cache), the encoders and the results of the protocols it runs after,
and returns a `ProtocolResult`: the leaderboard section, per-model records (``results/<out_name>/<model>.json``),
per-image prediction rows (the linear probe's, which demographics scores per subgroup), the files it publishes
(parquet, PNG) under ``results/<out_name>/`` or ``<out_name>_<protocol>/``, or as one figure beside the
leaderboard (``<out_name>_label_efficiency.png``), and the rows of the tidy results table (`harness.tidy`).
`harness.evaluate` runs the protocols and returns their results; nothing is written until every protocol of the
task has finished, by `harness.outputs`, and a re-run of one protocol replaces exactly that protocol's files.
"""
from __future__ import annotations

import copy
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from joblib import cpu_count

from harness import stats
from harness.common.paths import safe_name
from harness.leaderboard import Section
from harness.probes import PROTOCOLS
from harness.registry import resolve
from harness.results_cache import ProtocolCache
from harness.splits import pseudonym
from harness.tasks.base import Task
from harness.tidy import TidyRow

if TYPE_CHECKING:
    from harness.features import FeatureStore

#: Default of --min-positive-patients: a label enters macro means only with this many positive (and negative)
#: test patients; below it a percentile interval is dominated by whether its few patients are drawn.
MIN_POSITIVE_PATIENTS = 5


def usable_cores() -> int:
    """CPUs this process may use: its affinity mask and cgroup quota, not the machine's count."""
    return cpu_count()


@dataclass(frozen=True)
class ProbeOptions:
    """Settings of the protocols that take flags (``raddino-bench eval --knn-k`` etc.). Each protocol records the
    ones it used in its section notes and results, not in the shared header: a one-protocol run may change them and
    is still merged with the sections computed before."""
    knn_k: int = 20                      # neighbours of the k-NN probe (DINO's default)
    knn_temperature: float = 0.07        # vote weight exp(cos / T) of the k-NN probe (DINO's default)
    #: fractions of the training patients the label-efficiency protocol refits the linear probe on
    label_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    label_draws: int = 3                 # seeded patient draws per fraction below 1
    #: processes fitting the linear probes (every protocol that fits one); no number depends on it, so unlike the
    #: settings above it is recorded nowhere
    n_jobs: int = field(default_factory=usable_cores)


@dataclass(frozen=True)
class TaskRun:
    """The state every protocol of one task reads and none changes."""

    task: Task
    split: np.ndarray                   # 'train' / 'test' per image
    weights: np.ndarray                 # [B, n_test] patient-bootstrap weights of the test images, in row order
    #: model -> global features of every image of the task; ``features.dense(rows)``: the dense grids of the rows
    #: a protocol declared (`harness.features.FeatureStore`)
    features: FeatureStore
    seed: int = 0
    reference: str = ""
    min_positive_patients: int = MIN_POSITIVE_PATIENTS
    #: stem of the task's output files (leaderboard, results folder, extra files): the task name plus the options
    #: that change its numbers; defaults to the task name
    out_name: str = ""
    options: ProbeOptions = field(default_factory=ProbeOptions)
    #: per-model protocol work saved on disk (`harness.results_cache`); the default caches nothing
    results: ProtocolCache = field(default_factory=ProtocolCache)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_name", self.out_name or safe_name(self.task.name))

    def patient_keys(self, rows: np.ndarray) -> list[str]:
        """Pseudonyms of the patients of `rows`: what outputs carry and what the bootstrap draws over."""
        return [pseudonym(self.task.table.patient_ids[r], self.task.name) for r in rows]


@dataclass(frozen=True)
class ProtocolResult:
    """Everything one protocol computed on one task, read-only once made (a protocol that runs after this one reads
    it, it cannot change it). `records`: model -> what ``results/<task>/<model>.json`` holds under
    ``protocols.<name>``; `predictions`: model -> per-image rows (image_id, patient_key, label, target, score) for
    protocols that score the task's labels per image; `files`: relative path (under the output folder) -> bytes;
    `tidy`: the protocol's rows of the tidy results table."""

    name: str
    section: Section
    records: Mapping[str, dict] = field(default_factory=dict)
    predictions: Mapping[str, tuple[dict, ...]] = field(default_factory=dict)
    files: Mapping[str, bytes] = field(default_factory=dict)
    tidy: tuple[TidyRow, ...] = ()

    def __post_init__(self) -> None:
        for name in ("records", "predictions", "files"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        object.__setattr__(self, "tidy", tuple(self.tidy))

    def to_section(self) -> Section:
        """The leaderboard section (a copy: rendering or merging it leaves the result as computed)."""
        return copy.deepcopy(self.section)

    def to_record(self, model: str) -> dict | None:
        """What the model's results file holds for this protocol (a copy), or None when it recorded nothing."""
        return copy.deepcopy(self.records.get(model))


def parquet_bytes(rows: list[dict]) -> bytes:
    """Rows of per-image values as a parquet file's bytes, for `ProtocolResult.files`."""
    buf = io.BytesIO()
    pl.DataFrame(rows).write_parquet(buf)
    return buf.getvalue()


def label_status(task: Task, split: np.ndarray, min_patients: int) -> tuple[np.ndarray, list[str]]:
    """Which of the task's labels are evaluable (bool [L]) and, for the others, why (text with counts; "" when
    evaluable). Evaluable: both classes among the training images (a probe can be fitted) and at least
    `min_patients` test patients with a positive image and as many with a negative one. It depends only on the
    labels and the split, so it is the same for every model and every protocol, and the bootstrap is conditioned
    on exactly these labels."""
    t = task.table
    labels = np.asarray(t.labels).astype(int)
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    pos, neg = stats.patients_per_class(labels[test], [t.patient_ids[i] for i in test])
    ok, reasons = np.zeros(len(t.label_names), dtype=bool), []
    for j in range(len(t.label_names)):
        y_train = labels[train, j]
        if y_train.min(initial=1) == y_train.max(initial=0):
            reasons.append("only one class in the training split")
        elif min(pos[j], neg[j]) < min_patients:
            reasons.append(f"{pos[j]} positive and {neg[j]} negative test patients, fewer than "
                           f"--min-positive-patients {min_patients}")
        else:
            ok[j] = True
            reasons.append("")
    return ok, reasons


def dense_rows(task: Task, protocols: tuple[str, ...]) -> list[np.ndarray]:
    """The rows of `task` whose dense features (patch grids, layers) each of `protocols` declared it reads, in
    protocol order (empty for a protocol that reads global features only)."""
    out = []
    for name in protocols:
        target = PROTOCOLS.get(name).dense_rows
        out.append(np.asarray(resolve(target)(task), dtype=int) if target else np.array([], dtype=int))
    return out
