"""A plain pre-norm Vision Transformer that reads the public checkpoints stored in timm's parameter names.

The official DINOv2 backbone, MRM (an MAE-style timm ViT) and BiomedCLIP's image trunk (timm
``vit_base_patch16_224``) all store ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.{norm1, attn.qkv,
attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`` and ``norm``; OpenAI CLIP's visual tower is the same
network with an extra LayerNorm before the blocks, QuickGELU and no patch bias, and is renamed into this layout by
`baselines.clip`. Re-implementing these ~80 lines (rather than importing timm/open_clip) keeps every loader usable
on the CPU torch, where torchvision, which timm and open_clip import, does not load. The parity tests check this
module against timm and open_clip themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ViTArch:
    img_size: int               # the grid the position embeddings were trained for
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    norm_eps: float = 1e-6
    act: str = "gelu"           # "gelu" (exact erf) or "quick_gelu" (OpenAI CLIP)
    patch_bias: bool = True
    pre_norm: bool = False      # CLIP's ``ln_pre`` on the embedded tokens
    layerscale: bool = False    # DINOv2's per-channel residual scales ``ls1``/``ls2``
    # DINOv2 resamples its 37x37 position grid with a scale factor nudged by 0.1 (its ``interpolate_offset``) to
    # dodge floating-point rounding of the output size; timm and CLIP resample to the exact size.
    pos_interp_offset: float = 0.0


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, arch: ViTArch):
        super().__init__()
        d = arch.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=arch.norm_eps)
        self.attn = Attention(d, arch.num_heads)
        self.ls1 = LayerScale(d) if arch.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=arch.norm_eps)
        self.mlp = Mlp(d, arch.mlp_hidden, arch.act)
        self.ls2 = LayerScale(d) if arch.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, arch: ViTArch):
        super().__init__()
        self.proj = nn.Conv2d(3, arch.embed_dim, arch.patch_size, arch.patch_size, bias=arch.patch_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """CLS token + absolute position embeddings + pre-norm blocks + final norm."""

    def __init__(self, arch: ViTArch):
        super().__init__()
        self.arch = arch
        d, grid = arch.embed_dim, arch.img_size // arch.patch_size
        self.patch_embed = PatchEmbed(arch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.norm_pre = nn.LayerNorm(d, eps=arch.norm_eps) if arch.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(d, eps=arch.norm_eps)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        m = int(math.sqrt(patch_pos.shape[1]))
        if (h, w) == (m, m):
            return self.pos_embed
        grid = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
        if self.arch.pos_interp_offset:
            o = self.arch.pos_interp_offset
            grid = F.interpolate(grid, scale_factor=((h + o) / m, (w + o) / m), mode="bicubic", align_corners=False)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, grid], dim=1)

    def forward_tokens(self, x: torch.Tensor, keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[B, 3, H, W] -> (final-normed tokens [B, 1+N, D], final-normed outputs of the blocks listed in `keep`)."""
        h, w = x.shape[-2] // self.arch.patch_size, x.shape[-1] // self.arch.patch_size
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self._pos_embed(h, w)
        x = self.norm_pre(x)
        kept = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in keep:
                kept.append(self.norm(x))
        return self.norm(x), kept


def heads_for(embed_dim: int) -> int:
    """Every ViT we load (OpenAI CLIP, timm ViT-B, DINOv2, MAE) uses 64-wide attention heads; the checkpoint
    does not store the head count, so it is derived from the width."""
    if embed_dim % 64:
        raise ValueError(f"embedding width {embed_dim} is not a multiple of the 64-wide heads these models use")
    return embed_dim // 64


def arch_from_timm_state(state: dict[str, torch.Tensor], **overrides) -> ViTArch:
    """Read a timm-layout ViT's shape from its state dict (square position grid, CLS token, no registers)."""
    d = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    n_pos = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"pos_embed holds {n_pos} patch positions, not a square grid")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    fields = dict(img_size=grid * patch, patch_size=patch, embed_dim=d, depth=depth, num_heads=heads_for(d),
                  mlp_hidden=state["blocks.0.mlp.fc1.weight"].shape[0], patch_bias="patch_embed.proj.bias" in state,
                  layerscale="blocks.0.ls1.gamma" in state)
    fields.update(overrides)
    return ViTArch(**fields)


def load_exact(model: nn.Module, state: dict[str, torch.Tensor], ignored_prefixes: tuple[str, ...],
               source: str) -> None:
    """Load `state` into `model`, failing on any missing key or any unexpected key outside `ignored_prefixes`
    (a silent partial load is exactly the MRM ``fc_norm`` trap: random layers passed off as pretrained)."""
    state = {k: v for k, v in state.items() if not k.startswith(ignored_prefixes)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match the architecture; missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")


def vit_features(model: VisionTransformer, pixels: torch.Tensor, keep: tuple[int, ...]):
    """Final-normed CLS [B, D], patch grid [B, D, h, w] and the kept blocks' final-normed patch grids."""
    h, w = pixels.shape[-2] // model.arch.patch_size, pixels.shape[-1] // model.arch.patch_size
    tokens, kept = model.forward_tokens(pixels, keep)

    def grid(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, h, w)

    return tokens[:, 0], grid(tokens), tuple(grid(t) for t in kept)
