"""trainer.checkpoint: round trip, atomic writes, keep-last-K, the backbone loader."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.checkpoint import (
    build_backbone,
    flat_state,
    latest_checkpoint,
    list_checkpoints,
    load_backbone,
    load_checkpoint,
    resolve_checkpoint,
    restore_state,
    save_checkpoint,
)
from trainer.config import load_config


def tiny_cfg():
    return load_config("smoke", ["model.depth=2", "crops.global_size=28", "crops.local_size=14",
                                 "model.img_size=28", "head.out_dim=32", "head.hidden_dim=16", "head.bottleneck_dim=8"])


def modules(cfg, seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"student.backbone": build_backbone(cfg.model), "teacher.backbone": build_backbone(cfg.model)}


def save(run: Path, cfg, mods, iteration: int, keep_last: int = 3) -> Path:
    opt = torch.optim.AdamW(mods["student.backbone"].parameters(), lr=1e-3)
    mods["student.backbone"](torch.rand(2, 3, 28, 28)).sum().backward()
    opt.step()
    state = {"iteration": iteration, "samples_seen": 8 * iteration, "seed": 0}
    return save_checkpoint(run, flat_state(mods), opt.state_dict(), state, cfg, keep_last=keep_last)


def test_round_trip_restores_every_tensor_and_the_optimizer(tmp_path):
    cfg = tiny_cfg()
    mods = modules(cfg, 0)
    ckpt = save(tmp_path, cfg, mods, 4)
    assert ckpt.name == "ckpt_0000004"
    tensors, opt_state, state = load_checkpoint(ckpt)
    assert state == {"iteration": 4, "samples_seen": 32, "seed": 0}
    assert opt_state["state"][0]["step"].item() == 1  # loaded with weights_only=True
    fresh = modules(cfg, 1)
    restore_state(fresh, tensors, ckpt)
    for name in mods:
        for (k, a), (_, b) in zip(mods[name].state_dict().items(), fresh[name].state_dict().items()):
            assert torch.equal(a, b), k


def test_restore_rejects_a_different_model_naming_the_checkpoint(tmp_path):
    cfg = tiny_cfg()
    ckpt = save(tmp_path, cfg, modules(cfg, 0), 2)
    tensors, _, _ = load_checkpoint(ckpt)
    deeper = load_config("smoke", ["model.depth=3", "crops.global_size=28", "crops.local_size=14", "model.img_size=28"])
    with pytest.raises(RuntimeError, match=r"ckpt_0000002.*student.backbone"):
        restore_state(modules(deeper, 0), tensors, ckpt)
    with pytest.raises(RuntimeError, match="unexpected tensors"):
        restore_state({"student.backbone": build_backbone(cfg.model)}, tensors, ckpt)


def test_keeps_last_k_and_ignores_half_written_checkpoints(tmp_path):
    cfg = tiny_cfg()
    mods = modules(cfg, 0)
    for it in (2, 4, 6, 8):
        save(tmp_path, cfg, mods, it, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_0000006", "ckpt_0000008"]
    # What a SIGKILL during a write leaves behind: a temporary directory without the final name.
    crashed = tmp_path / "checkpoints" / ".ckpt_0000010.0123456789ab.tmp"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path).name == "ckpt_0000008"
    # Re-saving an existing iteration (a preemption right after a periodic save) replaces it.
    again = save(tmp_path, cfg, mods, 8, keep_last=2)
    assert json.loads((again / "state.json").read_text())["iteration"] == 8
    # ... and leaves neither its own temporary nor the old copy behind.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [crashed.name, "ckpt_0000006",
                                                                             "ckpt_0000008"]


def test_load_backbone_from_run_or_checkpoint_dir(tmp_path):
    cfg = tiny_cfg()
    mods = modules(cfg, 0)
    save(tmp_path, cfg, mods, 2)
    ckpt = save(tmp_path, cfg, mods, 4)
    teacher, config = load_backbone(tmp_path)  # the run directory -> its latest checkpoint
    assert not teacher.training
    assert config["model"]["depth"] == 2 and config["crops"]["global_size"] == 28
    for k, v in mods["teacher.backbone"].state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k
    student, _ = load_backbone(ckpt, which="student")
    assert not torch.equal(student.pos_embed, teacher.pos_embed)  # student took an optimizer step
    with pytest.raises(ValueError, match="which="):
        load_backbone(ckpt, which="ema")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory"):
        resolve_checkpoint(tmp_path / "nothing")
