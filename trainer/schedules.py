"""Per-iteration schedules, precomputed as arrays of length total_iters (facebookresearch/dinov2
``dinov2/utils/utils.py`` CosineScheduler, ``dinov2/train/train.py``, ``dinov2/configs/ssl_default_config.yaml``).

- lr: linear warm-up from 0 to the peak, then cosine down to min_lr;
- weight decay: cosine from 0.04 up to 0.4 (a cosine schedule may increase);
- teacher EMA momentum: cosine from 0.992 to 1.0 over all iterations;
- teacher temperature: linear warm-up 0.04 -> 0.07, then constant;
- last-layer lr: the lr schedule with the first freeze_last_layer_iters set to 0 (prototypes frozen).
Iterations past the end take the last value (upstream's CosineScheduler returns the final value there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine_schedule(base: float, final: float, total_iters: int, warmup_iters: int = 0,
                    start_warmup: float = 0.0) -> np.ndarray:
    """[total_iters] values: linspace(start_warmup, base, warmup_iters), then base -> final on a half cosine.

    Like upstream, the warm-up's last value is `base` and the cosine part starts again at `base` and reaches
    `final` only in the limit (its last value is one step short of it).
    """
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(f"warmup_iters={warmup_iters} must be within [0, total_iters={total_iters}]")
    warmup = np.linspace(start_warmup, base, warmup_iters)
    steps = np.arange(total_iters - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def teacher_temp_schedule(final: float, start: float, warmup_iters: int, total_iters: int) -> np.ndarray:
    """[total_iters] values: linear start -> final over warmup_iters, then constant at final (dinov2's)."""
    warmup = np.linspace(start, final, warmup_iters)[:total_iters]  # a run shorter than the warm-up stops in it
    return np.concatenate([warmup, np.full(total_iters - len(warmup), final)])


@dataclass
class Schedules:
    """The five arrays, indexed by iteration; `at(it)` gives the values of one step."""
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray

    @classmethod
    def from_config(cls, optim, peak_lr: float) -> "Schedules":
        """From the trainer's OptimConfig (iteration counts, not epochs) and the already scaled peak lr."""
        total = optim.total_iters
        if optim.warmup_iters > total:
            raise ValueError(f"optim.warmup_iters={optim.warmup_iters} exceeds optim.total_iters={total}; "
                             "lower optim.warmup_iters (e.g. optim.warmup_iters=<10% of total_iters>)")
        lr = cosine_schedule(peak_lr, optim.min_lr, total, warmup_iters=optim.warmup_iters)
        last_layer_lr = lr.copy()
        last_layer_lr[:optim.freeze_last_layer_iters] = 0.0  # prototypes frozen first (dinov2 freeze_last_layer_epochs)
        return cls(
            lr=lr,
            wd=cosine_schedule(optim.weight_decay, optim.weight_decay_end, total),
            momentum=cosine_schedule(optim.momentum_teacher, optim.final_momentum_teacher, total),
            teacher_temp=teacher_temp_schedule(optim.teacher_temp, optim.warmup_teacher_temp,
                                               optim.warmup_teacher_temp_iters, total),
            last_layer_lr=last_layer_lr,
        )

    def at(self, it: int) -> dict[str, float]:
        """Values for iteration `it` (0-based); past the end, the last values (upstream returns final)."""
        i = min(it, len(self.lr) - 1)
        return {name: float(getattr(self, name)[i]) for name in ("lr", "wd", "momentum", "teacher_temp",
                                                                   "last_layer_lr")}
