"""dinov2-base in both layouts: a transformers folder (checked against transformers) and the official backbone state
dict (run by trainer.vit, checked against timm's DINOv2 ViT, whose parameter names are the official ones)."""
from __future__ import annotations

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

import baselines.dinov2 as dinov2
from baselines._common import vit_features
from baselines.registry import WeightsMissing, build_encoder
from trainer.vit import ViTConfig, VisionTransformer
from tests.baselines.refs import assert_close, pixels, randomise_, reference


def test_hf_folder_matches_transformers(tmp_path):
    ref = randomise_(Dinov2Model(Dinov2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                              image_size=28, patch_size=14))).eval()
    ref.save_pretrained(tmp_path / "dinov2-base")
    enc = build_encoder("dinov2-base", weights_dir=tmp_path)
    x = pixels(2, 28)
    f = enc.encode(x)
    with torch.no_grad():
        out = ref(pixel_values=x)
    assert_close(f.global_, out.pooler_output, "global")
    assert_close(f.patch, out.last_hidden_state[:, 1:].transpose(1, 2).reshape(2, 128, 2, 2), "patch")
    assert enc.preprocess == dinov2.NATIVE


def test_missing_weights_lists_both_layouts(tmp_path):
    (tmp_path / "dinov2-base").mkdir()
    with pytest.raises(WeightsMissing, match="dinov2_vitb14_pretrain.pth") as e:
        build_encoder("dinov2-base", weights_dir=tmp_path)
    assert "model.safetensors" in str(e.value) and str(tmp_path / "dinov2-base") in str(e.value)


def _timm_dinov2(timm, img_size: int):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    # The official DINOv2 ViT-B/14 recipe in timm's terms (vit_base_patch14_dinov2), shrunk.
    return randomise_(TimmViT(img_size=img_size, patch_size=14, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4,
                              init_values=1e-5, num_classes=0)).eval()


def test_official_state_dict_matches_timm(tmp_path):
    timm = reference("timm")
    ref = _timm_dinov2(timm, 56)
    state = dict(ref.state_dict()) | {"mask_token": torch.randn(1, 128)}  # the official file also has the mask token
    (tmp_path / "dinov2-base").mkdir()
    torch.save(state, tmp_path / "dinov2-base" / "dinov2_vitb14_pretrain.pth")
    enc = build_encoder("dinov2-base", weights_dir=tmp_path)
    x = pixels(2, 56)
    f = enc.encode(x)
    with torch.no_grad():
        tokens = ref.forward_features(x)
        inter = ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=True, intermediates_only=True)
    assert_close(f.global_, tokens[:, 0], "global (CLS)")
    assert_close(f.patch, tokens[:, 1:].transpose(1, 2).reshape(2, 128, 4, 4), "patch")
    for i, (got, want) in enumerate(zip(f.layers, inter, strict=True)):
        assert_close(got, want, f"layer {i}")


def test_official_position_resampling_uses_dinov2_offset(tmp_path):
    """At 224 the 518-trained grid (37x37) of the loaded official file is resampled with DINOv2's scale factor
    (16 + 0.1) / 37, which differs from an exact-size resize; at the trained size the embeddings are used as stored."""
    official = ViTConfig(img_size=518, patch_size=14, embed_dim=64, depth=1, num_heads=1, layerscale_init=1.0)
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(randomise_(VisionTransformer(official)).state_dict(), path)
    model = dinov2.load_official(path)
    pos = model.interpolate_pos_encoding(16, 16)
    grid = model.pos_embed[:, 1:].reshape(1, 37, 37, 64).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    assert torch.equal(pos[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 256, 64))
    exact = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic")
    assert not torch.allclose(want, exact)
    assert model.interpolate_pos_encoding(37, 37) is model.pos_embed


def test_real_vit_b14_official_shapes():
    with torch.device("meta"):
        model = VisionTransformer(ViTConfig(img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12,
                                            layerscale_init=1.0, interpolate_offset=0.1))
        f = vit_features(model, torch.empty(2, 3, 224, 224))
    assert f.global_.shape == (2, 768) and f.patch.shape == (2, 768, 16, 16) and len(f.layers) == 4
