"""DINO (CLS) loss, iBOT masked-patch loss and KoLeo regulariser (facebookresearch/dinov2
``dinov2/loss/dino_clstoken_loss.py``, ``ibot_patch_loss.py``, ``koleo_loss.py``).

Teacher targets come from one of two rules, both distributed-correct (per-GPU statistics make small
per-GPU batches collapse: dinov2 issues #173, #349):
- softmax centering: t = softmax((z - c) / tau_t) with c an EMA (momentum 0.9) of the batch-mean teacher logits
  over ALL ranks, applied with a one-step lag (step t uses the centre built from batches 0..t-1);
- Sinkhorn-Knopp: 3 iterations in fp32, prototype (row) sums all-reduced, B = global sample count.
Both run in fp32 whatever the input dtype.

The student side is H(t, s) = -sum_k t_k log softmax(s / tau_s)_k with tau_s = 0.1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: Tensor, op=None) -> Tensor:
    """In-place all-reduce (sum by default) when a multi-rank process group exists; a no-op otherwise."""
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op is None else op)
    return x


def cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """Per-row H(t, s) = -sum_k t_k log softmax(s / tau_s)_k, in fp32."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_p).sum(dim=-1)


class TeacherTargets(nn.Module):
    """The two target rules of dinov2/loss/dino_clstoken_loss.py, shared by the CLS and the patch loss; owns the
    centre buffer [1, K]."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # The pending centre update: [sum of logits over the batch | count], all-reduced asynchronously
        # (the reduction overlaps the student forward, as upstream's) and folded into `center` lazily.
        self._pending: Tensor | None = None
        self._pending_work = None
        # A checkpoint taken between steps must hold the centre the next step will use.
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.apply_center_update())

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """t = softmax((z - c) / tau_t) in fp32, with c as of the previous step (one-step lag, as upstream)."""
        self.apply_center_update()
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """Start the centre update with this step's teacher logits [n, K]; the next softmax call applies it.

        The mean is over all rows on all ranks (sum and count are reduced together, so ranks may hold
        different numbers of rows, e.g. of masked patches).
        """
        self.apply_center_update()
        z = teacher_logits.float().reshape(-1, self.out_dim)
        count = z.new_full((1,), z.shape[0])
        self._pending = torch.cat([z.sum(dim=0), count])
        if _distributed():
            self._pending_work = dist.all_reduce(self._pending, async_op=True)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold a pending batch mean into the EMA centre (no-op when nothing is pending)."""
        if self._pending is None:
            return
        if self._pending_work is not None:
            self._pending_work.wait()
        total, count = self._pending[:-1], self._pending[-1]
        batch_center = (total / count.clamp(min=1)).unsqueeze(0)
        updated = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        # An empty batch (no masked patch on any rank) leaves the centre alone; `where` avoids a host sync.
        self.center.copy_(torch.where(count > 0, updated, self.center))
        self._pending, self._pending_work = None, None

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Teacher targets [n, K] by Sinkhorn-Knopp over the global batch (all ranks), fp32 (as upstream).

        Q = exp(z / tau_t)^T is K x B. Each iteration makes every prototype (row) carry 1/K of the mass (row
        sums all-reduced) and every sample (column) 1/B; finally x B so each sample's target sums to 1.
        B is the all-reduced row count, so ranks may hold different numbers of samples (or masked patches).
        """
        z = teacher_logits.float()
        n, k = z.shape
        global_n = _all_reduce(z.new_full((1,), n))
        # Upstream first divides Q by its global sum; the row normalisation right after makes any per-row
        # factor a no-op, so we instead subtract each prototype's global max logit. That is equally cancelled
        # and keeps exp() from overflowing fp32 for large logits / small tau_t (upstream can give inf/NaN).
        row_max = z.amax(dim=0) if n > 0 else z.new_full((k,), float("-inf"))
        _all_reduce(row_max, op=dist.ReduceOp.MAX)
        q = torch.exp((z - row_max) / teacher_temp).t()
        for _ in range(n_iterations):
            row_sum = _all_reduce(q.sum(dim=1, keepdim=True))
            q = q / row_sum / k
            q = q / q.sum(dim=0, keepdim=True) / global_n
        return (q * global_n).t()


class DINOLoss(TeacherTargets):
    """Cross-entropy between student crops and teacher global crops, over all cross-view pairs
    (dinov2/train/ssl_meta_arch.py)."""

    def forward(self, student_logits_list: list[Tensor], teacher_probs_list: list[Tensor]) -> Tensor:
        """Mean over cross-view pairs of the batch-mean H(teacher crop j, student crop i).

        Convention: teacher_probs_list holds the n_g teacher global crops [B, K] and the FIRST n_g entries of
        student_logits_list are the student's views of the same global crops in the same order, followed by the
        local crops. Pairs (i, i) for i < n_g are the same view and are skipped, which is DINOv2's A<->B
        swap for globals. With 2 globals and 8 locals: 2*1 + 2*8 = 18 pairs, loss = sum / 18; with no locals,
        sum / 3 (upstream's divisor, see below).
        """
        n_global = len(teacher_probs_list)
        if len(student_logits_list) < n_global:
            raise ValueError(f"DINOLoss: {len(student_logits_list)} student crops but {n_global} teacher crops; "
                             "the student list must start with the same global crops as the teacher list")
        total, n_pairs = 0.0, 0
        for i, student in enumerate(student_logits_list):
            log_p = F.log_softmax(student.float() / self.student_temp, dim=-1)
            for j, teacher in enumerate(teacher_probs_list):
                if i == j:
                    continue
                if teacher.shape != student.shape:
                    raise ValueError(f"DINOLoss: student crop {i} has shape {tuple(student.shape)} but teacher "
                                     f"crop {j} has {tuple(teacher.shape)}; each crop must be [B, K]")
                total = total - (teacher.float() * log_p).sum(dim=-1).mean()
                n_pairs += 1
        if n_pairs == 0:
            raise ValueError("DINOLoss: no cross-view pair (need >= 2 global crops or >= 1 local crop)")
        # Upstream's divisor is (global pairs) + max(local pairs, 1) (dinov2/train/ssl_meta_arch.py,
        # n_local_crops_loss_terms): the number of pairs with local crops, but one more than the pair count
        # without them. Matched so that a run with crops.n_local=0 weighs DINO against iBOT/KoLeo as upstream.
        n_local_pairs = n_global * (len(student_logits_list) - n_global)
        return total / (n_global * (n_global - 1) + max(n_local_pairs, 1))


class iBOTPatchLoss(TeacherTargets):  # lower-case i: the method's name
    """Masked-image-modelling loss on patch tokens: masked positions of the student's global crops only
    (dinov2/loss/ibot_patch_loss.py)."""

    def forward_masked(self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, student_masks_flat: Tensor,
                       n_masked_patches: int | None = None, masks_weight: Tensor | None = None) -> Tensor:
        """sum_i (1/|M_i|) sum_{p in M_i} H(t_ip, s_ip) / n_images, n_images = ALL global crops (masked or not).

        student_patch_logits, teacher_patch_probs: [M, K], the masked tokens in student_masks_flat[mask] order
        (image by image); student_masks_flat: [n_images, N] bool; masks_weight: [M] = 1/|M_i| per token (computed
        from the masks when None); n_masked_patches: use only the first n rows (rows beyond are buffer padding).
        With mask_sample_probability 0.5 half of the images contribute 0 but still count in the denominator.
        """
        if masks_weight is None:
            per_image = 1.0 / student_masks_flat.sum(dim=-1).clamp(min=1).float()
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            student_patch_logits = student_patch_logits[:n_masked_patches]
            teacher_patch_probs = teacher_patch_probs[:n_masked_patches]
            masks_weight = masks_weight[:n_masked_patches]
        if student_patch_logits.shape[0] != masks_weight.shape[0]:
            raise ValueError(f"iBOTPatchLoss: {student_patch_logits.shape[0]} masked-token logits but "
                             f"{masks_weight.shape[0]} mask weights; pass n_masked_patches when the logits "
                             "come from a padded buffer")
        h = cross_entropy(teacher_patch_probs, student_patch_logits, self.student_temp)
        return (h * masks_weight.float()).sum() / student_masks_flat.shape[0]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator: -mean_i log ||x_i - x_NN(i)|| on L2-normalised vectors (koleo_loss.py).

    Apply to the backbone CLS tokens of ONE global crop at a time (two views of the same image must not be
    each other's neighbour) and sum over the global crops. Per device, as upstream; it runs in fp32.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, cls_tokens: Tensor) -> Tensor:
        if cls_tokens.ndim != 2 or cls_tokens.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss needs [B, D] with B >= 2 images per device, got shape {tuple(cls_tokens.shape)}: with one "
                "image there is no nearest neighbour and the loss is inf/NaN (DINOv2 issue #314). Raise "
                "optim.batch_size_per_gpu to >= 2, or disable KoLeo with loss.koleo_weight=0.")
        with torch.autocast(device_type=cls_tokens.device.type, enabled=False):
            x = F.normalize(cls_tokens.float(), dim=-1, p=2, eps=self.eps)
            dots = x @ x.t()
            dots.fill_diagonal_(-1.0)  # never one's own neighbour (cosine >= -1 for every other point)
            neighbour = dots.argmax(dim=1)
            distances = F.pairwise_distance(x, x[neighbour], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()
