"""Two encoders that need no weights: honest floors every real model must beat.

- ``pixels``: the radiograph itself, downsampled. Global = the 16x16 thumbnail (256 values); patch grid = the
  raw 8x8 pixel blocks of the 224 px input as 64-channel tokens (28x28), i.e. a patch embedding with identity
  weights.
- ``random-vit``: a ViT-S/14 with a fixed seed and random weights. What a linear probe gets from an untrained
  transformer of the same shape as the real models: the architecture's prior, not learning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from baselines._common import vit_features
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, Features
from harness.common.hashing import sha256_arrays, sha256_text

PIXELS_PREPROCESS = Preprocess(size=224, policy="resize_stretch", interpolation="area", mean=(0.5,), std=(0.25,),
                               channels=1)
# Same normalisation as RAD-DINO (microsoft/rad-dino preprocessor_config.json), so the random ViT sees inputs of
# the scale the real one does.
RANDOM_VIT_PREPROCESS = Preprocess(size=224, policy="resize_stretch", interpolation="bicubic",
                                   mean=(0.5307,), std=(0.2583,), channels=3)
RANDOM_VIT_SEED = 0


class PixelsEncoder(Encoder):
    """No tokens to pool: the thumbnail is already an average pool of the image, and the mean of the raw 8x8 pixel
    blocks (64 near-equal brightness values) would be a floor of nothing. So every `--global-pool` reads the
    thumbnail, and the leaderboard header says so."""

    pooling_note = "pixels has no tokens: its global feature is the 16x16 thumbnail under every pooling"
    patch_tokens = False

    def __init__(self, preprocess: Preprocess, thumbnail: int = 16, block: int = 8):
        self.name = "pixels"
        self.preprocess = preprocess
        self.thumbnail, self.block = thumbnail, block
        self.weights_digest = sha256_text(f"pixels:{thumbnail}:{block}")

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> Features:
        x = pixels[:, :1].float()
        thumb = F.adaptive_avg_pool2d(x, self.thumbnail).flatten(1)
        b = self.block
        h, w = x.shape[-2] // b, x.shape[-1] // b
        patch = F.pixel_unshuffle(x[..., : h * b, : w * b], b)  # [B, b*b, h, w]: each block's pixels as channels
        return Features(global_=thumb, patch=patch)

    def pooled(self, f: Features) -> Features:
        return f._replace(global_=f.global_.float())


class ViTEncoder(Encoder):
    """Any of our DINOv2-style ViTs (trainer.vit): global = normed CLS token, patch = normed patch tokens as a
    grid, layers = four evenly spaced blocks (normed), as DINOv2's segmentation evaluations use them."""

    def __init__(self, name: str, model: torch.nn.Module, preprocess: Preprocess, weights_digest: str):
        self.name = name
        self.model = model.eval()
        self.preprocess = preprocess
        self.weights_digest = weights_digest

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> Features:
        return vit_features(self.model, pixels)


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over parameter names and bytes: identifies the weights actually in memory."""
    return sha256_arrays((k, v.detach().cpu().numpy()) for k, v in sorted(model.state_dict().items()))


def pixels(spec: EncoderSpec) -> Encoder:
    return PixelsEncoder(spec.apply_policy(PIXELS_PREPROCESS))


def random_vit(spec: EncoderSpec) -> Encoder:
    from trainer.vit import vit_small

    # Seed a private generator state so building this encoder never disturbs the caller's RNG. LayerScale at
    # 1.0, not the training init of 1e-5: with 1e-5 every block is near-identity and the "random ViT" would be
    # a random patch projection, a weaker and less honest floor than an untrained transformer.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_VIT_SEED)
        model = vit_small(patch_size=14, img_size=224, layerscale_init=1.0)
    return ViTEncoder(spec.name, model, spec.apply_policy(RANDOM_VIT_PREPROCESS), state_dict_digest(model))
