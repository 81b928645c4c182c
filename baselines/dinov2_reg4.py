"""DINOv2 ViT-B/14 with 4 register tokens (facebook/dinov2-with-registers-base), natural images (LVD-142M): the
generic self-supervised control for CXformer and RAD-DINO at matched size. Run by transformers'
``Dinov2WithRegistersModel`` (the reference implementation, used as is); global = the final-normed CLS, the register
tokens dropped from the patch grid.

Native preprocessing is the repo's ``preprocessor_config.json`` (a BitImageProcessor, as facebook/dinov2-base's):
shortest edge to 256 px bicubic, centre-crop 224, ImageNet mean/std. Licence Apache-2.0.
"""
from __future__ import annotations

from baselines._common import IMAGENET_MEAN, IMAGENET_STD, ModuleEncoder
from baselines._hf import checked_config, dinov2_features, from_folder
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, HubRepo, WeightFiles

NATIVE = Preprocess(size=224, resize=256, policy="resize_shortest_crop", interpolation="bicubic", mean=IMAGENET_MEAN,
                    std=IMAGENET_STD, channels=3)
FILES = ("config.json", "model.safetensors")
REPO = "facebook/dinov2-with-registers-base"
DOWNLOAD = f"hf download {REPO} config.json model.safetensors --local-dir <weights-dir>/dinov2-base-reg4"
WEIGHTS = WeightFiles((FILES,), DOWNLOAD, hub=(HubRepo(REPO, (FILES,)),))
#: What a DINOv2-with-registers folder's config must say (CXformer's too). The width is read from the file.
ARCHITECTURE = {"patch_size": 14, "num_register_tokens": 4}


def registers_vit(spec: EncoderSpec, native: Preprocess) -> Encoder:
    """A transformers Dinov2WithRegistersModel folder as an encoder read through `native` preprocessing: the
    config checked against `ARCHITECTURE`, global = the final-normed CLS, the registers dropped from the grid."""
    folder, files = spec.locate()
    config = checked_config(folder, spec.name, "Dinov2WithRegistersConfig", ("dinov2_with_registers",), ARCHITECTURE)
    return ModuleEncoder(spec.name, from_folder("Dinov2WithRegistersModel", folder, config),
                         spec.apply_policy(native), [folder / f for f in files], dinov2_features)


def dinov2_base_reg4(spec: EncoderSpec) -> Encoder:
    """DINOv2 ViT-B/14 with 4 registers (transformers Dinov2WithRegistersModel folder)."""
    return registers_vit(spec, NATIVE)
