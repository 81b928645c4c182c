"""The ``ckpt:DIR`` encoder: the teacher of a training checkpoint, with the checkpoint's own preprocessing."""
from __future__ import annotations

import hashlib

import pytest
import torch

from baselines.ckpt import ckpt  # noqa: F401  (registers "ckpt")
from baselines.registry import WeightsMissing, build_encoder
from trainer.checkpoint import build_backbone, flat_state, save_checkpoint
from trainer.config import load_config


def randomise_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))


def save_run(run_dir, iteration: int, seed: int):
    cfg = load_config("smoke", ["model.depth=2", "model.img_size=42", "crops.global_size=42", "crops.local_size=28",
                                "crops.mean=0.4", "crops.std=0.3"])
    student, teacher = build_backbone(cfg.model), build_backbone(cfg.model)
    randomise_(student, seed)
    randomise_(teacher, seed + 100)
    state = {"iteration": iteration, "samples_seen": 8 * iteration, "seed": 0}
    path = save_checkpoint(run_dir, flat_state({"student.backbone": student, "teacher.backbone": teacher}), {}, state,
                           cfg, keep_last=3)
    return path, student.eval(), teacher.eval()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_dir_gives_latest_teacher_with_its_preprocessing(tmp_path):
    save_run(tmp_path, 1, seed=0)
    latest, student, teacher = save_run(tmp_path, 2, seed=1)
    enc = build_encoder(f"ckpt:{tmp_path}")
    assert enc.name == f"ckpt:{tmp_path}"
    pre = enc.preprocess
    assert (pre.size, pre.policy, pre.mean, pre.std, pre.channels) == (42, "resize_stretch", (0.4,), (0.3,), 3)
    assert enc.weights_digest == sha256(latest / "model.safetensors")

    pixels = torch.randn(2, 3, 42, 42)
    feats = enc.encode(pixels)
    with torch.no_grad():
        ref = teacher.forward_features(pixels)
        other = student.forward_features(pixels)
    torch.testing.assert_close(feats.global_, ref["x_norm_clstoken"])
    torch.testing.assert_close(feats.patch, ref["x_norm_patchtokens"].reshape(2, 3, 3, -1).permute(0, 3, 1, 2))
    assert not torch.allclose(feats.global_, other["x_norm_clstoken"], atol=1e-3)
    assert len(feats.layers) == 2 and all(t.shape == (2, 192, 3, 3) for t in feats.layers)
    torch.testing.assert_close(feats.layers[-1], feats.patch)


def test_checkpoint_dir_directly_and_harmonised_policy(tmp_path):
    first, _, teacher = save_run(tmp_path, 1, seed=0)
    save_run(tmp_path, 2, seed=1)
    enc = build_encoder(f"ckpt:{first}", input_policy="harmonised")
    assert enc.weights_digest == sha256(first / "model.safetensors")
    x = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(x).global_, teacher(x))


def test_missing_dir_or_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsMissing, match=r"does not exist") as e:
        build_encoder(f"ckpt:{tmp_path / 'nope'}")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(WeightsMissing, match="no checkpoint found"):
        build_encoder(f"ckpt:{tmp_path}")
    path, _, _ = save_run(tmp_path / "run", 1, seed=0)
    (path / "config.yaml").unlink()
    with pytest.raises(WeightsMissing, match="missing config.yaml"):
        build_encoder(f"ckpt:{path}")
    with pytest.raises(ValueError, match="needs an argument"):
        build_encoder("ckpt")
