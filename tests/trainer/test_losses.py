"""DINO, iBOT and KoLeo losses and both teacher-target rules against direct formulas (facebookresearch/dinov2
``dinov2/loss/``).

The direct formulas are written independently of trainer.losses: explicit loops, float64 numpy for
Sinkhorn-Knopp, and the upstream concatenate-and-swap bookkeeping for the DINO loss.
"""
from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss

K = 12


def direct_softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z.double() - z.double().max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def direct_log_softmax(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))


def direct_sinkhorn(z: np.ndarray, tau: float, n_iterations: int = 3) -> np.ndarray:
    """Upstream's steps (dinov2/loss/dino_clstoken_loss.py), float64: Q = exp(z/tau)^T, / sum, row/K, column/B."""
    q = np.exp(z.astype(np.float64) / tau).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


# ---------------------------------------------------------------- softmax centering


def test_softmax_centering_uses_the_previous_steps_centre():
    loss = DINOLoss(K, center_momentum=0.9)
    tau = 0.05
    batches = [torch.randn(6, K) for _ in range(3)]
    centre = torch.zeros(K, dtype=torch.float64)
    for z in batches:
        probs = loss.softmax_center_teacher(z, teacher_temp=tau)
        torch.testing.assert_close(probs.double(), direct_softmax((z.double() - centre) / tau), rtol=1e-5, atol=1e-7)
        loss.update_center(z)
        batch_mean = torch.stack([z[i].double() for i in range(z.shape[0])]).sum(0) / z.shape[0]
        centre = 0.9 * centre + 0.1 * batch_mean
    # the third update is pending; a checkpoint taken now must contain it
    torch.testing.assert_close(loss.state_dict()["center"].double().squeeze(0), centre, rtol=1e-5, atol=1e-7)


def test_softmax_centering_is_fp32_for_bf16_logits():
    loss = DINOLoss(K)
    z = torch.randn(4, K).bfloat16()
    probs = loss.softmax_center_teacher(z, teacher_temp=0.04)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    loss.update_center(z)
    loss.apply_center_update()
    assert loss.center.dtype == torch.float32


def test_empty_patch_batch_leaves_centre_unchanged():
    loss = iBOTPatchLoss(K)
    loss.update_center(torch.randn(5, K))
    loss.apply_center_update()
    before = loss.center.clone()
    loss.update_center(torch.zeros(0, K))
    loss.apply_center_update()
    assert torch.equal(loss.center, before)


# ---------------------------------------------------------------- Sinkhorn-Knopp


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_sinkhorn_knopp_matches_reference_steps(scale):
    z = torch.randn(10, K) * scale
    tau = 0.04  # at scale 3 logits/tau reach ~250: exp overflows fp32 without the per-row shift
    out = DINOLoss(K).sinkhorn_knopp_teacher(z, teacher_temp=tau)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), direct_sinkhorn(z.numpy(), tau), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.sum(-1), torch.ones(10))  # each sample's target is a distribution


def test_sinkhorn_knopp_bf16_input_gives_fp32_output():
    z = torch.randn(8, K).bfloat16()
    out = iBOTPatchLoss(K).sinkhorn_knopp_teacher(z, teacher_temp=0.07)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), direct_sinkhorn(z.float().numpy(), 0.07), rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sinkhorn_and_centre_worker(rank: int, world_size: int, port: int, cls_halves, patch_parts, expected):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        dino, ibot = DINOLoss(K), iBOTPatchLoss(K)
        # CLS: each rank holds half of the global batch
        torch.testing.assert_close(dino.sinkhorn_knopp_teacher(cls_halves[rank], 0.05), expected["cls_sk"][rank])
        # patches: unequal masked-patch counts per rank (5 and 3), as happens with random masks
        torch.testing.assert_close(ibot.sinkhorn_knopp_teacher(patch_parts[rank], 0.05), expected["patch_sk"][rank])
        # centres: mean over all rows of all ranks
        dino.update_center(cls_halves[rank])
        ibot.update_center(patch_parts[rank])
        dino.apply_center_update()
        ibot.apply_center_update()
        torch.testing.assert_close(dino.center, expected["cls_center"])
        torch.testing.assert_close(ibot.center, expected["patch_center"])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.gloo
def test_sinkhorn_and_centre_are_distributed_correct_on_two_gloo_ranks():
    cls = torch.randn(8, K) * 2
    patches = torch.randn(8, K) * 2
    cls_halves = [cls[:4].clone(), cls[4:].clone()]
    patch_parts = [patches[:5].clone(), patches[5:].clone()]
    single = DINOLoss(K).sinkhorn_knopp_teacher(cls, 0.05)
    single_patch = iBOTPatchLoss(K).sinkhorn_knopp_teacher(patches, 0.05)
    expected = {
        "cls_sk": [single[:4], single[4:]],
        "patch_sk": [single_patch[:5], single_patch[5:]],
        "cls_center": 0.1 * cls.mean(0, keepdim=True),
        "patch_center": 0.1 * patches.mean(0, keepdim=True),
    }
    # guard against a vacuous comparison: per-rank Sinkhorn would give a different answer
    assert not torch.allclose(DINOLoss(K).sinkhorn_knopp_teacher(cls[:4], 0.05), single[:4], atol=1e-4)
    mp.spawn(_sinkhorn_and_centre_worker, args=(2, _free_port(), cls_halves, patch_parts, expected), nprocs=2)


# ---------------------------------------------------------------- DINO loss


def test_dino_loss_is_the_mean_over_the_18_cross_view_pairs():
    b, n_local, tau_s = 3, 8, 0.1
    student = [torch.randn(b, K) for _ in range(2 + n_local)]  # global A, global B, 8 locals
    teacher = [direct_softmax(torch.randn(b, K) / 0.04).float() for _ in range(2)]
    got = DINOLoss(K, student_temp=tau_s)(student, teacher)

    # upstream bookkeeping (dinov2/train/ssl_meta_arch.py): locals vs both teacher globals, plus 2 x mean over 2B
    # of the swapped globals, / 18
    local_sum = 0.0
    for s in student[2:]:
        for t in teacher:
            local_sum += sum(-(t[i].double() * direct_log_softmax(s[i] / tau_s)).sum() for i in range(b)) / b
    student_globals = torch.cat(student[:2])
    teacher_swapped = torch.cat([teacher[1], teacher[0]])
    h = [-(teacher_swapped[i].double() * direct_log_softmax(student_globals[i] / tau_s)).sum() for i in range(2 * b)]
    global_term = 2 * sum(h) / (2 * b)
    expected = (local_sum + global_term) / (2 * 1 + 2 * n_local)
    torch.testing.assert_close(got.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_dino_loss_rejects_mismatched_crops():
    loss = DINOLoss(K)
    teacher = [torch.full((3, K), 1 / K)] * 2
    with pytest.raises(ValueError, match="shape"):
        loss([torch.randn(3, K), torch.randn(3, K), torch.randn(4, K)], teacher)
    with pytest.raises(ValueError, match="student crops"):
        loss([torch.randn(3, K)], teacher)


# ---------------------------------------------------------------- iBOT loss


def test_ibot_loss_weights_each_masked_patch_by_one_over_its_images_mask_size():
    n_images, n_patches, tau_s = 4, 6, 0.1
    masks = torch.tensor([[1, 0, 1, 1, 0, 0],
                          [0, 0, 0, 0, 0, 0],   # unmasked image: contributes 0 but counts in the mean
                          [0, 1, 0, 0, 0, 0],
                          [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    student_all = torch.randn(n_images, n_patches, K)
    teacher_all = direct_softmax(torch.randn(n_images, n_patches, K) / 0.04).float()

    expected = 0.0
    for i in range(n_images):
        m_i = int(masks[i].sum())
        for p in range(n_patches):
            if masks[i, p]:
                h = -(teacher_all[i, p].double() * direct_log_softmax(student_all[i, p] / tau_s)).sum()
                expected += h / m_i
    expected /= n_images

    loss = iBOTPatchLoss(K, student_temp=tau_s)
    got = loss.forward_masked(student_all[masks], teacher_all[masks], masks)
    torch.testing.assert_close(got.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)

    # padded buffer (static upper bound) with explicit weights gives the same value
    pad = 3
    s_buf = torch.cat([student_all[masks], torch.randn(pad, K)])
    t_buf = torch.cat([teacher_all[masks], torch.full((pad, K), 1 / K)])
    weights = (1 / masks.sum(-1).clamp(min=1).float()).unsqueeze(-1).expand_as(masks)[masks]
    got_padded = loss.forward_masked(s_buf, t_buf, masks, n_masked_patches=int(masks.sum()), masks_weight=weights)
    torch.testing.assert_close(got_padded, got)
    with pytest.raises(ValueError, match="n_masked_patches"):
        loss.forward_masked(s_buf, t_buf, masks)


# ---------------------------------------------------------------- KoLeo


def test_koleo_matches_nearest_neighbour_formula():
    x = torch.randn(7, 5) * 3
    xn = [x[i].double() / torch.sqrt((x[i].double() ** 2).sum()) for i in range(7)]
    expected = 0.0
    for i in range(7):
        d = min(math.sqrt(float(((xn[i] - xn[j]) ** 2).sum())) for j in range(7) if j != i)
        expected += -math.log(d + 1e-8)
    expected /= 7
    got = KoLeoLoss()(x)
    assert got.dtype == torch.float32
    assert abs(got.item() - expected) < 1e-5


def test_koleo_has_finite_gradients_and_works_in_bf16():
    x = torch.randn(6, 5, requires_grad=True)
    KoLeoLoss()(x.bfloat16()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_koleo_refuses_one_image_per_device():
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(1, 5))
