"""DINOv3 ViT-B/16 (facebook/dinov3-vitb16-pretrain-lvd1689m), natural images (LVD-1689M, distilled from DINOv3
ViT-7B): patch 16, 4 register tokens, rotary position embeddings (RoPE, so no position grid to resample at any input
size). Run by transformers' ``DINOv3ViTModel`` (the reference implementation, used as is); global = the final-normed
CLS, the register tokens dropped from the patch grid (14 x 14 at 224 px).

Native preprocessing is the repo's ``preprocessor_config.json`` (a DINOv3ViTImageProcessor): the whole image resized
to 224 x 224 (no crop) bilinear after rescaling to [0, 1], ImageNet mean/std. The repo is gated under the DINOv3
License: the download works once it is accepted on the repo's page by the logged-in account.
"""
from __future__ import annotations

from baselines._common import IMAGENET_MEAN, IMAGENET_STD, ModuleEncoder
from baselines._hf import checked_config, dinov3_features, from_folder
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, HubRepo, WeightFiles

NATIVE = Preprocess(size=224, policy="resize_stretch", interpolation="bilinear", mean=IMAGENET_MEAN,
                    std=IMAGENET_STD, channels=3)
FILES = ("config.json", "model.safetensors")
REPO = "facebook/dinov3-vitb16-pretrain-lvd1689m"
DOWNLOAD = f"hf download {REPO} config.json model.safetensors --local-dir <weights-dir>/dinov3-vitb16"
WEIGHTS = WeightFiles((FILES,), DOWNLOAD, hub=(HubRepo(REPO, (FILES,), gated=True),))
ARCHITECTURE = {"patch_size": 16, "num_register_tokens": 4}


def dinov3_vitb16(spec: EncoderSpec) -> Encoder:
    """DINOv3 ViT-B/16 with 4 registers and RoPE (transformers DINOv3ViTModel folder)."""
    folder, files = spec.locate()
    config = checked_config(folder, spec.name, "DINOv3ViTConfig", ("dinov3_vit",), ARCHITECTURE)
    return ModuleEncoder(spec.name, from_folder("DINOv3ViTModel", folder, config), spec.apply_policy(NATIVE),
                         [folder / f for f in files], dinov3_features)
