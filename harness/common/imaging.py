"""Decode a radiograph file (PNG, JPEG, DICOM) to float32 [H, W] in [0, 1], once, the same way everywhere.

Shared by the trainer's data pipeline and the harness's tasks; it lives in harness.common, whose modules import
nothing of the trainer, so the trainer can use it without pulling in the harness. DICOM follows the display
pipeline a radiologist's viewer applies: modality LUT (rescale slope/intercept), then VOI LUT or window, then
MONOCHROME1 inversion, then scaling of the displayable range to [0, 1]. pydicom decodes the compressed transfer
syntaxes through its plugins (pylibjpeg for JPEG Lossless / JPEG-LS / JPEG 2000, Pillow for JPEG Baseline, its own
RLE decoder).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

#: Bump when a change here changes decoded pixels: caches keyed on file bytes include it (the bytes alone do
#: not say how they were turned into an image).
DECODER_VERSION = "imaging-2"
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


def load_radiograph(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Any supported file -> float32 [H, W] in [0, 1]. Raises ImageDecodeError naming the file.

    `min_side`: the caller will shrink the image until its shorter side is about this long, so a codec that
    can decode at a lower resolution may do so (JPEG 2000 DICOM: 5-20x faster, see bench/bench_dicom.py); the
    result is then smaller than the file's Rows x Columns but its shorter side is still >= min_side. None (the
    default) always decodes at full size."""
    path = Path(path)
    if not path.exists():
        raise ImageDecodeError(f"{path}: file not found")
    try:
        return decode_dicom(path, min_side) if is_dicom(path) else decode_raster(path)
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


def decode_dicom(path: Path, min_side: int | None = None) -> np.ndarray:
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
    unsigned = int(getattr(ds, "PixelRepresentation", 0)) == 0
    try:
        raw = _decode_j2k_reduced(ds, min_side) if min_side and frames == 1 else None
        if raw is None:
            # A multi-frame radiograph is read as its first frame; decode only that one. Unsigned values are
            # masked to BitsStored below, and only when an unused high bit is set, instead of pydicom's
            # unconditional shift pair; an uncompressed image is then a view of the file's bytes (no copy).
            ds.pixel_array_options(index=0 if frames > 1 else None, decoding_plugin=_fastest_plugin(ts),
                                   correct_unused_bits=not unsigned, view_only=True)
            raw = ds.pixel_array
    except Exception as e:
        raise ImageDecodeError(f"{path}: cannot decode pixel data (transfer syntax {ts}): {e}") from e
    if raw.ndim == 3:  # colour (SamplesPerPixel 3): luminance as the channel mean
        return _display(raw.astype(np.float32).mean(axis=-1), ds, present=None)
    if raw.dtype.kind == "u":
        top = (1 << int(getattr(ds, "BitsStored", 8 * raw.dtype.itemsize))) - 1
        if raw.max() > top:
            raw = raw & np.array(top, dtype=raw.dtype)  # PS3.5 8.1.1: bits above BitsStored carry no value
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
        if np.issubdtype(modality.dtype, np.floating) and np.array_equal(modality, np.round(modality)):
            modality = modality.astype(np.int64)  # a LUT is indexed by integers (an identity rescale gives floats)
        out = np.asarray(apply_voi_lut(modality, ds, prefer_lut=True), dtype=np.float64)
        # The display range is what the VOI can output, not the image's own min/max: a dark image stays dark.
        # A LUT's outputs over its whole input domain, or a window's at two extreme inputs, give those bounds.
        if "VOILUTSequence" in ds:
            entries, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
            inputs = np.arange(first, first + (entries or 65536))  # 0 entries means 2**16 (PS3.3 C.11.2.1.1)
        else:
            inputs = np.array([-1e9, 1e9])
        bounds = apply_voi_lut(inputs, ds, prefer_lut=True)
        lo, hi = float(bounds.min()), float(bounds.max())
    else:
        out = np.asarray(modality, dtype=np.float64)
        # Without a window, the image's own range is displayed. The modality transforms radiographs use
        # (rescale slope/intercept) are monotonic, so the range of `present` bounds the image's values.
        seen = out if present is None else np.asarray(apply_modality_lut(present, ds), dtype=np.float64)
        lo, hi = float(seen.min()), float(seen.max())
    lo, hi = min(lo, hi), max(lo, hi)
    out = np.clip((out - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(out)
    # pydicom does not invert MONOCHROME1 (pydicom/pixels/processing.py apply_presentation_lut inverts only for
    # PresentationLUTShape INVERSE): lower values are brighter there.
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _decode_j2k_reduced(ds, min_side: int) -> np.ndarray | None:
    """A JPEG 2000 frame decoded at a lower resolution level: the wavelet transform stores the image at
    1/2, 1/4, ... of its size, and decoding stops at the smallest level whose shorter side is >= min_side,
    skipping most of the entropy decoding. None when the file is not a single-channel unsigned JPEG 2000 image
    or no level is small enough to help."""
    import io

    from PIL import Image
    from pydicom.encaps import generate_frames

    if str(ds.file_meta.TransferSyntaxUID) not in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"):
        return None
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1 or int(getattr(ds, "PixelRepresentation", 0)) != 0:
        return None
    levels = 0
    while min(int(ds.Rows), int(ds.Columns)) >> (levels + 1) >= min_side:
        levels += 1
    if levels == 0:
        return None
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    siz = frame.find(b"\xff\x51")  # the image and tile size marker; component 0's precision is 40 bytes in
    if siz < 0 or len(frame) <= siz + 40:
        return None
    precision = (frame[siz + 40] & 0x7F) + 1
    with Image.open(io.BytesIO(frame)) as im:
        # The codestream may hold fewer decomposition levels than asked: Pillow then refuses; decode in full.
        im.reduce = levels
        try:
            im.load()
        except (OSError, ValueError):
            return None
        arr = np.asarray(im)
    if arr.dtype.itemsize == 2 and precision < 16:
        arr = arr >> (16 - precision)  # Pillow scales 9-15-bit samples up to the full 16-bit range
    return arr.astype(np.uint16 if int(ds.BitsAllocated) > 8 else np.uint8, copy=False)


def _fastest_plugin(ts) -> str:
    """pyjpegls decodes JPEG-LS about 4x faster than pylibjpeg (2500x2048 12-bit, one core: 0.12 s vs 0.47 s); ''
    lets pydicom choose."""
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
    raise ValueError("no TransferSyntaxUID in the file meta, and the encapsulated pixel data is in no codec "
                     "recognised from its first bytes (JPEG, JPEG-LS, JPEG 2000, RLE)")
