"""rad-dino: a tiny random Dinov2Model saved as a transformers folder, loaded through the registry, checked against
transformers' own forward; offline loading, missing files, digest, preprocessing, and the real ViT-B/14 shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

import baselines.rad_dino as rad_dino
from baselines._hf import dinov2_features
from baselines.registry import WeightsMissing, build_encoder
from harness.common.hashing import sha256_files
from tests.baselines.refs import assert_close, pixels, randomise_

TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256, image_size=56,
            patch_size=14)


def _save_tiny(folder) -> Dinov2Model:
    model = randomise_(Dinov2Model(Dinov2Config(**TINY))).eval()
    model.save_pretrained(folder)
    return model


def test_matches_transformers_forward(tmp_path, no_network):
    ref = _save_tiny(tmp_path / "rad-dino")
    enc = build_encoder("rad-dino", weights_dir=tmp_path)
    x = pixels(2, 56)
    feats = enc.encode(x)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
    assert_close(feats.global_, out.pooler_output, "global")
    assert_close(feats.patch, out.last_hidden_state[:, 1:].transpose(1, 2).reshape(2, 128, 4, 4), "patch")
    assert len(feats.layers) == 4
    for got, i in zip(feats.layers, (0, 1, 2, 3)):  # 4 blocks -> every block is kept
        want = ref.layernorm(out.hidden_states[i + 1])[:, 1:].transpose(1, 2).reshape(2, 128, 4, 4)
        assert_close(got, want, f"layer {i}")
    # The final layer equals the patch grid (same block, same norm), a consistency check on the indexing.
    assert_close(feats.layers[-1], feats.patch, "last layer vs patch")


def test_identity_preprocess_and_digest(tmp_path):
    _save_tiny(tmp_path / "rad-dino")
    enc = build_encoder("rad-dino", weights_dir=tmp_path)
    assert enc.preprocess == rad_dino.NATIVE
    assert (enc.preprocess.size, enc.preprocess.policy, enc.preprocess.interpolation) == (518, "resize_shortest_crop",
                                                                                          "bicubic")
    folder = tmp_path / "rad-dino"
    assert enc.weights_digest == sha256_files([folder / "config.json", folder / "model.safetensors"])
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    harmonised = build_encoder("rad-dino", weights_dir=tmp_path, input_policy="harmonised")
    assert harmonised.preprocess.policy == "resize_stretch" and harmonised.preprocess.size == 518
    # Different weights, different digest.
    _save_tiny(tmp_path / "other" / "rad-dino")
    torch.manual_seed(5)
    model = Dinov2Model(Dinov2Config(**TINY))
    model.save_pretrained(tmp_path / "other" / "rad-dino")
    assert build_encoder("rad-dino", weights_dir=tmp_path / "other").weights_digest != enc.weights_digest


def test_missing_file_names_folder_and_files(tmp_path):
    _save_tiny(tmp_path / "rad-dino")
    (tmp_path / "rad-dino" / "model.safetensors").unlink()
    with pytest.raises(WeightsMissing) as e:
        build_encoder("rad-dino", weights_dir=tmp_path)
    assert str(tmp_path / "rad-dino") in str(e.value) and "model.safetensors" in str(e.value)


def test_rejects_wrong_channels(tmp_path):
    _save_tiny(tmp_path / "rad-dino")
    enc = build_encoder("rad-dino", weights_dir=tmp_path)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc.encode(torch.zeros(1, 1, 56, 56))


def test_real_vit_b14_shapes():
    """The published RAD-DINO architecture at its native 518 px, on the meta device (shapes only, no compute)."""
    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                         image_size=518, patch_size=14))
    f = dinov2_features(model, torch.empty(2, 3, 518, 518, device="meta"))
    assert f.global_.shape == (2, 768) and f.patch.shape == (2, 768, 37, 37)
    assert [tuple(t.shape) for t in f.layers] == [(2, 768, 37, 37)] * 4


def _radiograph_u8(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + 0.1 * rng.standard_normal((h, w))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(600, 520), (520, 610)])
def test_native_preprocessing_matches_the_model_card_processor(shape):
    """NATIVE through preprocess_batch vs transformers' BitImageProcessor with RAD-DINO's preprocessor_config.json.
    They differ only by resampling arithmetic (Pillow on 8-bit vs antialiased torch on float); a one-pixel shift of
    the crop would give a mean difference ~50x larger on this noisy image."""
    from PIL import Image
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    from baselines.preprocess import preprocess_batch

    a = _radiograph_u8(*shape)
    proc = BitImageProcessorPil(size={"shortest_edge": 518}, resample=3, crop_size={"height": 518, "width": 518},
                                image_mean=[0.5307] * 3, image_std=[0.2583] * 3)
    ref = proc(images=Image.fromarray(a), return_tensors="pt")["pixel_values"]
    ours = preprocess_batch([torch.from_numpy(a).float()[None] / 255], rad_dino.NATIVE)
    assert ours.shape == ref.shape == (1, 3, 518, 518)
    diff = (ours - ref).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.25, (diff.mean().item(), diff.max().item())
