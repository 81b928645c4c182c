"""One DINOv2 training step for the benchmarks, with the student's multi-crop pass PACKED (one block-diagonal
sequence, vit.forward_features_list) or SEPARATE (forward_features on the globals, then on the locals).

Everything else is the trainer's own and identical in both modes: crops on the device, iBOT masks, teacher
forward, DINO + iBOT + KoLeo losses, backward, gradient clipping, AdamW, EMA update. Used by bench_trainer.py
(CPU, memory by process) and gpu_check.py (CUDA, bf16).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from trainer.config import TrainConfig, load_config
from trainer.crops import MultiCropAugmentation
from trainer.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from trainer.masking import sample_masks
from trainer.meta_arch import SSLMetaArch


def step_config(overrides: list[str]) -> TrainConfig:
    """The rad-dino recipe with a benchmark's geometry overrides, without drop-path (its random draws would
    differ between the packed and the separate pass)."""
    return load_config("rad-dino", [*overrides, "model.drop_path_rate=0.0"])


def make_step(cfg: TrainConfig, batch: int, packed: bool, device: torch.device,
              bf16: bool = False) -> Callable[[int], None]:
    """Build models, optimiser and a batch of random images on `device`; return ``step(i)`` (seeded by i)."""
    n_local, out_dim = cfg.crops.n_local, cfg.head.out_dim
    model = SSLMetaArch(cfg).to(device)
    student, teacher = model.student, model.teacher
    # The recipe's groups: layer-wise decay 0.9, patch embedding x0.2 (no benchmark overrides them).
    optimizer = torch.optim.AdamW(model.param_groups(), lr=1e-4, foreach=True)
    dino, ibot = DINOLoss(out_dim).to(device), iBOTPatchLoss(out_dim).to(device)
    koleo = KoLeoLoss()
    augment = MultiCropAugmentation(cfg.crops.global_size, cfg.crops.local_size, n_local)
    images = torch.rand(batch, 1, cfg.crops.global_size, cfg.crops.global_size, device=device)
    grid = (cfg.crops.global_size // cfg.model.patch_size,) * 2
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def student_forward(g: torch.Tensor, l_: torch.Tensor, masks: torch.Tensor) -> dict:
        if packed:
            return student(g, l_, masks)
        # Separate passes: the same outputs, one backbone call per crop size, then the same single head call.
        bb = student.backbone
        go, lo = bb.forward_features(g, masks), bb.forward_features(l_)
        cls_g, cls_l = go["x_norm_clstoken"], lo["x_norm_clstoken"]
        logits = student.dino_head(torch.cat([cls_g, cls_l, go["x_norm_patchtokens"][masks]]))
        n_g, n_l = cls_g.shape[0], cls_l.shape[0]
        return {"global_cls": cls_g, "global_logits": logits[:n_g], "local_logits": logits[n_g:n_g + n_l],
                "patch_logits": logits[n_g + n_l:]}

    def step(i: int) -> None:
        gen = torch.Generator(device).manual_seed(i)
        g, l_ = augment(images, gen)
        masks = sample_masks(g.shape[0], grid, generator=gen).to(device)
        with autocast:
            t_cls, t_patch, _ = teacher(g, masks)
        t_cls_p = dino.softmax_center_teacher(t_cls, 0.07)
        dino.update_center(t_cls)
        t_patch_p = ibot.softmax_center_teacher(t_patch, 0.07)
        ibot.update_center(t_patch)
        with autocast:
            s = student_forward(g, l_, masks)
        crops = list(s["global_logits"].chunk(2)) + list(s["local_logits"].chunk(n_local))
        loss = dino(crops, list(t_cls_p.chunk(2))) + ibot.forward_masked(s["patch_logits"], t_patch_p, masks) \
            + 0.1 * sum(koleo(c) for c in s["global_cls"].chunk(2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        optimizer.step()
        model.update_teacher(0.996)

    return step
