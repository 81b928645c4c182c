"""Segmentation from frozen patch tokens: two trained heads, one fixed budget, Dice and IoU at mask resolution.

For every encoder the same two heads are trained on its cached dense features of the masked training images:
- ``linear``: a 1x1 convolution on the last layer's patch grid (DINOv2's linear segmentation head);
- ``multi-level``: a light FPN-style decoder over the encoder's intermediate layers (each projected by a 1x1
  convolution, summed on the finest grid, refined by a 3x3 convolution, upsampled x2, refined, classified).
  An encoder without intermediate layers (``pixels``) gets the same decoder over its patch grid alone.
Features are standardised per channel with training-set statistics (a frozen BatchNorm), so one learning rate
suits every encoder. Optimiser, schedule, loss (binary cross-entropy + soft Dice, one sigmoid channel per
structure), epochs, batch size and seed are those of `SegBudget`, identical for every model.

Geometry. Targets are the masks put through *each encoder's own* preprocessing geometry (`place`: resize, crop
or pad) to its input square, then area-resampled to a loss grid of the same size for every model
(`SegBudget.loss_size`); the loss compares them with logits bilinearly upsampled from the patch grid. For
scoring, the logits are upsampled to the input size, turned into probabilities, mapped back with the inverse
geometry (`unplace`) to the original mask size and thresholded at 0.5, so every model is scored on the same
pixels whatever its input size. Pixels that a centre crop (``resize_shortest_crop``) cut away were never seen by
the encoder: they are scored as predicted background, so lung cut off by a crop counts as missed, not excused.

Placed targets are shared between encoders only when every mask lands identically (`mask_placement_key`: the
per-mask geometries themselves), so a model's numbers never depend on which other models are in the run.

Metrics: per image and structure, Dice = 2|P∩G| / (|P| + |G|) and IoU = |P∩G| / |P∪G|, averaged over the test
images whose ground truth for that structure is non-empty (an empty truth has no overlap to measure). On the
images whose truth is empty, the `empty-truth FP rate` is the fraction with any predicted pixel: the false
positives on negative images that Dice cannot see. Intervals and paired deltas use the patient-level bootstrap of
the masked test images, resampled over the pseudonymous patient keys that the per-image file
(``results/<task>/<model>.seg.parquet``) publishes, so every interval can be recomputed from it. Dense features
that are not finite (e.g. an fp16 overflow in the cache) stop the protocol with the model, task and images named.

Memory does not grow with the task. Dense features are read a batch of rows at a time from the grids extraction
returns (the cache's shards, or re-encoded batches when the entry exceeded the disk budget); the placed targets go
to shard files in a scratch folder ($TMPDIR) and masks are re-read from the task where they are needed. Every
batch, sum and chunk is the one the in-memory computation would make, in the same order, so the numbers are
bit-identical to holding everything in RAM.
"""
from __future__ import annotations

import io
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from baselines.preprocess import Geometry, Preprocess, geometry, place, unplace
from harness import ranks, stats
from harness.features import FeatureSet, Grid, ShardWriter, dense_view
from harness.figures.overlays import SUFFIX as OVERLAY_SUFFIX
from harness.figures.overlays import overlay_npz
from harness.leaderboard import Cell, Section
from harness.common.hashing import array_digest, sha256_chunks, sha256_text
from harness.common.paths import safe_name
from harness.log import progress
from harness.protocols import ProtocolResult, TaskRun
from harness.tasks.base import Task, TaskError
from harness.tidy import TidyRow, rows_of

if TYPE_CHECKING:
    from baselines.registry import Encoder

NAME = "seg"
log = logging.getLogger(__name__)
TITLE = "Segmentation (frozen patch tokens)"
HEADS = ("linear", "multi-level")
N_OVERLAYS = 4


@dataclass(frozen=True)
class SegBudget:
    """The training budget every encoder gets (CPU-friendly: a few seconds per head on the demo task)."""

    epochs: int = 12
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    decoder_dim: int = 32
    dice_weight: float = 1.0
    #: Side of the grid the loss is computed on: the encoder's input square (its own geometry) resampled to a
    #: common size, so a 518 px model is neither helped nor taxed by a finer supervision grid than a 224 px one,
    #: and training costs the same for every model. Scoring is at the original mask resolution regardless.
    loss_size: int = 112


BUDGET = SegBudget()


# ------------------------------------------------------------------------------------------------------- heads

class Standardise(nn.Module):
    """Fixed per-channel (x - mean) / std with training-set statistics: a frozen BatchNorm."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LinearHead(nn.Module):
    """A 1x1 convolution on one grid (the last layer's patch tokens)."""

    def __init__(self, norms: list[Standardise], channels: list[int], n_classes: int):
        super().__init__()
        if len(norms) != 1:
            raise ValueError(f"the linear head reads one grid (the patch tokens), got {len(norms)}")
        self.norm = norms[0]
        self.classify = nn.Conv2d(channels[0], n_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.norm(levels[0]))


class MultiLevelHead(nn.Module):
    """FPN-style fusion of several levels: lateral 1x1 projections summed on the finest grid, a 3x3 refinement,
    one x2 upsampling with a second 3x3 refinement (so the head can draw edges finer than a patch), a 1x1
    classifier."""

    def __init__(self, norms: list[Standardise], channels: list[int], n_classes: int, dim: int):
        super().__init__()
        self.norms = nn.ModuleList(norms)
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)
        self.fuse = nn.Sequential(nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1), nn.GELU())
        self.refine = nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1), nn.GELU())
        self.classify = nn.Conv2d(dim // 2, n_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        hw = max((x.shape[-2:] for x in levels), key=lambda s: s[0] * s[1])
        x = sum(F.interpolate(lat(norm(lv)), size=hw, mode="bilinear", align_corners=False)
                if lv.shape[-2:] != hw else lat(norm(lv))
                for norm, lat, lv in zip(self.norms, self.lateral, levels))
        x = self.fuse(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.classify(self.refine(x))


def levels_of(fs: FeatureSet, kind: str = "multi-level") -> list[Grid]:
    """The grids a head of `kind` reads: the linear head the last layer's patch tokens; the multi-level head the
    intermediate layers, shallow to deep (or the patch grid alone when the encoder exposes none)."""
    if kind == "linear" or not fs.layers:
        return [fs.patch]
    return list(fs.layers)


def channel_stats(levels: list[Grid], rows: np.ndarray | None = None,
                  chunk: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std of each fp16 [N, C, h, w] grid over `rows` (default: all), accumulated in float64
    over chunks of images; every level of a chunk is read before the next chunk (one encoder pass per chunk when
    the grids are re-encoded)."""
    rows = np.arange(len(levels[0])) if rows is None else np.asarray(rows)
    total = [np.zeros(lv.shape[1]) for lv in levels]
    sq = [np.zeros(lv.shape[1]) for lv in levels]
    for s in range(0, len(rows), chunk):
        for j, lv in enumerate(levels):
            x = lv[rows[s:s + chunk]].astype(np.float64)
            total[j] += x.sum(axis=(0, 2, 3))
            sq[j] += (x * x).sum(axis=(0, 2, 3))
    out = []
    for lv, t, q in zip(levels, total, sq):
        n = len(rows) * lv.shape[2] * lv.shape[3]
        mean = t / n
        std = np.sqrt(np.maximum(q / n - mean * mean, 0.0))
        out.append((torch.tensor(mean, dtype=torch.float32), torch.tensor(np.maximum(std, 1e-4), dtype=torch.float32)))
    return out


def non_finite_rows(grids: list[Grid], chunk: int = 64) -> np.ndarray:
    """Indices of the images with a NaN or infinite value in any of the [N, C, h, w] `grids` (chunked, so a large
    fp16 cache is never read whole nor copied to a full-size boolean array)."""
    bad = np.zeros(len(grids[0]), dtype=bool)
    for s in range(0, len(bad), chunk):
        for grid in grids:
            part = grid[s:s + chunk]
            bad[s:s + len(part)] |= ~np.isfinite(part).reshape(len(part), -1).all(axis=1)
    return np.flatnonzero(bad)


def check_finite(fs: FeatureSet, model: str, task_name: str, image_ids: list[str], shown: int = 5) -> None:
    """Raise a TaskError naming the model, the task and the images (of `image_ids`, the rows of `fs`) whose dense
    features are not finite: a single inf in a grid makes a head's loss NaN and its Dice 0 without any other sign."""
    bad = non_finite_rows([fs.patch, *fs.layers])
    if bad.size == 0:
        return
    more = f" and {bad.size - shown} more" if bad.size > shown else ""
    names = ", ".join(repr(image_ids[i]) for i in bad[:shown]) + more
    raise TaskError(
        f"task {task_name}, model {model}, protocol seg: dense features (patch grid or intermediate layers) of "
        f"{bad.size} of {len(image_ids)} masked image(s) contain NaN or inf: {names}. Dense grids are cached as "
        f"float16, whose largest value is 65504, so a larger activation overflows to inf (a NaN comes from the "
        f"encoder itself). Check the encoder's outputs on these images (cache entry {fs.key[:12]} under "
        f"--cache-dir); until then leave `{model}` out of --models.")


def build_head(kind: str, stats_: list[tuple[torch.Tensor, torch.Tensor]], n_classes: int, budget: SegBudget,
               seed: int) -> nn.Module:
    """A freshly initialised head of `kind`, seeded (so every encoder starts from the same random state)."""
    norms = [Standardise(m, s) for m, s in stats_]
    channels = [len(m) for m, _ in stats_]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "linear":
            return LinearHead(norms, channels, n_classes)
        if kind == "multi-level":
            return MultiLevelHead(norms, channels, n_classes, budget.decoder_dim)
    raise ValueError(f"unknown segmentation head {kind!r}; use one of {', '.join(HEADS)}")


# ---------------------------------------------------------------------------------------------------- training

def seg_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """Binary cross-entropy + soft Dice loss, per structure (sigmoid channels), averaged over images. The +1
    smoothing keeps the Dice term defined (and near 0) on an empty truth predicted empty."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(-2, -1))
    soft_dice = (2 * inter + 1) / (p.sum(dim=(-2, -1)) + target.sum(dim=(-2, -1)) + 1)
    return bce + dice_weight * (1 - soft_dice).mean()


FeaturesOf = Callable[[np.ndarray], list[torch.Tensor]]


def read_levels(levels: list[Grid], rows: np.ndarray | None = None) -> FeaturesOf:
    """idx -> float32 batches of the fp16 grids at rows `rows[idx]` (rows default: all), read when asked."""
    rows = np.arange(len(levels[0])) if rows is None else np.asarray(rows)
    return lambda idx: [torch.from_numpy(lv[rows[idx]].astype(np.float32)) for lv in levels]


def read_targets(targets: Grid | torch.Tensor, rows: np.ndarray | None = None) -> Callable[[np.ndarray], torch.Tensor]:
    """idx -> float32 targets [b, K, s, s] at rows `rows[idx]` of fp16 targets (on disk or in memory)."""
    rows = np.arange(len(targets)) if rows is None else np.asarray(rows)
    return lambda idx: torch.as_tensor(targets[rows[idx]]).float()


def fit_head(head: nn.Module, features_of: FeaturesOf, targets_of: Callable[[np.ndarray], torch.Tensor], n: int,
             budget: SegBudget, seed: int) -> nn.Module:
    """Train `head` on images 0..n-1: `features_of(idx)` gives their levels, `targets_of(idx)` [b, K, s, s] in
    [0, 1] (the encoder's input square at the budget's loss size). AdamW, cosine learning rate over the fixed
    number of steps, seeded batch order."""
    steps_per_epoch = math.ceil(n / budget.batch_size)
    total = budget.epochs * steps_per_epoch
    opt = torch.optim.AdamW(head.parameters(), lr=budget.lr, weight_decay=budget.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(budget.epochs):
        order = torch.randperm(n, generator=gen).numpy()
        for s in range(0, n, budget.batch_size):
            idx = np.sort(order[s:s + budget.batch_size])
            target = targets_of(idx)
            logits = F.interpolate(head(features_of(idx)), size=target.shape[-2:], mode="bilinear",
                                   align_corners=False)
            loss = seg_loss(logits, target, budget.dice_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def predict_probabilities(head: nn.Module, features_of: FeaturesOf, n: int, size: int,
                          batch_size: int = 32) -> Iterator[torch.Tensor]:
    """Sigmoid probabilities at the encoder's input geometry, [b, K, size, size] per batch of images 0..n-1 in
    order (a generator: a large test set is never held at input resolution all at once)."""
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(s + batch_size, n))
        logits = F.interpolate(head(features_of(idx)), size=(size, size), mode="bilinear", align_corners=False)
        yield torch.sigmoid(logits)


# ------------------------------------------------------------------------------------------- geometry, metrics

def mask_to_input(mask: np.ndarray, geo: Geometry, loss_size: int | None = None) -> torch.Tensor:
    """bool [K, H, W] at the image's size -> float [K, S, S] in [0, 1] at the encoder's input geometry, then
    optionally area-resampled to [K, loss_size, loss_size] (antialiased bilinear and area averaging: a target
    pixel holds the fraction of mask it covers; padding is background)."""
    x = place(torch.from_numpy(mask.astype(np.float32))[None], geo, "bilinear")
    if loss_size is not None and loss_size != geo.size:
        x = F.interpolate(x, size=(loss_size, loss_size), mode="area")
    return x[0].clamp(0.0, 1.0)


def prediction_to_mask(prob: torch.Tensor, geo: Geometry) -> np.ndarray:
    """float [K, S, S] probabilities -> bool [K, H, W] at the original mask size; pixels the preprocessing
    cropped away come back as probability 0, i.e. predicted background."""
    return (unplace(prob[None].float(), geo, "bilinear")[0] > 0.5).numpy()


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-structure Dice and IoU of bool [K, H, W] masks; NaN where the truth is empty (nothing to overlap)."""
    pred, truth = pred.reshape(len(pred), -1), truth.reshape(len(truth), -1)
    inter = (pred & truth).sum(1).astype(np.float64)
    p, t = pred.sum(1).astype(np.float64), truth.sum(1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(t > 0, 2 * inter / (p + t), np.nan)
        iou = np.where(t > 0, inter / (p + t - inter), np.nan)
    return dice, iou


def mask_placement_key(pre: Preprocess, shapes: list[tuple[int, int]]) -> tuple[Geometry, ...]:
    """Where each mask of `shapes` lands in the encoder's input: encoders share placed targets only when every mask
    is resized, cropped and padded identically. Keyed on the geometry itself rather than on chosen `Preprocess`
    fields, so no field that moves a mask (size, policy, the resize before a crop) can be left out."""
    return tuple(geometry(h, w, pre) for h, w in shapes)


# ------------------------------------------------------------------------------------------------------ protocol

@dataclass
class HeadScores:
    dice: np.ndarray          # [n_test, K], NaN where the truth is empty
    iou: np.ndarray
    predicted_any: np.ndarray  # [n_test, K] bool: the head predicted at least one pixel
    preds: list[np.ndarray]   # bool [K, H, W] per test image (kept for the overlays only)


def evaluate_encoder(fs: FeatureSet, pre: Preprocess, mask_of: Callable[[int], np.ndarray], train: np.ndarray,
                     test: np.ndarray, targets: Grid | torch.Tensor, budget: SegBudget, seed: int,
                     keep_preds: set[int]) -> dict[str, HeadScores]:
    """Train both heads on rows `train` of the masked subset (features and fp16 `targets` read a batch at a time)
    and score rows `test` at mask resolution: both heads in one pass, so each test mask (`mask_of(row)`) is read
    once and, when re-encoding, each test batch is encoded once."""
    n_classes = targets.shape[1]
    heads, levels = {}, {}
    for kind in progress(HEADS, "training heads"):
        levels[kind] = levels_of(fs, kind)
        head = build_head(kind, channel_stats(levels[kind], train), n_classes, budget, seed)
        heads[kind] = fit_head(head, read_levels(levels[kind], train), read_targets(targets, train), len(train),
                               budget, seed)
    dice = {kind: np.empty((len(test), n_classes)) for kind in HEADS}
    iou = {kind: np.empty((len(test), n_classes)) for kind in HEADS}
    anything = {kind: np.zeros((len(test), n_classes), dtype=bool) for kind in HEADS}
    preds: dict[str, list[np.ndarray]] = {kind: [] for kind in HEADS}
    streams = [predict_probabilities(heads[kind], read_levels(levels[kind], test), len(test), pre.size)
               for kind in HEADS]
    r = 0
    for batches in zip(*streams):
        for j in range(len(batches[0])):
            truth = mask_of(int(test[r]))
            geo = geometry(*truth.shape[-2:], pre)
            for kind, probs in zip(HEADS, batches):
                pred = prediction_to_mask(probs[j], geo)
                dice[kind][r], iou[kind][r] = dice_iou(pred, truth)
                anything[kind][r] = pred.reshape(n_classes, -1).any(1)
                if r in keep_preds:
                    preds[kind].append(pred)
            r += 1
    return {kind: HeadScores(dice[kind], iou[kind], anything[kind], preds[kind]) for kind in HEADS}


#: (results key, column title) of each per-structure metric; the FP rate is the one computed on empty truths.
FP_METRIC = "empty_truth_fp_rate"
METRICS = (("dice", "Dice"), ("iou", "IoU"), (FP_METRIC, "empty-truth FP rate"))


def scored_on(metric: str, truth_any: np.ndarray) -> np.ndarray:
    """Which test images a metric is defined on: Dice and IoU need a non-empty truth, the FP rate an empty one."""
    return ~truth_any if metric == FP_METRIC else truth_any


def per_image(sc: HeadScores, metric: str, k: int) -> np.ndarray:
    """One metric of structure `k` for every test image (NaN, or meaningless, outside `scored_on`)."""
    return sc.predicted_any[:, k].astype(np.float64) if metric == FP_METRIC else getattr(sc, metric)[:, k]


def per_image_parquet(scores: dict[str, HeadScores], names: list[str], image_ids: list[str], patient_keys: list[str],
                      truth_any: np.ndarray) -> bytes:
    """A row per (head, structure, test image): Dice and IoU (null on an empty truth), whether the truth is empty
    and whether the head predicted any pixel, keyed by image id and pseudonymous patient key (never the raw id)."""
    n = len(image_ids)
    parts = [pl.DataFrame({
        "image_id": image_ids, "patient_key": patient_keys, "head": [kind] * n, "structure": [name] * n,
        "truth_empty": ~truth_any[:, k], "predicted_any": scores[kind].predicted_any[:, k],
        "dice": scores[kind].dice[:, k], "iou": scores[kind].iou[:, k],
    }) for kind in HEADS for k, name in enumerate(names)]
    buf = io.BytesIO()
    pl.concat(parts).with_columns(pl.col("dice", "iou").fill_nan(None)).write_parquet(buf)
    return buf.getvalue()


def _mask(subset: Task, i: int) -> np.ndarray:
    m = subset.load_mask(i)
    if m is None or m.ndim != 3 or m.shape[0] != len(subset.mask_names):
        raise TaskError(f"task {subset.name}: image {subset.table.image_ids[i]!r} is marked as having a mask "
                        f"but load_mask returned {None if m is None else m.shape}; expected "
                        f"[{len(subset.mask_names)}, H, W]")
    return m.astype(bool)


def placed_targets(subset: Task, placements: list[tuple[Geometry, ...]], loss_size: int,
                   folder: Path) -> dict[tuple[Geometry, ...], Grid]:
    """fp16 targets [N, K, loss_size, loss_size] of every mask for each placement (one geometry per mask), in one
    pass over the masks, written to shard files in `folder` rather than held in memory (CANDID: 19k images x 3
    structures at 112 px is 1.4 GB per placement)."""
    writers = [ShardWriter(folder, f"targets{j}") for j in range(len(placements))]
    for i in range(len(subset)):
        m = _mask(subset, i)
        for w, geos in zip(writers, placements):
            w.add({"targets": mask_to_input(m, geos[i], loss_size).to(torch.float16).numpy()[None]})
    return {key: w.grids()["targets"] for key, w in zip(placements, writers)}


_MODES = {"memory": "held in memory", "cache": "streamed from the cache's shards",
          "re-encode": "re-encoded every batch"}


def masked_rows(task: Task) -> np.ndarray:
    """The images segmentation trains and scores on: those with a mask."""
    return np.flatnonzero(task.table.has_mask) if task.mask_names else np.array([], dtype=int)


def section_inputs(task: Task) -> dict:
    """Which images carry a mask, and every mask's content: a segmentation section of an earlier run is kept only
    when they are unchanged (one pass over the masks, as `masked_images` makes)."""
    rows = masked_rows(task)
    chunks = [rows.astype(np.int64).tobytes()]
    for i in rows:
        m = _mask(task, int(i))
        chunks += [f"{m.shape}".encode(), np.packbits(m).tobytes()]
    return {"masks": sha256_chunks(chunks)}


@dataclass
class MaskedImages:
    """The masked images of a task as segmentation sees them: the task's rows `rows` as a task, `subset`, whose
    rows `train` / `test` split them; the structures `names`, the test images' ids and pseudonymous patient keys,
    their own patient bootstrap (`weights`, over the keys the per-image file publishes), every mask's size, which
    test truths are non-empty [n_test, K], and the test rows (positions in `test`) shown as overlays.
    `mask_digest` covers every mask's content (a segmentation result depends on it as well as on the features)."""

    rows: np.ndarray
    subset: Task
    train: np.ndarray
    test: np.ndarray
    names: list[str]
    test_ids: list[str]
    test_keys: list[str]
    weights: np.ndarray
    shapes: list[tuple[int, int]]
    truth_any: np.ndarray
    shown: list[int]
    mask_digest: str


def masked_images(tr: TaskRun) -> MaskedImages | str:
    """The task's masked images split into train and test, or why segmentation cannot be evaluated on it."""
    task = tr.task
    rows = masked_rows(task)
    if rows.size == 0:
        return f"task `{task.name}` has no masks"
    in_train, in_test = tr.split[rows] == "train", tr.split[rows] == "test"
    if in_train.sum() < 2 or in_test.sum() < 1:
        return (f"task `{task.name}` has {int(in_train.sum())} masked training and {int(in_test.sum())} masked test "
                "images (need at least 2 and 1)")
    subset = dense_view(task, rows)
    train, test = np.flatnonzero(in_train), np.flatnonzero(in_test)
    names = list(task.mask_names)
    # Resampled over the pseudonymous keys that the per-image file publishes, so its intervals can be recomputed
    # exactly from it (the bootstrap is deterministic in the sorted unique keys and the seed).
    test_keys = tr.patient_keys(rows[test])
    weights = stats.bootstrap_weights(test_keys, tr.weights.shape[0], tr.seed)
    # One pass over the masks for their sizes and for which test truths are empty; masks are not kept (CANDID's are
    # ~1 MB each) but read again where needed.
    test_row = {int(i): r for r, i in enumerate(test)}
    shapes, truth_any = [], np.zeros((len(test), len(names)), dtype=bool)
    mask_chunks = []
    for i in range(len(subset)):
        m = _mask(subset, i)
        shapes.append(m.shape[-2:])
        mask_chunks += [f"{i}:{m.shape}".encode(), np.packbits(m).tobytes()]
        if i in test_row:
            truth_any[test_row[i]] = m.reshape(len(names), -1).any(1)
    # The overlays show the same test images for every model: the first ones with something to segment.
    shown = [r for r in range(len(test)) if truth_any[r].any()][:N_OVERLAYS]
    return MaskedImages(rows, subset, train, test, names, [subset.table.image_ids[i] for i in test], test_keys,
                        weights, shapes, truth_any, shown, sha256_chunks(mask_chunks))


def fit_heads(tr: TaskRun, data: MaskedImages, encoders: list[Encoder], dense: dict[str, FeatureSet],
              budget: SegBudget) -> dict[str, dict[str, HeadScores]]:
    """Both heads of every encoder trained on the training masks and scored on the test masks, per image; an
    encoder whose heads the results cache holds (same dense features, masks, split, budget and code) is not
    retrained, and the masks are placed on the loss grid only for those that are."""
    placement = {enc.name: mask_placement_key(enc.preprocess, data.shapes) for enc in encoders}
    settings = {enc.name: {"budget": asdict(budget), "placement": sha256_text(repr(placement[enc.name])),
                           "masks": data.mask_digest, "train": array_digest(data.train),
                           "test": array_digest(data.test), "shown": data.shown}
                for enc in encoders}
    found = {enc.name: tr.results.cached(NAME, dense[enc.name], settings[enc.name]) for enc in encoders}
    trained = [enc for enc in encoders if found[enc.name] is None]
    scores: dict[str, dict[str, HeadScores]] = {}
    with tempfile.TemporaryDirectory(prefix="raddino-seg-") as scratch:
        targets = placed_targets(data.subset, list(dict.fromkeys(placement[e.name] for e in trained)),
                                 budget.loss_size, Path(scratch)) if trained else {}
        for enc in progress(encoders, "segmentation heads"):
            tree = found[enc.name]
            if tree is None:
                t0, c0 = time.perf_counter(), time.process_time()
                heads = evaluate_encoder(dense[enc.name], enc.preprocess, lambda i: _mask(data.subset, i),
                                         data.train, data.test, targets[placement[enc.name]], budget, tr.seed,
                                         set(data.shown))
                tree = tr.results.store(NAME, dense[enc.name], settings[enc.name],
                                        {kind: vars(h) for kind, h in heads.items()})
                log.info(f"  {enc.name}: segmentation heads trained and scored in {time.perf_counter() - t0:.1f} s "
                         f"({time.process_time() - c0:.1f} s CPU; dense features "
                         f"{_MODES[dense[enc.name].dense_mode]})")
            scores[enc.name] = {kind: HeadScores(**tree[kind]) for kind in HEADS}
    return scores


#: (head, structure, metric) -> model -> a `stats.summarise` dict, or a `stats.compare_to_reference` entry
Scored = dict[tuple[str, str, str], dict[str, dict]]
#: (head, structure, metric) -> model -> its [B] values on the shared resamples
Resampled = dict[tuple[str, str, str], dict[str, np.ndarray]]
#: (head, structure or MACRO, metric) -> (`ranks.rank_summary`, `ranks.win_probabilities` or None)
Ranked = dict[tuple[str, str, str], tuple[dict, dict | None]]

#: The section's rank column ranks the multi-level head's Dice (the better of the two heads for every model we have
#: run, and the one the paper's segmentation numbers come from), averaged over the structures when there are several.
RANKED_HEAD = "multi-level"
MACRO = "macro"


def score(data: MaskedImages, scores: dict[str, dict[str, HeadScores]], reference: str
          ) -> tuple[Scored, Scored, Resampled]:
    """Per (head, structure, metric): every model's mean over the images the metric is defined on, with its
    interval, the paired differences to the reference, and the resampled means they come from. Nothing for a
    metric no test image is scored on."""
    summary: Scored = {}
    paired: Scored = {}
    resampled_all: Resampled = {}
    for kind in HEADS:
        for k, name in enumerate(data.names):
            for metric, _ in METRICS:
                key = (kind, name, metric)
                summary[key], resampled = {}, {}
                on = scored_on(metric, data.truth_any[:, k])
                if not on.any():
                    continue
                for model, per_head in scores.items():
                    values = per_image(per_head[kind], metric, k)[on]
                    with np.errstate(invalid="ignore", divide="ignore"):
                        # A resample that drew none of these images has no mean: NaN, dropped by summarise.
                        resampled[model] = stats.weighted_mean(values, data.weights[:, on])
                    summary[key][model] = stats.summarise(float(values.mean()), resampled[model])
                paired[key] = stats.compare_to_reference(resampled, {m: s["point"] for m, s in summary[key].items()},
                                                         reference)
                resampled_all[key] = resampled
    return summary, paired, resampled_all


def rank_columns(data: MaskedImages, summary: Scored, resampled: Resampled) -> tuple[Ranked, tuple[str, str, str]
                                                                                        | None]:
    """Every column's ranks on the shared resamples (the FP rate ranks the lowest first), with win probabilities
    for the Dice columns (the section's headline metric), and the key of the rank column: the multi-level Dice of
    the one structure, or its mean over the structures (`MACRO`) when there are several; None when no test image
    has a structure."""
    ranked: Ranked = {}
    for kind, name, metric, _ in shown_metrics(data):
        key = (kind, name, metric)
        if key not in resampled:
            continue
        points = {m: s["point"] for m, s in summary[key].items()}
        higher = metric != FP_METRIC
        ranked[key] = (ranks.rank_summary(resampled[key], points, higher),
                       ranks.win_probabilities(resampled[key], higher) if metric == "dice" else None)
    dice = [(RANKED_HEAD, name, "dice") for name in data.names if (RANKED_HEAD, name, "dice") in resampled]
    if len(dice) <= 1:
        return ranked, dice[0] if dice else None
    # A resample that drew no image of one structure has no mean Dice for it, so none over the structures either.
    models = list(resampled[dice[0]])
    mean = {m: np.mean([resampled[k][m] for k in dice], axis=0) for m in models}
    points = {m: float(np.mean([summary[k][m]["point"] for k in dice])) for m in models}
    key = (RANKED_HEAD, MACRO, "dice")
    ranked[key] = (ranks.rank_summary(mean, points), ranks.win_probabilities(mean))
    return ranked, key


def rank_column(headline: tuple[str, str, str] | None, n_structures: int) -> str:
    """The rank column's title."""
    if headline is None:
        return "rank (Dice)"
    return f"rank ({'mean ' if n_structures > 1 else ''}Dice, {RANKED_HEAD})"


def shown_metrics(data: MaskedImages) -> list[tuple[str, str, str, str]]:
    """(head, structure, metric, column title) of every column of the section, in order: the FP rate only for a
    structure with an empty test truth (without one there is nothing a false positive could land on)."""
    n_empty = (~data.truth_any).sum(axis=0)
    return [(kind, name, metric, f"{name} {title} ({kind})") for kind in HEADS for k, name in enumerate(data.names)
            for metric, title in METRICS if metric != FP_METRIC or n_empty[k]]


def section_rows(data: MaskedImages, encoders: list[Encoder], summary: Scored, paired: Scored, ranked: Ranked,
                 headline: tuple[str, str, str] | None) -> tuple[list[str], dict[str, dict[str, Cell]], dict[str, bool]]:
    """Columns (the rank column first), cells (with † where the paired difference is significant after Holm) and
    which columns rank up."""
    title = rank_column(headline, len(data.names))
    columns, higher_is_better = [title], {title: False}
    rows: dict[str, dict[str, Cell]] = {
        enc.name: {title: Cell.from_rank(ranked[headline][0][enc.name]) if headline else
                   Cell(None, note="n/e: no test image with a structure")} for enc in encoders}
    for kind, name, metric, col in shown_metrics(data):
        columns.append(col)
        higher_is_better[col] = metric != FP_METRIC
        key = (kind, name, metric)
        for enc in encoders:
            s = summary[key].get(enc.name)
            if s is None:
                rows[enc.name][col] = Cell(None, note="n/e: no test image with this structure")
                continue
            p = paired.get(key, {}).get(enc.name)
            sig = p is not None and (p["p_holm"] or 1.0) < 0.05
            rows[enc.name][col] = Cell(s["point"], s["lo"], s["hi"], sig)
    return columns, rows, higher_is_better


def section_notes(data: MaskedImages, encoders: list[Encoder], dense: dict[str, FeatureSet], budget: SegBudget,
                  tr: TaskRun) -> list[str]:
    task_stem = tr.out_name
    training = (f"Masked images: {len(data.train)} train, {len(data.test)} test (patient-level split of the task). "
                f"Heads trained on frozen cached patch features with an identical budget for every model: AdamW (lr "
                f"{budget.lr}, weight decay {budget.weight_decay}), cosine schedule, {budget.epochs} epochs, batch "
                f"{budget.batch_size}, loss BCE + soft Dice on each model's own input square (its resize/crop/pad) "
                f"resampled to {budget.loss_size}x{budget.loss_size} for every model, seed {tr.seed}. `linear` = 1x1 "
                f"conv on the last layer's patch grid; `multi-level` = FPN-style decoder (width "
                f"{budget.decoder_dim}) over the intermediate layers.")
    n_empty = {name: int((~data.truth_any[:, k]).sum()) for k, name in enumerate(data.names)}
    empty = ""
    if any(n_empty.values()):
        empty = (" (" + ", ".join(f"{n}: {c} test images with an empty truth left out" for n, c in n_empty.items() if c)
                 + "). `empty-truth FP rate` = fraction of the test images whose truth for that structure is empty "
                 "with any predicted pixel, the false positives Dice cannot see (lower is better)")
    scoring = ("Scored at the original mask resolution: probabilities mapped back through the inverse of each "
               "model's resize/crop/pad and thresholded at 0.5; pixels a centre crop removed count as predicted "
               f"background. Dice and IoU per image, averaged over test images whose truth is non-empty{empty}. "
               f"Per-image values: `results/{task_stem}/<model>.seg.parquet` (by pseudonymous patient_key).")
    mean = " averaged over the structures" if len(data.names) > 1 else ""
    notes = [training, scoring, f"Reference model for paired differences: `{tr.reference}`. Rank column: the "
             f"{RANKED_HEAD} head's Dice{mean}; every column's ranks, and the Dice columns' pairwise win "
             "probabilities, are in the results JSON (`ranks`) and the tidy table."]
    no_layers = [e.name for e in encoders if not dense[e.name].layers]
    if no_layers:
        notes.append("No intermediate layers (multi-level head over the patch grid alone): "
                     + ", ".join(f"`{n}`" for n in no_layers) + ".")
    if data.shown:
        notes.append(f"Overlays of {len(data.shown)} test images (multi-level head; true positives, false positives, "
                     f"false negatives): `results/{task_stem}/<model>{OVERLAY_SUFFIX}`, drawn into "
                     f"`figures/{task_stem}/` by `python -m harness.plot`.")
    return notes


def model_record(data: MaskedImages, model: str, summary: Scored, paired: Scored, ranked: Ranked, n_grids: int,
                 budget: SegBudget, per_image_file: str, reference: str) -> dict:
    """What the model's results file holds for segmentation: per head and structure, every metric with its
    interval and paired difference; under ``ranks``, per ``<metric>_<head>`` and structure (or ``macro``), its
    rank, interval, P(best) and, for Dice, its win probabilities."""
    ranks_of: dict[str, dict] = {}
    for (kind, name, metric), (summary_r, wins) in ranked.items():
        ranks_of.setdefault(f"{metric}_{kind}", {})[name] = ranks.rank_record(summary_r, wins, model)
    heads = {}
    for kind in HEADS:
        heads[kind] = {name: {
            "n_scored": int(data.truth_any[:, k].sum()),
            "n_empty_truth": int((~data.truth_any[:, k]).sum()),
            **{m: summary[(kind, name, m)].get(model) for m, _ in METRICS},
            "paired_to_reference": None if model == reference else
            {m: paired.get((kind, name, m), {}).get(model) for m, _ in METRICS},
        } for k, name in enumerate(data.names)}
    return {"structures": data.names, "train_images": len(data.train), "test_images": len(data.test),
            "multi_level_grids": n_grids, "budget": asdict(budget), "heads": heads, "ranks": ranks_of,
            "per_image": per_image_file}


def seg_tidy(data: MaskedImages, encoders: list[Encoder], summary: Scored, paired: Scored, ranked: Ranked,
             tr: TaskRun) -> list[TidyRow]:
    """Tidy rows of the section's cells: metric ``<metric>_<head>`` (``dice_linear``, ``iou_multi-level``,
    ``empty_truth_fp_rate_linear``), label the structure; then every column's ranks (`harness.ranks.ranked_rows`,
    win probabilities for Dice), and the mean Dice's (label ``macro``) when there are several structures."""
    rows = [row for enc in encoders for kind, name, metric, _ in shown_metrics(data)
            for row in rows_of(tr.out_name, NAME, enc.name, f"{metric}_{kind}", name,
                               summary[(kind, name, metric)].get(enc.name),
                               paired.get((kind, name, metric), {}).get(enc.name))]
    for (kind, name, metric), (summary_r, wins) in ranked.items():
        rows += ranks.ranked_rows(tr.out_name, NAME, f"{metric}_{kind}", name, summary_r, wins)
    return rows


def fit_and_score(tr: TaskRun, encoders: list[Encoder], budget: SegBudget = BUDGET) -> ProtocolResult:
    data = masked_images(tr)
    if isinstance(data, str):
        return ProtocolResult(NAME, Section(TITLE, [], {}, notes=[f"Nothing evaluated: {data}."]))
    dense = tr.features.dense(data.rows)  # extracted before any protocol ran: the rows `masked_rows` declared
    for enc in encoders:  # before any training: fail in seconds, not after the other models' heads
        check_finite(dense[enc.name], enc.name, tr.task.name, data.subset.table.image_ids)
    scores = fit_heads(tr, data, encoders, dense, budget)
    summary, paired, resampled = score(data, scores, tr.reference)
    ranked, headline = rank_columns(data, summary, resampled)

    columns, rows, higher_is_better = section_rows(data, encoders, summary, paired, ranked, headline)
    section = Section(TITLE, columns, rows, higher_is_better, notes=section_notes(data, encoders, dense, budget, tr))
    records, files = {}, {}
    for enc in encoders:
        per_image_file = f"results/{tr.out_name}/{safe_name(enc.name)}.seg.parquet"
        records[enc.name] = model_record(data, enc.name, summary, paired, ranked, len(levels_of(dense[enc.name])),
                                         budget, per_image_file, tr.reference)
        files[per_image_file] = per_image_parquet(scores[enc.name], data.names, data.test_ids, data.test_keys,
                                                  data.truth_any)
        if data.shown:  # what the overlay figure needs (harness.figures draws it), named by pseudonym, never by id
            ml = scores[enc.name]["multi-level"]
            files[f"results/{tr.out_name}/{safe_name(enc.name)}{OVERLAY_SUFFIX}"] = overlay_npz(
                enc.name, "multi-level", [data.subset.load_image(int(data.test[r])) for r in data.shown],
                [_mask(data.subset, int(data.test[r])) for r in data.shown], ml.preds, ml.dice[data.shown],
                data.names, [data.test_keys[r] for r in data.shown], data.shown)
    return ProtocolResult(NAME, section, records, files=files,
                          tidy=seg_tidy(data, encoders, summary, paired, ranked, tr))
