"""Backbone weights in and out: the DINOv2 state-dict layout and Hugging Face ``Dinov2Model`` folders.

DINOv2 layout. Our parameter names ARE the DINOv2 backbone's (``cls_token``, ``pos_embed``, ``mask_token``,
``register_tokens``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma}``, ``norm``), so RAD-DINO's ``backbone_compatible.safetensors`` or a hub ``dinov2_vit*14``
file loads strictly after undoing the wrappers training adds (``teacher``/``module.``/``backbone.`` prefixes,
FSDP ``BlockChunk`` indices ``blocks.<chunk>.<i>``). The head count is not stored in the weights; DINOv2's
models all use 64-dim heads, which is the default here.

Hugging Face layout (what ``save_pretrained`` writes, read from transformers 5.23's modeling_dinov2.py and its
checkpoint conversion mapping; transformers 4.x uses the same on-disk names):
``embeddings.{cls_token, mask_token, position_embeddings, register_tokens, patch_embeddings.projection}``,
``encoder.layer.N.{norm1, attention.attention.{query,key,value}, attention.output.dense, layer_scale1.lambda1,
norm2, mlp.fc1, mlp.fc2, layer_scale2.lambda1}``, ``layernorm``. Our fused ``qkv`` is split into three. Loaded
models of transformers 5 name the attention ``attention.{q,k,v,o}_proj`` in memory; both spellings are accepted.

Position-embedding resampling differs by source, and it changes features whenever the patch grid differs from
the stored one (it does not at the native size):
- DINOv2 without registers (and RAD-DINO's backbone_compatible): bicubic by scale factor (n + 0.1) / M, no
  antialias -> ``interpolate_offset=0.1, interpolate_antialias=False`` (our training default);
- DINOv2 with registers: by output size with antialias -> ``0.0, True``;
- HF ``Dinov2Model``: by output size, no antialias -> ``0.0, False``; HF ``Dinov2WithRegistersModel``: ``0.0, True``.
Models loaded from HF get the HF mode, so they reproduce HF's features exactly at every size.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from harness.common.atomic import atomic_dir, atomic_path
from trainer.vit import LN_EPS, ViTConfig, VisionTransformer

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
_HEAD_PREFIXES = ("dino_head.", "ibot_head.")


# ----------------------------------------------------------------------------------------------------------------
# DINOv2 layout


def clean_dinov2_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Undo what DINOv2 training wraps around backbone weights: ``teacher.``, ``module.`` and ``backbone.``
    prefixes, DINO/iBOT head tensors (dropped), and FSDP BlockChunk indices (``blocks.2.7.`` -> ``blocks.7.``:
    chunks are padded with Identity, so the inner index is already the global block index)."""
    out = {}
    for key, value in sd.items():
        for prefix in ("teacher.", "module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(_HEAD_PREFIXES):
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)] = value
    return out


def config_from_dinov2_state_dict(sd: dict[str, Tensor], num_heads: int | None = None, **overrides) -> ViTConfig:
    """The ViTConfig a (cleaned) DINOv2 backbone state dict implies. Interpolation follows the source: offset 0.1
    without registers, offset 0 + antialias with registers (override to taste)."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise KeyError(f"not a DINOv2 backbone state dict: {key!r} missing (keys start {sorted(sd)[:4]})")
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    if grid * grid != sd["pos_embed"].shape[1] - 1:
        raise ValueError(f"pos_embed has {sd['pos_embed'].shape[1] - 1} patch positions, not a square grid")
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cfg = dict(
        img_size=grid * patch, patch_size=patch, in_chans=sd["patch_embed.proj.weight"].shape[1],
        embed_dim=dim, depth=depth, num_heads=num_heads or dim // 64,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, num_register_tokens=regs,
        layerscale_init=1.0 if "blocks.0.ls1.gamma" in sd else None, qkv_bias="blocks.0.attn.qkv.bias" in sd,
        interpolate_offset=0.0 if regs else 0.1, interpolate_antialias=bool(regs),
    )
    return ViTConfig(**{**cfg, **overrides})


def from_dinov2_state_dict(sd: dict[str, Tensor], num_heads: int | None = None, **overrides) -> VisionTransformer:
    """A VisionTransformer (eval mode) holding a DINOv2-layout backbone state dict, loaded strictly."""
    sd = clean_dinov2_state_dict(sd)
    model = VisionTransformer(config_from_dinov2_state_dict(sd, num_heads, **overrides))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def dinov2_state_dict(model: VisionTransformer) -> dict[str, Tensor]:
    """Our weights in the DINOv2 backbone layout, loadable with ``strict=True`` into DINOv2's
    ``DinoVisionTransformer`` of the same size. Hub models always have LayerScale, so a model built without
    it gets gamma = 1 (the identity)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.layerscale_init is None:
        ones = torch.ones(model.embed_dim)
        for i in range(model.n_blocks):
            sd[f"blocks.{i}.ls1.gamma"] = ones.clone()
            sd[f"blocks.{i}.ls2.gamma"] = ones.clone()
    return sd


def load_dinov2(path: str | Path, num_heads: int | None = None, **overrides) -> VisionTransformer:
    """A DINOv2-layout backbone file: ``.safetensors``, or a ``.pth`` loaded with ``weights_only=True`` (a raw
    state dict, or DINOv2's ``teacher_checkpoint.pth`` with its ``{"teacher": ...}`` nesting)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such backbone file")
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("teacher", sd.get("model", sd))
    try:
        return from_dinov2_state_dict(sd, num_heads, **overrides)
    except (KeyError, ValueError, RuntimeError) as e:
        raise type(e)(f"{path}: {e}") from e


def save_dinov2(model: VisionTransformer, path: str | Path) -> Path:
    """Write the DINOv2-layout state dict to one safetensors file, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(dinov2_state_dict(model), str(tmp))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face layout

_HF_GLOBAL = {  # ours -> HF
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HF_BLOCK = {  # per block, ours -> HF (qkv is split separately)
    "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
}
_HF_QKV = ("query", "key", "value")
# transformers 5 in-memory names -> on-disk names
_HF5_RENAMES = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
                ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}


def hf_config(model: VisionTransformer) -> dict:
    """config.json for ``Dinov2Model`` (or ``Dinov2WithRegistersModel`` when the model has registers)."""
    cfg = model.cfg
    if float(cfg.mlp_ratio) != int(cfg.mlp_ratio):
        raise ValueError(f"Hugging Face Dinov2Config takes an integer mlp_ratio, this model has {cfg.mlp_ratio}")
    out = {
        "architectures": ["Dinov2WithRegistersModel" if cfg.num_register_tokens else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if cfg.num_register_tokens else "dinov2",
        "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        "mlp_ratio": int(cfg.mlp_ratio), "hidden_act": "gelu", "layer_norm_eps": LN_EPS,
        "image_size": cfg.img_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias, "layerscale_value": 1.0, "use_swiglu_ffn": False, "use_mask_token": True,
        "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "dtype": "float32",
    }
    if cfg.num_register_tokens:
        out["num_register_tokens"] = cfg.num_register_tokens
    return out


def _to_hf_name(key: str) -> str:
    if key in _HF_GLOBAL:
        return _HF_GLOBAL[key]
    i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
    for ours, hf in _HF_BLOCK.items():
        if rest == ours or rest.startswith(ours + "."):
            return f"encoder.layer.{i}.{hf}{rest[len(ours):]}"
    raise KeyError(f"no Hugging Face name for parameter {key!r}")


def _from_hf_name(key: str) -> str:
    for ours, hf in _HF_GLOBAL.items():
        if key == hf:
            return ours
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
    if m:
        i, rest = m.groups()
        for ours, hf in _HF_BLOCK.items():
            if rest == hf or rest.startswith(hf + "."):
                return f"blocks.{i}.{ours}{rest[len(hf):]}"
    raise KeyError(f"unexpected tensor {key!r} in a Hugging Face Dinov2 state dict")


def hf_state_dict(model: VisionTransformer) -> dict[str, Tensor]:
    """Our weights under the Hugging Face on-disk names (float32, contiguous)."""
    out = {}
    for key, value in dinov2_state_dict(model).items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if m:  # fused [q | k | v] rows -> three Linear layers
            for name, part in zip(_HF_QKV, value.chunk(3, dim=0)):
                out[f"encoder.layer.{m[1]}.attention.attention.{name}.{m[2]}"] = part
        else:
            out[_to_hf_name(key)] = value
    return {k: v.float().contiguous() for k, v in out.items()}


def config_from_hf(config: dict) -> ViTConfig:
    """Our ViTConfig for a Hugging Face Dinov2 config.json, with HF's position-embedding resampling."""
    if config.get("model_type") not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(f"model_type {config.get('model_type')!r} is not a Dinov2 model")
    if config.get("use_swiglu_ffn", False):
        raise ValueError("SwiGLU Dinov2 models (giant) are not supported: our ViT has a GELU MLP")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only 'gelu')")
    if abs(config.get("layer_norm_eps", LN_EPS) - LN_EPS) > 1e-12:
        raise ValueError(f"layer_norm_eps {config['layer_norm_eps']} differs from ours ({LN_EPS})")
    size, patch = config.get("image_size", 224), config.get("patch_size", 14)
    for name, v in (("image_size", size), ("patch_size", patch)):
        if isinstance(v, (list, tuple)) and len(set(v)) != 1:
            raise ValueError(f"non-square {name} {v} is not supported")
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    regs = config.get("num_register_tokens", 0) if config["model_type"] == "dinov2_with_registers" else 0
    return ViTConfig(
        img_size=size, patch_size=patch, in_chans=config.get("num_channels", 3),
        embed_dim=config.get("hidden_size", 768), depth=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 12), mlp_ratio=float(config.get("mlp_ratio", 4)),
        num_register_tokens=regs, layerscale_init=config.get("layerscale_value", 1.0),
        qkv_bias=config.get("qkv_bias", True),
        # HF resamples by output size; antialias only in the with-registers model (modeling_dinov2*.py).
        interpolate_offset=0.0, interpolate_antialias=bool(regs),
    )


def from_hf_state_dict(sd: dict[str, Tensor], config: dict) -> VisionTransformer:
    """A VisionTransformer (eval mode) from Hugging Face Dinov2 weights (on-disk or transformers-5 in-memory
    names; a ``dinov2.`` prefix from the classification model is dropped) and its config dict."""
    model = VisionTransformer(config_from_hf(config))
    ours: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        key = key.removeprefix("dinov2.")
        for new, old in _HF5_RENAMES.items():
            key = key.replace(new, old)
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            ours[_from_hf_name(key)] = value
    for (i, kind), parts in qkv.items():
        ours[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in _HF_QKV], dim=0)
    if "mask_token" not in ours:  # use_mask_token=False models have none; a zero token is never used at inference
        ours["mask_token"] = torch.zeros(1, model.embed_dim)
    model.load_state_dict(ours, strict=True)
    return model.eval()


def save_hf(model: VisionTransformer, out_dir: str | Path) -> Path:
    """Write a Hugging Face folder (config.json + model.safetensors), atomically; an existing non-empty folder is
    refused, so an export never mixes old and new files."""
    with atomic_dir(out_dir) as tmp:
        save_file(hf_state_dict(model), str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config(model), indent=2) + "\n")
    return Path(out_dir)


def load_hf(folder: str | Path) -> VisionTransformer:
    """A Hugging Face Dinov2 folder (config.json + model.safetensors) as our VisionTransformer; no transformers
    import needed."""
    folder = Path(folder)
    missing = [f for f in (HF_CONFIG, HF_WEIGHTS) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)} (expected a Hugging Face Dinov2 folder)")
    config = json.loads((folder / HF_CONFIG).read_text())
    try:
        return from_hf_state_dict(load_file(str(folder / HF_WEIGHTS)), config)
    except (KeyError, ValueError, RuntimeError) as e:
        raise type(e)(f"{folder}: {e}") from e
