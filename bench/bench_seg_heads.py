"""Segmentation head training from cached patch features against re-encoding the images every epoch.

    python bench/bench_seg_heads.py [--images 16] [--epochs 12] [--head multi-level] [--threads 1]

One model (random-vit), a few demo-phantom images with their lung masks. Both sides train the same head (same
initial weights, standardisation, budget, seeded batch order) for the same number of epochs (default: the
protocol's budget), after an untimed warm-up fit so that neither pays torch's one-time initialisation:
- cached: the dense features are extracted once into a feature cache (timed separately, as the one-time cost),
  then the head is trained from the fp16 arrays read back from that cache (read + training timed);
- re-encode: the head is trained while every batch of every epoch is decoded, preprocessed and put through the
  frozen encoder again (what training without a patch-feature cache costs).
Prints both times and their ratio, and checks that the two trainings saw the same features (up to fp16).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Runnable as `python bench/bench_seg_heads.py` from a checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from baselines.preprocess import geometry, preprocess_batch
from baselines.registry import build_encoder
from harness.features import FeatureCache, extract
from harness.probes.segmentation import (
    BUDGET,
    build_head,
    channel_stats,
    fit_head,
    levels_of,
    mask_to_input,
    read_levels,
    read_targets,
)
from harness.tasks.base import Subset
from harness.tasks.demo import DemoTask, PhantomConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--epochs", type=int, default=BUDGET.epochs)
    p.add_argument("--head", default="multi-level", choices=("linear", "multi-level"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both sides")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    task = DemoTask(PhantomConfig(n_patients=args.images, size=256, max_images_per_patient=1))
    n = len(task)
    enc = build_encoder("random-vit")
    budget = dataclasses.replace(BUDGET, epochs=args.epochs)
    images = [torch.from_numpy(task.load_image(i))[None] for i in range(n)]
    masks = [task.load_mask(i) for i in range(n)]
    targets = torch.stack([mask_to_input(m, geometry(*m.shape[-2:], enc.preprocess), budget.loss_size)
                           for m in masks])

    subset = Subset(task, np.arange(n), "bench")
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(Path(tmp))
        t0 = time.perf_counter()
        fresh = extract(subset, [enc], cache, dense=True, batch_size=8, workers=0, log=lambda *_: None)[enc.name]
        t_extract = time.perf_counter() - t0
        # Untimed, shared by both sides: the standardisation statistics and a one-epoch warm-up fit.
        fresh_levels = levels_of(fresh, args.head)
        stats_ = channel_stats(fresh_levels)
        warm = dataclasses.replace(budget, epochs=1)
        fit_head(build_head(args.head, stats_, 1, warm, 0), read_levels(fresh_levels), read_targets(targets), n, warm,
                 0)

        t0 = time.perf_counter()
        fs = extract(subset, [enc], cache, dense=True, batch_size=8, workers=0, log=lambda *_: None)[enc.name]
        levels = levels_of(fs, args.head)
        head = fit_head(build_head(args.head, stats_, 1, budget, 0), read_levels(levels), read_targets(targets), n,
                        budget, 0)
        t_cached = time.perf_counter() - t0
        assert fs.from_cache

        def reencode(idx: np.ndarray) -> list[torch.Tensor]:
            x = preprocess_batch([images[i] for i in idx], enc.preprocess)
            f = enc.encode(x)
            grids = list(f.layers) if f.layers and args.head == "multi-level" else [f.patch]
            return [g.to(torch.float16).float() for g in grids]  # what the cache would have stored

        # Compared while the cache (read lazily, shard by shard) still exists.
        first = reencode(np.arange(min(4, n)))
        gap = max(float((a - torch.from_numpy(lv[: len(a)].astype(np.float32))).abs().max())
                  for a, lv in zip(first, levels))
    t0 = time.perf_counter()
    head2 = fit_head(build_head(args.head, stats_, 1, budget, 0), reencode, read_targets(targets), n, budget, 0)
    t_reencode = time.perf_counter() - t0
    drift = max(float((a - b).abs().max()) for a, b in zip(head.state_dict().values(), head2.state_dict().values()))

    print(f"random-vit, {n} images, {args.epochs} epochs, {args.head} head, {args.threads} thread(s)")
    print(f"  one-time dense extraction into the cache: {t_extract:8.2f} s")
    print(f"  train from cached patch features:         {t_cached:8.2f} s (cache read + training)")
    print(f"  train re-encoding every epoch:            {t_reencode:8.2f} s")
    print(f"  ratio re-encode / cached:                 {t_reencode / t_cached:8.1f}x")
    print(f"  max |feature difference| cache vs re-encode {gap:.2e}; max head weight difference {drift:.2e}")


if __name__ == "__main__":
    main()
