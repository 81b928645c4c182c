"""Small look-alikes of VinDr-CXR, CANDID-PTX and RSNA Pneumonia in their exact on-disk layouts, written with
pydicom from synthetic phantoms (no real data, no identifiers), carrying every trap of the published layouts
(docs/datasets.md):

- VinDr: `.dicom` files; three reader rows per training image that disagree; the test file's 'Other disease'
  spelling; a 'No finding' box row with empty coordinates; MONOCHROME1; 12-bit with rescale slope/intercept;
  a window; JPEG 2000 Lossless; a JPEG 2000 file whose file meta lost its TransferSyntaxUID; ages '045Y', blank
  and '155Y'; sex 'F', 'M', 'O' and blank.
- CANDID: UIDs full of dots as file names, with and without '.dcm', in a sub-folder; one image with two RLE rows
  (union); '-1' rows; quoted multi-line reports with commas; an RLE row for an image not in the reports file;
  either fracture file name; JPEG-LS and RLE Lossless.
- RSNA: 0-, 1- and 2-box patients with empty coordinate cells; duplicated class rows; JPEG Baseline 8-bit;
  ages '155' (-> missing) and plain '58'; both view positions.

Each maker returns what it wrote (ids and the ground truth the tests check against), so that the tests state
their expectations next to the data rather than re-deriving them with the code under test.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def phantom(shape: tuple[int, int], seed: int, max_value: int) -> np.ndarray:
    """A smooth radiograph-like image (bright body, two dark lung fields, a vertical gradient, mild noise)
    spanning 0..max_value, so that the decoded [0, 1] image is known exactly for uncompressed files."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.6 + 0.3 * yy
    for cx in (0.3, 0.7):
        img -= 0.4 * (((xx - cx) / 0.15) ** 2 + ((yy - 0.45) / 0.3) ** 2 < 1)
    img += 0.03 * rng.standard_normal(shape)
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(img * max_value).astype(np.uint8 if max_value < 256 else np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                syntax: str = ExplicitVRLittleEndian, sex: str | None = None, age: str | None = None,
                rescale: tuple[float, float] | None = None, window: tuple[float, float] | None = None,
                view: str | None = None, drop_syntax: bool = False, with_pixels: bool = True) -> Path:
    """Write `pixels` (the *stored* values) as a DX DICOM in the given transfer syntax. `drop_syntax` removes
    TransferSyntaxUID from the file meta (VinDr issue #3); `with_pixels=False` writes a header only."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if sex is not None:
        ds.PatientSex = sex
    if age is not None:
        # RSNA's plain-number ages are invalid AS values: that is the trap, so no validation warning.
        ds.add(pydicom.DataElement(0x00101010, "AS", age, validation_mode=pydicom.config.IGNORE))
    if view is not None:
        ds.ViewPosition = view
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if syntax == JPEGBaseline8Bit:
        # pydicom 3 has no JPEG Baseline encoder: Pillow writes the codestream, pydicom wraps it.
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    elif UID(syntax).is_compressed:
        ds.compress(syntax)
    if not with_pixels:
        del ds.PixelData
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    if drop_syntax:
        ds = pydicom.dcmread(path)
        del ds.file_meta.TransferSyntaxUID
        ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# --- VinDr-CXR -----------------------------------------------------------------------------------------------

VINDR_LABELS = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
]


@dataclass
class VinDrFixture:
    root: Path
    train_ids: list[str]
    test_ids: list[str]
    #: image id -> label -> the three readers' votes (train) or the consensus (test, one vote)
    votes: dict[str, dict[str, tuple[int, ...]]]
    sex: dict[str, str | None]
    age: dict[str, float]
    #: image id -> the decoded image expected (uncompressed, lossless files)
    expected: dict[str, np.ndarray] = field(default_factory=dict)


def make_vindr(root: Path, extra: int = 0) -> VinDrFixture:
    """The trap images below, plus `extra` training and `extra // 2` test images with random readings (plain
    uncompressed files) when a run needs enough positives per label, e.g. the end-to-end CLI test."""
    root = Path(root)
    t1, t2 = "a1b2c3d4e5f60718293a4b5c6d7e8f90", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    t3 = "1234567890abcdef1234567890abcdef"
    s1, s2 = "fedcba0987654321fedcba0987654321", "00112233445566778899aabbccddeeff"
    shape = (48, 40)
    img12 = phantom(shape, 1, 4095)
    # 12-bit stored with rescale: the display range is the image's own; the rescale must not change the picture.
    write_dicom(root / "train" / f"{t1}.dicom", img12, bits_stored=12, rescale=(2.0, -1024.0),
                sex="F", age="045Y")
    img16 = phantom(shape, 2, 65535)
    # MONOCHROME1 stores the inverted picture: decoded, it must equal the MONOCHROME2 picture.
    write_dicom(root / "train" / f"{t2}.dicom", (65535 - img16).astype(np.uint16), photometric="MONOCHROME1",
                sex="", age="")
    write_dicom(root / "train" / f"{t3}.dicom", phantom(shape, 3, 4095), bits_stored=12, syntax=JPEG2000Lossless,
                drop_syntax=True, sex="O", age="155Y")
    img_s1 = phantom(shape, 4, 4095)
    # A window narrower than the data: values above 2047 saturate (DICOM LINEAR: y = x / 2047 here).
    write_dicom(root / "test" / f"{s1}.dicom", img_s1, bits_stored=12, window=(1024.0, 2048.0),
                sex="M", age="060Y")
    write_dicom(root / "test" / f"{s2}.dicom", phantom(shape, 5, 4095), bits_stored=12, syntax=JPEG2000Lossless,
                sex="F", age="007M")

    votes = {
        t1: {"Cardiomegaly": (1, 1, 0), "Pneumonia": (1, 0, 0), "No finding": (0, 0, 1)},
        t2: {"No finding": (1, 1, 1)},
        t3: {"Aortic enlargement": (1, 1, 1), "Lung Opacity": (0, 1, 1), "Other diseases": (0, 0, 1),
             "No finding": (1, 0, 0)},
        s1: {"Cardiomegaly": (1,), "Other diseases": (1,)},
        s2: {"No finding": (1,)},
    }
    rng = np.random.default_rng(100)
    extra_train = [f"{k:08x}" + "e" * 24 for k in range(extra)]
    extra_test = [f"{k:08x}" + "f" * 24 for k in range(extra // 2)]
    for k, image_id in enumerate(extra_train + extra_test):
        part, n_readers = ("train", 3) if image_id in extra_train else ("test", 1)
        write_dicom(root / part / f"{image_id}.dicom", phantom((32, 32), 200 + k, 4095), bits_stored=12)
        votes[image_id] = {n: tuple(int(v) for v in rng.random(n_readers) < 0.4) for n in VINDR_LABELS}
    rows = []
    for image_id in [t1, t2, t3] + extra_train:
        for reader, rad in enumerate(("R8", "R9", "R10")):
            rows.append([image_id, rad] + [votes[image_id].get(n, (0, 0, 0))[reader] for n in VINDR_LABELS])
    _write_csv(root / "annotations" / "image_labels_train.csv", ["image_id", "rad_id"] + VINDR_LABELS, rows)
    test_header = ["Other disease" if n == "Other diseases" else n for n in VINDR_LABELS]
    _write_csv(root / "annotations" / "image_labels_test.csv", ["image_id"] + test_header,
               [[i] + [votes[i].get(n, (0,))[0] for n in VINDR_LABELS] for i in [s1, s2] + extra_test])
    box_header = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
    _write_csv(root / "annotations" / "annotations_train.csv", box_header, [
        [t1, "R8", "Cardiomegaly", 10.0, 20.0, 30.0, 40.0], [t1, "R10", "No finding", "", "", "", ""],
        [t2, "R8", "No finding", "", "", "", ""]])
    _write_csv(root / "annotations" / "annotations_test.csv", box_header[:1] + box_header[2:], [
        [s1, "Cardiomegaly", 8.0, 20.0, 32.0, 40.0], [s2, "No finding", "", "", "", ""]])
    return VinDrFixture(
        root=root, train_ids=[t1, t2, t3] + extra_train, test_ids=[s1, s2] + extra_test, votes=votes,
        sex={t1: "F", t2: None, t3: None, s1: "M", s2: "F"},
        age={t1: 45.0, t2: float("nan"), t3: float("nan"), s1: 60.0, s2: 7 / 12},
        # t1: the rescale is linear and there is no window, so the image's own range (0..4095) maps to [0, 1].
        expected={t1: img12.astype(np.float32) / 4095,
                  t2: img16.astype(np.float32) / 65535,
                  s1: np.clip(img_s1.astype(np.float32) / 2047, 0, 1)})


# --- CANDID-PTX ----------------------------------------------------------------------------------------------

@dataclass
class CandidFixture:
    root: Path
    uids: list[str]
    patients: dict[str, str]
    labels: dict[str, tuple[int, int, int]]
    #: uid -> (pneumothorax mask, chest tube mask) at the image's size, written out by hand (trap images only)
    masks: dict[str, tuple[np.ndarray, np.ndarray]]
    shapes: dict[str, tuple[int, int]]


def _rect_rle(boxes: list[tuple[int, int, int, int]]) -> str:
    """RLE of the union of (row0, row1, col0, col1) rectangles on the 1024 grid, written from the convention's
    definition (pixels column by column, each start relative to the end of the previous run), independently of
    harness.tasks.rle."""
    grid = np.zeros((1024, 1024), dtype=bool)
    for r0, r1, c0, c1 in boxes:
        grid[r0:r1, c0:c1] = True
    column_major = np.concatenate([[False], grid.T.reshape(-1), [False]])
    edges = np.flatnonzero(column_major[1:] != column_major[:-1]).tolist()
    out, end = [], 0
    for start, stop in zip(edges[0::2], edges[1::2]):
        out += [start - end, stop - start]
        end = stop
    return " ".join(map(str, out))


def make_candid(root: Path, fracture_file: str = "acute_rib_fracture.csv", extra: int = 0) -> CandidFixture:
    """The trap images below, plus `extra` plain images (two per patient) with random findings."""
    root = Path(root)
    uids = ["5.1.742.187374.3.030.4.1001.2.7", "5.1.742.187374.3.030.4.1002.2.7",
            "5.1.742.187374.3.030.4.1003.9", "5.1.742.187374.3.030.4.1004.11"]
    patients = dict(zip(uids, ["P1001", "P1001", "P1002", "P1003"]))
    shapes = dict(zip(uids, [(64, 64), (64, 64), (32, 48), (64, 32)]))
    folder = root / "dataset"
    write_dicom(folder / uids[0], phantom(shapes[uids[0]], 10, 4095), bits_stored=12)
    write_dicom(folder / f"{uids[1]}.dcm", phantom(shapes[uids[1]], 11, 4095), bits_stored=12, sex="M")
    write_dicom(folder / uids[2], phantom(shapes[uids[2]], 12, 4095), bits_stored=12, syntax=JPEGLSLossless)
    write_dicom(folder / f"{uids[3]}.dcm", phantom(shapes[uids[3]], 13, 4095), bits_stored=12, syntax=RLELossless)

    # Rectangles on the 1024 grid whose edges fall on multiples of 32, so that resized to 64 (or 32, 48) they are
    # exact rectangles again and the expected masks below can be written by hand.
    ptx_a, ptx_b = (128, 384, 64, 256), (512, 640, 768, 1024)
    tube, tube2 = (0, 1024, 512, 544), (256, 288, 0, 1024)
    ptx_d = (0, 256, 0, 512)
    filenames = [f"{patients[u]}_29_06_2569_DICOM_{k:08X}_AAD215A6" for k, u in enumerate(uids)]
    report = 'FINDINGS: Small apical pneumothorax, left.\nNo effusion, no consolidation.\n"Lines" as before.'
    rng = np.random.default_rng(101)
    extra_rows, extra_tubes, extra_fractures, extra_labels = [], [], [], {}
    for k in range(extra):
        uid, pid = f"5.1.742.187374.3.030.5.{k}.1", f"P{2000 + k // 2}"
        write_dicom(folder / uid, phantom((32, 32), 300 + k, 4095), bits_stored=12)
        ptx, tube_k, fracture_k = rng.random(3) < (0.4, 0.3, 0.3)
        extra_rows.append([f"{pid}_01_01_2570_DICOM_{k:08X}", uid, "6.1.742.2.1",
                           _rect_rle([ptx_a]) if ptx else "-1", "Extra report."])
        extra_tubes += [[uid, f"E{k}", _rect_rle([tube])]] if tube_k else []
        extra_fractures += [[uid, f"G{k}", _rect_rle([(300, 340, 100, 160)])]] if fracture_k else []
        patients[uid], shapes[uid], extra_labels[uid] = pid, (32, 32), (int(ptx), int(tube_k), int(fracture_k))
        uids.append(uid)
    _write_csv(root / "Pneumothorax_reports.csv", ["filename", "SOPInstanceUID", "StudyInstanceUID",
                                                   "EncodedPixels", "Report"], [
        [filenames[0], uids[0], "6.1.742.1.1", _rect_rle([ptx_a]), report],
        [filenames[1], uids[1], "6.1.742.1.1", "-1", "No pneumothorax.\nChest tube removed, clear lungs."],
        [filenames[0], uids[0], "6.1.742.1.1", _rect_rle([ptx_b]), report],  # second region of image 0
        [filenames[2], uids[2], "6.1.742.1.2", "-1", "Normal, heart size normal."],
        [filenames[3], uids[3], "6.1.742.1.3", _rect_rle([ptx_d]), "Large pneumothorax."],
    ] + extra_rows)
    _write_csv(root / "chest_tube.csv", ["anon_SOPUID", "anon_annotation_ref", "mask_rle"], [
        [uids[0], "A1", _rect_rle([tube])],
        [uids[3], "A2", _rect_rle([tube])], [uids[3], "A3", _rect_rle([tube2])],
        ["9.9.999.1", "A4", _rect_rle([tube])],  # an image the reports file does not list
    ] + extra_tubes)
    _write_csv(root / fracture_file, ["anon_SOPUID", "anon_annotation_ref", "mask_rle"], [
        [uids[2], "F1", _rect_rle([(300, 340, 100, 160)])]] + extra_fractures)

    def box(shape: tuple[int, int], *rects: tuple[int, int, int, int]) -> np.ndarray:
        m = np.zeros(shape, dtype=bool)
        sy, sx = shape[0] / 1024, shape[1] / 1024
        for r0, r1, c0, c1 in rects:
            m[int(r0 * sy):int(r1 * sy), int(c0 * sx):int(c1 * sx)] = True
        return m

    masks = {u: (box(shapes[u], *p), box(shapes[u], *t)) for u, p, t in (
        (uids[0], [ptx_a, ptx_b], [tube]), (uids[1], [], []), (uids[2], [], []),
        (uids[3], [ptx_d], [tube, tube2]))}
    labels = {uids[0]: (1, 1, 0), uids[1]: (0, 0, 0), uids[2]: (0, 0, 1), uids[3]: (1, 1, 0), **extra_labels}
    return CandidFixture(root=root, uids=uids, patients=patients, labels=labels, masks=masks, shapes=shapes)


# --- RSNA Pneumonia ------------------------------------------------------------------------------------------

@dataclass
class RsnaFixture:
    root: Path
    ids: list[str]
    targets: dict[str, int]
    boxes: dict[str, list[tuple[float, float, float, float]]]
    sex: dict[str, str | None]
    age: dict[str, float]
    test_ids: list[str] = field(default_factory=list)


def make_rsna(root: Path, extra: int = 0) -> RsnaFixture:
    """The trap patients below, plus `extra` plain patients with random targets and one box per positive."""
    root = Path(root)
    ids = ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00436515-870c-4b36-a041-de91049b9ab4",
           "00704310-78a8-4b38-8475-49f4573b2dbb", "00a85be6-6eb0-421d-8acf-ff2dc0007e8a"]
    a, b, c, d = ids
    shape = (64, 64)
    write_dicom(root / "stage_2_train_images" / f"{a}.dcm", phantom(shape, 20, 255), syntax=JPEGBaseline8Bit,
                sex="M", age="155", view="PA")
    write_dicom(root / "stage_2_train_images" / f"{b}.dcm", phantom(shape, 21, 255), sex="F", age="58", view="AP")
    write_dicom(root / "stage_2_train_images" / f"{c}.dcm", phantom(shape, 22, 255), syntax=JPEGBaseline8Bit,
                sex="M", age="34", view="AP")
    write_dicom(root / "stage_2_train_images" / f"{d}.dcm", phantom(shape, 23, 255), sex="", age="", view="PA")
    # Boxes in the 1024 space on multiples of 16, so that at 64 px they cover whole pixels.
    boxes = {a: [], b: [(256.0, 160.0, 192.0, 320.0)], c: [(80.0, 96.0, 240.0, 400.0), (640.0, 112.0, 208.0, 336.0)],
             d: []}
    targets = {a: 0, b: 1, c: 1, d: 0}
    classes = {a: "Normal", b: "Lung Opacity", c: "Lung Opacity", d: "No Lung Opacity / Not Normal"}
    rng = np.random.default_rng(102)
    sex, age = {a: "M", b: "F", c: "M", d: None}, {a: float("nan"), b: 58.0, c: 34.0, d: float("nan")}
    for k in range(extra):
        pid = f"{k:08x}-0000-4000-8000-{k:012x}"
        positive = bool(rng.random() < 0.4)
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", phantom(shape, 400 + k, 255), sex="F", age="50")
        ids.append(pid)
        targets[pid], boxes[pid] = int(positive), [(256.0, 256.0, 128.0, 256.0)] if positive else []
        classes[pid] = "Lung Opacity" if positive else "Normal"
        sex[pid], age[pid] = "F", 50.0
    rows = []
    for i in ids:
        rows += [[i, *box, 1] for box in boxes[i]] or [[i, "", "", "", "", 0]]
    _write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    _write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"],
               [[r[0], classes[r[0]]] for r in rows])  # same granularity as the labels: c appears twice
    test_ids = ["c1e88810-9e4e-4f39-9306-8d314bfc1ff1", "c14d9403-6e1f-4d9f-b278-6b7bc18cf3cc"]
    for k, t in enumerate(test_ids):  # unlabelled in the Kaggle download
        write_dicom(root / "stage_2_test_images" / f"{t}.dcm", phantom(shape, 30 + k, 255), sex="F", age="40")
    return RsnaFixture(root=root, ids=ids, targets=targets, boxes=boxes, sex=sex, age=age, test_ids=test_ids)


def make_rsna_split_lists(fx: RsnaFixture, folder: Path) -> dict[str, tuple[str, int]]:
    """MRM-pytorch style lists: train a, b; val c; test d plus the two stage-2 test images with labels 1, 0.
    Returns image id -> (expected split, expected label)."""
    a, b, c, d = fx.ids[:4]
    folder.mkdir(parents=True, exist_ok=True)
    line = lambda sub, i, label: f"{sub}/{i}.dcm {label} \n"  # trailing space as in MRM's files
    (folder / "train_list.txt").write_text(line("stage_2_train_images", a, 0) + line("stage_2_train_images", b, 1))
    (folder / "val_list.txt").write_text(line("stage_2_train_images", c, 1))
    (folder / "test_list.txt").write_text(line("stage_2_train_images", d, 0)
                                          + line("stage_2_test_images", fx.test_ids[0], 1)
                                          + line("stage_2_test_images", fx.test_ids[1], 0))
    return {a: ("train", 0), b: ("train", 1), c: ("train", 1), d: ("test", 0),
            fx.test_ids[0]: ("test", 1), fx.test_ids[1]: ("test", 0)}


def make_all(root: Path, extra: int = 0) -> tuple[VinDrFixture, CandidFixture, RsnaFixture]:
    """The three datasets under one --data-root, in their default folder names."""
    root = Path(root)
    return (make_vindr(root / "vindr-cxr", extra=extra), make_candid(root / "candid-ptx", extra=extra),
            make_rsna(root / "rsna-pneumonia", extra=extra))
