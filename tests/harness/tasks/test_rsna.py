"""RSNA Pneumonia reader on a generated look-alike in the Kaggle stage 2 layout."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from harness.splits import pseudonym
from harness.tasks.base import TaskContext, TaskError, build_task
from harness.tasks.rsna import RsnaTask
from tests.harness.tasks.dicom_fixtures import make_rsna, make_rsna_split_lists


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_rsna(tmp_path_factory.mktemp("data") / "rsna-pneumonia")


@pytest.fixture
def copy(fx, tmp_path):
    shutil.copytree(fx.root, tmp_path / "rsna-pneumonia")
    return tmp_path / "rsna-pneumonia"


def keys(ids):
    return [pseudonym(i, "rsna") for i in ids]


def test_one_row_per_patient_and_targets(fx):
    t = RsnaTask(fx.root)
    # 2-box patient deduplicated; the patientId (= DICOM PatientID) appears only as a pseudonym
    assert t.table.image_ids == keys(fx.ids) and t.table.patient_ids == keys(fx.ids)
    assert not set(fx.ids) & set(t.table.image_ids)
    assert t.table.label_names == ["pneumonia"]
    assert t.table.labels[:, 0].tolist() == [fx.targets[i] for i in fx.ids]
    assert t.table.split is None  # the harness makes the seeded patient split
    assert t.summary()["positives"] == {"pneumonia": 2}


def test_demographics_age_155_is_missing(fx):
    t = RsnaTask(fx.root)
    assert t.table.sex == [fx.sex[i] for i in fx.ids]
    for got, i in zip(t.table.age, fx.ids):
        assert (math.isnan(got) and math.isnan(fx.age[i])) or got == fx.age[i]


def test_box_masks_at_image_size(fx):
    t = RsnaTask(fx.root)
    assert t.mask_names == ("pneumonia_boxes",) and t.table.has_mask.all()
    for i, image_id in enumerate(fx.ids):
        want = np.zeros((64, 64), dtype=bool)
        for x, y, w, h in fx.boxes[image_id]:  # 1024 space -> 64 px: divide by 16 (all on multiples of 16)
            want[int(y) // 16:int(y + h) // 16, int(x) // 16:int(x + w) // 16] = True
        m = t.load_mask(i)
        assert m.shape == (1, 64, 64) and m.dtype == bool
        np.testing.assert_array_equal(m[0], want, err_msg=image_id)
    assert t.load_mask(2)[0].sum() == 15 * 25 + 13 * 21  # two boxes of the 2-box patient


def test_jpeg_baseline_images_decode(fx):
    t = RsnaTask(fx.root)
    for i in range(len(t)):
        img = t.load_image(i)
        assert img.shape == (64, 64) and img.dtype == np.float32 and 0 <= img.min() < img.max() <= 1


def test_published_split_lists(fx, tmp_path):
    want = {pseudonym(i, "rsna"): v for i, v in make_rsna_split_lists(fx, tmp_path / "splits").items()}
    t = build_task("rsna", f"splits={tmp_path / 'splits'}", TaskContext(data_roots={"rsna": fx.root}))
    assert sorted(t.table.image_ids) == sorted(want)
    labelled = keys(fx.ids)
    for i, image_id in enumerate(t.table.image_ids):
        assert (t.table.split[i], int(t.table.labels[i, 0])) == want[image_id]
        # the stage-2 test images carry no boxes: no mask rather than an empty one
        assert t.table.has_mask[i] == (image_id in labelled)
        assert (t.load_mask(i) is None) == (image_id not in labelled)


def test_split_list_label_must_agree(fx, tmp_path):
    make_rsna_split_lists(fx, tmp_path / "splits")
    path = tmp_path / "splits" / "train_list.txt"
    path.write_text(path.read_text().replace(".dcm 0", ".dcm 1", 1))
    with pytest.raises(TaskError, match="train_list.txt line 1: label 1 disagrees"):
        RsnaTask(fx.root, splits=tmp_path / "splits")


def test_missing_root_explains_layout(tmp_path):
    with pytest.raises(TaskError, match=r"(?s)stage_2_train_labels.csv.*kaggle.com/c/rsna-pneumonia"):
        RsnaTask(tmp_path)


def test_class_info_must_agree_with_target(copy):
    path = copy / "stage_2_detailed_class_info.csv"
    path.write_text(path.read_text().replace("Normal", "Lung Opacity", 1))
    with pytest.raises(TaskError, match="stage_2_detailed_class_info.csv line 2"):
        RsnaTask(copy)


def test_negative_row_with_box_cells(copy):
    path = copy / "stage_2_train_labels.csv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(",,,,,0", ",1,2,3,4,0", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskError, match="stage_2_train_labels.csv line 2: a Target 0 row has box cells"):
        RsnaTask(copy)


def test_wrong_header(copy):
    path = copy / "stage_2_train_labels.csv"
    path.write_text(path.read_text().replace("patientId", "PatientID", 1))
    with pytest.raises(TaskError, match=r"stage_2_train_labels.csv.*patientId"):
        RsnaTask(copy)


def test_skipped_files_are_named_by_csv_line_not_patient_id(fx, copy):
    (copy / "stage_2_train_images" / f"{fx.ids[1]}.dcm").unlink()
    (copy / "stage_2_train_images" / f"{fx.ids[3]}.dcm").write_bytes(b"garbage" * 50)
    with pytest.raises(TaskError, match="stage_2_train_labels.csv line 3"):
        RsnaTask(copy)
    t = RsnaTask(copy, skip_bad=True)
    assert t.table.image_ids == keys([fx.ids[0], fx.ids[2]])
    assert [w for w, _ in t.skipped] == ["stage_2_train_labels.csv line 3", "stage_2_train_labels.csv line 6"]
    assert not any(pid in w + r for w, r in t.skipped for pid in fx.ids)


def test_decode_failure_names_the_csv_line_not_the_file(fx, copy):
    t = RsnaTask(copy)
    path = copy / "stage_2_train_images" / f"{fx.ids[1]}.dcm"
    path.write_bytes(path.read_bytes()[:-200])  # truncated after the up-front check
    with pytest.raises(TaskError, match="stage_2_train_labels.csv line 3: cannot be decoded") as e:
        t.load_image(1)
    assert fx.ids[1] not in str(e.value)
