"""Block masking (facebookresearch/dinov2 dinov2/data/masking.py): counts, stratified ratios, rectangles,
determinism."""
from __future__ import annotations

import numpy as np
import torch

from trainer.masking import MaskingGenerator, sample_masks

GRID = (16, 16)
N = 256


def test_half_of_the_global_crops_are_masked_with_stratified_ratios():
    n_images = 16
    bounds = np.linspace(0.1, 0.5, 9)  # 8 masked images, one per stratum of width 0.05
    for seed in range(10):
        masks = sample_masks(n_images, GRID, (0.1, 0.5), 0.5, generator=np.random.default_rng(seed))
        assert masks.shape == (n_images, N) and masks.dtype == torch.bool
        counts = np.sort(masks.sum(1).numpy())
        assert (counts[:8] == 0).all() and (counts[8:] > 0).all()
        for k, c in enumerate(counts[8:]):
            # the k-th smallest mask lies in stratum k: never above its upper bound (masks never overshoot),
            # and at most a little below its lower bound (the block sampler may stop a few patches short)
            assert c <= int(N * bounds[k + 1])
            assert c >= 0.85 * int(N * bounds[k])


def test_masked_images_are_shuffled_across_the_batch():
    rows = set()
    for seed in range(20):
        masks = sample_masks(8, GRID, generator=np.random.default_rng(seed))
        rows |= set(torch.nonzero(masks.any(1)).flatten().tolist())
    assert rows == set(range(8))


def test_mean_masked_fraction_is_that_of_uniform_ratios():
    rng = np.random.default_rng(0)
    fractions = [sample_masks(8, GRID, generator=rng).sum(1).float() / N for _ in range(50)]
    masked = torch.cat(fractions)
    masked = masked[masked > 0]
    # U(0.1, 0.5) has mean 0.3; the sampler stops at most a few patches short of the target
    assert 0.27 < masked.mean().item() < 0.31


def test_deterministic_under_a_seed_for_numpy_and_torch_generators():
    a = sample_masks(12, GRID, generator=np.random.default_rng(3))
    b = sample_masks(12, GRID, generator=np.random.default_rng(3))
    c = sample_masks(12, GRID, generator=np.random.default_rng(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    t1 = sample_masks(12, GRID, generator=torch.Generator().manual_seed(7))
    t2 = sample_masks(12, GRID, generator=torch.Generator().manual_seed(7))
    assert torch.equal(t1, t2)


def test_masks_are_made_of_rectangles():
    # square blocks of exactly 16 patches: a single call must give one filled 4 x 4 square
    masker = MaskingGenerator(GRID, min_num_patches=16, min_aspect=1.0, max_aspect=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = masker(16, rng)
        rows, cols = np.nonzero(mask)
        assert mask.sum() == 16
        assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3

