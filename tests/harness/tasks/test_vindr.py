"""VinDr-CXR reader on a generated look-alike in the PhysioNet layout."""
from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from harness.tasks.base import TaskContext, TaskError, build_task
from harness.tasks.vindr import DEFAULT_LABELS, VinDrTask
from tests.harness.tasks.dicom_fixtures import VINDR_LABELS, make_vindr, phantom, write_dicom


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_vindr(tmp_path_factory.mktemp("data") / "vindr-cxr")


@pytest.fixture
def copy(fx, tmp_path):
    """A private copy of the dataset for tests that break it."""
    shutil.copytree(fx.root, tmp_path / "vindr-cxr")
    return tmp_path / "vindr-cxr"


def expected_labels(fx, rule) -> dict[str, list[int]]:
    out = {}
    for i in fx.train_ids + fx.test_ids:
        readers = len(next(iter(fx.votes[i].values())))
        agg = {n: int(rule(sum(fx.votes[i].get(n, (0,))), readers)) for n in VINDR_LABELS}
        agg["No finding"] = int(not any(v for n, v in agg.items() if n != "No finding"))  # derived, not voted
        out[i] = [agg[n] for n in DEFAULT_LABELS]
    return out


def test_official_split_ids_and_demographics(fx):
    t = VinDrTask(fx.root)
    assert t.table.image_ids == fx.train_ids + fx.test_ids
    assert t.table.split == ["train"] * 3 + ["test"] * 2
    assert t.table.patient_ids == t.table.image_ids  # VinDr has no patient ids
    assert t.table.sex == [fx.sex[i] for i in t.table.image_ids]
    for got, i in zip(t.table.age, t.table.image_ids):  # '155Y' and blank -> NaN, '007M' -> 7/12
        assert (math.isnan(got) and math.isnan(fx.age[i])) or got == pytest.approx(fx.age[i])
    assert t.skipped == [] and t.summary()["reader_aggregation"] == "majority"


@pytest.mark.parametrize("agg, rule", [("majority", lambda v, n: 2 * v > n), ("any", lambda v, n: v >= 1),
                                       ("all", lambda v, n: v == n)])
def test_reader_aggregation(fx, agg, rule):
    t = VinDrTask(fx.root, aggregation=agg)
    want = expected_labels(fx, rule)
    for row, i in zip(t.table.labels, t.table.image_ids):
        assert row.tolist() == want[i], (agg, i)


def test_disagreement_cases_spelled_out(fx):
    t1, t2, t3 = fx.train_ids
    col = {n: j for j, n in enumerate(DEFAULT_LABELS)}
    maj, any_ = VinDrTask(fx.root).table.labels, VinDrTask(fx.root, aggregation="any").table.labels
    assert maj[0, col["Cardiomegaly"]] == 1 and maj[0, col["Pneumonia"]] == 0  # 2 of 3 vs 1 of 3
    assert any_[0, col["Pneumonia"]] == 1
    assert maj[2, col["Lung Opacity"]] == 1 and maj[2, col["No finding"]] == 0


@pytest.mark.parametrize("agg", ["majority", "any", "all"])
def test_no_finding_is_consistent_with_the_findings(fx, agg):
    # t1's readers: Cardiomegaly (1, 1, 0), Pneumonia (1, 0, 0), No finding (0, 0, 1). Aggregating "No finding"'s
    # own votes gave t1 findings *and* "No finding" under any, and no finding at all but not "No finding" under all.
    t = VinDrTask(fx.root, aggregation=agg, labels=tuple(VINDR_LABELS))
    labels = t.table.labels
    nf = VINDR_LABELS.index("No finding")
    np.testing.assert_array_equal(labels[:, nf], 1 - np.delete(labels, nf, axis=1).max(axis=1))
    t1 = t.table.image_ids.index(fx.train_ids[0])
    assert labels[t1, nf] == {"majority": 0, "any": 0, "all": 1}[agg]


def test_test_file_spelling_is_normalised(fx):
    t = VinDrTask(fx.root)
    s1 = t.table.image_ids.index(fx.test_ids[0])
    assert t.table.labels[s1, DEFAULT_LABELS.index("Other diseases")] == 1  # written as 'Other disease'


def test_all_28_labels(fx):
    t = build_task("vindr", "labels=all,agg=any", TaskContext(data_roots={"vindr": fx.root}))
    assert t.table.label_names == VINDR_LABELS and t.table.labels.shape == (5, 28)


def test_images_decode_through_every_trap(fx):
    t = VinDrTask(fx.root)
    for i, image_id in enumerate(t.table.image_ids):
        img = t.load_image(i)
        assert img.dtype == np.float32 and img.shape == (48, 40) and 0 <= img.min() and img.max() <= 1
        if image_id in fx.expected:  # 12-bit + rescale, MONOCHROME1, window
            np.testing.assert_allclose(img, fx.expected[image_id], atol=1e-6)


def test_root_may_be_the_folder_above_1_0_0(fx, tmp_path):
    shutil.copytree(fx.root, tmp_path / "physionet" / "1.0.0")
    assert len(VinDrTask(tmp_path / "physionet")) == 5


def test_missing_root_explains_layout_and_download(tmp_path):
    with pytest.raises(TaskError, match=r"(?s)image_labels_train.csv.*physionet.org/content/vindr-cxr"):
        VinDrTask(tmp_path / "nowhere")
    with pytest.raises(TaskError, match="needs --data-root"):
        build_task("vindr", None, TaskContext())


def test_wrong_header_names_file_and_column(copy):
    path = copy / "annotations" / "image_labels_train.csv"
    path.write_text(path.read_text().replace("Cardiomegaly", "Cardiomegally", 1))
    with pytest.raises(TaskError, match=r"image_labels_train.csv.*Cardiomegaly"):
        VinDrTask(copy)


def test_bad_label_cell_names_line(copy):
    path = copy / "annotations" / "image_labels_test.csv"
    rows = list(csv.reader(path.open()))
    rows[2][4] = "yes"  # Cardiomegaly of the second image
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(TaskError, match="image_labels_test.csv line 3"):
        VinDrTask(copy)


def test_missing_and_unreadable_images_fail_or_are_skipped(fx, copy):
    (copy / "train" / f"{fx.train_ids[1]}.dicom").unlink()
    write_dicom(copy / "test" / f"{fx.test_ids[1]}.dicom", phantom((8, 8), 0, 255), with_pixels=False)
    with pytest.raises(TaskError, match=rf"train/{fx.train_ids[1]}.dicom: the image file is missing "
                                        r"\(listed in annotations/image_labels_train.csv line 5\)"):
        VinDrTask(copy)
    t = VinDrTask(copy, skip_bad=True)
    assert t.table.image_ids == [fx.train_ids[0], fx.train_ids[2], fx.test_ids[0]]
    assert [s[0] for s in t.skipped] == [f"train/{fx.train_ids[1]}.dicom", f"test/{fx.test_ids[1]}.dicom"]
    assert "no PixelData" in t.skipped[1][1]
    assert t.summary()["skipped"][0]["file"] == f"train/{fx.train_ids[1]}.dicom"


def test_decode_failure_later_names_the_file(fx, copy):
    t = VinDrTask(copy)
    path = copy / "train" / f"{fx.train_ids[0]}.dicom"
    path.write_bytes(path.read_bytes()[:-500])  # truncated after the up-front check
    with pytest.raises(TaskError, match=f"{fx.train_ids[0]}.dicom"):
        t.load_image(0)


def test_content_digest_follows_bytes(copy):
    d = VinDrTask(copy).content_digest()
    assert VinDrTask(copy).content_digest() == d
    path = next((copy / "test").iterdir())
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert VinDrTask(copy).content_digest() != d


def test_bad_option_is_named(fx):
    with pytest.raises(TaskError, match="agg"):
        build_task("vindr", "agg=mean", TaskContext(data_roots={"vindr": Path(fx.root)}))
