"""dinov3-vitb16: a small random DINOv3ViTModel (patch 16, 4 registers, RoPE) saved as a transformers folder, loaded
through the registry and checked on real radiographs against transformers' DINOv3ViTModel (global) and its own
DINOv3ViTBackbone (patch grid and intermediate layers, registers dropped by transformers, not by us); the
preprocessing against a DINOv3ViTImageProcessor with the hub values; the config check; gating; the real ViT-B/16
shapes."""
from __future__ import annotations

import pytest
import torch
from transformers import DINOv3ViTBackbone, DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

import baselines.dinov3 as dinov3
from baselines._hf import ConfigMismatch, dinov3_features
from baselines.registry import ENCODERS, build_encoder
from harness.listing import licence_cell
from tests.baselines.refs import assert_matches_model_and_backbone, assert_preprocessing_matches, radiographs
from tests.baselines.tiny_weights import tiny_dinov2_reg, tiny_dinov3

NAME = "dinov3-vitb16"
# The hub repo's preprocessor_config.json values: 224 x 224 bilinear, no crop, ImageNet mean/std.
PROCESSOR = dict(size={"height": 224, "width": 224}, resample=2, image_mean=[0.485, 0.456, 0.406],
                 image_std=[0.229, 0.224, 0.225])


def test_matches_the_model_and_its_backbone(tmp_path, shared_cxr, no_network):
    tiny_dinov3(layers=4).save_pretrained(tmp_path / NAME)
    enc = build_encoder(NAME, weights_dir=tmp_path)
    ref = DINOv3ViTModel.from_pretrained(tmp_path / NAME).eval()
    backbone = DINOv3ViTBackbone.from_pretrained(tmp_path / NAME, out_features=["stage1", "stage2", "stage3",
                                                                                 "stage4"]).eval()
    assert_matches_model_and_backbone(enc, ref, backbone, shared_cxr, (64, 14, 14), 'patch (registers dropped)')


def test_preprocessing_matches_the_hub_processor(shared_cxr):
    for path in radiographs(shared_cxr):
        assert_preprocessing_matches(dinov3.NATIVE, DINOv3ViTImageProcessor(**PROCESSOR), path)


@pytest.mark.parametrize("config, field", [
    (dict(patch_size=14), "patch_size=14"),
    (dict(num_register_tokens=0), "num_register_tokens=0"),
])
def test_a_config_of_another_architecture_is_a_named_error(config, field, tmp_path):
    tiny_dinov3(**config).save_pretrained(tmp_path / NAME)
    with pytest.raises(ConfigMismatch, match=field):
        build_encoder(NAME, weights_dir=tmp_path)


def test_a_dinov2_registers_folder_is_refused(tmp_path):
    tiny_dinov2_reg().save_pretrained(tmp_path / NAME)
    with pytest.raises(ConfigMismatch, match="'dinov2_with_registers' model, not 'dinov3_vit'"):
        build_encoder(NAME, weights_dir=tmp_path)


def test_gated_under_its_licence():
    entry = ENCODERS.get(NAME)
    assert [r.page for r in entry.weight_files.gated] == ["https://huggingface.co/facebook/dinov3-vitb16-pretrain-lvd1689m"]
    assert licence_cell(entry) == "DINOv3 License, gated"


def test_real_vit_b16_shapes():
    """The published ViT-B/16 at 224 px on the meta device (shapes only): 14 x 14 patches, registers out."""
    with torch.device("meta"):
        model = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12, patch_size=16, num_register_tokens=4))
    f = dinov3_features(model, torch.empty(2, 3, 224, 224, device="meta"))
    assert f.global_.shape == (2, 768) and f.patch.shape == (2, 768, 14, 14)
    assert [tuple(t.shape) for t in f.layers] == [(2, 768, 14, 14)] * 4
