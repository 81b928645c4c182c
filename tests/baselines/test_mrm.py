"""mrm: a tiny MRM-style timm ViT saved as MRM.pth ({"model": ..., "args": Namespace, ...} with decoder keys),
checked against timm's forward on MRM's global_pool=False path; the missing-norm (fc_norm) trap is refused."""
from __future__ import annotations

import argparse
from functools import partial

import pytest
import torch

import baselines.mrm as mrm
from baselines._common import vit_features
from baselines.registry import build_encoder
from trainer.vit import ViTConfig, VisionTransformer
from tests.baselines.refs import assert_close, pixels, randomise_, reference


def _tiny_mrm(timm):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    # MRM's vit_base_patch16 (models_vit.py), shrunk: qkv bias, LayerNorm eps 1e-6, CLS token, 224 -> 32 px.
    return randomise_(TimmViT(img_size=32, patch_size=16, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4,
                              qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0)).eval()


def _save_checkpoint(folder, encoder_state: dict) -> None:
    """The MAE-style training checkpoint layout: encoder + decoder + report-branch weights, optimizer, epoch, args."""
    model = dict(encoder_state) | {"mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.randn(64, 128),
                                   "decoder_blocks.0.norm1.weight": torch.ones(64),
                                   "decoder_norm.weight": torch.ones(64),
                                   "bert_encoder.embeddings.weight": torch.randn(10, 64)}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "epoch": 199, "args": argparse.Namespace(mask_ratio=0.75, input_size=448)},
               folder / "MRM.pth")


def test_matches_timm_norm_path(tmp_path):
    timm = reference("timm")
    ref = _tiny_mrm(timm)
    _save_checkpoint(tmp_path / "mrm", ref.state_dict())
    enc = build_encoder("mrm", weights_dir=tmp_path)
    x = pixels(2, 32)
    f = enc.encode(x)
    with torch.no_grad():
        tokens = ref.forward_features(x)  # blocks -> pretrained norm (MRM's global_pool=False forward)
        inter = ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=True, intermediates_only=True)
    assert_close(f.global_, tokens[:, 0], "CLS after norm")
    assert_close(f.patch, tokens[:, 1:].transpose(1, 2).reshape(2, 128, 2, 2), "patch")
    for i, (got, want) in enumerate(zip(f.layers, inter, strict=True)):
        assert_close(got, want, f"layer {i}")
    assert enc.preprocess == mrm.NATIVE


def _own_state() -> dict:
    cfg = ViTConfig(img_size=32, patch_size=16, embed_dim=128, depth=2, num_heads=2, layerscale_init=None,
                    use_mask_token=False)  # MAE's encoder: no LayerScale, no mask token (it lives in the decoder)
    return randomise_(VisionTransformer(cfg)).state_dict()


def test_checkpoint_without_final_norm_is_refused(tmp_path):
    """A fine-tuned (global_pool) checkpoint has fc_norm instead of norm: using it would mean a random norm."""
    state = {k: v for k, v in _own_state().items() if not k.startswith("norm.")}
    state |= {"fc_norm.weight": torch.ones(128), "fc_norm.bias": torch.zeros(128)}
    _save_checkpoint(tmp_path / "mrm", state)
    with pytest.raises(ValueError, match="norm.weight"):
        build_encoder("mrm", weights_dir=tmp_path)


def test_reads_namespace_but_no_other_objects(tmp_path):
    _save_checkpoint(tmp_path / "mrm", _own_state())
    assert build_encoder("mrm", weights_dir=tmp_path).encode(pixels(1, 32)).global_.shape == (1, 128)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model": _own_state(), "x": Evil()}, tmp_path / "mrm" / "MRM.pth")
    with pytest.raises(ValueError, match="weights_only"):
        build_encoder("mrm", weights_dir=tmp_path)


def test_real_mrm_shapes():
    with torch.device("meta"):
        model = VisionTransformer(ViTConfig(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                            layerscale_init=None, use_mask_token=False, interpolate_offset=0.0))
        f = vit_features(model, torch.empty(2, 3, 224, 224))
    assert f.global_.shape == (2, 768) and f.patch.shape == (2, 768, 14, 14) and len(f.layers) == 4
