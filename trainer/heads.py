"""The DINO projection head, shared by the DINO (CLS) and iBOT (patch) objectives.

As facebookresearch/dinov2 ``dinov2/layers/dino_head.py``: a 3-layer GELU MLP in_dim -> 2048 -> 2048 -> 256
(no BatchNorm), L2 normalisation of the
256-d bottleneck, then weight-normed prototypes Linear(256, K, bias=False) whose gain g starts at 1 and is
trained (and weight-decayed) like any other weight. RAD-DINO ships the default K=65536 / bottleneck 256 head
(microsoft/rad-dino dino_head.safetensors), so those are the defaults here. By default the iBOT patch tokens go
through this same head (``ibot.separate_head: false`` in dinov2/configs/ssl_default_config.yaml).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Linear map without bias whose rows are w_k = g_k * v_k / ||v_k||.

    Written out rather than using torch's weight_norm helpers so the parameter names are the plain
    `weight_g` [K, 1] and `weight_v` [K, in] of a DINOv2 head checkpoint (RAD-DINO's dino_head.safetensors)
    and nothing depends on deprecated or parametrisation-specific names.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        # nn.Linear's own default (uniform in +-1/sqrt(in)), as upstream: its DINOHead applies trunc-normal(0.02)
        # to the MLP before the prototype layer exists. Only the rows' directions reach the logits, but under
        # AdamW the norm of v sets how fast they turn (a step of ~lr moves a row of norm |v| by ~lr/|v|).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normed prototypes; forward(x [*, in_dim]) -> logits [*, out_dim]."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # As dinov2/layers/dino_head.py: eps 1e-6 in fp16 (1e-12 underflows there), 1e-12 otherwise.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
