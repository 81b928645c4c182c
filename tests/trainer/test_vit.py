"""The ViT: shapes, mask-token placement, position-embedding resampling, multi-crop packing, stochastic depth, and
the switches for the other ViTs of this layout (OpenAI CLIP, timm/MAE)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.vit import BlockDiagonal, Mlp, ViTConfig, VisionTransformer, attention, build_vit, drop_path, vit_small


def tiny(**kw) -> VisionTransformer:
    cfg = {"img_size": 56, "patch_size": 14, "embed_dim": 64, "depth": 2, "num_heads": 4, **kw}
    return VisionTransformer(ViTConfig(**cfg)).eval()


def perturb(model: VisionTransformer) -> VisionTransformer:
    """Random non-trivial tokens: the init has a zero mask token and CLS ~ 1e-6, which would hide bugs."""
    with torch.no_grad():
        for p in (model.cls_token, model.mask_token, model.pos_embed):
            p.normal_()
        if model.register_tokens is not None:
            model.register_tokens.normal_()
        for blk in model.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)
            blk.ls2.gamma.uniform_(0.5, 1.5)
    return model


def test_output_shapes_with_registers_non_square():
    model = tiny(num_register_tokens=2)
    out = model.forward_features(torch.randn(3, 3, 42, 70))  # 3 x 5 patch grid
    assert out["x_norm_clstoken"].shape == (3, 64)
    assert out["x_norm_regtokens"].shape == (3, 2, 64)
    assert out["x_norm_patchtokens"].shape == (3, 15, 64)
    assert out["x_prenorm"].shape == (3, 1 + 2 + 15, 64)
    z = torch.zeros(1, 3, 42, 70)
    assert torch.equal(model(z), model.forward_features(z)["x_norm_clstoken"])


def test_vit_small_shape_at_small_resolution():
    model = vit_small(patch_size=14).eval()
    assert (model.embed_dim, model.n_blocks, model.patch_size) == (384, 12, 14)
    with torch.no_grad():
        grid = model.get_intermediate_layers(torch.randn(1, 3, 28, 42), n=1, reshape=True)[0]
    assert grid.shape == (1, 384, 2, 3)


def test_build_vit_presets_and_bad_name():
    assert build_vit("vit_tiny", depth=2).embed_dim == 192
    assert build_vit("vit_base", depth=1).blocks[0].attn.num_heads == 12
    with pytest.raises(ValueError, match="vit_huge"):
        build_vit("vit_huge")


def test_bad_input_size_and_mask_shape_raise():
    model = tiny()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.forward_features(torch.randn(1, 3, 50, 56))
    with pytest.raises(ValueError, match="masks must be"):
        model.forward_features(torch.randn(1, 3, 56, 56), torch.zeros(1, 15, dtype=torch.bool))


def test_pos_embed_grid_for_518():
    model = VisionTransformer(ViTConfig(img_size=518, embed_dim=32, depth=1, num_heads=2))
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 32)
    assert model.interpolate_pos_encoding(37, 37) is model.pos_embed
    assert model.interpolate_pos_encoding(16, 12).shape == (1, 1 + 16 * 12, 32)


def test_interpolation_modes_differ_and_size_mode_is_plain_bicubic():
    model = perturb(tiny(img_size=112))  # 8 x 8 stored grid
    grid = model.pos_embed[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    model.cfg.interpolate_offset = 0.0
    by_size = model.interpolate_pos_encoding(5, 7)
    expected = F.interpolate(grid, size=(5, 7), mode="bicubic", align_corners=False)
    torch.testing.assert_close(by_size[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 35, -1))
    torch.testing.assert_close(by_size[:, :1], model.pos_embed[:, :1])
    model.cfg.interpolate_offset = 0.1
    kludge = model.interpolate_pos_encoding(5, 7)
    assert kludge.shape == by_size.shape
    assert (kludge - by_size).abs().max() > 1e-3  # the offset moves the sampling points


def test_mask_token_replaces_patches_before_position_embedding():
    model = perturb(tiny())
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    tok = model.prepare_tokens_with_masks(x, masks)
    pos = model.pos_embed[0]
    torch.testing.assert_close(tok[0, 1 + 1], model.mask_token[0] + pos[1 + 1])
    torch.testing.assert_close(tok[0, 1 + 5], model.mask_token[0] + pos[1 + 5])
    unmasked = model.prepare_tokens_with_masks(x)
    torch.testing.assert_close(tok[1], unmasked[1])
    assert not torch.allclose(tok[0, 1 + 1], unmasked[0, 1 + 1])
    torch.testing.assert_close(tok[0, 1 + 2], unmasked[0, 1 + 2])


def test_packed_multicrop_equals_separate_passes():
    model = perturb(tiny(num_register_tokens=1))
    glob = torch.randn(2, 3, 56, 56)
    loc = torch.randn(3, 3, 28, 28)
    masks = torch.rand(2, 16) < 0.4
    with torch.no_grad():
        packed = model.forward_features_list([glob, loc], [masks, None])
        separate = [model.forward_features(glob, masks), model.forward_features(loc)]
    for p, s in zip(packed, separate):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert p[key].shape == s[key].shape
            torch.testing.assert_close(p[key], s[key], atol=1e-5, rtol=1e-5)
    assert packed[0]["masks"] is masks and packed[1]["masks"] is None


def test_sdpa_block_diagonal_equals_dense_mask():
    layout = BlockDiagonal(((2, 5), (3, 2)))
    N = 2 * 5 + 3 * 2
    q, k, v = (torch.randn(1, N, 2, 8) for _ in range(3))
    dense = torch.block_diag(*[torch.ones(t, t) for t in layout.seqlens]).bool()
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=dense).transpose(1, 2)
    torch.testing.assert_close(attention(q, k, v, layout), expected, atol=1e-6, rtol=1e-5)
    # and it is not the unmasked attention
    assert not torch.allclose(attention(q, k, v), expected, atol=1e-3)


def test_get_intermediate_layers_match_forward_features():
    model = perturb(tiny(depth=3, num_register_tokens=2))
    x = torch.randn(2, 3, 42, 56)
    out = model.forward_features(x)
    last, cls = model.get_intermediate_layers(x, n=1, return_class_token=True)[0]
    torch.testing.assert_close(last, out["x_norm_patchtokens"])
    torch.testing.assert_close(cls, out["x_norm_clstoken"])
    grids = model.get_intermediate_layers(x, n=[0, 2], reshape=True)
    assert [g.shape for g in grids] == [(2, 64, 3, 4)] * 2
    torch.testing.assert_close(grids[1], out["x_norm_patchtokens"].reshape(2, 3, 4, 64).permute(0, 3, 1, 2))
    raw = model.get_intermediate_layers(x, n=1, norm=False)[0]
    torch.testing.assert_close(raw, out["x_prenorm"][:, 3:])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[3])


def test_drop_path_is_per_image_in_packed_layout():
    torch.manual_seed(1)
    layout = BlockDiagonal(((6, 4), (10, 3)))
    x = torch.ones(1, 6 * 4 + 10 * 3, 5)
    y = drop_path(x, 0.5, training=True, layout=layout)
    per_image = y[0].split(layout.seqlens)
    values = set()
    for tokens in per_image:
        assert torch.all(tokens == tokens[0, 0])  # one draw per image, not per token
        values.add(tokens[0, 0].item())
    assert values == {0.0, 2.0}  # 16 images at p=0.5: both outcomes occur, kept branches scaled by 1/(1-p)
    assert torch.equal(drop_path(x, 0.5, training=False, layout=layout), x)


def test_drop_path_active_in_training_only():
    model = perturb(tiny(drop_path_rate=0.5))
    x = torch.randn(8, 3, 28, 28)
    with torch.no_grad():
        ev1, ev2 = model(x), model(x)
        model.train()
        tr = model(x)
    torch.testing.assert_close(ev1, ev2)
    assert not torch.allclose(tr, ev1)


def test_no_layerscale_option():
    model = tiny(layerscale_init=None)
    assert not any("gamma" in k for k in model.state_dict())
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 64)


def test_default_state_dict_is_the_dinov2_backbone_layout():
    """The defaults of the CLIP/timm switches must leave the trainer's checkpoint keys exactly as DINOv2's."""
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    want = {"cls_token", "pos_embed", "mask_token", "register_tokens", "patch_embed.proj.weight",
            "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(2):
        want |= {f"blocks.{i}.{m}.{p}" for m in block for p in ("weight", "bias")}
        want |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    model = tiny(num_register_tokens=1)
    assert set(model.state_dict()) == want
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}


def test_clip_switches_change_exactly_their_part():
    clip = {"act": "quick_gelu", "layer_norm_eps": 1e-5, "patch_bias": False, "pre_norm": True, "use_mask_token": False}
    model = tiny(**clip)
    keys = set(model.state_dict())
    assert {"norm_pre.weight", "norm_pre.bias"} <= keys
    assert not {"mask_token", "patch_embed.proj.bias"} & keys
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    # ln_pre acts on the tokens entering the first block, after the position embeddings
    plain = tiny(**{**clip, "pre_norm": False})
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("norm_pre.")})
    with torch.no_grad():
        model.norm_pre.weight.uniform_(0.5, 1.5)
        model.norm_pre.bias.normal_()
        x = torch.randn(2, 3, 28, 42)
        torch.testing.assert_close(model.prepare_tokens_with_masks(x),
                                   model.norm_pre(plain.prepare_tokens_with_masks(x)))
    with pytest.raises(ValueError, match="use_mask_token=False"):
        model.forward_features(x, torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="quick_gelu"):
        ViTConfig(act="relu")


def test_quick_gelu_is_clips_sigmoid_approximation():
    torch.manual_seed(0)
    quick, exact = Mlp(8, 16, "quick_gelu"), Mlp(8, 16)
    exact.load_state_dict(quick.state_dict())
    x = 3 * torch.randn(4, 8)
    h = quick.fc1(x)
    with torch.no_grad():
        torch.testing.assert_close(quick(x), quick.fc2(h * torch.sigmoid(1.702 * h)))
        assert not torch.allclose(quick(x), exact(x), atol=1e-3)


def test_xformers_backend_wiring(monkeypatch):
    """CI has no GPU/xformers: stand in a fake xformers that checks what it is given, to test the dispatch."""
    import types

    import trainer.vit as vit

    seen = []

    class FakeMask:
        def __init__(self, seqlens):
            self.seqlens = seqlens

        @classmethod
        def from_seqlens(cls, seqlens):
            seen.append(list(seqlens))
            return cls(seqlens)

    def memory_efficient_attention(q, k, v, attn_bias=None):
        assert q.ndim == 4 and q.shape[2] == 4  # xformers layout [B, N, heads, d]
        mask = None if attn_bias is None else torch.block_diag(*[torch.ones(t, t) for t in attn_bias.seqlens]).bool()
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    fake = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention,
                                 fmha=types.SimpleNamespace(BlockDiagonalMask=FakeMask))
    model = perturb(tiny())
    glob, loc = torch.randn(2, 3, 56, 56), torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        expected = [model.forward_features(glob), model.forward_features(loc)]
        monkeypatch.setattr(vit, "_xformers_ops", lambda: fake)
        monkeypatch.setattr(vit, "uses_xformers", lambda device: True)
        vit._xformers_block_mask.cache_clear()
        packed = model.forward_features_list([glob, loc])
    vit._xformers_block_mask.cache_clear()
    assert seen == [[17, 17, 5, 5, 5]]  # built once, reused by both blocks
    for p, e in zip(packed, expected):
        torch.testing.assert_close(p["x_norm_patchtokens"], e["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)
