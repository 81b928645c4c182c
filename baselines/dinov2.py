"""DINOv2 ViT-B/14 trained on natural images (LVD-142M), the general-domain counterpart of RAD-DINO.

Two layouts are accepted in ``<weights>/dinov2-base``: the transformers folder ``facebook/dinov2-base``
(config.json + model.safetensors, run by transformers' Dinov2Model) or the official backbone state dict
``dinov2_vitb14_pretrain.pth`` (run by our trainer's ViT, `trainer.vit`, whose parameter names are the official
ones). Native preprocessing is DINOv2's ImageNet evaluation transform at 224 px (bicubic, ImageNet mean/std); the
position grid (37x37, trained at 518) is resampled to 16x16 as each implementation does it (official: scale factor
with DINOv2's 0.1 offset; transformers: exact size), so the two layouts agree closely, not bit for bit, at 224.
"""
from __future__ import annotations

from pathlib import Path

from baselines._common import IMAGENET_MEAN, IMAGENET_STD, ModuleEncoder, vit_features
from baselines._hf import dinov2_features, from_folder
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, HubRepo, WeightFiles
from trainer.convert import load_dinov2
from trainer.vit import VisionTransformer

# The reference transform resizes the shortest edge to 256 then centre-crops 224; `Preprocess` has one size, so the
# shortest edge goes straight to 224 (the crop keeps the whole short side instead of 87.5% of it).
NATIVE = Preprocess(size=224, resize=256, policy="resize_shortest_crop", interpolation="bicubic", mean=IMAGENET_MEAN,
                    std=IMAGENET_STD, channels=3)
HF_FILES = ("config.json", "model.safetensors")
OFFICIAL_FILES = ("dinov2_vitb14_pretrain.pth",)
DOWNLOAD = ("hf download facebook/dinov2-base config.json model.safetensors --local-dir <weights-dir>/dinov2-base "
            "(or: curl -L -o <weights-dir>/dinov2-base/dinov2_vitb14_pretrain.pth "
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth)")
# The official .pth is not on the hub, so only the transformers folder can come from the Hugging Face cache.
WEIGHTS = WeightFiles((HF_FILES, OFFICIAL_FILES), DOWNLOAD, hub=(HubRepo("facebook/dinov2-base", (HF_FILES,)),))


def load_official(path: Path) -> VisionTransformer:
    """The official DINOv2 backbone state dict, loaded strictly (mask token included, unused here) by
    `trainer.convert`, which also sets DINOv2's position-grid resampling for a model without registers."""
    model = load_dinov2(path)
    if model.num_register_tokens:
        raise ValueError(f"{path}: a DINOv2 with register tokens; dinov2-base is the plain ViT-B/14")
    return model


def dinov2_base(spec: EncoderSpec) -> Encoder:
    """DINOv2 ViT-B/14, ImageNet-domain (transformers folder or official .pth)."""
    folder, files = spec.locate()
    paths = [folder / f for f in files]
    if files == HF_FILES:
        return ModuleEncoder(spec.name, from_folder("Dinov2Model", folder), spec.apply_policy(NATIVE), paths,
                             dinov2_features)
    return ModuleEncoder(spec.name, load_official(paths[0]), spec.apply_policy(NATIVE), paths, vit_features)
