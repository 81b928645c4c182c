"""biomedclip: a tiny open_clip TimmModel tower saved as an open_clip folder (with a stand-in text tower in the same
file), loaded vision-only, checked against open_clip's own image forward; the config guard."""
from __future__ import annotations

import json

import pytest
import torch

import baselines.biomedclip as biomedclip
from baselines._common import ProjectedViT, projected_vit_features
from baselines.registry import build_encoder
from trainer.vit import ViTConfig
from tests.baselines.refs import assert_close, pixels, randomise_, reference

# The published open_clip_config.json, minus the tokenizer details.
CONFIG = {"model_cfg": {"embed_dim": 512, "vision_cfg": {"timm_model_name": "vit_base_patch16_224",
                                                          "timm_model_pretrained": False, "timm_pool": "",
                                                          "timm_proj": "linear", "image_size": 224},
                        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                     "context_length": 256}},
          "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                             "std": [0.26862954, 0.26130258, 0.27577711]}}


def _tiny_tower(open_clip, timm):
    """open_clip's TimmModel for BiomedCLIP's config, with its timm trunk swapped for a 4-block, 128-wide ViT-B/16
    (TimmModel builds the trunk by name only, so the trunk is rebuilt the same way at a tiny size)."""
    from open_clip.timm_model import TimmModel

    tower = TimmModel("vit_tiny_patch16_224", embed_dim=48, image_size=32, pool="", proj="linear")
    tower.trunk = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, embed_dim=128, depth=4,
                                    num_heads=2, num_classes=0)
    tower.head.proj = torch.nn.Linear(128, 48, bias=False)
    return randomise_(tower).eval()


def test_matches_open_clip_image_forward(tmp_path):
    open_clip, timm = reference("open_clip"), reference("timm")
    tower = _tiny_tower(open_clip, timm)
    state = {"visual." + k: v for k, v in tower.state_dict().items()}
    state |= {"text.transformer.embeddings.word_embeddings.weight": torch.randn(99, 64), "logit_scale": torch.ones(())}
    folder = tmp_path / "biomedclip"
    folder.mkdir()
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps(CONFIG))
    enc = build_encoder("biomedclip", weights_dir=tmp_path)
    x = pixels(2, 32)
    f = enc.encode(x)
    with torch.no_grad():
        want_global = tower(x)  # = CLIP.encode_image(x, normalize=False)
        tokens = tower.trunk.forward_features(x)
        inter = tower.trunk.forward_intermediates(x, indices=[0, 1, 2, 3], norm=True, intermediates_only=True)
    assert_close(f.global_, want_global, "encode_image")
    assert_close(f.patch, tokens[:, 1:].transpose(1, 2).reshape(2, 128, 2, 2), "trunk patch tokens")
    for i, (got, want) in enumerate(zip(f.layers, inter, strict=True)):
        assert_close(got, want, f"layer {i}")
    assert enc.preprocess == biomedclip.NATIVE


@pytest.mark.parametrize("change", [{"timm_pool": "avg"}, {"timm_proj": "mlp"}, {"timm_model_name": "convnext_base"}])
def test_config_guard_refuses_other_towers(tmp_path, change):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model_cfg"]["vision_cfg"].update(change)
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="open_clip_config.json"):
        biomedclip.check_config(path)


def test_real_biomedclip_shapes():
    with torch.device("meta"):
        trunk = ViTConfig(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, layerscale_init=None,
                          use_mask_token=False, interpolate_offset=0.0)
        f = projected_vit_features(ProjectedViT(trunk, 512), torch.empty(2, 3, 224, 224))
    assert f.global_.shape == (2, 512) and f.patch.shape == (2, 768, 14, 14) and len(f.layers) == 4
