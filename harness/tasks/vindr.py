"""``vindr`` — VinDr-CXR v1.0.0 as PhysioNet distributes it (https://physionet.org/content/vindr-cxr/1.0.0/).

Layout (the folder given as ``--data-root vindr=PATH``, or ``<--data-root>/vindr-cxr``; a ``1.0.0/`` level
below it, as ``wget -r`` leaves it, is found too):

    annotations/image_labels_train.csv   image_id, rad_id, <28 labels>   3 rows per image, one per radiologist
    annotations/image_labels_test.csv    image_id, <28 labels>           consensus of 5; 'Other disease' spelling
    annotations/annotations_{train,test}.csv                              boxes (not used: labels are image-level)
    train/<image_id>.dicom   (15,000)    test/<image_id>.dicom   (3,000)

The official test split is kept (``TaskTable.split``). Training images carry three independent readings; they
are reduced per image and label by a rule, ``vindr:agg=majority`` (default: positive when more than half the
readers say so, i.e. 2 of 3), ``any`` (at least one) or ``all``. "No finding" (train and test alike) is derived from the
aggregated findings (positive exactly when none of the other 27 labels is): aggregating its own votes gave an
image both a finding and "No finding" under ``any``, and neither under ``all``. VinDr has no patient ids (image
ids are hashes of the original SOP instance UID), so each image is its own patient. Sex and age come from the
DICOM headers.

Labels: ``vindr:labels=default`` (below) or ``labels=all`` (the 22 local + 6 global labels of the release).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from harness.common.options import parse_options
from harness.tasks.base import TaskContext, TaskError, TaskTable
from harness.tasks.dicom_meta import DicomTask, Skips, check_images, demographics, read_csv

URL = "https://physionet.org/content/vindr-cxr/1.0.0/"
LOCAL_LABELS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion",
)
GLOBAL_LABELS = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
#: The default list: the six global labels, and the 14 local findings frequent enough to have been the classes
#: of the VinBigData challenge built on this release (the rarer eight local labels have too few test positives
#: for a stable AUPRC). Which exact list RAD-DINO reports is not verified here; ``labels=all`` gives all 28.
DEFAULT_LABELS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD", "Infiltration",
    "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis",
) + GLOBAL_LABELS
#: Spellings of the test file that differ from the training file's.
SPELLING = {"Other disease": "Other diseases"}
AGGREGATION = {
    "majority": lambda votes, readers: 2 * votes > readers,
    "any": lambda votes, readers: votes >= 1,
    "all": lambda votes, readers: votes == readers,
}
LAYOUT = f"""expected the VinDr-CXR 1.0.0 layout:
  <root>/annotations/image_labels_train.csv, <root>/annotations/image_labels_test.csv
  <root>/train/<image_id>.dicom, <root>/test/<image_id>.dicom
download it (credentialed access) from {URL}"""


class VinDrTask(DicomTask):
    name = "vindr"

    def __init__(self, root: Path, aggregation: str = "majority", labels: tuple[str, ...] = DEFAULT_LABELS,
                 skip_bad: bool = False) -> None:
        root = _find_root(Path(root))
        self.aggregation = aggregation
        skips = Skips(skip_bad)
        image_ids: list[str] = []
        label_rows: list[np.ndarray] = []
        split: list[str] = []
        listed: list[tuple[str, Path | None, str]] = []
        for part in ("train", "test"):
            csv_name = f"annotations/image_labels_{part}.csv"
            per_image, first_line = _read_labels(root / csv_name, labels, aggregation)
            folder = root / part
            names = set(os.listdir(folder)) if folder.is_dir() else set()
            for image_id, row in per_image.items():
                file = next((f for f in (f"{image_id}.dicom", f"{image_id}.dcm", image_id) if f in names), None)
                listed.append((f"{csv_name} line {first_line[image_id]}", folder / file if file else None,
                               f"{part}/{image_id}.dicom"))
                image_ids.append(image_id)
                label_rows.append(row)
                split.append(part)
        kept, headers = check_images(root, listed, skips)
        if not kept:
            raise TaskError(f"{root}: no readable image\n{LAYOUT}")
        self.skipped = skips.items
        self.paths = [listed[k][1] for k in kept]
        self.shown = [listed[k][2] for k in kept]
        sex, age = demographics(headers)
        ids = [image_ids[k] for k in kept]
        self.table = TaskTable(
            image_ids=ids, patient_ids=list(ids), label_names=list(labels),
            labels=np.stack([label_rows[k] for k in kept]).astype(np.int8),
            sex=sex, age=age, split=[split[k] for k in kept])

    def summary(self) -> dict:
        return {**super().summary(), "reader_aggregation": self.aggregation}


def _find_root(root: Path) -> Path:
    for candidate in (root, root / "1.0.0"):
        if all((candidate / "annotations" / f"image_labels_{p}.csv").is_file() for p in ("train", "test")):
            return candidate
    raise TaskError(f"VinDr-CXR: no annotations/image_labels_{{train,test}}.csv in {root}\n{LAYOUT}")


def _read_labels(path: Path, labels: tuple[str, ...], aggregation: str
                 ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """image_id -> 0/1 per label of `labels`, the readers of each image reduced by the aggregation rule and "No
    finding" derived from the result; and image_id -> the line of its first row. Every label of the release is
    read, whichever are kept: "No finding" depends on all of them."""
    everything = LOCAL_LABELS + GLOBAL_LABELS
    rows = read_csv(path, ["image_id", *everything], rename=SPELLING)
    votes: dict[str, np.ndarray] = {}
    readers: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for line, row in rows:
        try:
            values = np.array([float(row[name]) for name in everything])
        except ValueError:
            raise TaskError(f"{path} line {line}: a label cell is not 0 or 1") from None
        if not np.isin(values, (0, 1)).all():
            raise TaskError(f"{path} line {line}: a label cell is not 0 or 1")
        image_id = row["image_id"]
        if not image_id:
            raise TaskError(f"{path} line {line}: empty image_id")
        votes[image_id] = votes.get(image_id, 0) + values.astype(np.int64)
        readers[image_id] = readers.get(image_id, 0) + 1
        first_line.setdefault(image_id, line)
    rule = AGGREGATION[aggregation]
    no_finding = everything.index("No finding")
    keep = [everything.index(name) for name in labels]
    out = {}
    for i, v in votes.items():
        agg = rule(v, readers[i])
        agg[no_finding] = not np.delete(agg, no_finding).any()
        out[i] = agg[keep].astype(np.int8)
    return out, first_line


def vindr(ctx: TaskContext) -> VinDrTask:
    options = parse_options("vindr", ctx.arg, {"agg": tuple(AGGREGATION), "labels": ("default", "all")}, TaskError)
    labels = LOCAL_LABELS + GLOBAL_LABELS if options.get("labels") == "all" else DEFAULT_LABELS
    return VinDrTask(ctx.root_for("vindr", "vindr-cxr"), aggregation=options.get("agg", "majority"),
                     labels=labels, skip_bad=ctx.skip_bad)
