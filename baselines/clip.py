"""OpenAI CLIP ViT-B/16, as a transformers folder (``openai/clip-vit-base-patch16``) or an open_clip checkpoint.

- transformers folder (config.json + model.safetensors; a full CLIPModel config is fine, only the vision tower is
  built): run by transformers' CLIPVisionModelWithProjection.
- open_clip file ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin`` (a plain state dict), e.g. from
  ``timm/vit_base_patch16_clip_224.openai`` (whose timm-format config.json + model.safetensors are skipped): its
  ``visual.*`` keys are renamed into our trainer's ViT (`trainer.vit`, timm's parameter names, with CLIP's QuickGELU,
  ``ln_pre`` and bias-free patch projection switched on), which avoids importing open_clip (and torchvision) at run
  time; the parity test checks the result against open_clip itself.

Global = the 512-d projected, post-layernormed CLS (``image_embeds`` / open_clip ``encode_image``); patch = the
post-layernormed patch tokens (open_clip's ``output_tokens``; transformers' ``last_hidden_state`` is pre-norm, so the
norm is applied here). Native preprocessing: shortest edge 224 bicubic, centre-crop 224, OpenAI mean/std.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from baselines._common import (CLIP_MEAN, CLIP_STD, ModuleEncoder, ProjectedViT, load_exact, projected_vit_features,
                               read_state_dict, timm_vit_config)
from baselines._hf import clip_features, from_folder
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, HubRepo, WeightFiles

NATIVE = Preprocess(size=224, policy="resize_shortest_crop", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD,
                    channels=3)
HF_FILES = ("config.json", "model.safetensors")
OPEN_CLIP_SAFETENSORS = ("open_clip_model.safetensors",)
OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin",)
DOWNLOAD = ("hf download openai/clip-vit-base-patch16 config.json model.safetensors --local-dir <weights-dir>/clip "
            "(or: hf download timm/vit_base_patch16_clip_224.openai open_clip_config.json "
            "open_clip_model.safetensors --local-dir <weights-dir>/clip)")


# open_clip's residual-block parameter names -> ours (the fused q|k|v in-projection has the same layout as timm's qkv).
_BLOCK_RENAMES = {"ln_1": "norm1", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
                  "attn.out_proj": "attn.proj", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def open_clip_visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip CLIP state dict's ``visual.*`` entries into `ProjectedViT`'s names (text tower dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith("visual."):
            continue
        k = key[len("visual."):]
        if k == "class_embedding":
            out["vit.cls_token"] = value.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["vit.pos_embed"] = value.unsqueeze(0)
        elif k == "conv1.weight":
            out["vit.patch_embed.proj.weight"] = value
        elif k == "proj":
            out["proj.weight"] = value.t().contiguous()  # open_clip computes x @ proj
        elif k.startswith("ln_pre."):
            out["vit.norm_pre." + k[len("ln_pre."):]] = value
        elif k.startswith("ln_post."):
            out["vit.norm." + k[len("ln_post."):]] = value
        elif k.startswith("transformer.resblocks."):
            _, _, idx, rest = k.split(".", 3)
            for old, new in _BLOCK_RENAMES.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"vit.blocks.{idx}.{rest}"] = value
        else:
            out[k] = value  # unknown: reported by load_exact
    return out


def load_open_clip(path: Path, quick_gelu: bool) -> ProjectedViT:
    state = open_clip_visual_state(read_state_dict(path))
    if "vit.cls_token" not in state:
        raise ValueError(f"{path}: no visual.* CLIP tower found (is this an open_clip CLIP checkpoint?)")
    vit_state = {k[len("vit."):]: v for k, v in state.items() if k.startswith("vit.")}
    # open_clip's LayerNorms keep PyTorch's default eps; the patch bias and ln_pre are read from the keys.
    cfg = timm_vit_config(vit_state, act="quick_gelu" if quick_gelu else "gelu", layer_norm_eps=1e-5)
    model = ProjectedViT(cfg, state["proj.weight"].shape[0])
    load_exact(model, state, ignored_prefixes=(), source=str(path))
    return model.eval()


def hf_vision_config(folder: Path):
    """The vision config of a transformers CLIP folder. The published ``config.json`` is a full CLIPConfig whose
    ``projection_dim`` sits at the top level; the vision tower alone would default it to 512 and silently re-draw a
    projection of any other size, so it is carried over explicitly."""
    from transformers import CLIPConfig, CLIPVisionConfig

    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") == "clip":
        full = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
        vision = full.vision_config
        vision.projection_dim = full.projection_dim
        return vision
    return CLIPVisionConfig.from_pretrained(str(folder), local_files_only=True)


def _accepts(folder: Path, files: tuple[str, ...]) -> bool:
    """timm's hub repos also hold a config.json + model.safetensors, in timm's own format: the transformers layout
    counts only when its config.json is a transformers CLIP config."""
    if files != HF_FILES:
        return True
    return json.loads((folder / "config.json").read_text()).get("model_type") in ("clip", "clip_vision_model")


WEIGHTS = WeightFiles((HF_FILES, OPEN_CLIP_SAFETENSORS, OPEN_CLIP_FILES), DOWNLOAD,
                      hub=(HubRepo("openai/clip-vit-base-patch16", (HF_FILES,)),
                           HubRepo("timm/vit_base_patch16_clip_224.openai", (OPEN_CLIP_SAFETENSORS,))),
                      accepts=_accepts)


def _quick_gelu(folder: Path) -> bool:
    """OpenAI's CLIP weights were trained with QuickGELU; an ``open_clip_config.json`` beside them may say so."""
    cfg = folder / "open_clip_config.json"
    if cfg.is_file():
        return bool(json.loads(cfg.read_text()).get("model_cfg", {}).get("quick_gelu", True))
    return True


def clip(spec: EncoderSpec) -> Encoder:
    """OpenAI CLIP ViT-B/16 image tower (transformers folder or open_clip checkpoint)."""
    folder, files = spec.locate()
    paths = [folder / f for f in files]
    pre = spec.apply_policy(NATIVE)
    if files == HF_FILES:
        return ModuleEncoder(spec.name, from_folder("CLIPVisionModelWithProjection", folder, hf_vision_config(folder)),
                             pre, paths, clip_features)
    return ModuleEncoder(spec.name, load_open_clip(paths[0], _quick_gelu(folder)), pre, paths, projected_vit_features)
