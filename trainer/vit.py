"""The DINOv2 Vision Transformer, readable top to bottom.

Pre-norm ViT with patch 14, a CLS token, optional register tokens, a learnable iBOT mask token, LayerScale and
stochastic depth (facebookresearch/dinov2 ``dinov2/models/vision_transformer.py``, ``dinov2/layers/``). Parameter
names follow the DINOv2 backbone state dict (``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv``,
``blocks.N.ls1.gamma``, ...) so that released DINOv2 / RAD-DINO backbones load strictly; `trainer.convert` maps to
and from Hugging Face.

The same network, with a few switches in ViTConfig, is also every other plain ViT the benchmark loads (the `baselines`
package): MAE-style timm ViTs (MRM), BiomedCLIP's timm trunk and OpenAI CLIP's image tower store the same parameter
names (CLIP after renaming) and differ only in the activation, the LayerNorm epsilon, a LayerNorm before the first
block, a bias-free patch projection, no LayerScale and no mask token.

Multi-crop packing: `forward_features_list` runs crops of different sizes through the blocks as ONE token
sequence. Everything but attention is token-wise, so only attention needs to know where one image ends and the
next begins: a block-diagonal mask, described by `BlockDiagonal`. On CUDA with xformers installed it becomes
xformers' ``BlockDiagonalMask``; otherwise the SDPA backend applies the same mask by attending within each run of
equal-length sequences (a batched reshape), which is exactly the dense block-diagonal mask without its N^2 memory.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-6


@dataclass
class ViTConfig:
    img_size: int = 224  # sets the stored position-embedding grid (img_size // patch_size per side)
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_register_tokens: int = 0
    layerscale_init: float | None = 1e-5  # None = no LayerScale
    drop_path_rate: float = 0.0
    qkv_bias: bool = True
    # Position-embedding resampling. DINOv2 checkpoints without registers (and RAD-DINO's backbone_compatible)
    # use the "kludge" offset 0.1 and no antialias; checkpoints with registers use offset 0 and antialias.
    # Hugging Face Dinov2Model resamples by output size with no antialias, i.e. offset 0.0, antialias False.
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    # Switches for the other ViTs of this layout (MAE/MRM, BiomedCLIP, OpenAI CLIP); the defaults are DINOv2's.
    act: str = "gelu"  # "gelu" (exact, erf) | "quick_gelu" (x * sigmoid(1.702 x): what OpenAI CLIP was trained with)
    layer_norm_eps: float = LN_EPS  # OpenAI CLIP uses PyTorch's default, 1e-5
    patch_bias: bool = True  # OpenAI CLIP's patch projection has no bias
    pre_norm: bool = False  # CLIP's ln_pre: a LayerNorm (`norm_pre`, timm's name) on the tokens entering block 0
    use_mask_token: bool = True  # models not trained with iBOT masking have no mask token in their weights

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown act {self.act!r}; choose one of {', '.join(ACTIVATIONS)}")


# ----------------------------------------------------------------------------------------------------------------
# Attention: one function, two backends


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    """``xformers.ops`` when importable, else None. Imported lazily: xformers is optional (no CPU kernels)."""
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return xops


def uses_xformers(device: torch.device) -> bool:
    return device.type == "cuda" and _xformers_ops() is not None


@dataclass(frozen=True)
class BlockDiagonal:
    """Layout of a packed token sequence [1, N, D]: consecutive runs of ``(n_sequences, seq_len)``. Each sequence
    (one image's tokens) attends only to itself."""

    runs: tuple[tuple[int, int], ...]

    @property
    def seqlens(self) -> list[int]:
        return [t for n, t in self.runs for _ in range(n)]

    @property
    def n_sequences(self) -> int:
        return sum(n for n, _ in self.runs)


@functools.lru_cache(maxsize=16)
def _xformers_block_mask(runs: tuple[tuple[int, int], ...]):
    # Building the mask has a host-side cost; every block of a forward pass uses the same layout.
    return _xformers_ops().fmha.BlockDiagonalMask.from_seqlens(BlockDiagonal(runs).seqlens)


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # [B, N, H, d] -> SDPA's [B, H, N, d] and back.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_bias: BlockDiagonal | None = None) -> Tensor:
    """Softmax attention on [B, N, heads, head_dim] tensors (scale 1/sqrt(head_dim)), returning the same shape.
    ``attn_bias`` marks a packed sequence (B == 1) whose images must not attend to each other."""
    if uses_xformers(q.device):
        bias = _xformers_block_mask(attn_bias.runs) if attn_bias is not None else None
        return _xformers_ops().memory_efficient_attention(q, k, v, attn_bias=bias)
    if attn_bias is None:
        return _sdpa(q, k, v)
    # Block-diagonal mask for SDPA: sequences of one run share a length, so [1, n*T, H, d] -> [n, T, H, d].
    outs, start = [], 0
    for n, t in attn_bias.runs:
        sl = slice(start, start + n * t)
        qs, ks, vs = (z[:, sl].reshape(n, t, *z.shape[2:]) for z in (q, k, v))
        outs.append(_sdpa(qs, ks, vs).reshape(1, n * t, *q.shape[2:]))
        start += n * t
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def drop_path(x: Tensor, p: float, training: bool, layout: BlockDiagonal | None = None) -> Tensor:
    """Stochastic depth: zero a residual branch for a random subset of images, rescaling the rest by 1/(1-p).
    Without `layout` each row of x [B, N, D] is an image; with it, x is one packed row and the draw is per image
    (dropping the whole packed row would drop every crop at once)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    if layout is None:
        scale = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
    else:
        per_image = x.new_empty(layout.n_sequences).bernoulli_(keep)
        lens = torch.tensor(layout.seqlens, device=x.device)
        scale = per_image.repeat_interleave(lens).view(1, -1, 1)
    return x * scale / keep


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {self.patch_size}; "
                             f"resize or crop it to a multiple first")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, D], row-major over the patch grid


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # output laid out as [q | k | v], each [heads, d]
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_bias: BlockDiagonal | None = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v, attn_bias).reshape(B, N, C))


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU. Its weights were trained with it, so the exact GELU shifts
    their features."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}  # nn.GELU is the exact (erf) GELU, as DINOv2 and HF's "gelu"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale gamma (CaiT), initialised small so deep blocks start near identity."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LS(Attn(LN(x)))), then x + DropPath(LS(MLP(LN(x))))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(dim, cfg.layerscale_init) if cfg.layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.act)
        self.ls2 = LayerScale(dim, cfg.layerscale_init) if cfg.layerscale_init is not None else nn.Identity()
        self.drop_path_rate = cfg.drop_path_rate  # uniform over blocks ("drop_path_uniform: true" upstream)

    def forward(self, x: Tensor, attn_bias: BlockDiagonal | None = None) -> Tensor:
        # Classic per-image DropPath with an independent draw for each branch. Upstream's Block applies its
        # `drop_path1` module to both branches ("FIXME: drop_path2"); we do not reproduce that naming bug.
        # The optional batch-subset variant (rate > 0.1 upstream) is not implemented: same expectation, it only
        # saves compute.
        p, train = self.drop_path_rate, self.training
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), attn_bias)), p, train, attn_bias)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), p, train, attn_bias)
        return x


# ----------------------------------------------------------------------------------------------------------------
# The model


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.embed_dim = D
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        self.n_blocks = cfg.depth
        self.pos_grid = cfg.img_size // cfg.patch_size  # the stored position embeddings cover pos_grid^2 patches

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid**2, D))
        R = cfg.num_register_tokens
        self.register_tokens = nn.Parameter(torch.zeros(1, R, D)) if R else None
        self.mask_token = nn.Parameter(torch.zeros(1, D)) if cfg.use_mask_token else None  # iBOT's masked patches
        self.norm_pre = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        # DINOv2 / timm init: pos_embed trunc-normal(0.02), CLS and registers N(0, 1e-6), Linear trunc-normal(0.02)
        # with zero bias; the mask token starts at zero; conv and LayerNorm keep PyTorch defaults.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- tokens ---------------------------------------------------------------------------------------------

    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        """Position embeddings [1, 1 + h*w, D] for an h x w patch grid, resampled bicubically from the stored
        square grid (in fp32: bicubic in half precision shifts the embeddings)."""
        M = self.pos_grid
        if (h, w) == (M, M):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.reshape(1, M, M, -1).permute(0, 3, 1, 2).float()
        offset = self.cfg.interpolate_offset
        if offset:
            # DINOv2's historical kludge: resample by the scale factor (n + offset) / M rather than by the output
            # size, which moves the sampling points slightly. Needed to reproduce checkpoints trained with it.
            resize = {"scale_factor": ((h + offset) / M, (w + offset) / M)}
        else:
            resize = {"size": (h, w)}
        grid = F.interpolate(grid, mode="bicubic", antialias=self.cfg.interpolate_antialias, **resize)
        patch_pos = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """[B, C, H, W] -> [B, 1 + R + h*w, D]: CLS, registers, patches, as they enter the first block. Masked
        patches become the mask token BEFORE position embeddings are added (so the model still knows where the
        masked patch was); registers are inserted after and get no position embedding."""
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        x = self.patch_embed(x)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this ViT was built with use_mask_token=False and cannot take masks")
            if masks.shape != (B, h * w):
                raise ValueError(f"masks must be [B, n_patches] = [{B}, {h * w}] for a {H}x{W} input, "
                                 f"got {list(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        return self.norm_pre(x)

    def _outputs(self, x: Tensor, masks: Tensor | None) -> dict:
        x_norm = self.norm(x)
        r = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:r],
            "x_norm_patchtokens": x_norm[:, r:],
            "x_prenorm": x,
            "masks": masks,
        }

    # --- forward passes -------------------------------------------------------------------------------------

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict:
        x_tok = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x_tok = blk(x_tok)
        return self._outputs(x_tok, masks)

    def forward_features_list(
        self, xs: Sequence[Tensor], masks_list: Sequence[Tensor | None] | None = None
    ) -> list[dict]:
        """Several batches of crops (e.g. global and local crops, different sizes) in one packed pass."""
        masks_list = list(masks_list) if masks_list is not None else [None] * len(xs)
        if len(masks_list) != len(xs):
            raise ValueError(f"got {len(xs)} crop batches but {len(masks_list)} masks")
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks_list)]
        layout = BlockDiagonal(tuple((t.shape[0], t.shape[1]) for t in tokens))
        packed = torch.cat([t.reshape(1, -1, self.embed_dim) for t in tokens], dim=1)
        for blk in self.blocks:
            packed = blk(packed, layout)
        sizes = [n * t for n, t in layout.runs]
        return [self._outputs(chunk.reshape(n, t, self.embed_dim), m)
                for chunk, (n, t), m in zip(packed.split(sizes, dim=1), layout.runs, masks_list)]

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last `n` blocks (int) or of the listed block indices (0-based), shallow to deep, as
        patch tokens [B, h*w, D] (or [B, D, h, w] with `reshape`), paired with the CLS token when asked."""
        take = list(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else sorted(n)
        if not take or take[0] < 0 or take[-1] >= self.n_blocks:
            raise ValueError(f"layer indices {n} out of range for a {self.n_blocks}-block ViT")
        B, _, H, W = x.shape
        x_tok = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks[: take[-1] + 1]):
            x_tok = blk(x_tok)
            if i in take:
                outputs.append(self.norm(x_tok) if norm else x_tok)
        r = 1 + self.num_register_tokens
        cls = [o[:, 0] for o in outputs]
        patches = [o[:, r:] for o in outputs]
        if reshape:
            h, w = H // self.patch_size, W // self.patch_size
            patches = [p.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        return tuple(zip(patches, cls)) if return_class_token else tuple(patches)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["x_norm_clstoken"]


# ----------------------------------------------------------------------------------------------------------------
# Presets


def vit_tiny(**kw) -> VisionTransformer:
    return VisionTransformer(ViTConfig(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kw}))


def vit_small(**kw) -> VisionTransformer:
    return VisionTransformer(ViTConfig(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kw}))


def vit_base(**kw) -> VisionTransformer:
    return VisionTransformer(ViTConfig(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kw}))


PRESETS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build_vit(name: str, **overrides) -> VisionTransformer:
    """A preset by name (``vit_tiny``, ``vit_small``, ``vit_base``) with ViTConfig field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)
