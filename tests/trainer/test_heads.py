"""DINOHead against a hand-written formula, and its checkpoint-facing parameter names."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.heads import DINOHead


def direct_head(head: DINOHead, x: torch.Tensor) -> torch.Tensor:
    """MLP with exact GELU, L2 normalisation and g * v / ||v|| prototypes, written out row by row."""
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    h = x
    for i, lin in enumerate(linears):
        h = h @ lin.weight.t() + lin.bias
        if i < len(linears) - 1:
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = h / torch.sqrt((h * h).sum(dim=-1, keepdim=True))
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    rows = [g[k, 0] * v[k] / torch.sqrt((v[k] * v[k]).sum()) for k in range(v.shape[0])]
    return h @ torch.stack(rows).t()


@pytest.mark.parametrize("nlayers", [1, 2, 3])
def test_head_matches_direct_formula(nlayers):
    head = DINOHead(in_dim=24, out_dim=40, hidden_dim=32, bottleneck_dim=16, nlayers=nlayers)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)  # g != 1 so the gain is really exercised
    x = torch.randn(5, 24)
    torch.testing.assert_close(head(x), direct_head(head, x), rtol=1e-5, atol=1e-6)


def test_head_keeps_leading_dims_and_g_starts_at_one():
    head = DINOHead(in_dim=24, out_dim=40, hidden_dim=32, bottleneck_dim=16)
    x = torch.randn(2, 7, 24)
    out = head(x)
    assert out.shape == (2, 7, 40)
    torch.testing.assert_close(out[1, 3], head(x[1, 3]))
    assert torch.equal(head.last_layer.weight_g.detach(), torch.ones(40, 1))
    # With g = 1 every prototype is a unit vector and the bottleneck is unit-norm: logits are cosines.
    assert out.abs().max() <= 1.0 + 1e-5


def test_weight_norm_ignores_the_scale_of_v():
    head = DINOHead(in_dim=8, out_dim=12, hidden_dim=16, bottleneck_dim=6)
    x = torch.randn(3, 8)
    before = head(x)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.rand(12, 1) * 10 + 0.1)
    torch.testing.assert_close(head(x), before, rtol=1e-5, atol=1e-6)


def test_parameter_names_match_a_dinov2_head_checkpoint_and_g_is_trained():
    head = DINOHead(in_dim=8, out_dim=12, hidden_dim=16, bottleneck_dim=6)
    names = set(dict(head.named_parameters()))
    assert names == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
                     "last_layer.weight_g", "last_layer.weight_v"}
    head(torch.randn(4, 8)).pow(2).sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_g.grad.abs().sum() > 0


def test_rejects_zero_layers():
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(in_dim=8, out_dim=12, nlayers=0)
