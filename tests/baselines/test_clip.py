"""clip in both layouts: a transformers CLIP folder (checked against transformers) and an open_clip checkpoint
(checked against open_clip's own visual tower)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

import baselines.clip as clip
from baselines._common import ProjectedViT, projected_vit_features
from baselines.registry import build_encoder
from trainer.vit import ViTConfig
from tests.baselines.refs import assert_close, pixels, randomise_, reference


def test_hf_clip_folder_matches_transformers(tmp_path):
    """The published folder is a full CLIPModel (text + vision); only the vision tower is built from it."""
    cfg = CLIPConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128,
                         vocab_size=99, max_position_embeddings=16),
        vision_config=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256,
                           image_size=32, patch_size=16),
        projection_dim=48)
    ref = randomise_(CLIPModel(cfg)).eval()
    ref.save_pretrained(tmp_path / "clip")
    enc = build_encoder("clip", weights_dir=tmp_path)
    x = pixels(2, 32)
    f = enc.encode(x)
    with torch.no_grad():
        out = ref.vision_model(pixel_values=x, output_hidden_states=True)
        post = ref.vision_model.post_layernorm
        want_global = ref.visual_projection(out.pooler_output)
        want_patch = post(out.last_hidden_state)[:, 1:].transpose(1, 2).reshape(2, 128, 2, 2)
    assert_close(f.global_, want_global, "image_embeds")
    assert f.global_.shape == (2, 48)
    assert_close(f.patch, want_patch, "post-layernormed patch tokens")
    for i, got in enumerate(f.layers):
        assert_close(got, post(out.hidden_states[i + 1])[:, 1:].transpose(1, 2).reshape(2, 128, 2, 2), f"layer {i}")
    assert enc.preprocess == clip.NATIVE


def _tiny_open_clip(open_clip):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=4, width=128, head_width=64, patch_size=16, image_size=32)
    text = CLIPTextCfg(context_length=8, vocab_size=99, width=64, heads=1, layers=1)
    return randomise_(CLIP(embed_dim=48, vision_cfg=vision, text_cfg=text, quick_gelu=True)).eval()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_open_clip_checkpoint_matches_open_clip(tmp_path, fmt):
    open_clip = reference("open_clip")
    ref = _tiny_open_clip(open_clip)
    folder = tmp_path / "clip"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if fmt == "bin":
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    else:
        save_file(state, str(folder / "open_clip_model.safetensors"))
        # timm's hub repos also hold timm-format config.json + model.safetensors: not a transformers folder.
        (folder / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_clip_224"}))
        save_file({"cls_token": torch.zeros(1, 1, 128)}, str(folder / "model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    enc = build_encoder("clip", weights_dir=tmp_path)
    x = pixels(2, 32)
    f = enc.encode(x)
    with torch.no_grad():
        want_global = ref.encode_image(x)
        ref.visual.output_tokens = True
        _, tokens = ref.visual(x)
        inter = ref.visual.forward_intermediates(x, indices=[0, 1, 2, 3], normalize_intermediates=True,
                                                 intermediates_only=True)["image_intermediates"]
    assert_close(f.global_, want_global, "encode_image")
    assert_close(f.patch, tokens.transpose(1, 2).reshape(2, 128, 2, 2), "open_clip tokens (after ln_post)")
    for i, (got, want) in enumerate(zip(f.layers, inter, strict=True)):
        assert_close(got, want, f"layer {i}")


def test_open_clip_quick_gelu_matters(tmp_path):
    """Loading OpenAI weights with the wrong activation must not pass the parity check (guards the test itself)."""
    open_clip = reference("open_clip")
    ref = _tiny_open_clip(open_clip)
    (tmp_path / "clip").mkdir()
    torch.save(ref.state_dict(), tmp_path / "clip" / "open_clip_pytorch_model.bin")
    (tmp_path / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": False}}))
    x = pixels(2, 32)
    with torch.no_grad():
        assert not torch.allclose(build_encoder("clip", weights_dir=tmp_path).encode(x).global_, ref.encode_image(x),
                                  atol=1e-4)


def test_real_clip_b16_shapes():
    with torch.device("meta"):
        cfg = ViTConfig(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, layerscale_init=None,
                        interpolate_offset=0.0, layer_norm_eps=1e-5, act="quick_gelu", patch_bias=False, pre_norm=True,
                        use_mask_token=False)
        f = projected_vit_features(ProjectedViT(cfg, 512), torch.empty(2, 3, 224, 224))
    assert f.global_.shape == (2, 512) and f.patch.shape == (2, 768, 14, 14) and len(f.layers) == 4


def test_native_preprocessing_matches_clip_processor():
    """NATIVE vs transformers' CLIPImageProcessor (openai/clip-vit-base-patch16's settings) on a portrait image."""
    import numpy as np
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from baselines.preprocess import preprocess_batch

    rng = np.random.default_rng(0)
    h, w = 300, 250
    yy, xx = np.mgrid[0:h, 0:w] / h
    a = (np.clip(0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + 0.1 * rng.standard_normal((h, w)), 0, 1) * 255)
    a = a.astype(np.uint8)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, resample=3, crop_size={"height": 224, "width": 224})
    ref = proc(images=Image.fromarray(a).convert("RGB"), return_tensors="pt")["pixel_values"]
    ours = preprocess_batch([torch.from_numpy(a).float()[None] / 255], clip.NATIVE)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    diff = (ours - ref).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.2, (diff.mean().item(), diff.max().item())
