"""Decode a radiograph file (PNG, JPEG, DICOM) to float32 [H, W] in [0, 1], once, the same way everywhere.

Shared by the trainer's data pipeline and the harness's tasks (the harness imports this; the trainer imports
nothing from the harness). DICOM follows the display pipeline a radiologist's viewer applies: modality LUT
(rescale slope/intercept), then VOI LUT or window, then MONOCHROME1 inversion, then scaling of the
displayable range to [0, 1]. pydicom decodes the compressed transfer syntaxes through its plugins (pylibjpeg
for JPEG Lossless / JPEG-LS / JPEG 2000, Pillow for JPEG Baseline, its own RLE decoder).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ""}
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


class ImageDecodeError(ValueError):
    """A file could not be decoded; the message names the file and the cause."""


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the 'DICM' magic at byte 128 (files named by UID often have no suffix or a
    suffix that is just the UID's last component, e.g. ``1.2.840.113619.2.55.3.604688``)."""
    suffix = path.suffix.lower()
    if suffix in (".dcm", ".dicom"):
        return True
    if suffix in RASTER_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def load_radiograph(path: str | Path) -> np.ndarray:
    """Any supported file -> float32 [H, W] in [0, 1]. Raises ImageDecodeError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageDecodeError(f"{path}: file not found")
    try:
        return decode_dicom(path) if is_dicom(path) else decode_raster(path)
    except ImageDecodeError:
        raise
    except Exception as e:  # decoders raise many types; the caller needs one, naming the file
        raise ImageDecodeError(f"{path}: cannot decode ({type(e).__name__}: {e})") from e


def decode_raster(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32)
            # 16-bit PNGs store the bit depth used; normalise by the type's range, not by the image's max,
            # so that a dark image stays dark.
            return np.clip(arr / 65535.0, 0.0, 1.0)
        if im.mode == "F":
            arr = np.asarray(im, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        if im.mode != "L":
            im = im.convert("L")  # RGB(A) figures -> luminance; alpha dropped
        return np.asarray(im, dtype=np.float32) / 255.0


def decode_dicom(path: Path) -> np.ndarray:
    """DICOM -> float32 [H, W] in [0, 1] through the display pipeline (module docstring).

    The pipeline is a pointwise function of the stored value, so for 8- and 16-bit images it is evaluated
    once on every possible stored value (a 256- or 65,536-entry table) and applied with one gather, instead
    of four float64 passes over a ~5-megapixel image."""
    import pydicom

    ds = pydicom.dcmread(path, force=True)
    if "PixelData" not in ds:
        raise ImageDecodeError(f"{path}: DICOM has no PixelData (not an image)")
    if getattr(ds, "file_meta", None) is None or "TransferSyntaxUID" not in ds.file_meta:
        # Some published files lack it (VinDr-CXR v1.0.0, vindr-cxr issue #3).
        if getattr(ds, "file_meta", None) is None:
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = infer_transfer_syntax(ds)
    ts = ds.file_meta.TransferSyntaxUID
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    try:
        # A multi-frame radiograph is read as its first frame; decode only that one.
        ds.pixel_array_options(index=0 if frames > 1 else None, decoding_plugin=_fastest_plugin(ts))
        raw = ds.pixel_array
    except Exception as e:
        raise ImageDecodeError(f"{path}: cannot decode pixel data (transfer syntax {ts}): {e}") from e
    if raw.ndim == 3:  # colour (SamplesPerPixel 3): luminance as the channel mean
        return _display(raw.astype(np.float32).mean(axis=-1), ds, present=None)
    if raw.dtype.itemsize <= 2 and raw.dtype.kind in "ui":
        domain = np.arange(1 << (8 * raw.dtype.itemsize), dtype=np.uint32)
        stored = domain.astype(raw.dtype.str.replace("i", "u")).view(raw.dtype)  # table index -> stored value
        present = np.arange(int(raw.min()), int(raw.max()) + 1)
        table = _display(stored, ds, present)
        return table[raw.view(raw.dtype.str.replace("i", "u"))]
    return _display(raw, ds, present=None)


def _display(values: np.ndarray, ds, present: np.ndarray | None) -> np.ndarray:
    """Stored pixel values -> float32 display values in [0, 1]. `present` are the stored values occurring in
    the image (a contiguous range), which set the normalisation when there is no VOI; None means `values`
    are the image itself."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    modality = apply_modality_lut(values, ds)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_voi:
        out = np.asarray(apply_voi_lut(modality, ds, prefer_lut=True), dtype=np.float64)
        # The display range is what the window/LUT maps the extremes to, not the image's own min/max: a
        # dark image stays dark. Pushing two extreme values through the same VOI gives those bounds.
        extremes = np.array([-1e9, 1e9], dtype=np.float64)
        lo, hi = (float(v) for v in apply_voi_lut(extremes, ds, prefer_lut=True))
    else:
        out = np.asarray(modality, dtype=np.float64)
        # Without a window, the image's own range is displayed. The modality transforms radiographs use
        # (rescale slope/intercept) are monotonic, so the range of `present` bounds the image's values.
        seen = out if present is None else np.asarray(apply_modality_lut(present, ds), dtype=np.float64)
        lo, hi = float(seen.min()), float(seen.max())
    lo, hi = min(lo, hi), max(lo, hi)
    out = np.clip((out - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(out)
    # pydicom does not invert MONOCHROME1 (environment.md §4): lower values are brighter there.
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _fastest_plugin(ts) -> str:
    """pyjpegls decodes JPEG-LS about 4x faster than pylibjpeg (environment.md §4); '' lets pydicom choose."""
    from pydicom.pixels import get_decoder

    plugin = _PREFERRED_PLUGIN.get(str(ts), "")
    return plugin if plugin and plugin in get_decoder(ts).available_plugins else ""


_PREFERRED_PLUGIN = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls"}

# First bytes of an encapsulated frame -> its transfer syntax, for files whose file meta lost the UID.
_JPEG_SOF_SYNTAX = {
    0xC0: "1.2.840.10008.1.2.4.50",  # baseline
    0xC1: "1.2.840.10008.1.2.4.51",  # extended sequential
    0xC3: "1.2.840.10008.1.2.4.70",  # lossless (process 14, first-order prediction is the common one)
    0xF7: "1.2.840.10008.1.2.4.80",  # JPEG-LS
}


def infer_transfer_syntax(ds) -> str:
    """The transfer syntax of a dataset whose file meta has none: the dataset's own encoding for native
    pixels, or the codec recognised from the first frame's magic bytes for encapsulated ones."""
    from pydicom.encaps import generate_frames
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = ds.original_encoding
    if not ds["PixelData"].is_undefined_length:
        if little is False:
            return ExplicitVRBigEndian
        return ImplicitVRLittleEndian if implicit in (True, None) else ExplicitVRLittleEndian
    frame = next(generate_frames(ds.PixelData, number_of_frames=int(getattr(ds, "NumberOfFrames", 1) or 1)))
    if frame[:4] == b"\xff\x4f\xff\x51" or frame[4:8] == b"jP  ":
        return "1.2.840.10008.1.2.4.90"  # JPEG 2000 codestream or JP2 file: decoders read either
    if frame[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(frame) and frame[i] == 0xFF:
            marker = frame[i + 1]
            if marker in _JPEG_SOF_SYNTAX:
                return _JPEG_SOF_SYNTAX[marker]
            i += 2 + int.from_bytes(frame[i + 2:i + 4], "big")  # skip this marker segment
    if len(frame) >= 64 and 1 <= int.from_bytes(frame[:4], "little") <= 15:
        return "1.2.840.10008.1.2.5"  # RLE Lossless: a 64-byte header starting with the segment count
    raise ImageDecodeError("encapsulated pixel data in an unrecognised codec and no TransferSyntaxUID")
