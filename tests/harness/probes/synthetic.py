"""A task made of a TaskTable only, and a named stand-in encoder, for protocols that read features, not images."""
from __future__ import annotations

import numpy as np

from harness import stats
from harness.features import FeatureSet, FeatureStore
from harness.protocols import ProbeOptions, TaskRun
from harness.tasks.base import Task, TaskTable


class NamedEncoder:
    """What a protocol reads of an encoder when its features are given: the name."""

    def __init__(self, name: str) -> None:
        self.name = name


class TableTask(Task):
    def __init__(self, table: TaskTable) -> None:
        self.name, self.table, self.skipped = "synthetic", table, []

    def load_image(self, i: int) -> np.ndarray:
        raise AssertionError("a protocol on given global features must not read images")

    def content_digest(self) -> str:
        return "synthetic"


def synthetic_run(pid: np.ndarray, label_names: list[str], labels: np.ndarray, features: dict[str, np.ndarray],
                  reference: str, options: ProbeOptions, n_resamples: int, seed: int
                  ) -> tuple[TaskRun, list[NamedEncoder]]:
    """A TaskRun over given global features: image i belongs to patient pid[i]; patients with pid % 3 == 0 are the
    test split, resampled `n_resamples` times with `seed`."""
    n = len(pid)
    table = TaskTable([f"img{i}" for i in range(n)], [f"P{p}" for p in pid], label_names, labels, [None] * n,
                      np.full(n, np.nan))
    split = np.where(pid % 3 == 0, "test", "train")
    test = np.flatnonzero(split == "test")
    weights = stats.bootstrap_weights([table.patient_ids[i] for i in test], n_resamples, seed)
    feats = {name: FeatureSet(x.astype(np.float32)) for name, x in features.items()}
    tr = TaskRun(TableTask(table), split, weights, FeatureStore(feats), seed=0, reference=reference, options=options)
    return tr, [NamedEncoder(name) for name in features]
