"""Patient-level train/test splits: seeded, checked for leakage, written out with a hash.

A leaderboard must say exactly what it was computed on, so the split file lists every image with its split and
its hash is stored in every results file. Patient ids are written only as pseudonyms (see `pseudonym`).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from harness.common.atomic import atomic_write_text
from harness.common.hashing import sha256_chunks, sha256_text


class LeakageError(ValueError):
    """A patient has images in more than one split."""


def pseudonym(patient_id: str, task: str) -> str:
    """A stable, non-identifying key for a patient: used in split files and per-image predictions instead of
    the dataset's own id. (Deterministic so committed results stay comparable; it is a pseudonym, not
    anonymisation: small id spaces can be enumerated.)"""
    return sha256_text(f"raddino-bench|{task}|{patient_id}")[:12]


def patient_clusters(patient_ids: list[str], image_digests: list[str]) -> list[str]:
    """Per image, the id of its patient cluster: patients linked by byte-identical images (directly or through a
    chain) form one cluster. A patient without such a link keeps its own id (and its pseudonym); a merged
    cluster is named by its member ids, sorted and joined with NUL, which no CSV or DICOM id contains."""
    parent = {p: p for p in patient_ids}

    def root(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    owner: dict[str, str] = {}
    for p, d in zip(patient_ids, image_digests, strict=True):
        a, b = root(owner.setdefault(d, p)), root(p)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[str, list[str]] = {}
    for p in parent:
        members.setdefault(root(p), []).append(p)
    name = {r: "\0".join(sorted(m)) for r, m in members.items()}
    return [name[root(p)] for p in patient_ids]


def check_no_leakage(patient_ids: list[str], split: list[str], image_ids: list[str] | None = None) -> None:
    """Raise LeakageError naming the first patient found in two splits (and two of its images)."""
    seen: dict[str, tuple[str, int]] = {}
    for i, (p, s) in enumerate(zip(patient_ids, split, strict=True)):
        if p in seen and seen[p][0] != s:
            j = seen[p][1]
            where = ""
            if image_ids is not None:
                where = f" (image {image_ids[j]!r} in {seen[p][0]}, image {image_ids[i]!r} in {s})"
            raise LeakageError(f"patient {p!r} is in both the {seen[p][0]} and the {s} split{where}; "
                               "splits must be by patient: fix the split column or let the harness split")
        seen.setdefault(p, (s, i))


def make_split(patient_ids: list[str], seed: int, test_fraction: float = 0.3,
               predefined: list[str] | None = None) -> list[str]:
    """'train'/'test' per image. Rows with a predefined split keep it; every other patient goes to test with
    probability ~test_fraction, by a seeded permutation of the sorted patient ids (so the split does not depend
    on row order). A patient with a predefined split drags its other images along with it."""
    n = len(patient_ids)
    fixed: dict[str, str] = {}
    if predefined is not None:
        check_no_leakage([p for p, s in zip(patient_ids, predefined) if s],
                         [s for s in predefined if s])
        fixed = {p: s for p, s in zip(patient_ids, predefined) if s}
    free = sorted(set(patient_ids) - set(fixed))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(free))
    n_test = int(round(test_fraction * len(free)))
    assignment = dict(fixed)
    for rank, k in enumerate(order):
        assignment[free[k]] = "test" if rank < n_test else "train"
    split = [assignment[p] for p in patient_ids]
    check_no_leakage(patient_ids, split)
    if n and ("train" not in split or "test" not in split):
        raise ValueError(f"the split has an empty {'train' if 'train' not in split else 'test'} set "
                         f"({len(set(patient_ids))} patients); add data or change --test-fraction")
    return split


def count_identical_files(paths: list[Path], digests: frozenset[str]) -> int:
    """How many of the files `paths` are byte-identical to one of `digests` (sha256 of image files): the check that
    pretraining images are not a task's test images. A manifest can name copies or another folder of the same
    data, so contents are compared, not paths. Patients cannot be compared: a pretraining manifest has none."""
    if not digests:
        return 0
    from harness.common.hashing import sha256_file

    return sum(sha256_file(p) in digests for p in paths)


def test_split_digests(task, seed: int, test_fraction: float = 0.3) -> frozenset[str]:
    """sha256 of the image files of `task`'s test split at `seed` (harness.run's split); empty for a task whose
    images are not files (the synthetic demo)."""
    digests = task.file_digests()
    if digests is None:
        return frozenset()
    split = make_split(task.table.patient_ids, seed, test_fraction, task.table.split)
    return frozenset(d for d, s in zip(digests, split) if s == "test")


#: Share of the training patients held out as the validation split (recipe, checkpoint and pooling selection).
VALIDATION_FRACTION = 0.25
#: Added to the split seed so the inner permutation is not the outer one restricted to the training patients.
_VALIDATION_SEED_OFFSET = 7919


def validation_split(patient_ids: list[str], split: list[str], seed: int,
                     fraction: float = VALIDATION_FRACTION) -> list[str]:
    """'train' / 'val' / 'test' per image: the training patients of `split` divided again by patient, seeded.

    Everything that chooses (the in-training probe, a sweep, a best checkpoint, a pooling) fits on the inner
    'train' and scores on 'val'; 'test' rows stay 'test' and are never read for a choice. The inner split is
    `make_split` on the training rows alone with seed ``seed + 7919``, so it does not depend on the test rows."""
    rows = [i for i, s in enumerate(split) if s == "train"]
    inner = make_split([patient_ids[i] for i in rows], seed + _VALIDATION_SEED_OFFSET, fraction)
    out = list(split)
    for i, s in zip(rows, inner, strict=True):
        out[i] = "val" if s == "test" else "train"
    return out


def split_hash(image_ids: list[str], split: list[str]) -> str:
    return sha256_chunks(f"{i}\t{s}\n".encode() for i, s in sorted(zip(image_ids, split)))[:16]


def write_split(path: Path, task: str, image_ids: list[str], patient_ids: list[str], split: list[str]) -> str:
    """Write the split as CSV (image_id, patient_key, split) with its hash in a header comment; returns the hash."""
    digest = split_hash(image_ids, split)
    buf = io.StringIO()
    buf.write(f"# split_hash={digest}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "patient_key", "split"])
    writer.writerows([i, pseudonym(p, task), s] for i, p, s in zip(image_ids, patient_ids, split))
    atomic_write_text(path, buf.getvalue())
    return digest
