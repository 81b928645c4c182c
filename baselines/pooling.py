"""Global pooling: how an encoder's tokens become the one vector per image the global protocols read.

Its own module because it computes features: its source is part of every feature-cache key
(`harness.features.EXTRACTION_CODE`), while the registry beside it is not.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from baselines.registry import Features

__all__ = ["GLOBAL_POOLS", "pool_global"]

#: How an encoder's tokens become the one vector per image that the global protocols (linear, k-NN, demographics,
#: label efficiency) read (``--global-pool``; docs/evaluate.md#global-pooling):
#: ``cls`` the encoder's own global embedding (a ViT's final-normed CLS token, CLIP's projected one);
#: ``avg`` the mean of its last layer's patch grid (a ViT's final-normed patch tokens, registers excluded);
#: ``cls+avg`` both, concatenated (DINOv2's linear evaluation, dinov2/eval/linear.py, without the extra blocks).
GLOBAL_POOLS = ("cls", "avg", "cls+avg")


def pool_global(f: "Features", pool: str) -> torch.Tensor:
    """The [B, D] global feature of `f` under `pool` (one of GLOBAL_POOLS), in float32."""
    if pool == "cls":
        return f.global_.float()
    avg = f.patch.float().mean(dim=(2, 3))
    if pool == "avg":
        return avg
    if pool == "cls+avg":
        return torch.cat([f.global_.float(), avg], dim=1)
    raise ValueError(f"unknown global pooling {pool!r}; choose one of {', '.join(GLOBAL_POOLS)}")
