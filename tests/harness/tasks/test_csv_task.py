import numpy as np
import pytest
from PIL import Image

from harness.tasks.base import TaskError
from harness.tasks.csv_task import CsvTask


def _write_set(root, rows, header="image,label_a,label_b,patient_id,sex,age"):
    (root / "img").mkdir(exist_ok=True)
    for i in range(6):
        Image.fromarray((np.random.default_rng(i).random((20, 16)) * 255).astype(np.uint8)).save(root / f"img/{i}.png")
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return root / "labels.csv"


GOOD = ["img/0.png,1,0,p1,M,54", "img/1.png,0,1,p1,M,55", "img/2.png,1,1,p2,F,",
        "img/3.png,0,0,p3,,200", "img/4.png,1,0,p4,f,40.5", "img/5.png,0,1,p5,M,33"]


def test_reads_labels_sex_age(tmp_path):
    t = CsvTask(_write_set(tmp_path, GOOD))
    assert t.table.label_names == ["a", "b"]
    assert t.table.labels[:, 0].tolist() == [1, 0, 1, 0, 1, 0]
    assert t.table.sex == ["M", "M", "F", None, "F", "M"]
    assert np.isnan(t.table.age[2]) and np.isnan(t.table.age[3])  # blank, and an impossible age -> missing
    img = t.load_image(0)
    assert img.shape == (20, 16) and img.dtype == np.float32 and 0 <= img.min() <= img.max() <= 1
    assert t.content_digest() == CsvTask(tmp_path / "labels.csv").content_digest()


def test_digest_changes_with_image_bytes(tmp_path):
    csv = _write_set(tmp_path, GOOD)
    before = CsvTask(csv).content_digest()
    Image.fromarray(np.zeros((20, 16), np.uint8)).save(tmp_path / "img/3.png")
    assert CsvTask(csv).content_digest() != before


def test_missing_image_column(tmp_path):
    csv = _write_set(tmp_path, ["img/0.png,1,p1"], header="path,label_a,patient_id")
    with pytest.raises(TaskError, match="missing column.*image"):
        CsvTask(csv)


def test_non_binary_label_names_row_and_label(tmp_path):
    rows = GOOD[:2] + ["img/2.png,2,1,p2,F,"]
    with pytest.raises(TaskError, match=r"row 4: label_a is '2'"):
        CsvTask(_write_set(tmp_path, rows))


def test_missing_file_names_path_and_skip_bad_counts_it(tmp_path):
    rows = GOOD + ["img/missing.png,1,0,p9,M,50"]
    csv = _write_set(tmp_path, rows)
    with pytest.raises(TaskError, match=r"row 8: image 'img/missing.png' not found.*--skip-bad"):
        CsvTask(csv)
    t = CsvTask(csv, skip_bad=True)
    assert len(t) == 6 and t.skipped == [("img/missing.png", "file not found")]
    assert t.summary()["skipped"] == [{"file": "img/missing.png", "reason": "file not found"}]


def test_corrupt_image_is_named_or_skipped(tmp_path):
    csv = _write_set(tmp_path, GOOD)
    (tmp_path / "img/2.png").write_bytes(b"not a png at all")
    t = CsvTask(csv)
    with pytest.raises(TaskError, match="img/2.png"):
        t.load_image(2)
    t = CsvTask(csv, skip_bad=True)
    assert "img/2.png" not in t.table.image_ids and t.skipped[0][0] == "img/2.png"


def test_shared_csv_reads_as_is(shared_cxr):
    t = CsvTask(shared_cxr / "labels.csv")
    assert len(t) == 286 and len(set(t.table.patient_ids)) == 158
    assert int(t.table.has_mask.sum()) == 205
    m = t.load_mask(int(np.flatnonzero(t.table.has_mask)[0]))
    assert m.dtype == bool and m.ndim == 3 and 0.05 < m.mean() < 0.7


def test_skip_bad_drops_a_dicom_without_pixel_data(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    csv = _write_set(tmp_path, GOOD + ["img/empty.dcm,1,0,p9,M,50"])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = 4, 4
    pydicom.dcmwrite(tmp_path / "img/empty.dcm", ds, enforce_file_format=True)
    t = CsvTask(csv, skip_bad=True)
    assert len(t) == 6 and t.skipped[0][0] == "img/empty.dcm"


def _with_masks(root, masks: dict[int, np.ndarray]):
    """GOOD plus a mask column: image i gets masks[i] (saved as an 8-bit PNG) when given."""
    (root / "mask").mkdir(exist_ok=True)
    rows = []
    for i, row in enumerate(GOOD):
        cell = ""
        if i in masks:
            Image.fromarray(masks[i]).save(root / f"mask/{i}.png")
            cell = f"mask/{i}.png"
        image, rest = row.split(",", 1)
        rows.append(f"{image},{cell},{rest}")
    return _write_set(root, rows, header="image,mask,label_a,label_b,patient_id,sex,age")


def _blob(value: int) -> np.ndarray:
    m = np.zeros((20, 16), np.uint8)
    m[4:12, 3:9] = value
    return m


@pytest.mark.parametrize("value", [1, 255, 3])
def test_mask_foreground_is_any_non_zero_value(tmp_path, value):
    # 0/1 PNGs decoded like a radiograph (/255) and thresholded at 0.5 came out empty.
    t = CsvTask(_with_masks(tmp_path, {0: _blob(value), 2: _blob(value)}))
    m = t.load_mask(0)
    assert m.dtype == bool and m.shape == (1, 20, 16)
    np.testing.assert_array_equal(m[0], _blob(1).astype(bool))


def test_mask_of_another_size_names_both_files_and_sizes(tmp_path):
    with pytest.raises(TaskError, match=r"row 4: mask 'mask/2.png' is 15x20 pixels but its image 'img/2.png' "
                                        r"is 16x20"):
        CsvTask(_with_masks(tmp_path, {0: _blob(1), 2: np.ones((20, 15), np.uint8)}))


def test_all_masks_empty_is_refused(tmp_path):
    empty = np.zeros((20, 16), np.uint8)
    with pytest.raises(TaskError, match=r"all 2 masks in the 'mask' column are empty"):
        CsvTask(_with_masks(tmp_path, {0: empty, 2: empty}))
    t = CsvTask(_with_masks(tmp_path, {0: empty, 2: _blob(1)}))  # one empty mask among others is fine
    assert not t.load_mask(0).any() and t.load_mask(2).any()
