"""``csv:PATH`` — any labelled set of radiographs described by one CSV file.

Columns: ``image`` (path relative to the CSV), ``label_*`` (0/1, one column per finding), ``patient_id``, and
optionally ``mask`` (path of a mask, relative to the CSV, at its image's size; any non-zero value is foreground, so
0/1, 0/255 and label masks all work), ``sex`` (M/F/blank), ``age`` (number/blank)
and ``split`` (train/test/blank; blank rows go to the harness's seeded patient split). Other columns are ignored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from harness.common.hashing import sha256_file
from harness.common.imaging import ImageDecodeError, load_radiograph
from harness.common.ranges import plausible_age
from harness.tasks.base import Task, TaskContext, TaskError, TaskTable, combine_digests

REQUIRED = ("image", "patient_id")


def _row(i: int) -> str:
    return f"row {i + 2}"  # +1 for the header, +1 for 1-based line numbers as a spreadsheet shows them


def _unreadable(path: Path) -> str | None:
    """A cheap up-front check (header and structure, not a full decode) so that --skip-bad can drop a corrupt
    file before splits are made, rather than fail half-way through feature extraction."""
    from PIL import Image

    from harness.tasks.dicom_meta import read_header
    from harness.common.imaging import is_dicom

    try:
        if is_dicom(path):
            read_header(path)  # DICOM with Rows/Columns, pixel data and an installed decoder
        else:
            with Image.open(path) as im:
                im.verify()
        return None
    except Exception as e:
        return f"unreadable ({type(e).__name__})"


def _size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels."""
    from PIL import Image

    from harness.tasks.dicom_meta import read_header
    from harness.common.imaging import is_dicom

    if is_dicom(path):
        h = read_header(path)
        return h.columns, h.rows
    with Image.open(path) as im:
        return im.size


def read_mask(path: Path) -> np.ndarray:
    """A mask file -> bool [H, W]: a pixel is foreground when its stored value is non-zero (in any colour channel;
    alpha is ignored). Stored values, not display intensities: a 0/1 PNG must not be scaled to 0/255 first."""
    from PIL import Image

    from harness.common.imaging import is_dicom

    if is_dicom(path):
        import pydicom

        return np.asarray(pydicom.dcmread(path, force=True).pixel_array) != 0
    with Image.open(path) as im:
        arr = np.asarray(im)
        if im.getbands()[-1] == "A":
            arr = arr[..., :-1]  # alpha (always the last band) is transparency, not a label
    return arr.any(axis=-1) if arr.ndim == 3 else arr != 0


class CsvTask(Task):
    mask_names = ("mask",)

    def __init__(self, csv_path: Path, skip_bad: bool = False, name: str | None = None):
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise TaskError(f"{csv_path}: labels CSV not found (csv:PATH needs a file with columns "
                            f"image, label_*, patient_id[, mask, sex, age, split])")
        self.csv_path = csv_path
        self.root = csv_path.parent
        self.name = name or f"csv-{csv_path.parent.name}"
        self.skipped = []
        self._file_digests: list[str] | None = None
        df, label_cols = self._read_csv()
        keep, images, masks = self._usable_rows(df, skip_bad)
        df = df[keep]
        self._masks = masks
        self.table = TaskTable(
            image_ids=images,
            patient_ids=[p.strip() for p in df["patient_id"].to_list()],
            label_names=[c.removeprefix("label_") for c in label_cols],
            labels=self._labels(df, label_cols, keep),
            sex=[self._parse_sex(v, keep[k]) for k, v in enumerate(self._col(df, "sex"))],
            age=np.array([self._parse_age(v, keep[k]) for k, v in enumerate(self._col(df, "age"))], dtype=np.float64),
            split=self._split(df, keep),
            has_mask=np.array([m is not None for m in masks]),
        )
        if not self.table.has_mask.any():
            self.mask_names = ()
        else:
            self._check_masks(keep)

    def _read_csv(self) -> tuple[pl.DataFrame, list[str]]:
        """The CSV as strings (every column is validated here, not guessed by a reader), and its label columns."""
        csv_path = self.csv_path
        try:
            df = pl.read_csv(csv_path, infer_schema=False)
        except Exception as e:
            raise TaskError(f"{csv_path}: cannot parse as CSV ({e})") from e
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise TaskError(f"{csv_path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}")
        label_cols = [c for c in df.columns if c.startswith("label_")]
        if not label_cols:
            raise TaskError(f"{csv_path}: no label_* columns (one 0/1 column per finding, e.g. label_effusion)")
        if df.height == 0:
            raise TaskError(f"{csv_path}: no rows")
        return df, label_cols

    def _usable_rows(self, df: pl.DataFrame, skip_bad: bool) -> tuple[list[int], list[str], list[str | None]]:
        """The rows kept (with `skip_bad`, a missing or unreadable image is skipped and counted in `skipped`;
        without it, an error naming the row), their image paths and mask paths (None: no mask)."""
        csv_path = self.csv_path
        keep, images, masks = [], [], []
        for i, rec in enumerate(df.iter_rows(named=True)):
            rel = (rec["image"] or "").strip()
            if not rel:
                raise TaskError(f"{csv_path} {_row(i)}: empty 'image' cell")
            path = self.root / rel
            if not path.is_file():
                if skip_bad:
                    self.skipped.append((rel, "file not found"))
                    continue
                raise TaskError(f"{csv_path} {_row(i)}: image {rel!r} not found at {path} "
                                "(fix the path, or pass --skip-bad to skip and count such rows)")
            if skip_bad and (reason := _unreadable(path)):
                self.skipped.append((rel, reason))
                continue
            if not (rec["patient_id"] or "").strip():
                raise TaskError(f"{csv_path} {_row(i)}: empty patient_id (every image needs one for patient-level splits)")
            mrel = (rec.get("mask") or "").strip() if "mask" in df.columns else ""
            if mrel and not (self.root / mrel).is_file():
                raise TaskError(f"{csv_path} {_row(i)}: mask {mrel!r} not found at {self.root / mrel}")
            keep.append(i)
            images.append(rel)
            masks.append(mrel or None)
        return keep, images, masks

    def _labels(self, df: pl.DataFrame, label_cols: list[str], keep: list[int]) -> np.ndarray:
        """int8 [N, L] of the kept rows; anything but 0 or 1 names its row."""
        labels = np.zeros((df.height, len(label_cols)), dtype=np.int8)
        for j, col in enumerate(label_cols):
            for k, v in enumerate(df[col].to_list()):
                v = (v or "").strip()
                if v not in ("0", "1", "0.0", "1.0"):
                    raise TaskError(f"{self.csv_path} {_row(keep[k])}: {col} is {v!r}; labels must be 0 or 1")
                labels[k, j] = int(float(v))
        return labels

    def _split(self, df: pl.DataFrame, keep: list[int]) -> list[str] | None:
        """The official split of the kept rows ('train', 'test' or '' per row), None when the CSV has none."""
        if "split" not in df.columns:
            return None
        split = []
        for k, v in enumerate(df["split"].to_list()):
            v = (v or "").strip().lower()
            if v not in ("", "train", "test"):
                raise TaskError(f"{self.csv_path} {_row(keep[k])}: split is {v!r}; use train, test or blank")
            split.append(v)
        return split if any(split) else None

    def _check_masks(self, rows: list[int]) -> None:
        """Every mask at its image's size (header reads only), and at least one mask with foreground: a set of
        masks that all decode empty is a format problem, and would train segmentation heads on nothing."""
        with_mask = np.flatnonzero(self.table.has_mask)
        for k in with_mask:
            image, mask = self.table.image_ids[k], self._masks[k]
            try:
                image_size, mask_size = _size(self.root / image), _size(self.root / mask)
            except Exception as e:  # any reader error, reported with the row and the file
                raise TaskError(f"{self.csv_path} {_row(rows[k])}: cannot read the size of image {image!r} or mask "
                                f"{mask!r} ({type(e).__name__}: {e})") from e
            if image_size != mask_size:
                raise TaskError(f"{self.csv_path} {_row(rows[k])}: mask {mask!r} is {mask_size[0]}x{mask_size[1]} "
                                f"pixels but its image {image!r} is {image_size[0]}x{image_size[1]}; a mask must "
                                "have its image's size (re-export it at that size, or blank the mask cell)")
        # Stops at the first mask with foreground: one decode on a good set.
        if not any(read_mask(self.root / self._masks[k]).any() for k in with_mask):
            raise TaskError(f"{self.csv_path}: all {len(with_mask)} masks in the 'mask' column are empty (no "
                            "non-zero pixel); foreground must be stored as a non-zero value (0/1 and 0/255 both "
                            "work): check that the column points at the mask files")

    @staticmethod
    def _col(df: pl.DataFrame, name: str) -> list:
        return df[name].to_list() if name in df.columns else [None] * df.height

    def _parse_sex(self, v: str | None, i: int) -> str | None:
        v = (v or "").strip().upper()
        if v in ("", "O", "U", "UNKNOWN"):
            return None
        if v in ("M", "F"):
            return v
        raise TaskError(f"{self.csv_path} {_row(i)}: sex is {v!r}; use M, F or blank")

    def _parse_age(self, v: str | None, i: int) -> float:
        v = (v or "").strip()
        if not v:
            return float("nan")
        try:
            a = float(v)
        except ValueError:
            raise TaskError(f"{self.csv_path} {_row(i)}: age is {v!r}; use a number of years or blank") from None
        return plausible_age(a)

    def load_image(self, i: int) -> np.ndarray:
        try:
            return load_radiograph(self.root / self.table.image_ids[i])
        except ImageDecodeError as e:
            raise TaskError(f"{self.csv_path}: {e}") from e

    def load_mask(self, i: int) -> np.ndarray | None:
        rel = self._masks[i]
        if rel is None:
            return None
        try:
            return read_mask(self.root / rel)[None]
        except Exception as e:  # any decoder error, reported naming the file
            raise TaskError(f"{self.csv_path}: mask {rel!r} cannot be read ({type(e).__name__}: {e})") from e

    def file_digests(self) -> list[str]:
        # Hashing every image's bytes is the slow part of a cached run and a run asks several times (duplicate
        # check, once per feature set); the files do not change during one run.
        if self._file_digests is None:
            self._file_digests = [sha256_file(self.root / p) for p in self.table.image_ids]
        return self._file_digests

    def content_digest(self) -> str:
        return combine_digests(self.table.image_ids, self.file_digests())


def csv_task(ctx: TaskContext) -> Task:
    return CsvTask(Path(ctx.arg).expanduser(), skip_bad=ctx.skip_bad)
