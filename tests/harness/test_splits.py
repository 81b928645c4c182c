from pathlib import Path

import numpy as np
import pytest

from harness.splits import LeakageError, check_no_leakage, make_split, pseudonym, split_hash, write_split
from harness.common.hashing import sha256_file
from harness.tasks.base import TaskContext, TaskError, build_task
from harness.tasks.csv_task import CsvTask


def test_split_is_by_patient_and_seeded():
    pids = [f"p{i // 3}" for i in range(90)]  # 30 patients, 3 images each
    a = make_split(pids, seed=1)
    assert a == make_split(pids, seed=1)
    assert a != make_split(pids, seed=2)
    for p in set(pids):
        assert len({s for q, s in zip(pids, a) if q == p}) == 1
    n_test_patients = len({p for p, s in zip(pids, a) if s == "test"})
    assert n_test_patients == 9  # round(0.3 * 30)


def test_split_does_not_depend_on_row_order():
    pids = [f"p{i // 2}" for i in range(40)]
    ids = [f"img{i}" for i in range(40)]
    a = dict(zip(ids, make_split(pids, seed=0)))
    rev = make_split(pids[::-1], seed=0)
    assert a == dict(zip(ids[::-1], rev))


def test_leakage_names_the_patient_and_images():
    with pytest.raises(LeakageError, match=r"patient 'p7'.*'b.png' in train.*'c.png' in test"):
        check_no_leakage(["p1", "p7", "p7"], ["train", "train", "test"], ["a.png", "b.png", "c.png"])


def test_predefined_split_with_leak_is_rejected():
    with pytest.raises(LeakageError, match="p2"):
        make_split(["p1", "p2", "p2", "p3"], seed=0, predefined=["train", "train", "test", ""])


def test_predefined_split_is_kept_and_drags_patients():
    pids = ["a", "a", "b", "c", "d", "e", "f"]
    pre = ["test", "", "", "", "", "", ""]
    s = make_split(pids, seed=0, predefined=pre)
    assert s[0] == s[1] == "test"


def test_split_file_has_hash_and_no_raw_patient_ids(tmp_path):
    pids, ids = ["PATIENT-123", "PATIENT-456"], ["x/1.png", "x/2.png"]
    h = write_split(tmp_path / "s.csv", "t", ids, pids, ["train", "test"])
    text = (tmp_path / "s.csv").read_text()
    assert h == split_hash(ids, ["train", "test"]) and h in text
    assert "PATIENT" not in text and pseudonym("PATIENT-123", "t") in text
    assert split_hash(ids, ["test", "train"]) != h


def test_patient_clusters_join_patients_linked_by_identical_images():
    from harness.splits import patient_clusters

    #           a-b share digest x, b-c share y (a chain), d only shares with itself
    ids = ["a", "b", "b", "c", "d", "d"]
    digests = ["x", "x", "y", "y", "z", "z"]
    groups = patient_clusters(ids, digests)
    assert groups[:4] == ["a\0b\0c"] * 4 and groups[4:] == ["d", "d"]  # an unlinked patient keeps its id
    assert patient_clusters(["a", "b"], ["x", "y"]) == ["a", "b"]


def _csv_with_copy(root: Path) -> Path:
    """Ten patients, one image each, and img/copy.png: a byte copy of img/0.png filed under another patient."""
    from PIL import Image

    (root / "img").mkdir()
    rows = []
    for p in range(10):
        Image.fromarray((np.random.default_rng(p).random((12, 10)) * 255).astype(np.uint8)).save(root / f"img/{p}.png")
        rows.append(f"img/{p}.png,{p % 2},P{p}")
    (root / "img/copy.png").write_bytes((root / "img/0.png").read_bytes())
    rows.append("img/copy.png,0,P-other")
    (root / "labels.csv").write_text("image,label_a,patient_id\n" + "\n".join(rows) + "\n")
    return root / "labels.csv"


def _pairs_apart(task, seeds) -> list[int]:
    """Seeds whose split puts two byte-identical images in different splits."""
    by_digest: dict[str, list[int]] = {}
    for i, d in enumerate(sha256_file(task.root / p) for p in task.table.image_ids):
        by_digest.setdefault(d, []).append(i)
    pairs = [rows for rows in by_digest.values() if len(rows) > 1]
    assert pairs, "the fixture has duplicates"
    apart = []
    for seed in seeds:
        split = make_split(task.table.patient_ids, seed)
        if any(len({split[i] for i in rows}) > 1 for rows in pairs):
            apart.append(seed)
    return apart


def test_duplicate_image_across_patients_stays_in_one_split(tmp_path):
    csv = _csv_with_copy(tmp_path)
    assert _pairs_apart(CsvTask(csv), range(10)), "without merging some seed separates the copies"
    task = build_task("csv", str(csv), TaskContext())
    assert _pairs_apart(task, range(10)) == []
    assert task.patients_merged == 1 and task.summary()["patients"] == 10
    with pytest.raises(TaskError, match=r"images 'img/0.png' and 'img/copy.png' are identical.*--on-duplicate merge"):
        build_task("csv", str(csv), TaskContext(on_duplicate="error"))


@pytest.mark.shared
def test_shared_duplicates_stay_in_one_split(shared_cxr):
    # ieee8023 files 4 byte-identical image pairs under 2 pairs of patient ids; seeds 1, 3, 5, 6, 7, 9 split them.
    csv = shared_cxr / "labels.csv"
    assert _pairs_apart(CsvTask(csv), range(10)) == [1, 3, 5, 6, 7, 9]
    task = build_task("csv", str(csv), TaskContext())
    assert _pairs_apart(task, range(10)) == []
    assert task.patients_merged == 2 and task.summary()["patients"] == 156
