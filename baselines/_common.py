"""Helpers shared by the pretrained-encoder families: safe checkpoint reading, exact state-dict loading, token grids,
and the plain ViTs (official DINOv2, MRM, BiomedCLIP, OpenAI CLIP) run by `trainer.vit`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from baselines.preprocess import Preprocess
from baselines.registry import Encoder, Features
from harness.common.hashing import sha256_files
from trainer.convert import config_from_dinov2_state_dict
from trainer.vit import ViTConfig, VisionTransformer

# The OpenAI CLIP normalisation, shared by CLIP and BiomedCLIP.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a plain ``torch.save`` state dict, never unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler refuses anything that is not tensors and plain containers
        raise ValueError(f"{path}: not a plain tensor checkpoint loadable with weights_only=True ({e}). A TorchScript "
                         "or pickled-module file is not supported; use the state-dict file named in docs/encoders.md") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def load_exact(model: nn.Module, state: dict[str, torch.Tensor], ignored_prefixes: tuple[str, ...],
               source: str) -> None:
    """Load `state` into `model`, failing on any missing key or any unexpected key outside `ignored_prefixes`
    (a silent partial load is exactly the MRM ``fc_norm`` trap: random layers passed off as pretrained)."""
    state = {k: v for k, v in state.items() if not k.startswith(ignored_prefixes)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match the architecture; missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")


def tokens_to_grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, C] patch tokens -> [B, C, h, w]."""
    B, N, C = tokens.shape
    if N != h * w:
        raise ValueError(f"{N} patch tokens do not form a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(B, C, h, w)


def layer_indices(depth: int) -> tuple[int, ...]:
    """Four blocks spread evenly over the depth (2, 5, 8, 11 for 12 blocks): the multi-level inputs a UPerNet-style
    decoder takes from a plain ViT."""
    return tuple(sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)}))


def timm_vit_config(state: dict[str, torch.Tensor], **overrides) -> ViTConfig:
    """The `trainer.vit` config of a ViT stored in timm's parameter names (MAE/MRM, BiomedCLIP's trunk, OpenAI CLIP
    once renamed). The shape is read as for a DINOv2 backbone (head width 64, LayerScale and qkv bias when present);
    a patch bias, a pre-block norm and a mask token only when the weights hold one; and the position grid is
    resampled to the exact size, as timm and open_clip do (DINOv2's 0.1 offset is its own)."""
    return config_from_dinov2_state_dict(
        state, patch_bias="patch_embed.proj.bias" in state, pre_norm="norm_pre.weight" in state,
        use_mask_token="mask_token" in state, interpolate_offset=0.0, **overrides)


def vit_features(model: VisionTransformer, pixels: torch.Tensor) -> Features:
    """One pass of a `trainer.vit` ViT: global = the final-normed CLS token, patch = the final-normed patch grid,
    layers = the `layer_indices` blocks through the same final norm (DINOv2's ``get_intermediate_layers``)."""
    outs = model.get_intermediate_layers(pixels, n=layer_indices(model.n_blocks), reshape=True,
                                         return_class_token=True, norm=True)
    patch, cls = outs[-1]  # the deepest index is the last block, so this is the model's final output
    return Features(cls, patch, tuple(p for p, _ in outs))


class ProjectedViT(nn.Module):
    """A CLIP image tower: a ViT and the bias-free linear map of its CLS token into the joint image-text space."""

    def __init__(self, cfg: ViTConfig, embed_dim: int):
        super().__init__()
        self.vit = VisionTransformer(cfg)
        self.proj = nn.Linear(cfg.embed_dim, embed_dim, bias=False)


def projected_vit_features(model: ProjectedViT, pixels: torch.Tensor) -> Features:
    """`vit_features` with the projected CLS as the global embedding (CLIP's ``encode_image``)."""
    f = vit_features(model.vit, pixels)
    return f._replace(global_=model.proj(f.global_))


class ModuleEncoder(Encoder):
    """An Encoder around an ``nn.Module`` (``self.model``) and a forward function returning Features."""

    def __init__(self, name: str, model: torch.nn.Module, preprocess: Preprocess, weight_files: list[Path],
                 forward: Callable[[torch.nn.Module, torch.Tensor], Features]):
        self.name = name
        self.model = model.eval()
        self.preprocess = preprocess
        self.weights_digest = sha256_files(weight_files)
        self.weights_folder = weight_files[0].parent
        self._forward = forward
        self.code_modules = (forward.__module__,)  # the forward function computes the features
        for p in self.model.parameters():
            p.requires_grad_(False)

    def encode(self, pixels: torch.Tensor) -> Features:
        if pixels.ndim != 4 or pixels.shape[1] != self.preprocess.channels:
            raise ValueError(f"{self.name}: expected [B, {self.preprocess.channels}, H, W] pixels, "
                             f"got {tuple(pixels.shape)}")
        with torch.inference_mode():
            return self._forward(self.model, pixels)
