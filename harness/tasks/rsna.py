"""``rsna`` — the RSNA Pneumonia Detection Challenge, stage 2, as Kaggle distributes it
(https://www.kaggle.com/c/rsna-pneumonia-detection-challenge; accept the competition rules, then
``kaggle competitions download -c rsna-pneumonia-detection-challenge`` and unzip).

Layout (``--data-root rsna=PATH`` or ``<--data-root>/rsna-pneumonia``):

    stage_2_train_labels.csv          patientId, x, y, width, height, Target   one row per box (empty cells: none)
    stage_2_detailed_class_info.csv   patientId, class                         same granularity, duplicated rows
    stage_2_train_images/<patientId>.dcm

Target: pneumonia (Target 1 = 'Lung Opacity'). The boxes (top-left x, y, width, height in the 1024 x 1024 image
space) are kept as one mask channel, "pneumonia_boxes", for every labelled image. Each patientId is one image of
one patient. With no option the task has no predefined split: the harness makes its seeded patient split.

The patientId is also the DICOM PatientID, so it is never used as the image id: image and patient ids are
``harness.splits.pseudonym(patientId, "rsna")`` (recompute it to map a result back to a file), and messages
name an image by its CSV line.

``rsna:splits=DIR`` reads published split lists instead: DIR holds ``train_list.txt``, optionally
``val_list.txt`` (merged into train: the harness keeps its own validation inside train) and ``test_list.txt``,
one image per line as ``<path relative to the root> [0|1]`` — the format of MRM-pytorch's
``DatasetsSplits/RSNA_Pneumonia``. Images under ``stage_2_test_images/`` (unlabelled in the Kaggle download) take
their label from the list; a labelled image's list label must agree with the CSV. Labelled images that are in no
list are left out of the task and counted in the summary.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from harness.splits import pseudonym
from harness.common.options import parse_options
from harness.tasks.base import TaskContext, TaskError, TaskTable
from harness.tasks.dicom_meta import DicomTask, Skips, check_images, demographics, read_csv

URL = "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge"
LABELS_CSV = "stage_2_train_labels.csv"
CLASSES_CSV = "stage_2_detailed_class_info.csv"
IMAGES = "stage_2_train_images"
BOX_SPACE = 1024.0  # box coordinates are pixels of the 1024 x 1024 release images
SPLIT_FILES = {"train_list.txt": "train", "val_list.txt": "train", "test_list.txt": "test"}
LAYOUT = f"""expected the RSNA Pneumonia (stage 2) layout:
  <root>/{LABELS_CSV}, <root>/{CLASSES_CSV}, <root>/{IMAGES}/<patientId>.dcm
download it (Kaggle account, competition rules accepted) from {URL}"""


class RsnaTask(DicomTask):
    name = "rsna"
    mask_names = ("pneumonia_boxes",)

    def __init__(self, root: Path, splits: Path | None = None, skip_bad: bool = False) -> None:
        root = Path(root)
        if not (root / LABELS_CSV).is_file() or not (root / CLASSES_CSV).is_file():
            raise TaskError(f"RSNA Pneumonia: missing CSV files in {root}\n{LAYOUT}")
        skips = Skips(skip_bad)
        target, boxes, first_line = _read_targets(root / LABELS_CSV)
        _check_classes(root / CLASSES_CSV, target)
        ids = list(target)
        split: list[str] | None = None
        self.not_in_split_lists = 0
        if splits is not None:
            listed = _read_split_lists(Path(splits), target)
            self.not_in_split_lists = sum(1 for i in ids if i not in listed)
            ids = list(listed)
            split = [listed[i][0] for i in ids]
            target = {i: listed[i][1] for i in ids}
            paths = [root / listed[i][2] for i in ids]
            shown = [listed[i][3] for i in ids]
        else:
            paths = [root / IMAGES / f"{i}.dcm" for i in ids]
            shown = [f"{LABELS_CSV} line {first_line[i]}" for i in ids]
        entries = list(zip(shown, paths, shown))  # a CSV line names the image: its file name is a patient id
        kept, headers = check_images(root, entries, skips)
        if not kept:
            raise TaskError(f"{root}: no readable image\n{LAYOUT}")
        pids = [ids[k] for k in kept]
        self.skipped = skips.items
        self.paths = [paths[k] for k in kept]
        self.shown = [shown[k] for k in kept]
        self.shapes = [(h.rows, h.columns) for h in headers]
        self.boxes = [boxes.get(p) for p in pids]  # None: no box annotation (stage-2 test images)
        # The file name is the DICOM PatientID: results carry a pseudonym of it instead (one image per patient).
        keys = [pseudonym(p, "rsna") for p in pids]
        sex, age = demographics(headers)
        self.table = TaskTable(
            image_ids=keys, patient_ids=list(keys), label_names=["pneumonia"],
            labels=np.array([[target[p]] for p in pids], dtype=np.int8), sex=sex, age=age,
            split=None if split is None else [split[k] for k in kept],
            has_mask=np.array([b is not None for b in self.boxes], dtype=bool))

    def load_mask(self, i: int) -> np.ndarray | None:
        if self.boxes[i] is None:
            return None
        height, width = self.shapes[i]
        mask = np.zeros((height, width), dtype=bool)
        sy, sx = height / BOX_SPACE, width / BOX_SPACE
        for x, y, w, h in self.boxes[i]:
            # Pixels whose centres fall inside the box, after scaling the box to this image's size.
            r0, r1 = math.ceil(y * sy - 0.5), math.ceil((y + h) * sy - 0.5)
            c0, c1 = math.ceil(x * sx - 0.5), math.ceil((x + w) * sx - 0.5)
            mask[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = True
        return mask[None]

    def summary(self) -> dict:
        out = super().summary()
        if self.not_in_split_lists:
            out["not_in_split_lists"] = self.not_in_split_lists
        return out


def _read_targets(path: Path) -> tuple[dict[str, int], dict[str, list[tuple[float, ...]]], dict[str, int]]:
    """patientId -> Target, -> its boxes, -> the line of its first row; rows deduplicated per patient."""
    target: dict[str, int] = {}
    boxes: dict[str, list[tuple[float, ...]]] = {}
    first_line: dict[str, int] = {}
    for line, row in read_csv(path, ["patientId", "x", "y", "width", "height", "Target"]):
        pid, cells = row["patientId"], [row[k] for k in ("x", "y", "width", "height")]
        if not pid or row["Target"] not in ("0", "1"):
            raise TaskError(f"{path} line {line}: needs a patientId and Target 0 or 1")
        t = int(row["Target"])
        if target.setdefault(pid, t) != t:
            raise TaskError(f"{path} line {line}: Target {t} contradicts this image's earlier rows")
        first_line.setdefault(pid, line)
        box_list = boxes.setdefault(pid, [])
        if t == 0:
            if any(cells):
                raise TaskError(f"{path} line {line}: a Target 0 row has box cells; they must be empty")
            continue
        try:
            box = tuple(float(c) for c in cells)
        except ValueError:
            raise TaskError(f"{path} line {line}: a Target 1 row needs numeric x, y, width, height") from None
        if box[2] <= 0 or box[3] <= 0:
            raise TaskError(f"{path} line {line}: box width and height must be positive")
        box_list.append(box)
    if not target:
        raise TaskError(f"{path}: no rows")
    return target, boxes, first_line


def _check_classes(path: Path, target: dict[str, int]) -> None:
    """The detailed class file must agree with the targets: 'Lung Opacity' exactly when Target is 1."""
    seen: dict[str, str] = {}
    for line, row in read_csv(path, ["patientId", "class"]):
        pid, cls = row["patientId"], row["class"]
        if seen.setdefault(pid, cls) != cls:
            raise TaskError(f"{path} line {line}: class {cls!r} contradicts this image's earlier rows")
        if pid in target and (cls == "Lung Opacity") != (target[pid] == 1):
            raise TaskError(f"{path} line {line}: class {cls!r} disagrees with Target {target[pid]} in "
                            f"{LABELS_CSV}")
    if missing := len(set(target) - set(seen)):
        raise TaskError(f"{path}: {missing} image(s) of {LABELS_CSV} have no class row; "
                        "is this the stage 2 file?")


def _read_split_lists(folder: Path, target: dict[str, int]) -> dict[str, tuple[str, int, str, str]]:
    """image id -> (split, label, path relative to the root, where listed) from MRM-style split lists."""
    found = [folder / f for f in SPLIT_FILES if (folder / f).is_file()]
    if not any(f.name == "test_list.txt" for f in found) or not any(f.name == "train_list.txt" for f in found):
        raise TaskError(f"rsna:splits={folder}: expected train_list.txt and test_list.txt (and optionally "
                        "val_list.txt) there, one '<relative path> [0|1]' per line")
    out: dict[str, tuple[str, int, str, str]] = {}
    for file in found:
        for n, text in enumerate(file.read_text().splitlines(), start=1):
            parts = text.split()
            if not parts:
                continue
            where = f"{file.name} line {n}"
            rel = parts[0]
            image_id = Path(rel).name.removesuffix(".dcm")
            if len(parts) > 2 or (len(parts) == 2 and parts[1] not in ("0", "1")):
                raise TaskError(f"{file} line {n}: expected '<relative path> [0|1]'")
            label = int(parts[1]) if len(parts) == 2 else target.get(image_id)
            if label is None:
                raise TaskError(f"{file} line {n}: image not in {LABELS_CSV} and the line gives no label")
            if image_id in target and target[image_id] != label:
                raise TaskError(f"{file} line {n}: label {label} disagrees with Target {target[image_id]} "
                                f"in {LABELS_CSV}")
            if image_id in out:
                raise TaskError(f"{file} line {n}: image listed twice (also at {out[image_id][3]})")
            out[image_id] = (SPLIT_FILES[file.name], label, rel, where)
    return out


def rsna(ctx: TaskContext) -> RsnaTask:
    options = parse_options("rsna", ctx.arg, {"splits": None}, TaskError)
    splits = Path(options["splits"]).expanduser() if "splits" in options else None
    return RsnaTask(ctx.root_for("rsna", "rsna-pneumonia"), splits=splits, skip_bad=ctx.skip_bad)
