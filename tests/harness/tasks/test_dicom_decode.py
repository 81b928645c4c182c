"""DICOM decoding (harness/common/imaging.py) and header reading (harness/tasks/dicom_meta.py) on generated files."""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from harness.tasks.base import combine_digests
from harness.tasks.dicom_meta import memoised_file_digests, parse_age, parse_sex, read_header
from harness.common.imaging import ImageDecodeError, load_radiograph
from tests.harness.tasks.dicom_fixtures import phantom, write_dicom

SHAPE = (40, 36)


@pytest.fixture(autouse=True)
def _digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RADDINO_BENCH_CACHE", str(tmp_path / "cache"))


def test_monochrome1_is_inverted(tmp_path):
    img = phantom(SHAPE, 0, 4095)
    m2 = load_radiograph(write_dicom(tmp_path / "m2.dcm", img, bits_stored=12))
    m1 = load_radiograph(write_dicom(tmp_path / "m1.dcm", (4095 - img).astype(np.uint16), bits_stored=12,
                                     photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, m2, atol=1e-6)
    np.testing.assert_allclose(m2, img / 4095, atol=1e-6)  # bright stays bright: not inverted twice


def test_12_bit_with_rescale_keeps_the_picture(tmp_path):
    img = phantom(SHAPE, 1, 4095)
    out = load_radiograph(write_dicom(tmp_path / "r.dcm", img, bits_stored=12, rescale=(2.0, -1024.0)))
    assert out.dtype == np.float32 and out.shape == SHAPE
    np.testing.assert_allclose(out, img / 4095, atol=1e-6)


def test_window_saturates_above_its_upper_edge(tmp_path):
    img = phantom(SHAPE, 2, 4095)
    out = load_radiograph(write_dicom(tmp_path / "w.dcm", img, bits_stored=12, window=(1024.0, 2048.0)))
    np.testing.assert_allclose(out, np.clip(img / 2047, 0, 1), atol=1e-6)
    assert (out == 1.0).mean() > 0.2  # the window really cut: a min/max normalisation would not saturate


def test_voi_lut_sequence_is_applied(tmp_path):
    img = phantom(SHAPE, 3, 4095)
    path = write_dicom(tmp_path / "lut.dcm", img, bits_stored=12)
    ds = pydicom.dcmread(path)
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    np.testing.assert_allclose(load_radiograph(path), lut[img] / 65535, atol=1e-6)


def test_table_path_equals_the_direct_float_pipeline(tmp_path):
    """The 65,536-entry table is an optimisation: it must give what the pipeline gives pixel by pixel."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 65536, SHAPE, dtype=np.uint16)
    path = write_dicom(tmp_path / "t.dcm", img, rescale=(0.5, 100.0), window=(20000.0, 30000.0))
    ds = pydicom.dcmread(path)
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    lo, hi = apply_voi_lut(np.array([-1e9, 1e9]), ds)
    np.testing.assert_allclose(load_radiograph(path), (voi - lo) / (hi - lo), atol=1e-6)


def test_signed_pixels(tmp_path):
    img = (phantom(SHAPE, 4, 4000).astype(np.int32) - 2000).astype(np.int16)
    out = load_radiograph(write_dicom(tmp_path / "s.dcm", img))
    np.testing.assert_allclose(out, (img + 2000) / 4000, atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_syntaxes_decode_exactly(tmp_path, syntax):
    img = phantom(SHAPE, 5, 4095)
    ref = load_radiograph(write_dicom(tmp_path / "raw.dcm", img, bits_stored=12))
    path = write_dicom(tmp_path / "c.dcm", img, bits_stored=12, syntax=syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_radiograph(path), ref)


def test_jpeg_baseline_8_bit(tmp_path):
    img = phantom(SHAPE, 6, 255)
    out = load_radiograph(write_dicom(tmp_path / "j.dcm", img, syntax=JPEGBaseline8Bit))
    assert np.abs(out - img / 255).mean() < 0.02  # lossy, but the same picture


@pytest.mark.parametrize("syntax", [None, JPEG2000Lossless, RLELossless, JPEGLSLossless])
def test_missing_transfer_syntax_uid_is_inferred(tmp_path, syntax):
    img = phantom(SHAPE, 7, 4095)
    kw = {"syntax": syntax} if syntax else {}
    path = write_dicom(tmp_path / "x.dcm", img, bits_stored=12, drop_syntax=True, **kw)
    assert "TransferSyntaxUID" not in pydicom.dcmread(path, force=True).file_meta
    np.testing.assert_array_equal(load_radiograph(path), img / np.float32(4095))


def test_missing_transfer_syntax_uid_jpeg_baseline(tmp_path):
    img = phantom(SHAPE, 12, 255)
    with_uid = load_radiograph(write_dicom(tmp_path / "a.dcm", img, syntax=JPEGBaseline8Bit))
    without = load_radiograph(write_dicom(tmp_path / "b.dcm", img, syntax=JPEGBaseline8Bit, drop_syntax=True))
    np.testing.assert_array_equal(without, with_uid)


def test_missing_transfer_syntax_uid_unknown_codec_names_the_file(tmp_path):
    path = write_dicom(tmp_path / "odd.dcm", phantom(SHAPE, 13, 4095), bits_stored=12, syntax=RLELossless,
                       drop_syntax=True)
    ds = pydicom.dcmread(path, force=True)
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 80])  # an RLE header claiming 0 segments
    ds.save_as(path, implicit_vr=False, little_endian=True)
    with pytest.raises(ImageDecodeError, match="odd.dcm.*no TransferSyntaxUID"):
        load_radiograph(path)


def test_missing_pixel_data_and_garbage_name_the_file(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", phantom(SHAPE, 8, 255), with_pixels=False)
    with pytest.raises(ImageDecodeError, match="nopix.dcm.*no PixelData"):
        load_radiograph(path)
    with pytest.raises(ImageDecodeError, match="nopix.dcm.*no PixelData"):
        read_header(path)
    junk = tmp_path / "junk.dicom"
    junk.write_bytes(b"not a dicom file at all" * 20)
    with pytest.raises(ImageDecodeError, match="junk.dicom"):
        read_header(junk)
    with pytest.raises(ImageDecodeError, match="junk.dicom"):
        load_radiograph(junk)


def test_header_demographics(tmp_path):
    h = read_header(write_dicom(tmp_path / "h.dcm", phantom((20, 30), 9, 255), sex="F", age="055Y"))
    assert (h.sex, h.age, h.rows, h.columns) == ("F", 55.0, 20, 30)


@pytest.mark.parametrize("value, years", [
    ("055Y", 55.0), ("58", 58.0), ("006M", 0.5), ("014D", 14 / 365.25), ("002W", 14 / 365.25),
    ("155", math.nan), ("155Y", math.nan), ("", math.nan), (None, math.nan), ("abc", math.nan), ("-3", math.nan)])
def test_parse_age(value, years):
    got = parse_age(value)
    assert (math.isnan(got) and math.isnan(years)) or got == pytest.approx(years)


def test_parse_sex():
    assert [parse_sex(v) for v in ("M", "f ", "O", "", None)] == ["M", "F", None, None, None]


def memoised_digest(image_ids, paths):
    return combine_digests(image_ids, memoised_file_digests(paths))


def test_memoised_digest_tracks_bytes_and_keeps_no_names(tmp_path):
    a, b = tmp_path / "img-a.dcm", tmp_path / "img-b.dcm"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    d1 = memoised_digest(["ida", "idb"], [a, b])
    assert memoised_digest(["ida", "idb"], [a, b]) == d1
    assert memoised_digest(["idb", "ida"], [b, a]) != d1  # order is part of it
    memo = (tmp_path / "cache" / "file-digests.json").read_text()
    assert "img-a" not in memo and "ida" not in memo and len(json.loads(memo)) == 2
    b.write_bytes(b"SECOND")  # same size, new mtime
    assert memoised_digest(["ida", "idb"], [a, b]) != d1
    # Corrected in place with its old mtime put back (cp -p, touch -r): the memo must not serve the old digest.
    d2 = memoised_digest(["ida", "idb"], [a, b])
    mtime = b.stat().st_mtime_ns
    time.sleep(0.05)  # past the kernel's coarse timestamp tick, so the rewrite gets a later ctime
    b.write_bytes(b"SECONd")
    os.utime(b, ns=(mtime, mtime))
    assert b.stat().st_mtime_ns == mtime and memoised_digest(["ida", "idb"], [a, b]) != d2
    (tmp_path / "cache" / "file-digests.json").write_text("{not json")
    assert memoised_digest(["ida", "idb"], [a, b]) == memoised_digest(["ida", "idb"], [a, b])


def test_jpeg2000_reduced_resolution_decode(tmp_path):
    img = phantom((128, 96), 10, 4095)
    path = write_dicom(tmp_path / "j.dcm", img, bits_stored=12, syntax=JPEG2000Lossless)
    full = load_radiograph(path)
    half = load_radiograph(path, min_side=48)  # 96 / 2 = 48: one level down, no further
    assert half.shape == (64, 48) and half.dtype == np.float32
    blocks = full.reshape(64, 2, 48, 2).mean(axis=(1, 3))
    # The wavelet's low band is the same picture at half size (a 5/3 low-pass, not a box mean, hence the
    # tolerance; without a window the image's own range, narrowed slightly by the low-pass, sets the scaling).
    assert np.abs(half - blocks).mean() < 0.05 and np.corrcoef(half.ravel(), blocks.ravel())[0, 1] > 0.97
    assert load_radiograph(path, min_side=40).shape == (64, 48)  # 24 < 40: stops at one level
    np.testing.assert_array_equal(load_radiograph(path, min_side=97), full)  # no level small enough
    raw = write_dicom(tmp_path / "raw.dcm", img, bits_stored=12)
    np.testing.assert_array_equal(load_radiograph(raw, min_side=48), full)  # other syntaxes: full size


def test_bits_above_bits_stored_are_ignored(tmp_path):
    img = phantom(SHAPE, 11, 4095)
    path = write_dicom(tmp_path / "hb.dcm", img, bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.PixelData = (img | 0xB000).astype(np.uint16).tobytes()  # garbage in the 4 unused bits (overlay-style)
    ds.save_as(path)
    np.testing.assert_allclose(load_radiograph(path), img / 4095, atol=1e-6)
