"""``candid`` — CANDID-PTX as the University of Auckland distributes it (figshare, DOI 10.17608/k6.auckland.14173982;
data use agreement and an ethics course required).

Layout (``--data-root candid=PATH`` or ``<--data-root>/candid-ptx``):

    Pneumothorax_reports.csv   filename, SOPInstanceUID, StudyInstanceUID, EncodedPixels, Report
    chest_tube.csv             anon_SOPUID, <annotation reference>, mask_rle
    acute_rib_fracture.csv     (or Rib_fracture_mask_rle.csv) same three columns
    <any folder>/<SOPInstanceUID>[.dcm]   the DICOMs, found anywhere below the root

Every image of Pneumothorax_reports.csv is in the task; its patient is the ``filename`` prefix before the first
'_' (e.g. ``P9313``). An image is positive for pneumothorax when one of its rows has an RLE (``-1`` means
negative; several rows are several regions, united), and positive for chest tube / rib fracture when its UID
appears in that file. Masks: ("pneumothorax", "chest_tube"), decoded from the RLE convention of `rle.py` on the
1024 x 1024 grid and resized to the image; every image has them (negatives' are empty). File names are UIDs
full of dots: they are matched whole, never split at a 'suffix'.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.common.options import parse_options
from harness.tasks.base import TaskContext, TaskError, TaskTable
from harness.tasks.dicom_meta import DicomTask, Skips, check_images, demographics, read_csv
from harness.tasks.rle import CANDID_GRID, resize_mask, rle_decode, rle_runs

URL = "https://doi.org/10.17608/k6.auckland.14173982"
LABELS = ("pneumothorax", "chest_tube", "rib_fracture")
FRACTURE_FILES = ("acute_rib_fracture.csv", "Rib_fracture_mask_rle.csv")
LAYOUT = f"""expected the CANDID-PTX layout:
  <root>/Pneumothorax_reports.csv, <root>/chest_tube.csv,
  <root>/acute_rib_fracture.csv (or Rib_fracture_mask_rle.csv),
  the DICOMs named <SOPInstanceUID> or <SOPInstanceUID>.dcm in any folder below <root>
download it (data use agreement) from {URL}"""


class CandidTask(DicomTask):
    name = "candid"
    mask_names = ("pneumothorax", "chest_tube")

    def __init__(self, root: Path, skip_bad: bool = False) -> None:
        root = Path(root)
        reports = root / "Pneumothorax_reports.csv"
        fracture = next((root / n for n in FRACTURE_FILES if (root / n).is_file()), None)
        if not reports.is_file() or not (root / "chest_tube.csv").is_file() or fracture is None:
            raise TaskError(f"CANDID-PTX: missing CSV files in {root}\n{LAYOUT}")
        skips = Skips(skip_bad)
        patient: dict[str, str] = {}
        first_line: dict[str, int] = {}
        dropped: set[str] = set()  # images whose labels cannot be trusted: dropped, never mislabelled
        ptx_rles: dict[str, list[str]] = {}
        for line, row in read_csv(reports, ["filename", "SOPInstanceUID", "EncodedPixels"]):
            where = f"Pneumothorax_reports.csv line {line}"
            uid, prefix = row["SOPInstanceUID"], row["filename"].split("_", 1)[0]
            if not uid or not prefix:
                raise TaskError(f"{reports} line {line}: empty SOPInstanceUID or filename")
            first_line.setdefault(uid, line)
            if patient.setdefault(uid, prefix) != prefix:
                skips.bad(where, "the image is listed under two different patients (filename prefixes)")
                dropped.add(uid)
            elif _valid_rle(row["EncodedPixels"], where, skips):
                ptx_rles.setdefault(uid, []).append(row["EncodedPixels"])
            else:
                dropped.add(uid)
        tube_rles = self._positives(root / "chest_tube.csv", patient, dropped, skips)
        fracture_rles = self._positives(fracture, patient, dropped, skips)
        uids = [u for u in patient if u not in dropped]

        files = {f.name.removesuffix(".dcm"): f for f in sorted(root.rglob("*")) if f.is_file()}
        listed = [(f"Pneumothorax_reports.csv line {first_line[u]}", files.get(u), _shown(root, files.get(u), u))
                  for u in uids]
        kept, headers = check_images(root, listed, skips)
        if not kept:
            raise TaskError(f"{root}: no readable image\n{LAYOUT}")
        uids = [uids[k] for k in kept]
        self.skipped = skips.items
        self.paths = [listed[k][1] for k in kept]
        self.shown = [listed[k][2] for k in kept]
        self.shapes = [(h.rows, h.columns) for h in headers]
        self.rles = {"pneumothorax": ptx_rles, "chest_tube": tube_rles}
        labels = np.array([[any(r.strip() not in ("", "-1") for r in ptx_rles.get(u, [])),
                            u in tube_rles, u in fracture_rles] for u in uids], dtype=np.int8)
        sex, age = demographics(headers)
        self.table = TaskTable(image_ids=uids, patient_ids=[patient[u] for u in uids], label_names=list(LABELS),
                               labels=labels, sex=sex, age=age, has_mask=np.ones(len(uids), dtype=bool))

    @staticmethod
    def _positives(path: Path, listed: dict[str, str], dropped: set[str], skips: Skips) -> dict[str, list[str]]:
        """UID -> its RLE strings, for a chest-tube or rib-fracture file (one row per instance)."""
        out: dict[str, list[str]] = {}
        for line, row in read_csv(path, ["anon_SOPUID", "mask_rle"]):
            where = f"{path.name} line {line}"
            uid = row["anon_SOPUID"]
            if uid not in listed:
                skips.items.append((where, "image not listed in Pneumothorax_reports.csv (row ignored)"))
            elif _valid_rle(row["mask_rle"], where, skips):
                out.setdefault(uid, []).append(row["mask_rle"])
            else:
                dropped.add(uid)
        return out

    def load_mask(self, i: int) -> np.ndarray:
        uid = self.table.image_ids[i]
        masks = []
        for name in self.mask_names:
            grid = np.zeros(CANDID_GRID, dtype=bool)
            for rle in self.rles[name].get(uid, []):
                grid |= rle_decode(rle)  # several rows = several regions of one image: their union
            masks.append(resize_mask(grid, self.shapes[i]))
        return np.stack(masks)


def _valid_rle(rle: str, where: str, skips: Skips) -> bool:
    """Checked up front (cheaply, without drawing the mask) so that load_mask cannot fail later."""
    try:
        rle_runs(rle)
    except ValueError as e:
        skips.bad(where, f"malformed RLE ({e})")
        return False
    return True


def _shown(root: Path, path: Path | None, uid: str) -> str:
    return str(path.relative_to(root)) if path is not None else uid


def candid(ctx: TaskContext) -> CandidTask:
    parse_options("candid", ctx.arg, {}, TaskError)
    return CandidTask(ctx.root_for("candid", "candid-ptx"), skip_bad=ctx.skip_bad)
