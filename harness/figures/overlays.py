"""Segmentation overlays: what the protocol saves (`overlay_npz`, per model a compressed
``results/<name>/<model>.overlays.npz``) and the figure drawn from it, so overlays are redrawn without retraining.

The file holds, for the few test images the protocol shows, the radiograph downsampled to at most `MAX_HEIGHT`
rows (uint8), the union of the structures' truth and predicted masks at that size (bit-packed bools), the
per-structure Dice of each image (computed at full resolution by the protocol), and for naming only the patient
pseudonym and the image's position among the test images: never an image id. The zip is written with fixed
timestamps, so the same overlays give the same bytes."""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from PIL import Image

from harness.figures.common import FigureInputError, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SUFFIX = ".overlays.npz"
MAX_HEIGHT = 256
#: Okabe & Ito's colour-blind-safe palette; the three also differ in lightness (dark blue, mid vermillion, light
#: yellow), so they stay apart in greyscale too.
COLOURS = {"true positive": (0, 114, 178), "false positive": (213, 94, 0), "false negative": (240, 228, 66)}
OPACITY = 150  # of 255: the radiograph stays visible under the colours
_SCALARS = ("model", "head", "structures", "dice", "patient_keys", "test_index")


def _small_size(h: int, w: int) -> tuple[int, int]:
    if h <= MAX_HEIGHT:
        return h, w
    return MAX_HEIGHT, max(1, round(w * MAX_HEIGHT / h))


def _downsample_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    gray = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) * 255 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(gray.resize(size[::-1], Image.Resampling.BILINEAR) if gray.size[::-1] != size else gray)


def _downsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [H, W] -> bool at `size`: a pixel is set when it covers at least half mask (area averaging)."""
    if mask.shape == size:
        return mask.astype(bool)
    area = Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1], Image.Resampling.BOX)
    return np.asarray(area) >= 128


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """np.savez_compressed's format (np.load reads it) with a fixed date on every member, for identical bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def overlay_npz(model: str, head: str, images: list[np.ndarray], truths: list[np.ndarray], preds: list[np.ndarray],
                dice: np.ndarray, structures: list[str], patient_keys: list[str], test_index: list[int]) -> bytes:
    """The overlays file of one model: `images` float [H, W] in [0, 1], `truths` and `preds` bool [K, H, W] at
    the image's size, `dice` [n, K] (NaN where a truth is empty), the images' patient pseudonyms and positions
    among the test images."""
    arrays: dict[str, np.ndarray] = {
        "model": np.array(model), "head": np.array(head), "structures": np.array(structures, dtype=str),
        "dice": np.asarray(dice, dtype=np.float64).reshape(len(images), len(structures)),
        "patient_keys": np.array(patient_keys, dtype=str), "test_index": np.asarray(test_index, dtype=np.int64)}
    for i, (image, truth, pred) in enumerate(zip(images, truths, preds, strict=True)):
        size = _small_size(*image.shape[-2:])
        arrays[f"image{i}"] = _downsample_image(image, size)
        arrays[f"truth{i}"] = np.packbits(_downsample_mask(np.asarray(truth).any(0), size), axis=-1)
        arrays[f"pred{i}"] = np.packbits(_downsample_mask(np.asarray(pred).any(0), size), axis=-1)
    return _npz(arrays)


@dataclass
class Overlays:
    model: str
    head: str
    structures: list[str]
    dice: np.ndarray           # [n, K]
    patient_keys: list[str]
    test_index: list[int]
    images: list[np.ndarray]   # uint8 [h, w]
    truths: list[np.ndarray]   # bool [h, w]: any structure
    preds: list[np.ndarray]


def read_overlays(path: Path) -> Overlays:
    """The overlays file written by `overlay_npz`; FigureInputError naming the file when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise FigureInputError(f"{path}: cannot read the segmentation overlays ({type(e).__name__}: {e}); "
                               "regenerate them with `python -m harness.run` (protocol seg)") from None
    n = len(arrays.get("test_index", []))
    expected = [*_SCALARS, *(f"{k}{i}" for i in range(n) for k in ("image", "truth", "pred"))]
    missing = [k for k in expected if k not in arrays]
    if missing:
        raise FigureInputError(f"{path}: the segmentation overlays lack array(s) {', '.join(missing)}; regenerate "
                               "them with `python -m harness.run` (protocol seg)")
    images = [arrays[f"image{i}"] for i in range(n)]

    def unpacked(kind: str, i: int) -> np.ndarray:
        return np.unpackbits(arrays[f"{kind}{i}"], axis=-1, count=images[i].shape[1]).astype(bool)

    return Overlays(str(arrays["model"]), str(arrays["head"]), arrays["structures"].tolist(), arrays["dice"],
                    arrays["patient_keys"].tolist(), arrays["test_index"].tolist(), images,
                    [unpacked("truth", i) for i in range(n)], [unpacked("pred", i) for i in range(n)])


def overlay_rgba(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 4] layer over the radiograph: true positives, false positives, false negatives in their
    COLOURS at OPACITY, transparent elsewhere (true negatives)."""
    layer = np.zeros((*truth.shape, 4), dtype=np.uint8)
    for colour, where in zip(COLOURS.values(), (truth & pred, pred & ~truth, truth & ~pred)):
        layer[where] = (*colour, OPACITY)
    return layer


def colour_counts(layer: np.ndarray) -> dict[str, int]:
    """Pixels of each COLOURS entry in an overlay layer (what a reader of the figure sees)."""
    return {name: int((layer == (*colour, OPACITY)).all(-1).sum()) for name, colour in COLOURS.items()}


def _dice_text(structures: list[str], dice: np.ndarray) -> str:
    return ", ".join(f"{s} {d:.3f}" if np.isfinite(d) else f"{s} no truth" for s, d in zip(structures, dice))


def draw(ov: Overlays, title: str) -> tuple["Figure", pl.DataFrame] | None:
    """A panel per image (radiograph with the TP/FP/FN layer, the image's Dice in its title) under a title strip
    naming the model; returns the figure and per image its Dice and the TP/FP/FN pixels of the layer drawn."""
    from matplotlib.patches import Patch

    if not ov.images:
        return None
    aspects = [img.shape[1] / img.shape[0] for img in ov.images]
    fig = new_figure(max(4.0, sum(3.2 * a for a in aspects) + 0.4), 4.0)
    axes = fig.subplots(1, len(ov.images), squeeze=False, width_ratios=aspects).ravel()
    drawn = []
    for ax, img, truth, pred, dice, key, idx in zip(axes, ov.images, ov.truths, ov.preds, ov.dice, ov.patient_keys,
                                                  ov.test_index):
        layer = overlay_rgba(truth, pred)
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.imshow(layer, interpolation="nearest")
        ax.set_title(f"test image {idx}, patient {key}\nDice: {_dice_text(ov.structures, dice)}", fontsize=8)
        ax.set_axis_off()
        counts = colour_counts(layer)
        drawn.append({"test_index": idx, "patient_key": key, "dice": [float(d) for d in dice],
                      "tp": counts["true positive"], "fp": counts["false positive"], "fn": counts["false negative"]})
    fig.legend(handles=[Patch(color=np.array(c) / 255, label=n) for n, c in COLOURS.items()],
               loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(f"{title}: {ov.model}, {ov.head} head\nstructures merged ({', '.join(ov.structures)}); Dice per "
                 "structure, at full resolution", fontsize=9)
    return fig, pl.DataFrame(drawn)
