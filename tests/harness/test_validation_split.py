"""--split validation (issue 19 item 2): choices are made on a split of the training patients, and the test
patients' images are never read for them."""
import csv

import numpy as np
import polars as pl
import pytest

from harness.splits import make_split, validation_split
from harness.tasks.base import TaskContext, build_task
from harness.tasks.demo import DemoTask
from harness.run import main

SPEC = "n_patients=40,size=64,p_effusion=0.4,p_nodule=0.4"


def test_validation_split_divides_only_the_training_patients():
    pid = [f"P{i // 2}" for i in range(200)]
    outer = make_split(pid, 0, 0.3)
    inner = validation_split(pid, outer, 0)
    assert [s == "test" for s in outer] == [s == "test" for s in inner]  # test rows untouched
    by_patient = {}
    for p, s in zip(pid, inner):
        by_patient.setdefault(p, set()).add(s)
    assert all(len(v) == 1 for v in by_patient.values())  # by patient
    n_train = len({p for p, s in zip(pid, outer) if s == "train"})
    n_val = len({p for p, s in zip(pid, inner) if s == "val"})
    assert n_val == round(0.25 * n_train)
    assert validation_split(pid, outer, 0) == inner and validation_split(pid, outer, 1) != inner


@pytest.mark.slow
def test_a_validation_run_never_reads_a_test_image_and_scores_the_validation_patients(tmp_path, monkeypatch):
    read: list[int] = []
    original = DemoTask.load_image
    monkeypatch.setattr(DemoTask, "load_image", lambda self, i: (read.append(int(i)), original(self, i))[1])
    code = main(["--models", "pixels", "--tasks", f"demo:{SPEC}", "--protocols", "linear,knn", "--split",
                 "validation", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "50",
                 "--workers", "0", "--min-positive-patients", "1", "--probe-jobs", "1"])
    assert code == 0
    task = build_task("demo", SPEC, TaskContext(seed=0))
    outer = make_split(task.table.patient_ids, 0, 0.3, task.table.split)
    inner = validation_split(task.table.patient_ids, outer, 0)
    test_rows = {i for i, s in enumerate(outer) if s == "test"}
    assert read and not test_rows & set(read)
    stem = "demo-n_patients_40-p_effusion_0.4-p_nodule_0.4-size_64-validation"
    with open(tmp_path / "splits" / f"{stem}.csv") as f:
        rows = [r for r in csv.reader(line for line in f if not line.startswith("#"))][1:]
    ids = task.table.image_ids
    expected = {ids[i]: ("test" if s == "val" else "train") for i, s in enumerate(inner) if s != "test"}
    assert {r[0]: r[2] for r in rows} == expected
    md = (tmp_path / f"{stem}.md").read_text()
    assert "validation split (--split validation)" in md and "test patients are not read" in md
    assert np.isfinite(float(pl.read_csv(tmp_path / "results" / f"{stem}.csv")["point"][0]))
