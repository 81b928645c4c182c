"""Weight compatibility: the DINOv2 backbone layout and Hugging Face Dinov2 models (the independent reference)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file

from trainer.convert import (
    clean_dinov2_state_dict, config_from_dinov2_state_dict, dinov2_state_dict, from_dinov2_state_dict,
    from_hf_state_dict, hf_state_dict, load_dinov2, load_hf, save_dinov2, save_hf,
)
from trainer.vit import ViTConfig, VisionTransformer


def randomise_(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (LayerScale, LayerNorm, mask token included) so no mapping error can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("weight" in name or "lambda" in name or "gamma" in name):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "token" in name or "pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def tiny_hf(registers: int = 0):
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=14)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    randomise_(model)
    return model.eval()


def assert_same_features(ours: VisionTransformer, hf, x: torch.Tensor, masks: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        out = ours.forward_features(x, masks)
        ref = hf(pixel_values=x, bool_masked_pos=masks)
    r = 1 + ours.num_register_tokens
    torch.testing.assert_close(out["x_norm_clstoken"], ref.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], ref.last_hidden_state[:, r:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(224, 224), (168, 252)], ids=["224", "168x252"])
def test_hf_weights_give_hf_features(size):
    hf = tiny_hf()
    ours = from_hf_state_dict(hf.state_dict(), hf.config.to_dict())
    assert ours.cfg.interpolate_offset == 0.0 and not ours.cfg.interpolate_antialias
    x = torch.randn(2, 3, *size)
    assert_same_features(ours, hf, x)
    masks = torch.rand(2, (size[0] // 14) * (size[1] // 14)) < 0.3
    assert_same_features(ours, hf, x, masks)


def test_dinov2_kludge_offset_changes_features_off_native_size():
    """Documents why HF-loaded weights use offset 0: with DINOv2's 0.1 kludge, features differ off-grid only."""
    hf = tiny_hf()
    ours = from_hf_state_dict(hf.state_dict(), hf.config.to_dict())
    kludge = VisionTransformer(ViTConfig(**{**vars(ours.cfg), "interpolate_offset": 0.1}))
    kludge.load_state_dict(ours.state_dict())
    kludge.eval()
    with torch.no_grad():
        native = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(kludge.forward_features(native), ours.forward_features(native))
        other = torch.randn(1, 3, 168, 252)
        diff = kludge.forward_features(other)["x_norm_patchtokens"] - hf(other).last_hidden_state[:, 1:]
        assert diff.abs().max() > 1e-3  # far outside the 1e-5 agreement of the offset-0 mode


def test_hf_with_registers_non_square():
    hf = tiny_hf(registers=3)
    ours = from_hf_state_dict(hf.state_dict(), hf.config.to_dict())
    assert ours.num_register_tokens == 3 and ours.cfg.interpolate_antialias
    assert_same_features(ours, hf, torch.randn(1, 3, 140, 98))


def test_our_hf_names_are_what_save_pretrained_writes(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path / "ref")
    on_disk = load_file(str(tmp_path / "ref" / "model.safetensors"))
    ours = hf_state_dict(from_hf_state_dict(on_disk, json.loads((tmp_path / "ref" / "config.json").read_text())))
    assert sorted(ours) == sorted(on_disk)
    for k in on_disk:
        assert torch.equal(ours[k], on_disk[k]), k


@pytest.mark.parametrize("registers", [0, 2])
def test_our_model_exported_to_hf_folder(tmp_path, registers):
    ours = VisionTransformer(ViTConfig(img_size=56, embed_dim=64, depth=2, num_heads=4, num_register_tokens=registers,
                                       interpolate_offset=0.0, interpolate_antialias=bool(registers)))
    randomise_(ours, seed=1)
    ours.eval()
    save_hf(ours, tmp_path / "hf")
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    hf = cls.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    for size in [(56, 56), (42, 84)]:
        assert_same_features(ours, hf, torch.randn(2, 3, *size))
    back = load_hf(tmp_path / "hf")
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(FileExistsError, match="not an empty directory"):
        save_hf(ours, tmp_path / "hf")


def test_dinov2_layout_key_names():
    model = VisionTransformer(ViTConfig(img_size=28, embed_dim=32, depth=2, num_heads=2, num_register_tokens=4))
    expected = {"cls_token", "pos_embed", "mask_token", "register_tokens", "patch_embed.proj.weight",
                "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(2):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
        expected |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    sd = dinov2_state_dict(model)
    assert set(sd) == expected
    assert sd["mask_token"].shape == (1, 32) and sd["cls_token"].shape == (1, 1, 32)
    assert sd["pos_embed"].shape == (1, 1 + 4, 32) and sd["register_tokens"].shape == (1, 4, 32)


def test_dinov2_config_inference_and_interpolation_mode():
    plain = VisionTransformer(ViTConfig(img_size=518, embed_dim=128, depth=3, num_heads=2, mlp_ratio=2.0))
    cfg = config_from_dinov2_state_dict(dinov2_state_dict(plain))
    shape = (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
    assert shape == (518, 14, 128, 3, 2, 2.0)
    assert (cfg.interpolate_offset, cfg.interpolate_antialias, cfg.num_register_tokens) == (0.1, False, 0)
    reg = VisionTransformer(ViTConfig(img_size=28, embed_dim=64, depth=1, num_heads=1, num_register_tokens=4))
    cfg = config_from_dinov2_state_dict(dinov2_state_dict(reg), num_heads=1)
    assert (cfg.interpolate_offset, cfg.interpolate_antialias, cfg.num_register_tokens) == (0.0, True, 4)


def chunked(key: str, per_chunk: int = 2) -> str:
    """``blocks.3.x`` -> ``blocks.1.3.x``: DINOv2's FSDP BlockChunk naming."""
    if not key.startswith("blocks."):
        return key
    i = int(key.split(".")[1])
    return key.replace(f"blocks.{i}.", f"blocks.{i // per_chunk}.{i}.", 1)


def test_dinov2_round_trip_through_training_wrappers(tmp_path):
    model = VisionTransformer(ViTConfig(img_size=28, embed_dim=64, depth=4, num_heads=1))
    randomise_(model, seed=2)
    sd = dinov2_state_dict(model)
    # what an FSDP teacher checkpoint looks like: module/backbone prefixes, BlockChunk indices, head tensors
    wrapped = {"module.backbone." + chunked(k): v for k, v in sd.items()}
    wrapped["dino_head.last_layer.weight_g"] = torch.ones(8, 1)
    assert "module.backbone.blocks.1.3.norm1.weight" in wrapped
    assert set(clean_dinov2_state_dict(wrapped)) == set(sd)
    torch.save({"teacher": wrapped}, tmp_path / "teacher_checkpoint.pth")
    loaded = load_dinov2(tmp_path / "teacher_checkpoint.pth", num_heads=1)
    x = torch.randn(1, 3, 42, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=0, rtol=0)
    save_dinov2(loaded, tmp_path / "backbone.safetensors")
    again = load_dinov2(tmp_path / "backbone.safetensors", num_heads=1)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sd.items())


def test_dinov2_strict_load_rejects_wrong_shapes_and_missing_keys(tmp_path):
    sd = dinov2_state_dict(VisionTransformer(ViTConfig(img_size=28, embed_dim=64, depth=2, num_heads=1)))
    sd.pop("blocks.1.ls2.gamma")
    with pytest.raises(RuntimeError, match="ls2.gamma"):
        from_dinov2_state_dict(sd, num_heads=1)
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="bad.safetensors.*cls_token"):
        load_dinov2(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_dinov2(tmp_path / "nope.safetensors")


def test_no_layerscale_model_exports_identity_gamma():
    model = VisionTransformer(ViTConfig(img_size=28, embed_dim=64, depth=2, num_heads=1, layerscale_init=None))
    randomise_(model)
    back = from_dinov2_state_dict(dinov2_state_dict(model), num_heads=1)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x))


# ----------------------------------------------------------------------------------------------------------------
# python -m trainer.export, end to end from a training checkpoint


def make_run(run_dir, size: int = 56):
    """A run directory with one checkpoint whose student and teacher differ; returns the teacher."""
    from trainer.checkpoint import build_backbone, flat_state, save_checkpoint
    from trainer.config import load_config

    cfg = load_config("smoke", ["model.depth=2", f"model.img_size={size}", f"crops.global_size={size}",
                                "crops.local_size=28"])
    student, teacher = build_backbone(cfg.model), build_backbone(cfg.model)
    randomise_(student, seed=3)
    randomise_(teacher, seed=4)
    state = {"iteration": 7, "samples_seen": 56, "seed": 0}
    save_checkpoint(run_dir, flat_state({"student.backbone": student, "teacher.backbone": teacher}), {}, state, cfg,
                    keep_last=2)
    return teacher.eval()


def test_export_cli_hf_and_dinov2(tmp_path, capsys):
    from trainer.export import DINOV2_WEIGHTS, main

    teacher = make_run(tmp_path / "run")
    assert main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "offset=0.1" in capsys.readouterr().err  # the trained model uses DINOv2's kludge; HF resamples by size
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(hf).__name__ == "Dinov2Model"
    assert_same_features(teacher, hf, torch.randn(2, 3, 56, 56))  # native grid: no resampling, identical

    ckpt_dir = tmp_path / "run" / "checkpoints" / "ckpt_0000007"
    assert main([str(ckpt_dir), "--format", "dinov2", "--out", str(tmp_path / "dv2")]) == 0
    back = load_dinov2(tmp_path / "dv2" / DINOV2_WEIGHTS, num_heads=teacher.cfg.num_heads)
    cfg = json.loads((tmp_path / "dv2" / "vit_config.json").read_text())
    assert cfg["num_heads"] == 3 and cfg["interpolate_offset"] == 0.1
    x = torch.randn(1, 3, 42, 70)
    with torch.no_grad():
        torch.testing.assert_close(back(x), teacher(x), atol=0, rtol=0)


def test_export_cli_errors_name_the_path(tmp_path, capsys):
    from trainer.export import main

    assert main([str(tmp_path / "missing"), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    make_run(tmp_path / "run")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    assert main([str(tmp_path / "run"), "--format", "dinov2", "--out", str(tmp_path / "busy")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "run"]  # no temporary directory left behind
