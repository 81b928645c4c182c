"""Small random weights written in each pretrained encoder's published file layout, without the reference
libraries: transformers' own ``save_pretrained`` for the transformers folders, and for the other formats our
re-implementations' state dicts, whose parameter names are the official ones (the loaders load them strictly;
tests/baselines/test_all_models.py checks the names against the reference libraries where they are installed).

Each writer fills ``<weights>/<folder>/`` and returns the weight files in the order the loader digests them.
`WRITERS` holds one per encoder family this suite knows how to fake; a family registered without one is simply not
part of the full-folder run (its own test file covers it)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch
from transformers import (CLIPConfig, CLIPModel, DINOv3ViTConfig, DINOv3ViTModel, Dinov2Config, Dinov2Model,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipConfig, SiglipModel)

from baselines.biovil_t import BioViLTImage
from trainer.vit import ViTConfig, VisionTransformer
from tests.baselines.refs import randomise_


def _tiny_vit(**kw) -> VisionTransformer:
    return randomise_(VisionTransformer(ViTConfig(embed_dim=128, depth=2, num_heads=2, **kw)))


def _rad_dino(folder: Path) -> list[Path]:
    """microsoft/rad-dino: a transformers Dinov2Model folder."""
    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
                       image_size=518, patch_size=14)
    randomise_(Dinov2Model(cfg)).save_pretrained(folder)
    return [folder / "config.json", folder / "model.safetensors"]


def dinov2_state() -> dict[str, torch.Tensor]:
    """The official DINOv2 backbone layout (LayerScale, mask token), trained grid 37x37 as ViT-B/14's."""
    return _tiny_vit(img_size=518, patch_size=14, layerscale_init=1.0).state_dict()


def _dinov2_base(folder: Path) -> list[Path]:
    """dinov2_vitb14_pretrain.pth: the official backbone state dict (the other accepted layout, a transformers
    folder, is covered by rad-dino)."""
    folder.mkdir(parents=True)
    torch.save(dinov2_state(), folder / "dinov2_vitb14_pretrain.pth")
    return [folder / "dinov2_vitb14_pretrain.pth"]


def _clip(folder: Path) -> list[Path]:
    """openai/clip-vit-base-patch16: a full transformers CLIPModel folder (text and vision towers)."""
    cfg = CLIPConfig(text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                                      intermediate_size=64, vocab_size=99, max_position_embeddings=16),
                     vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                                        intermediate_size=128, image_size=224, patch_size=16),
                     projection_dim=48)
    randomise_(CLIPModel(cfg)).save_pretrained(folder)
    return [folder / "config.json", folder / "model.safetensors"]


BIOMEDCLIP_CONFIG = {"model_cfg": {"embed_dim": 48, "vision_cfg": {"timm_model_name": "vit_base_patch16_224",
                                                                   "timm_model_pretrained": False, "timm_pool": "",
                                                                   "timm_proj": "linear", "image_size": 224},
                                   "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                                "hf_proj_type": "mlp", "context_length": 256}}}


def biomedclip_visual() -> dict[str, torch.Tensor]:
    """open_clip's TimmModel tower: a timm ViT-B/16 trunk (no LayerScale, no mask token) and a bias-free head."""
    trunk = _tiny_vit(img_size=224, patch_size=16, layerscale_init=None, use_mask_token=False).state_dict()
    return {f"visual.trunk.{k}": v for k, v in trunk.items()} | {"visual.head.proj.weight": torch.randn(48, 128)}


def _biomedclip(folder: Path) -> list[Path]:
    """BiomedCLIP's open_clip folder: config + one state dict holding both towers (the text one is never read)."""
    folder.mkdir(parents=True)
    state = biomedclip_visual() | {"text.transformer.embeddings.word_embeddings.weight": torch.randn(99, 32),
                                    "logit_scale": torch.ones(())}
    (folder / "open_clip_config.json").write_text(json.dumps(BIOMEDCLIP_CONFIG))
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    return [folder / "open_clip_config.json", folder / "open_clip_pytorch_model.bin"]


def _biovil_t(folder: Path) -> list[Path]:
    """biovil_t_image_model_proj_size_128.pt: the ResNet-50 trunk and the 2048->256 projection the single-image
    path runs (the full ResNet-50 is the real architecture; default init keeps its 50 layers' activations finite)."""
    folder.mkdir(parents=True)
    torch.save(BioViLTImage().state_dict(), folder / "biovil_t_image_model_proj_size_128.pt")
    return [folder / "biovil_t_image_model_proj_size_128.pt"]


def mrm_encoder() -> dict[str, torch.Tensor]:
    """MRM's MAE-style timm ViT-B/16 encoder (no LayerScale, no mask token: it lives in the decoder)."""
    return _tiny_vit(img_size=224, patch_size=16, layerscale_init=None, use_mask_token=False).state_dict()


def _mrm(folder: Path) -> list[Path]:
    """MRM.pth: the training checkpoint, {"model": encoder + decoder weights, "epoch", "args": Namespace}."""
    folder.mkdir(parents=True)
    model = mrm_encoder() | {"mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.randn(64, 128),
                              "decoder_norm.weight": torch.ones(64)}
    torch.save({"model": model, "epoch": 199, "args": argparse.Namespace(mask_ratio=0.75)}, folder / "MRM.pth")
    return [folder / "MRM.pth"]


# The five families of issue 22 are transformers folders: a small random model of the published class, at the native
# input size and patch of the real one (its width and depth are what a small config may change: the loaders check
# the patch size, the input size SigLIP needs and the register tokens, not the width).
TINY = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128)


def tiny_siglip(layers: int = 2, **vision) -> SiglipModel:
    """google/medsiglip-448: a full SiglipModel (text tower too, as the hub repo holds it), patch 14 at 448 px."""
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99,
                max_position_embeddings=16)
    cfg = SiglipConfig(text_config=text, vision_config={**TINY, "num_hidden_layers": layers, "image_size": 448,
                                                        "patch_size": 14, **vision})
    return randomise_(SiglipModel(cfg)).eval()


def tiny_dinov2_reg(layers: int = 2, **config) -> Dinov2WithRegistersModel:
    """CXformer and DINOv2-reg4: a Dinov2WithRegistersModel, patch 14, 4 registers, position grid of 518 px."""
    cfg = Dinov2WithRegistersConfig(**{**TINY, "num_hidden_layers": layers, "image_size": 518, "patch_size": 14,
                                       "num_register_tokens": 4, **config})
    return randomise_(Dinov2WithRegistersModel(cfg)).eval()


def tiny_dinov3(layers: int = 2, **config) -> DINOv3ViTModel:
    """facebook/dinov3-vitb16-pretrain-lvd1689m: a DINOv3ViTModel, patch 16, 4 registers, RoPE."""
    cfg = DINOv3ViTConfig(**{**TINY, "num_hidden_layers": layers, "patch_size": 16, "num_register_tokens": 4,
                             **config})
    return randomise_(DINOv3ViTModel(cfg)).eval()


def tiny_dinov2(layers: int = 2, **config) -> Dinov2Model:
    """RAD-DINO and RAD-DINO-MAIRA-2: a plain Dinov2Model, patch 14, position grid of 518 px."""
    cfg = Dinov2Config(**{**TINY, "num_hidden_layers": layers, "image_size": 518, "patch_size": 14, **config})
    return randomise_(Dinov2Model(cfg)).eval()


def _saved(build: Callable[[], torch.nn.Module]) -> Callable[[Path], list[Path]]:
    """A writer saving `build()` with transformers' own save_pretrained (config.json + model.safetensors)."""
    def write(folder: Path) -> list[Path]:
        build().save_pretrained(folder)
        return [folder / "config.json", folder / "model.safetensors"]
    return write


WRITERS: dict[str, Callable[[Path], list[Path]]] = {
    "rad-dino": _rad_dino, "dinov2-base": _dinov2_base, "clip": _clip, "biomedclip": _biomedclip,
    "biovil-t": _biovil_t, "mrm": _mrm, "rad-dino-maira-2": _saved(tiny_dinov2),
    "cxformer-base": _saved(tiny_dinov2_reg), "cxformer-small": _saved(tiny_dinov2_reg),
    "medsiglip-448": _saved(tiny_siglip), "dinov2-base-reg4": _saved(tiny_dinov2_reg),
    "dinov3-vitb16": _saved(tiny_dinov3)}
