"""The tiny training run the trainer, ablation and SLURM tests share: ViT depth 2 at 32 px globals (patch 8 -> 16
patches), 2 locals of 16 px, a 64-prototype head, a few seconds per step on one CPU thread."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.config import TrainConfig, load_config

TINY = ["model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32", "crops.global_size=32",
        "crops.local_size=16", "crops.n_local=2", "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
        "optim.batch_size_per_gpu=4", "optim.base_lr=0.002", "optim.warmup_iters=2", "data.num_workers=0",
        "run.log_every=1", "optim.freeze_last_layer_iters=1", "optim.warmup_teacher_temp_iters=3"]


def tiny_cfg(*extra: str, steps: int = 4) -> TrainConfig:
    return load_config("smoke", TINY + list(extra), steps=steps)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
