"""CANDID-PTX reader on a generated look-alike: labels, patients, RLE masks, file naming, bad input."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from harness.tasks.base import TaskContext, TaskError, build_task
from harness.tasks.candid import CandidTask
from tests.harness.tasks.dicom_fixtures import make_candid


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_candid(tmp_path_factory.mktemp("data") / "candid-ptx")


@pytest.fixture
def copy(fx, tmp_path):
    shutil.copytree(fx.root, tmp_path / "candid-ptx")
    return tmp_path / "candid-ptx"


def test_labels_and_patients(fx):
    t = CandidTask(fx.root)
    assert t.table.image_ids == fx.uids  # dotted UIDs matched whole, with and without .dcm
    assert t.table.label_names == ["pneumothorax", "chest_tube", "rib_fracture"]
    assert [tuple(r) for r in t.table.labels.tolist()] == [fx.labels[u] for u in fx.uids]
    assert t.table.patient_ids == [fx.patients[u] for u in fx.uids]
    assert t.table.sex == [None, "M", None, None] and np.isnan(t.table.age).all()
    assert t.table.split is None and t.table.has_mask.all()


def test_masks_union_rows_and_follow_the_image_size(fx):
    t = CandidTask(fx.root)
    assert t.mask_names == ("pneumothorax", "chest_tube")
    for i, u in enumerate(fx.uids):
        m = t.load_mask(i)
        assert m.dtype == bool and m.shape == (2, *fx.shapes[u]) == (2, *t.load_image(i).shape)
        np.testing.assert_array_equal(m[0], fx.masks[u][0], err_msg=f"pneumothorax {u}")
        np.testing.assert_array_equal(m[1], fx.masks[u][1], err_msg=f"chest tube {u}")
    # image 0 has two pneumothorax rows: both regions are present
    m0 = t.load_mask(0)[0]
    assert m0[8:24, 4:16].all() and m0[32:40, 48:64].all() and m0.sum() == 16 * 12 + 8 * 16


def test_images_decode_jpeg_ls_and_rle(fx):
    t = CandidTask(fx.root)
    for i in range(len(t)):
        img = t.load_image(i)
        assert img.dtype == np.float32 and img.min() == 0.0 and img.max() == 1.0


def test_rows_for_unknown_images_are_reported(fx):
    t = CandidTask(fx.root)
    assert t.skipped == [("chest_tube.csv line 5", "image not listed in Pneumothorax_reports.csv (row ignored)")]


def test_fracture_file_name_variant(tmp_path):
    fx = make_candid(tmp_path / "c", fracture_file="Rib_fracture_mask_rle.csv")
    t = CandidTask(fx.root)
    assert t.table.labels[:, 2].tolist() == [fx.labels[u][2] for u in fx.uids]


def test_registered_and_rejects_options(fx):
    t = build_task("candid", None, TaskContext(data_roots={"candid": fx.root}))
    assert len(t) == 4
    with pytest.raises(TaskError, match="no options"):
        build_task("candid", "splits=x", TaskContext(data_roots={"candid": fx.root}))


def test_missing_root_explains_layout(tmp_path):
    with pytest.raises(TaskError, match=r"(?s)Pneumothorax_reports.csv.*k6.auckland.14173982"):
        CandidTask(tmp_path)


def test_malformed_rle_names_line_or_drops_the_image(fx, copy):
    path = copy / "Pneumothorax_reports.csv"
    path.write_text(path.read_text().replace('-1,"No pneumothorax', '12 x,"No pneumothorax'))
    # the row starts on line 5: the report of the row above spans lines 2-4
    with pytest.raises(TaskError, match="Pneumothorax_reports.csv line 5: malformed RLE"):
        CandidTask(copy)
    t = CandidTask(copy, skip_bad=True)
    assert fx.uids[1] not in t.table.image_ids and len(t) == 3


def test_image_under_two_patients(fx, copy):
    path = copy / "Pneumothorax_reports.csv"
    text = path.read_text().replace("P1001_29_06_2569_DICOM_00000000", "P7777_29_06_2569_DICOM_00000000", 1)
    path.write_text(text)
    with pytest.raises(TaskError, match="two different patients"):
        CandidTask(copy)
    t = CandidTask(copy, skip_bad=True)
    assert fx.uids[0] not in t.table.image_ids
    assert not any("P7777" in w or "P1001" in w or "P7777" in r for w, r in t.skipped)  # no patient ids


def test_missing_image_file(fx, copy):
    (copy / "dataset" / fx.uids[2]).unlink()
    with pytest.raises(TaskError, match=f"{fx.uids[2]}.*missing"):
        CandidTask(copy)
    t = CandidTask(copy, skip_bad=True)
    assert t.table.image_ids == [fx.uids[0], fx.uids[1], fx.uids[3]]
    assert (fx.uids[2], "the image file is missing (listed in Pneumothorax_reports.csv line 10)") in t.skipped


def test_wrong_header(copy):
    path = copy / "chest_tube.csv"
    path.write_text(path.read_text().replace("mask_rle", "rle", 1))
    with pytest.raises(TaskError, match=r"chest_tube.csv.*mask_rle"):
        CandidTask(copy)
