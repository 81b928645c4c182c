"""Block-wise masks for iBOT's masked image modelling (facebookresearch/dinov2
``dinov2/data/masking.py`` and ``dinov2/data/collate.py``).

BEiT-style: rectangles of random area and log-uniform aspect ratio are added until the image's target number
of masked patches is reached. Half of the global crops get a mask; their mask ratios are stratified over
[0.1, 0.5] (the i-th masked image draws its ratio from the i-th of n equal sub-intervals), so every batch
spans the whole range. Everything is driven by one explicit generator, so masks are reproducible.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def as_numpy_generator(generator: torch.Generator | np.random.Generator) -> np.random.Generator:
    """Masks are sampled on the host with numpy; a torch generator seeds one (advancing the torch generator)."""
    if isinstance(generator, np.random.Generator):
        return generator
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()
    return np.random.default_rng(seed)


class MaskingGenerator:
    """Draws one [h, w] boolean block mask with (at most) a given number of masked patches.

    Each rectangle has an area U(min_num_patches, max_block) with max_block = min(patches still to mask,
    max_num_patches) and an aspect ratio log-uniform in [min_aspect, max_aspect]; 10 tries per rectangle, and a
    rectangle is kept only if it adds between 1 and max_block new patches. Like DINOv2's it stops early
    when no rectangle fits, so a mask may hold slightly fewer patches than asked (never more).
    """

    def __init__(self, input_size: tuple[int, int], max_num_patches: float | None = None, min_num_patches: int = 4,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        # dinov2/train/train.py builds its MaskingGenerator with max_num_patches = 0.5 * N
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = 1 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, max_block: float, rng: np.random.Generator) -> int:
        """Try to add one rectangle; returns how many new patches it masked (0 if none of 10 tries fit)."""
        for _ in range(10):
            # a + (b - a) * U: also valid when fewer than min_num_patches remain (b < a), as in DINOv2's
            area = self.min_num_patches + (max_block - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_block:
                block[...] = True
                return new
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_block = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, max_block, rng)
            if added == 0:
                break
            count += added
        return mask


def sample_masks(n_images: int, grid: tuple[int, int], ratio_min_max: tuple[float, float] = (0.1, 0.5),
                 sample_probability: float = 0.5, *, generator: torch.Generator | np.random.Generator,
                 max_num_patches: float | None = None) -> torch.Tensor:
    """Masks for a batch of global crops -> BoolTensor [n_images, h*w] (dinov2/data/collate.py collate_data_and_cast).

    int(n_images * sample_probability) images are masked with stratified ratios (image i: U(p_i, p_{i+1}), p =
    linspace(min, max, n_masked + 1)), the others get an empty mask, and the order is shuffled.
    n_images is the number of global crops (2 x batch), in the crop-major order the student sees them.
    """
    rng = as_numpy_generator(generator)
    h, w = grid
    n_patches = h * w
    masker = MaskingGenerator((h, w), max_num_patches=max_num_patches)
    n_masked = int(n_images * sample_probability)
    bounds = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    masks = np.zeros((n_images, n_patches), dtype=bool)
    for i in range(n_masked):
        ratio = rng.uniform(bounds[i], bounds[i + 1])
        masks[i] = masker(int(n_patches * ratio), rng).reshape(-1)
    return torch.from_numpy(masks[rng.permutation(n_images)])
