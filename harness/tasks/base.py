"""The task contract and the task registry.

A task knows its images (decoded on demand to float32 in [0, 1], single channel, at their own size), a
multi-label target per image, optional masks, optional sex and age, and a patient id for every image. Adding a
dataset is one file in ``harness/tasks/`` with a factory, plus one line in the table of ``harness/tasks/__init__.py``
(the file is imported only when the task is built):

    # harness/tasks/mydata.py
    def mydata(ctx: TaskContext) -> Task:
        # --data-root mydata=DIR, else <--data-root>/mydata-files (docs/extending.md has a runnable example)
        return MyDataTask(ctx.root_for("mydata", "mydata-files"), skip_bad=ctx.skip_bad)

    # harness/tasks/__init__.py
    TASKS.register("mydata", "harness.tasks.mydata:mydata", description="...")
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from harness.common.hashing import sha256_chunks
from harness.common.imaging import DECODER_VERSION
from harness.registry import Entry, Registry
from harness.splits import patient_clusters


class TaskError(ValueError):
    """Bad input in a task's files: the message names the file, the row or the label, and the fix."""


@dataclass
class TaskTable:
    """One row per image. `labels` is [N, L] int8 in {0, 1}; `age` is float with NaN for unknown; `sex` holds
    'M', 'F' or None; `split` is an optional predefined 'train'/'test' per image (e.g. an official test set);
    `has_mask` says which images carry a mask (all-False when the task has none)."""

    image_ids: list[str]
    patient_ids: list[str]
    label_names: list[str]
    labels: np.ndarray
    sex: list[str | None]
    age: np.ndarray
    split: list[str] | None = None
    has_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if self.labels.shape != (n, len(self.label_names)):
            raise TaskError(f"labels have shape {self.labels.shape}, expected ({n}, {len(self.label_names)})")
        for name, col in (("patient_ids", self.patient_ids), ("sex", self.sex), ("age", self.age)):
            if len(col) != n:
                raise TaskError(f"{name} has {len(col)} rows, expected {n}")
        if len(set(self.image_ids)) != n:
            dup = next(i for i in self.image_ids if self.image_ids.count(i) > 1)
            raise TaskError(f"image {dup!r} is listed more than once")
        if self.has_mask is None:
            self.has_mask = np.zeros(n, dtype=bool)

    def __len__(self) -> int:
        return len(self.image_ids)


class Task(ABC):
    """A labelled set of radiographs. Subclasses set `name`, `table`, and optionally `mask_names`."""

    name: str
    table: TaskTable
    #: Names of the mask channels `load_mask` returns (e.g. ("lungs",)); empty when the task has no masks.
    mask_names: tuple[str, ...] = ()
    #: Files skipped while reading (path, reason), shown in the dataset summary; nothing is dropped silently.
    skipped: list[tuple[str, str]]
    #: Patient ids folded into another patient because they share an identical image (see `merge_duplicates`).
    patients_merged: int = 0
    #: What the leaderboard's Task line adds after the counts, for a set a reader could mistake for another (the
    #: demo phantom says its size is the small first-run default); empty for a dataset.
    header_note: str = ""

    def __len__(self) -> int:
        return len(self.table)

    @abstractmethod
    def load_image(self, i: int) -> np.ndarray:
        """Image `i` as float32 [H, W] in [0, 1]. Raise TaskError naming the file when it cannot be read."""

    def load_mask(self, i: int) -> np.ndarray | None:
        """Masks of image `i` as bool [K, H, W] (K = len(mask_names)) at the image's size, or None."""
        return None

    @abstractmethod
    def content_digest(self) -> str:
        """sha256 over the ordered image ids and the bytes that produce the images; the feature-cache key."""

    def file_digests(self) -> list[str] | None:
        """sha256 of each image's file, in row order; None for a task whose images are not files (nothing to
        compare)."""
        return None

    def where(self, i: int) -> str:
        """How image `i` is named in messages (a path or a CSV line: never a patient id)."""
        return self.table.image_ids[i]

    def summary(self) -> dict:
        """Counts for the dataset summary printed before evaluation and written into the results."""
        t = self.table
        sex = np.array([s or "" for s in t.sex])
        return {
            "task": self.name,
            "images": len(t),
            "patients": len(set(t.patient_ids)),
            "positives": {n: int(t.labels[:, j].sum()) for j, n in enumerate(t.label_names)},
            "sex_known": int((sex != "").sum()),
            "sex_counts": {s: int((sex == s).sum()) for s in ("M", "F")},
            "age_known": int(np.isfinite(t.age).sum()),
            "masks": int(t.has_mask.sum()),
            "patients_merged": self.patients_merged,
            "skipped": [{"file": f, "reason": r} for f, r in getattr(self, "skipped", [])],
        }


def combine_digests(image_ids: list[str], file_digests: list[str]) -> str:
    """sha256 over the decoder version and the ordered (image id, file sha256): the image list *and* the bytes,
    so an edited file changes it; and the decoder version, as the same bytes decode differently when it
    changes."""
    return sha256_chunks([DECODER_VERSION.encode() + b"\0"]
                         + [image_id.encode() + b"\0" + digest.encode() + b"\1"
                            for image_id, digest in zip(image_ids, file_digests, strict=True)])


def merge_duplicates(task: Task, on_duplicate: str) -> None:
    """Byte-identical images filed under different patient ids (a dataset listing one radiograph twice) put the
    same picture in train and test unless their patients stay together. With ``merge`` such patients become one
    patient (one split, one bootstrap unit) and `task.patients_merged` counts the ids folded away; with ``error``
    the first such pair is a TaskError."""
    digests = task.file_digests()
    if digests is None:
        return
    t = task.table
    if on_duplicate == "error":
        first: dict[str, int] = {}
        for i, d in enumerate(digests):
            j = first.setdefault(d, i)
            if t.patient_ids[j] != t.patient_ids[i]:
                raise TaskError(f"task {task.name}: images {task.where(j)!r} and {task.where(i)!r} are identical "
                                "files under two different patient ids; give them one patient id, remove one "
                                "copy, or run with --on-duplicate merge (the default: their patients are merged)")
    groups = patient_clusters(t.patient_ids, digests)
    task.patients_merged = len(set(t.patient_ids)) - len(set(groups))
    t.patient_ids = groups


@dataclass(frozen=True)
class TaskContext:
    """What a task factory gets from the CLI."""

    arg: str | None = None
    data_root: Path | None = None
    data_roots: dict[str, Path] = field(default_factory=dict)
    skip_bad: bool = False
    seed: int = 0
    on_duplicate: str = "merge"

    def root_for(self, name: str, default_folder: str) -> Path:
        """``--data-root name=PATH`` wins; else ``<--data-root>/<default_folder>``."""
        if name in self.data_roots:
            return self.data_roots[name]
        if self.data_root is None:
            raise TaskError(f"task {name!r} needs --data-root DIR (holding {default_folder}/) "
                            f"or --data-root {name}=PATH")
        return self.data_root / default_folder


@dataclass(frozen=True)
class TaskEntry(Entry):
    """A task's table line; `takes_arg` makes it spelled ``name:ARG`` (``csv:PATH``)."""

    takes_arg: bool = False


#: Filled by the table in ``harness/tasks/__init__.py``, which Python runs before this module is usable from outside.
TASKS: Registry[TaskEntry] = Registry("task", TaskEntry)


def build_task(name: str, arg: str | None, ctx: TaskContext) -> Task:
    if name not in TASKS:
        raise TaskError(TASKS.unknown(name))
    entry = TASKS.get(name)
    if entry.takes_arg and not arg:
        raise TaskError(f"task {name!r} needs an argument: {name}:ARG")
    task = entry.load()(replace(ctx, arg=arg))
    if not task.table.image_ids:  # every image skipped (--skip-bad): nothing to split, extract or score
        skipped = getattr(task, "skipped", [])
        why = (f": all {len(skipped)} it lists were skipped as missing or unreadable (--skip-bad), e.g. "
               f"{skipped[0][0]}: {skipped[0][1]}; check the paths (is --data-root, or the labels file, the right "
               "one?)" if skipped else "")
        raise TaskError(f"task {name!r} has no image to evaluate{why}")
    merge_duplicates(task, ctx.on_duplicate)
    return task


class Subset(Task):
    """Rows `indices` of another task, as a task of its own (e.g. the images that have masks). Its digest is
    derived from the parent's, so its features are cached separately and correctly."""

    def __init__(self, parent: Task, indices: np.ndarray, suffix: str):
        self.parent = parent
        self.indices = np.asarray(indices, dtype=int)
        self.name = f"{parent.name}/{suffix}"
        self.mask_names = parent.mask_names
        self.skipped = []
        t, idx = parent.table, self.indices
        self.table = TaskTable(
            image_ids=[t.image_ids[i] for i in idx],
            patient_ids=[t.patient_ids[i] for i in idx],
            label_names=list(t.label_names),
            labels=t.labels[idx],
            sex=[t.sex[i] for i in idx],
            age=t.age[idx],
            split=None if t.split is None else [t.split[i] for i in idx],
            has_mask=t.has_mask[idx],
        )

    def load_image(self, i: int) -> np.ndarray:
        return self.parent.load_image(int(self.indices[i]))

    def load_mask(self, i: int) -> np.ndarray | None:
        return self.parent.load_mask(int(self.indices[i]))

    def content_digest(self) -> str:
        return sha256_chunks([self.parent.content_digest().encode(), self.indices.astype(np.int64).tobytes()])
