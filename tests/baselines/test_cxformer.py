"""cxformer-base and cxformer-small: a small random Dinov2WithRegistersModel saved as a transformers folder, loaded
through the registry and checked against transformers' own forward on real radiographs (registers out of the patch
grid); the rebuilt preprocessing (OpenCV's equalisation, then the DINOv2 evaluation transform at 518 px) against
OpenCV and transformers' BitImageProcessor; the config check; the real ViT-B/14 and ViT-S/14 shapes."""
from __future__ import annotations

import pytest
import torch
from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

import baselines.cxformer as cxformer
from baselines._hf import ConfigMismatch, dinov2_features
from baselines.registry import ENCODERS, build_encoder
from tests.baselines.refs import (assert_close, assert_preprocessing_matches, preprocessed, radiographs, reference)
from tests.baselines.tiny_weights import tiny_dinov2, tiny_dinov2_reg

NAMES = ("cxformer-base", "cxformer-small")
# The evaluation transform of m42-health/CXformer (dinov2/eval/linear_cxr.py: Resize(518) + CenterCrop(518), bicubic,
# ImageNet mean/std), as a BitImageProcessor configuration; the equalisation runs before it, on the 8-bit image.
PROCESSOR = dict(size={"shortest_edge": 518}, resample=3, do_center_crop=True, crop_size={"height": 518, "width": 518},
                 image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def _grid(tokens: torch.Tensor, n: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], n, n)


@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers_and_drops_the_registers(name, tmp_path, shared_cxr, no_network):
    tiny_dinov2_reg(layers=4).save_pretrained(tmp_path / name)
    enc = build_encoder(name, weights_dir=tmp_path)
    ref = Dinov2WithRegistersModel.from_pretrained(tmp_path / name).eval()
    x = preprocessed(radiographs(shared_cxr), enc.preprocess)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
    feats = enc.encode(x)
    assert_close(feats.global_, out.last_hidden_state[:, 0], "global (final-normed CLS)")
    # [CLS, 4 registers, 37 x 37 patches]: the grid starts after the registers
    assert_close(feats.patch, _grid(out.last_hidden_state[:, 5:], 37), "patch")
    for got, i in zip(feats.layers, range(4)):
        assert_close(got, _grid(ref.layernorm(out.hidden_states[i + 1])[:, 5:], 37), f"layer {i}")


def test_both_sizes_share_one_factory_and_the_rebuilt_preprocessing():
    base, small = (ENCODERS.get(n) for n in NAMES)
    assert base.target == small.target == "baselines.cxformer:cxformer"
    assert [r.repo_id for r in base.weight_files.hub] == ["m42-health/CXformer-base"]
    assert [r.repo_id for r in small.weight_files.hub] == ["m42-health/CXformer-small"]
    assert not base.weight_files.gated and base.licence == small.licence == "CC-BY-NC-4.0"
    pre = cxformer.NATIVE
    assert (pre.size, pre.policy, pre.interpolation, pre.equalize) == (518, "resize_shortest_crop", "bicubic", True)


def test_preprocessing_matches_opencv_then_the_bit_processor(shared_cxr):
    cv2 = reference("cv2")
    for path in radiographs(shared_cxr):
        assert_preprocessing_matches(cxformer.NATIVE, BitImageProcessor(**PROCESSOR), path, cv2.equalizeHist)


@pytest.mark.parametrize("config, field", [
    (dict(num_register_tokens=0), "num_register_tokens=0"),
    (dict(patch_size=16), "patch_size=16"),
])
def test_a_config_of_another_architecture_is_a_named_error(config, field, tmp_path):
    tiny_dinov2_reg(**config).save_pretrained(tmp_path / "cxformer-base")
    with pytest.raises(ConfigMismatch, match=field):
        build_encoder("cxformer-base", weights_dir=tmp_path)


def test_a_plain_dinov2_folder_is_refused_before_transformers_reads_it(tmp_path):
    """Without the model-type check transformers would build a Dinov2WithRegisters with its default 4 registers and
    fail, or worse, on a checkpoint that has none."""
    tiny_dinov2().save_pretrained(tmp_path / "cxformer-small")
    with pytest.raises(ConfigMismatch, match="'dinov2' model, not 'dinov2_with_registers'"):
        build_encoder("cxformer-small", weights_dir=tmp_path)


@pytest.mark.parametrize("width, heads", [(768, 12), (384, 6)])
def test_real_vit_b14_and_s14_shapes(width, heads):
    """The published architectures at 518 px on the meta device (shapes only): 37 x 37 patches, registers out."""
    with torch.device("meta"):
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
            hidden_size=width, num_attention_heads=heads, intermediate_size=4 * width, num_hidden_layers=12,
            image_size=518, patch_size=14, num_register_tokens=4))
    f = dinov2_features(model, torch.empty(2, 3, 518, 518, device="meta"))
    assert f.global_.shape == (2, width) and f.patch.shape == (2, width, 37, 37)
    assert [tuple(t.shape) for t in f.layers] == [(2, width, 37, 37)] * 4
