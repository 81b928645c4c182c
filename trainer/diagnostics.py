"""Collapse diagnostics: is the teacher still telling images apart?

DINO-style self-distillation has two trivial solutions (Caron et al. 2021, "Emerging properties in self-supervised
vision transformers", section 5.3): *uniform* collapse, where the teacher's targets tend to 1/K for every image,
and *one-prototype* collapse, where every image goes to the same prototype. Centering pushes towards the first,
sharpening (a low teacher temperature) towards the second; Sinkhorn-Knopp forbids the second, so a run that uses it
can only fail the first way. The loss alone does not tell: at uniform collapse the DINO term sits at ln K, which a
reader may take for a plateau.

`step_diagnostics` measures, on one step's tensors:

- ``target_entropy_cls`` / ``target_entropy_patch``: mean entropy of the teacher's CLS and masked-patch targets
  (nats; ln K = uniform, 0 = one-hot);
- ``student_entropy_cls`` and ``kl_teacher_student_cls``: the student's CLS distribution and how far it is from the
  teacher's (KL(t || s), mean over the cross-view pairs of the DINO term);
- ``teacher_feature_std``: mean per-dimension std, across the batch, of the L2-normalised teacher CLS features
  (1/sqrt(D) for features spread evenly over the sphere, 0 when every image maps to one vector);
- ``prototypes_used``: how many of the K prototypes are some teacher CLS target's argmax in this step;
- ``prototype_gain``: mean gain g of the teacher's weight-normed prototypes (logits are g times a cosine, so a gain
  that decays towards 0 flattens every distribution whatever the features).

`CollapseMonitor` turns a sequence of these into a verdict: targets within a margin of ln K, or of 0, for a
sustained window of logged steps.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def mean_entropy(probs: Tensor) -> float:
    """Mean over rows of -sum_k p_k ln p_k (nats); 0 * ln 0 counts as 0."""
    if probs.numel() == 0:
        return float("nan")
    p = probs.float()
    return float(-(torch.special.xlogy(p, p)).sum(dim=-1).mean())


def feature_std(features: Tensor) -> float:
    """Mean per-dimension std across the batch of the L2-normalised rows of ``features`` [B, D]."""
    if features.shape[0] < 2:
        return float("nan")
    x = F.normalize(features.float(), dim=-1)
    return float(x.std(dim=0, unbiased=False).mean())


def prototypes_used(probs: Tensor) -> int:
    """Number of distinct argmax prototypes over the rows of ``probs`` [n, K]."""
    if probs.numel() == 0:
        return 0
    return int(probs.argmax(dim=-1).unique().numel())


@torch.no_grad()
def step_diagnostics(t_cls_probs: Tensor, t_patch_probs: Tensor, student_global_logits: Tensor,
                     student_temp: float, teacher_cls_features: Tensor, prototype_gain: Tensor) -> dict[str, float]:
    """The diagnostics of one step (see the module docstring).

    t_cls_probs: [2B, K] teacher targets of the two global crops (crop-major, as the DINO term uses them);
    t_patch_probs: [M, K] targets of the masked patches; student_global_logits: [2B, K], same order as
    t_cls_probs; teacher_cls_features: [2B, D] backbone CLS tokens the targets came from.
    The student/teacher pairs are cross-view (student crop 1 against teacher crop 2 and vice versa), as in the loss.
    """
    k = t_cls_probs.shape[-1]
    log_s = F.log_softmax(student_global_logits.float() / student_temp, dim=-1)
    t = t_cls_probs.float()
    t_swapped = torch.cat(t.chunk(2)[::-1])  # pair student crop i with the teacher's other crop
    kl = (torch.special.xlogy(t_swapped, t_swapped) - t_swapped * log_s).sum(dim=-1).mean()
    return {
        "ln_k": math.log(k),
        "target_entropy_cls": mean_entropy(t),
        "target_entropy_patch": mean_entropy(t_patch_probs),
        "student_entropy_cls": mean_entropy(log_s.exp()),
        "kl_teacher_student_cls": float(kl),
        "teacher_feature_std": feature_std(teacher_cls_features),
        "prototypes_used": prototypes_used(t),
        "prototype_gain": float(prototype_gain.float().mean()),
    }


@dataclass(frozen=True)
class CollapseVerdict:
    kind: str        # "uniform" | "one-prototype"
    since: int       # first iteration of the window
    entropy: float   # mean CLS target entropy over the window
    ln_k: float

    def message(self) -> str:
        if self.kind == "uniform":
            what = (f"teacher targets are uniform: CLS target entropy {self.entropy:.4f} vs ln K {self.ln_k:.4f} "
                    f"since iteration {self.since}. The teacher no longer tells images apart (its features or its "
                    "prototype gain have collapsed), so nothing is distilled and only KoLeo moves")
            fix = ("likely causes: too little sharpening for this batch and K (lower optim.teacher_temp / "
                   "optim.warmup_teacher_temp, or lower head.out_dim), a teacher that follows the student too "
                   "closely (raise optim.momentum_teacher), too small a batch (optim.batch_size_per_gpu), too high a "
                   "learning rate (optim.base_lr, optim.warmup_iters), or prototype gains decaying to 0 "
                   "(head.freeze_prototype_gain=true)")
        else:
            what = (f"teacher targets are one-hot on the same prototype: CLS target entropy {self.entropy:.4f} "
                    f"since iteration {self.since}")
            fix = ("likely causes: too much sharpening without balancing (use loss.centering=sinkhorn_knopp, raise "
                   "optim.teacher_temp, or lengthen optim.warmup_teacher_temp_iters)")
        return f"collapse: {what}. {fix}."


class CollapseMonitor:
    """Flags a run whose CLS target entropy stays within ``margin`` of ln K (or of 0) for ``window`` logged steps.

    The margin is relative to ln K (default 1 %): a healthy run at K = 1024 and tau_t = 0.04 has targets several
    nats below ln K, while the collapsed runs that motivated this sat at ln K to four decimals.
    """

    def __init__(self, window: int = 10, margin: float = 0.01):
        if window < 1 or not 0 < margin < 1:
            raise ValueError(f"collapse window={window} must be >= 1 and margin={margin} in (0, 1)")
        self.window, self.margin = window, margin
        self.history: deque[tuple[int, float, float]] = deque(maxlen=window)
        self.reported: str | None = None

    def update(self, iteration: int, diagnostics: dict[str, float]) -> CollapseVerdict | None:
        """Add one logged step; returns a verdict when the whole window is collapsed the same way."""
        self.history.append((iteration, diagnostics["target_entropy_cls"], diagnostics["ln_k"]))
        if len(self.history) < self.window:
            return None
        ln_k = self.history[-1][2]
        entropies = [h for _, h, _ in self.history]
        tol = self.margin * ln_k
        for kind, near in (("uniform", ln_k), ("one-prototype", 0.0)):
            if all(abs(h - near) <= tol for h in entropies):
                return CollapseVerdict(kind, self.history[0][0], sum(entropies) / len(entropies), ln_k)
        return None
