"""Small tasks several harness test files build: images drawn in memory (`TinyTask`, `MaskedTask`) and labels.csv
folders of PNGs for whole runs (`csv_set`, `labelled_set`), with the two pixel encoders the segmentation tests
compare."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from baselines.floors import PixelsEncoder
from baselines.preprocess import Preprocess
from harness.tasks.base import Task, TaskError, TaskTable


class TinyTask(Task):
    """`n` random images of growing heights, two per patient, one label; image `bad` fails to decode."""

    def __init__(self, n: int = 10, bad: int | None = None):
        self.name = "tiny"
        self.bad = bad
        self.table = TaskTable([f"i{k}" for k in range(n)], [f"p{k // 2}" for k in range(n)], ["a"],
                               np.array([[k % 2] for k in range(n)], np.int8), [None] * n, np.full(n, np.nan))
        self.skipped = []

    def load_image(self, i: int) -> np.ndarray:
        if i == self.bad:
            raise TaskError(f"file i{i}.png: cannot decode")
        rng = np.random.default_rng(i)
        return rng.random((30 + i, 40)).astype(np.float32)

    def content_digest(self) -> str:
        return f"tiny-{len(self)}"


def lung_mask(hw: tuple[int, int]) -> np.ndarray:
    """A lung-like mask away from the borders."""
    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    return ((((yy - 0.5 * h) / (0.38 * h)) ** 2 + ((xx - 0.4 * w) / (0.25 * w)) ** 2) < 1)[None]


class MaskedTask(Task):
    """Radiograph-like images of two shapes with a bright 'lung' region; every third image has no mask."""

    mask_names = ("lungs",)

    def __init__(self, n: int = 36, with_masks: bool = True):
        self.name = "tiny-seg"
        self.skipped = []
        self.shapes = [(48, 48) if i % 2 else (64, 40) for i in range(n)]
        has_mask = np.array([with_masks and i % 3 != 2 for i in range(n)])
        self.table = TaskTable([f"im{i}" for i in range(n)], [f"P{i // 2}" for i in range(n)], ["x"],
                               np.zeros((n, 1), np.int8), [None] * n, np.full(n, np.nan), has_mask=has_mask)
        if not with_masks:
            self.mask_names = ()

    def load_mask(self, i: int) -> np.ndarray | None:
        return lung_mask(self.shapes[i]) if self.table.has_mask[i] else None

    def load_image(self, i: int) -> np.ndarray:
        rng = np.random.default_rng(i)
        img = 0.6 + 0.1 * rng.random(self.shapes[i])
        img[lung_mask(self.shapes[i])[0]] = 0.15  # air-filled lungs are dark
        return (img + 0.05 * rng.normal(size=img.shape)).astype(np.float32)

    def content_digest(self) -> str:
        return f"tiny-seg-{len(self)}-{self.table.has_mask.sum()}"


def pixels_encoders() -> list[PixelsEncoder]:
    """`pixels` at 32 px with 4 px blocks, stretched and centre-cropped: two input geometries to map masks through."""
    stretch = PixelsEncoder(Preprocess(size=32, policy="resize_stretch", interpolation="area", mean=(0.5,),
                                       std=(0.25,), channels=1), block=4)
    crop = PixelsEncoder(Preprocess(size=32, policy="resize_shortest_crop", interpolation="area", mean=(0.5,),
                                    std=(0.25,), channels=1), block=4)
    crop.name = "pixels-crop"
    return [stretch, crop]


def csv_set(root: Path, n_patients: int = 24) -> Path:
    """Two PNGs per patient under `root`, label `signal` learnable from the brightness, label `never` all 0; sex
    and age given, no split column."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        for k in range(2):
            y = int(rng.random() < 0.5)
            img = rng.random((48, 40)) * 0.3 + (0.5 if y else 0.0)  # a learnable signal
            name = f"img/{p}_{k}.png"
            Image.fromarray((img * 255).clip(0, 255).astype(np.uint8)).save(root / name)
            rows.append(f"{name},{y},0,PID{p:03d},{'MF'[p % 2]},{30 + p}")
    (root / "labels.csv").write_text("image,label_signal,label_never,patient_id,sex,age\n" + "\n".join(rows) + "\n")
    return root / "labels.csv"


def labelled_set(root: Path, n_patients: int = 60) -> Path:
    """Two images per patient with an official split (patients 0-39 train, 40-59 test). Label `a`: even
    patients (10 positive test patients), `b`: multiples of 3 (6), `rare`: patients 1 and 41 only."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        a, b, rare = int(p % 2 == 0), int(p % 3 == 0), int(p in (1, 41))
        for k in range(2):
            img = rng.random((32, 32)) * 0.8  # a weak signal: AUROCs inside (0.5, 1), intervals of some width
            img[:16] += 0.04 * a
            img[:, :16] += 0.04 * b
            name = f"img/{p}_{k}.png"
            Image.fromarray((img * 255).clip(0, 255).astype(np.uint8)).save(root / name)
            rows.append(f"{name},{a},{b},{rare},PID{p:03d},{'MF'[p % 2]},{30 + p},{'train' if p < 40 else 'test'}")
    (root / "labels.csv").write_text("image,label_a,label_b,label_rare,patient_id,sex,age,split\n"
                                     + "\n".join(rows) + "\n")
    return root / "labels.csv"
