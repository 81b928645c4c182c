"""dinov2-base-reg4: a small random Dinov2WithRegistersModel saved as a transformers folder, loaded through the
registry and checked on real radiographs against transformers' model (global) and its own
Dinov2WithRegistersBackbone (patch grid and layers, registers dropped by transformers); the preprocessing against a
BitImageProcessor with the hub values (shortest edge 256, centre crop 224); the config check; the real ViT-B/14
shapes."""
from __future__ import annotations

import pytest
import torch
from transformers import (BitImageProcessor, Dinov2WithRegistersBackbone, Dinov2WithRegistersConfig,
                          Dinov2WithRegistersModel)

import baselines.dinov2_reg4 as dinov2_reg4
from baselines._hf import ConfigMismatch, dinov2_features
from baselines.registry import ENCODERS, build_encoder
from harness.listing import licence_cell
from tests.baselines.refs import assert_matches_model_and_backbone, assert_preprocessing_matches, radiographs
from tests.baselines.tiny_weights import tiny_dinov2, tiny_dinov2_reg

NAME = "dinov2-base-reg4"
# facebook/dinov2-with-registers-base's preprocessor_config.json values (those of facebook/dinov2-base).
PROCESSOR = dict(size={"shortest_edge": 256}, resample=3, do_center_crop=True, crop_size={"height": 224, "width": 224},
                 image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def test_matches_the_model_and_its_backbone(tmp_path, shared_cxr, no_network):
    tiny_dinov2_reg(layers=4).save_pretrained(tmp_path / NAME)
    enc = build_encoder(NAME, weights_dir=tmp_path)
    ref = Dinov2WithRegistersModel.from_pretrained(tmp_path / NAME).eval()
    backbone = Dinov2WithRegistersBackbone.from_pretrained(
        tmp_path / NAME, out_features=["stage1", "stage2", "stage3", "stage4"]).eval()
    assert_matches_model_and_backbone(enc, ref, backbone, shared_cxr, (64, 16, 16), 'patch (registers dropped)')


def test_preprocessing_matches_the_hub_processor(shared_cxr):
    for path in radiographs(shared_cxr):
        assert_preprocessing_matches(dinov2_reg4.NATIVE, BitImageProcessor(**PROCESSOR), path)


@pytest.mark.parametrize("config, field", [
    (dict(num_register_tokens=0), "num_register_tokens=0"),
    (dict(patch_size=16), "patch_size=16"),
])
def test_a_config_of_another_architecture_is_a_named_error(config, field, tmp_path):
    tiny_dinov2_reg(**config).save_pretrained(tmp_path / NAME)
    with pytest.raises(ConfigMismatch, match=field):
        build_encoder(NAME, weights_dir=tmp_path)


def test_a_plain_dinov2_folder_is_refused(tmp_path):
    tiny_dinov2().save_pretrained(tmp_path / NAME)
    with pytest.raises(ConfigMismatch, match="'dinov2' model, not 'dinov2_with_registers'"):
        build_encoder(NAME, weights_dir=tmp_path)


def test_open_licence_not_gated():
    assert licence_cell(ENCODERS.get(NAME)) == "Apache-2.0"


def test_real_vit_b14_shapes():
    """The published ViT-B/14 with 4 registers at 224 px on the meta device (shapes only): 16 x 16 patches."""
    with torch.device("meta"):
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
            hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=12, image_size=518,
            patch_size=14, num_register_tokens=4))
    f = dinov2_features(model, torch.empty(2, 3, 224, 224, device="meta"))
    assert f.global_.shape == (2, 768) and f.patch.shape == (2, 768, 16, 16)
    assert [tuple(t.shape) for t in f.layers] == [(2, 768, 16, 16)] * 4
