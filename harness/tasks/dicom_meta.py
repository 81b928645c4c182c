"""What the DICOM datasets (VinDr-CXR, CANDID-PTX, RSNA Pneumonia) share: reading their CSVs, a cheap header
read per image (demographics and a decodability check), a base task over DICOM files, and content digests
memoised across runs.

Nothing here writes a patient identifier anywhere: headers are read for PatientSex and PatientAge only, and the
digest memo is keyed by a hash of (path, size, mtime, inode, ctime), so it holds no file names either.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.common.atomic import atomic_write_json
from harness.common.hashing import sha256_file, sha256_text
from harness.common.imaging import ImageDecodeError, load_radiograph
from harness.common.paths import cache_dir
from harness.common.ranges import plausible_age
from harness.tasks.base import Task, TaskError, combine_digests

#: The tags a reader stopped by `stop_before_pixels` is left in front of: (Float/Double Float) Pixel Data,
#: little- and big-endian.
_PIXEL_TAGS = {b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00",
               b"\x7f\xe0\x00\x10", b"\x7f\xe0\x00\x08", b"\x7f\xe0\x00\x09"}
_AGE_UNIT_YEARS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


# --- CSV tables ----------------------------------------------------------------------------------------------

def read_csv(path: Path, required: list[str], rename: dict[str, str] | None = None
             ) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV as (line number, row dict), header names stripped and renamed by `rename` (spelling
    variants). Quoted multi-line fields (CANDID reports) are one row; a UTF-8 byte-order mark is ignored.
    Raises TaskError when the file or a required column is missing."""
    if not path.is_file():
        raise TaskError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [(rename or {}).get(h.strip(), h.strip()) for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise TaskError(f"{path}: header {header} lacks column(s) {missing}; expected at least {required} "
                            "(is this the file as the dataset distributes it?)")
        reader.fieldnames = header
        rows = []
        end = reader.line_num  # the header's last line
        for row in reader:
            # A quoted multi-line cell spans lines: a row is named by the line it starts on.
            start, end = end + 1, reader.line_num
            if None in row:  # more cells than header names
                raise TaskError(f"{path} line {start}: more cells than the {len(header)} header columns")
            rows.append((start, {k: (v or "").strip() for k, v in row.items()}))
        return rows


# --- DICOM headers -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    """What the loaders keep from a DICOM header: no identifiers."""

    sex: str | None
    age: float
    rows: int
    columns: int


def parse_sex(value: object) -> str | None:
    """PatientSex -> 'M', 'F' or None ('O', blank and anything else are unknown)."""
    s = str(value or "").strip().upper()
    return s if s in ("M", "F") else None


def parse_age(value: object) -> float:
    """PatientAge in years: the DICOM AS form (``055Y``, ``006M``, ``003W``, ``010D``) or a plain number
    (RSNA writes ``58``). Blank, unparsable and impossible (see `plausible_age`) ages are NaN."""
    s = str(value or "").strip().upper()
    scale = 1.0
    if s[-1:] in _AGE_UNIT_YEARS:
        s, scale = s[:-1], _AGE_UNIT_YEARS[s[-1]]
    try:
        years = float(s) * scale
    except ValueError:
        return math.nan
    return plausible_age(years)


def read_header(path: Path) -> Header:
    """Read a DICOM header without its pixels and check, cheaply, that the image can be decoded: the file is
    DICOM with Rows/Columns, carries pixel data, and a decoder for its transfer syntax is installed.
    Raises ImageDecodeError naming the file and the cause."""
    import pydicom
    from pydicom.pixels import get_decoder

    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            # The reader stops *in front of* the pixel data element; a file without one is read to the end.
            has_pixels = f.read(4) in _PIXEL_TAGS
    except Exception as e:  # pydicom raises many types on garbage; one error type naming the file
        raise ImageDecodeError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from e
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageDecodeError(f"{path}: not a DICOM image (no Rows/Columns in the header)")
    if not has_pixels:
        raise ImageDecodeError(f"{path}: DICOM has no PixelData (not an image)")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and ts.is_compressed:
        try:
            available = get_decoder(ts).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise ImageDecodeError(f"{path}: no installed decoder for transfer syntax {ts.name} ({ts}); "
                                   "install pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg and pillow")
    return Header(sex=parse_sex(ds.get("PatientSex")), age=parse_age(ds.get("PatientAge")),
                  rows=int(ds.Rows), columns=int(ds.Columns))


# --- The base task ---------------------------------------------------------------------------------------------

class Skips:
    """Collects bad inputs: raises a TaskError at once, or with --skip-bad records (where, reason) and goes on.
    `where` is a path relative to the dataset root or a CSV row, never a patient id."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.items: list[tuple[str, str]] = []

    def bad(self, where: str, reason: str, fix: str = "") -> None:
        if not self.skip_bad:
            raise TaskError(f"{where}: {reason}" + (f"; {fix}" if fix else "")
                            + " (or pass --skip-bad to skip and count such files)")
        self.items.append((where, reason))


def check_images(root: Path, listed: list[tuple[str, Path | None, str]], skips: Skips
                 ) -> tuple[list[int], list[Header]]:
    """For each (where listed, path or None when not found, shown as) entry: read its header. Returns the
    indices of the good entries and their headers; bad entries go to `skips` as `shown-as` (a path relative to
    the root, or a CSV row for datasets whose file names are patient ids)."""
    kept, headers = [], []
    for k, (listed_in, path, shown) in enumerate(listed):
        if path is None or not path.is_file():
            listed = f" (listed in {listed_in})" if listed_in != shown else ""
            skips.bad(shown, f"the image file is missing{listed}", f"expected under {root}")
            continue
        try:
            headers.append(read_header(path))
        except ImageDecodeError as e:
            skips.bad(shown, f"unreadable DICOM: {str(e).removeprefix(f'{path}: ')}")
            continue
        kept.append(k)
    return kept, headers


class DicomTask(Task):
    """A task whose images are DICOM files; subclasses fill `table`, `paths`, `shown` (how each image is named
    in messages: a path relative to the root, or a CSV line where file names are patient ids) and `skipped`."""

    paths: list[Path]
    shown: list[str]

    def load_image(self, i: int) -> np.ndarray:
        try:
            return load_radiograph(self.paths[i])
        except ImageDecodeError as e:
            cause = str(e).removeprefix(f"{self.paths[i]}: ")
            raise TaskError(f"{self.name}: {self.shown[i]}: cannot be decoded: {cause}; replace the file, or "
                            "pass --skip-bad (it drops files that fail the up-front header check)") from e

    def file_digests(self) -> list[str]:
        return memoised_file_digests(self.paths)

    def content_digest(self) -> str:
        return combine_digests(self.table.image_ids, self.file_digests())

    def where(self, i: int) -> str:
        return self.shown[i]


def demographics(headers: list[Header]) -> tuple[list[str | None], np.ndarray]:
    return [h.sex for h in headers], np.array([h.age for h in headers], dtype=np.float64)


# --- Content digests, memoised -------------------------------------------------------------------------------

def digest_cache_file() -> Path:
    """Where per-file digests are memoised: ``file-digests.json`` in the harness's cache directory
    (``$RADDINO_BENCH_CACHE``, else ``.cache/raddino-bench``)."""
    return cache_dir() / "file-digests.json"


def _file_key(path: Path) -> str:
    """What identifies one version of a file without reading it. mtime alone misses a file corrected in place
    with its mtime restored (``cp -p``, ``touch -r``, rsync -t); the ctime cannot be set that way (any write or
    utime moves it to now) and the inode changes when a file is replaced."""
    st = path.stat()
    version = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"
    return sha256_text(version)[:32]


def memoised_file_digests(paths: list[Path]) -> list[str]:
    """sha256 of each file's bytes. Each is memoised under its (path, size, mtime, inode, ctime), so an unchanged
    20k-image dataset is not re-read on every run (hashing alone runs at ~0.9 GB/s per core, before the disk
    reads: minutes per run for a few hundred GB of DICOM) while an edited or replaced file is. The memo is
    rewritten atomically; if it cannot be written the run goes on (it is only a speed-up) and says so."""
    cache = digest_cache_file()
    try:
        memo: dict[str, str] = json.loads(cache.read_text())
    except (OSError, ValueError):
        memo = {}
    digests = []
    changed = False
    for path in paths:
        key = _file_key(path)
        if key not in memo:
            memo[key] = sha256_file(path)
            changed = True
        digests.append(memo[key])
    if changed:
        try:
            atomic_write_json(cache, memo)
        except OSError as e:
            print(f"warning: cannot write the digest memo {cache} ({e}); digests are recomputed next run",
                  file=sys.stderr)
    return digests
