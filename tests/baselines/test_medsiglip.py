"""medsiglip-448: a small random SiglipModel (vision and text towers, as the hub repo holds them) saved as a
transformers folder, loaded through the registry and checked against the full model's own vision forward on real
radiographs (MAP-pooled global, 32 x 32 token grid at 448 px); the preprocessing against the authors' serving path
(zero-pad to a centred square, then a SiglipImageProcessor at 448); the config check; gating in the registry and in
``ls``; the real SigLIP-400M shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import SiglipImageProcessor, SiglipModel, SiglipVisionConfig, SiglipVisionModel

import baselines.medsiglip as medsiglip
from baselines._hf import ConfigMismatch, siglip_features
from baselines.registry import ENCODERS, build_encoder
from harness.listing import licence_cell, missing_note
from tests.baselines.refs import assert_close, assert_preprocessing_matches, preprocessed, radiographs
from tests.baselines.tiny_weights import tiny_dinov2_reg, tiny_siglip

NAME = "medsiglip-448"


def _grid(tokens: torch.Tensor, n: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], n, n)


def _pad_square(u8: np.ndarray) -> np.ndarray:
    """The authors' padding, written from its description: zeros to a square, the odd extra row or column last."""
    h, w = u8.shape
    d = max(h, w)
    return np.pad(u8, (((d - h) // 2, d - h - (d - h) // 2), ((d - w) // 2, d - w - (d - w) // 2)))


def test_matches_the_full_models_vision_forward(tmp_path, shared_cxr, no_network):
    tiny_siglip(layers=4).save_pretrained(tmp_path / NAME)
    enc = build_encoder(NAME, weights_dir=tmp_path)
    ref = SiglipModel.from_pretrained(tmp_path / NAME).eval()
    x = preprocessed(radiographs(shared_cxr), enc.preprocess)
    with torch.no_grad():
        out = ref.vision_model(pixel_values=x, output_hidden_states=True)
        embeds = ref.get_image_features(pixel_values=x)
    feats = enc.encode(x)
    assert_close(feats.global_, out.pooler_output, "global (MAP head)")
    # SigLIP's image embedding is that same MAP output (no projection): the global is what the model publishes
    assert_close(feats.global_, getattr(embeds, "pooler_output", embeds), "global vs get_image_features")
    assert_close(feats.patch, _grid(out.last_hidden_state, 32), "patch (no CLS: every token is a patch)")
    for got, i in zip(feats.layers, range(4)):
        assert_close(got, _grid(ref.vision_model.post_layernorm(out.hidden_states[i + 1]), 32), f"layer {i}")
    assert not any(p.requires_grad for p in enc.model.parameters())
    assert not any("text" in k for k in enc.model.state_dict())  # the text tower is never built


def test_preprocessing_matches_the_authors_pad_then_siglip_processor(shared_cxr):
    # Google's serving code builds SiglipImageProcessor(size=448 x 448) with every other value at its default
    # (bicubic, mean = std = 0.5) and feeds it the zero-padded square.
    processor = SiglipImageProcessor(size={"height": 448, "width": 448})
    for path in radiographs(shared_cxr):
        assert_preprocessing_matches(medsiglip.NATIVE, processor, path, _pad_square)


def test_the_native_policy_pads_where_the_hub_processor_would_stretch():
    pre = medsiglip.NATIVE
    assert (pre.size, pre.policy, pre.interpolation, pre.mean, pre.std) == (448, "pad_square_resize", "bicubic",
                                                                            (0.5,), (0.5,))
    assert pre.harmonised().policy == "resize_stretch"


@pytest.mark.parametrize("vision, field", [
    (dict(patch_size=16), "patch_size=16"),
    (dict(image_size=384), "image_size=384"),
    (dict(vision_use_head=False), "vision_use_head=False"),
])
def test_a_config_of_another_architecture_is_a_named_error(vision, field, tmp_path):
    tiny_siglip(**vision).save_pretrained(tmp_path / NAME)
    with pytest.raises(ConfigMismatch, match=field):
        build_encoder(NAME, weights_dir=tmp_path)


def test_a_folder_of_another_model_type_is_refused(tmp_path):
    tiny_dinov2_reg().save_pretrained(tmp_path / NAME)
    with pytest.raises(ConfigMismatch, match="'dinov2_with_registers' model, not 'siglip'"):
        build_encoder(NAME, weights_dir=tmp_path)


def test_gated_licence_and_download_line_in_the_registry_and_ls(tmp_path):
    entry = ENCODERS.get(NAME)
    assert [r.repo_id for r in entry.weight_files.gated] == ["google/medsiglip-448"]
    assert licence_cell(entry) == "HAI-DEF terms, gated"
    note = missing_note([NAME], tmp_path)
    assert "# gated: accept its licence at https://huggingface.co/google/medsiglip-448" in note
    assert f"hf download google/medsiglip-448 config.json model.safetensors --local-dir {tmp_path}/{NAME}" in note


def test_real_siglip_400m_shapes():
    """SigLIP-400M (so400m) at 448 px on the meta device (shapes only): 1152-d MAP global, 32 x 32 grid."""
    with torch.device("meta"):
        model = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                     num_attention_heads=16, image_size=448, patch_size=14))
    f = siglip_features(model, torch.empty(2, 3, 448, 448, device="meta"))
    assert f.global_.shape == (2, 1152) and f.patch.shape == (2, 1152, 32, 32)
    assert [tuple(t.shape) for t in f.layers] == [(2, 1152, 32, 32)] * 4
