"""DICOM decoding to a float image: our decoder (harness.common.imaging.load_radiograph) against pydicom's plain
``pixel_array`` plus a NumPy conversion, on a chest-radiograph-sized 16-bit file, uncompressed and JPEG 2000
Lossless (the syntax of VinDr-CXR).

    python bench/bench_dicom.py [--rows 2500] [--cols 2000] [--bits-stored 12] [--repeats 5] [--vit]

Three timings per file, each from the path on disk to a float32 array, median of --repeats (and, for JPEG 2000,
ours with `min_side` = 518 and 224: decoding stops at the wavelet level that still covers the encoder's input):
- ours:        load_radiograph: rescale + window + MONOCHROME handling -> [0, 1], through a per-value table;
- plain:       dcmread + pixel_array + astype(float32) + min/max scaling (no rescale, no window: less work);
- naive full:  dcmread + pixel_array + apply_modality_lut + apply_voi_lut in float64 + scaling (the same
               display pipeline as ours, written the direct way).
Ours is checked against the naive full pipeline (max abs difference printed) before anything is timed. Ratios
are reference time / our time (> 1: ours is faster). Images/s is 1 / our median time on one core.
With --vit it also times one forward pass of a randomly initialised ViT-B/14 at 518 px (RAD-DINO's encoder
size) on the CPU, so that decoding can be compared with feature extraction in the same run.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.common.imaging import load_radiograph


def write_radiograph(path: Path, rows: int, cols: int, bits_stored: int, syntax: str) -> Path:
    """A smooth radiograph-like 16-bit image with noise (so compression is realistic), with the rescale and
    window tags VinDr-style files carry."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:rows, 0:cols] / np.array([rows, cols])[:, None, None]
    img = 0.5 + 0.3 * yy - 0.35 * ((((xx - 0.3) / 0.15) ** 2 + ((yy - 0.45) / 0.3) ** 2) < 1)
    img = img - 0.35 * ((((xx - 0.7) / 0.15) ** 2 + ((yy - 0.45) / 0.3) ** 2) < 1)
    img = img + 0.01 * rng.standard_normal(img.shape)
    top = (1 << bits_stored) - 1
    pixels = np.clip(np.round((img - img.min()) / (img.max() - img.min()) * top), 0, top).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(pixels, "MONOCHROME2", bits_stored)
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
    ds.WindowCenter, ds.WindowWidth = top / 2, top * 0.8
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def plain(path: Path) -> np.ndarray:
    arr = pydicom.dcmread(path).pixel_array.astype(np.float32)
    lo, hi = arr.min(), arr.max()
    return (arr - lo) / (hi - lo)


def naive_full(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    lo, hi = apply_voi_lut(np.array([-1e9, 1e9]), ds)
    return np.clip((voi - lo) / (hi - lo), 0, 1).astype(np.float32)


def median_seconds(fn, path: Path | None, repeats: int) -> float:
    fn(path)  # warm-up: imports, plugin discovery, file cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def vit_forward_seconds(repeats: int) -> float:
    import torch

    from trainer.vit import build_vit

    torch.set_num_threads(1)
    model = build_vit("vit_base", img_size=518, patch_size=14).eval()
    x = torch.randn(1, 3, 518, 518)
    with torch.inference_mode():
        return median_seconds(lambda _: model(x), None, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2500)
    ap.add_argument("--cols", type=int, default=2000)
    ap.add_argument("--bits-stored", type=int, default=12, help="of 16 allocated (CR/DX store 10-14)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vit", action="store_true", help="also time a ViT-B/14 forward at 518 px, one core")
    args = ap.parse_args()
    print(f"{args.rows}x{args.cols}, 16 bits allocated, {args.bits_stored} stored, window + rescale tags; "
          f"median of {args.repeats}, one process")
    ours_ips = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, syntax in (("uncompressed", ExplicitVRLittleEndian), ("JPEG 2000 lossless", JPEG2000Lossless)):
            path = write_radiograph(Path(tmp) / f"{name[:4]}.dcm", args.rows, args.cols, args.bits_stored, syntax)
            diff = float(np.abs(load_radiograph(path) - naive_full(path)).max())
            t_ours = median_seconds(load_radiograph, path, args.repeats)
            t_plain = median_seconds(plain, path, args.repeats)
            t_naive = median_seconds(naive_full, path, args.repeats)
            ours_ips[name] = 1 / t_ours
            print(f"{name:>20} ({path.stat().st_size / 1e6:.1f} MB): ours {t_ours * 1e3:7.1f} ms "
                  f"({1 / t_ours:5.1f} images/s) | plain pixel_array+numpy {t_plain * 1e3:7.1f} ms "
                  f"(ratio {t_plain / t_ours:4.2f}) | naive full pipeline {t_naive * 1e3:7.1f} ms "
                  f"(ratio {t_naive / t_ours:4.2f}) | max |ours - naive| {diff:.1e}")
            if syntax == JPEG2000Lossless:
                for side in (518, 224):  # RAD-DINO's and CLIP's input sizes
                    t_red = median_seconds(functools.partial(load_radiograph, min_side=side), path, args.repeats)
                    shape = load_radiograph(path, min_side=side).shape
                    ours_ips[f"JPEG 2000 min_side={side}"] = 1 / t_red
                    print(f"{'':>20} ours with min_side={side} (decoded {shape[0]}x{shape[1]}): "
                          f"{t_red * 1e3:7.1f} ms ({1 / t_red:5.1f} images/s) | ratio plain / this "
                          f"{t_plain / t_red:5.2f}")
    if args.vit:
        t_vit = vit_forward_seconds(max(2, args.repeats // 2))
        print(f"ViT-B/14 forward at 518 px, batch 1, one thread: {t_vit * 1e3:.0f} ms ({1 / t_vit:.2f} images/s); "
              + ", ".join(f"{k} decoding is {v * t_vit:.1f}x faster" for k, v in ours_ips.items()))


if __name__ == "__main__":
    main()
