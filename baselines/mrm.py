"""MRM (Zhou et al., ICLR 2023, "Advancing radiograph representation learning with masked record modeling"):
an MAE-style timm ViT-B/16 pretrained on MIMIC-CXR images and reports.

``MRM.pth`` holds ``{"model": state_dict, ...}`` with the encoder (``patch_embed``, ``cls_token``, fixed sin-cos
``pos_embed``, ``blocks.*``, ``norm``) next to decoder and report-branch weights, which are ignored. MRM's own
fine-tuning uses ``global_pool=True``, which drops ``norm`` for a *new*, randomly initialised ``fc_norm`` absent from
the checkpoint; a frozen encoder must not use it. We take MRM's ``global_pool=False`` path instead: tokens after the
pretrained ``norm``, global = the CLS token. Native preprocessing (``NIH_ChestX-ray/utils/data_utils.py``):
torchvision ``Resize(224)`` (bilinear) -> ``CenterCrop(224)`` -> 3 grey channels -> normalise 0.4978 / 0.2449.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from baselines._common import ModuleEncoder, load_exact, timm_vit_config, vit_features
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, WeightFiles
from trainer.vit import VisionTransformer

NATIVE = Preprocess(size=224, policy="resize_shortest_crop", interpolation="bilinear", mean=(0.4978,), std=(0.2449,),
                    channels=3)
FILES = ("MRM.pth",)
# Not on a model hub: the authors share it through a Google Drive link in their README.
DOWNLOAD = ("download MRM.pth from the link in the README of github.com/RL4M/MRM-pytorch into <weights-dir>/mrm/")
# No hub repo, so only <weights-dir>/mrm is searched.
WEIGHTS = WeightFiles((FILES,), DOWNLOAD)
ENCODER_KEYS = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


def read_mrm(path: Path) -> dict[str, torch.Tensor]:
    """The encoder part of an MRM checkpoint. MAE-style training scripts also save their ``argparse.Namespace``,
    which is the one non-tensor class allowed through the weights-only unpickler."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from e
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k.startswith(ENCODER_KEYS)}


def load_mrm(path: Path) -> VisionTransformer:
    state = read_mrm(path)
    if "cls_token" not in state:
        raise ValueError(f"{path}: no ViT encoder keys (cls_token, blocks.*) found; is this MRM.pth?")
    model = VisionTransformer(timm_vit_config(state))
    load_exact(model, state, ignored_prefixes=(), source=str(path))
    return model.eval()


def mrm(spec: EncoderSpec) -> Encoder:
    """MRM ViT-B/16 (MRM.pth), CLS after the pretrained final norm."""
    path = spec.require_weights() / FILES[0]
    return ModuleEncoder(spec.name, load_mrm(path), spec.apply_policy(NATIVE), [path], vit_features)
