"""The objective as one object: student, EMA teacher, their shared DINO head, the DINO + iBOT + KoLeo losses with
their weights, the teacher targets (centering or Sinkhorn-Knopp), the EMA update and the AdamW parameter groups.

As facebookresearch/dinov2 ``dinov2/train/ssl_meta_arch.py`` (SSLMetaArch) gathers them, so that the loop in
trainer.train only feeds crops and masks in and steps the optimiser. One step, in `SSLMetaArch.losses`:

  1. the teacher (EMA, no grad, eval mode) sees the unmasked globals -> CLS and masked-patch logits;
  2. its targets: softmax around an EMA centre (one-step lag) or Sinkhorn-Knopp over the global batch;
  3. the student sees masked globals + locals in ONE packed backbone pass and ONE head call;
  4. loss = dino_weight * DINO + ibot_weight * iBOT + koleo_weight * sum over globals of KoLeo.

Not an nn.Module itself: it owns modules and says how a step combines them. Checkpoints name those modules
through `modules()` (``student.backbone``, ``teacher.dino_head``, ``dino_loss`` ...), as trainer.checkpoint
lays them out.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.checkpoint import build_backbone
from trainer.config import TrainConfig
from trainer.diagnostics import step_diagnostics
from trainer.heads import DINOHead
from trainer.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss


class SSLModel(nn.Module):
    """A backbone and its DINO head (shared by the CLS and patch objectives, dinov2's ibot.separate_head: false)."""

    def __init__(self, backbone: nn.Module, dino_head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head


class Student(SSLModel):
    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor) -> dict:
        """Masked globals and locals in one packed backbone pass, then one head call over all their tokens."""
        crops, crop_masks = [global_crops], [masks]
        if local_crops is not None:
            crops.append(local_crops)
            crop_masks.append(None)
        outs = self.backbone.forward_features_list(crops, crop_masks)
        global_cls = outs[0]["x_norm_clstoken"]
        local_cls = outs[1]["x_norm_clstoken"] if local_crops is not None else global_cls[:0]
        masked_patches = outs[0]["x_norm_patchtokens"][masks]  # [M, D], image by image
        # One head call over [global CLS; local CLS; masked patches] (as dinov2/train/ssl_meta_arch.py does).
        logits = self.dino_head(torch.cat([global_cls, local_cls, masked_patches]))
        g, l_ = global_cls.shape[0], local_cls.shape[0]
        return {"global_cls": global_cls, "global_logits": logits[:g], "local_logits": logits[g:g + l_],
                "patch_logits": logits[g + l_:]}


class Teacher(SSLModel):
    @torch.no_grad()
    def forward(self, global_crops: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
        """CLS logits of the unmasked globals, patch logits at the student's masked positions (as
        dinov2/train/ssl_meta_arch.py), and the backbone CLS tokens (for the collapse diagnostics)."""
        out = self.backbone.forward_features(global_crops)
        cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"][masks]
        logits = self.dino_head(torch.cat([cls, patches]))
        return logits[:cls.shape[0]], logits[cls.shape[0]:], cls


@dataclass
class StepOutput:
    """One step's weighted loss, its three unweighted terms, and the tensors the collapse diagnostics read."""
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]          # dino, ibot, koleo: the order of metrics.jsonl
    teacher_cls_probs: torch.Tensor         # [2B, K], crop-major
    teacher_patch_probs: torch.Tensor       # [M, K], the masked patches image by image
    teacher_cls_features: torch.Tensor      # [2B, D], the backbone CLS tokens the targets came from
    student_global_logits: torch.Tensor     # [2B, K], as teacher_cls_probs


class SSLMetaArch:
    """Everything a DINOv2 step computes, built from a config; ``torch.manual_seed`` before it fixes the weights."""

    def __init__(self, cfg: TrainConfig):
        backbone = build_backbone(cfg.model)
        if cfg.model.pretrained:
            load_pretrained_backbone(backbone, cfg.model.pretrained)
        head = DINOHead(backbone.embed_dim, cfg.head.out_dim, cfg.head.hidden_dim, cfg.head.bottleneck_dim,
                        cfg.head.nlayers)
        if cfg.model.pretrained_head:
            load_pretrained_head(head, cfg.model.pretrained_head)
        if cfg.head.freeze_prototype_gain:
            # DINO v1's norm_last_layer: prototypes stay unit-norm, so the logits are plain cosines and weight decay
            # cannot flatten every distribution by shrinking the gains (see trainer.diagnostics, prototype_gain).
            head.last_layer.weight_g.data.fill_(1.0)
            head.last_layer.weight_g.requires_grad_(False)
        self.student = Student(backbone, head)
        self.teacher = Teacher(copy.deepcopy(backbone), copy.deepcopy(head))
        self.teacher.requires_grad_(False)
        self.teacher.eval()  # the teacher never trains: no drop-path, no gradients (as upstream)
        self.dino_loss = DINOLoss(cfg.head.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum)
        self.ibot_loss = iBOTPatchLoss(cfg.head.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum)
        self.koleo_loss = KoLeoLoss()
        self.loss_cfg, self.optim_cfg, self.n_local, self.bf16 = cfg.loss, cfg.optim, cfg.crops.n_local, cfg.run.bf16
        # What runs the student's forward pass: the student itself, or its DDP wrapper after `distribute`.
        self.student_pass: nn.Module = self.student

    def modules(self) -> dict[str, nn.Module]:
        """The modules a checkpoint holds, by the prefix of their tensors' names."""
        return {"student.backbone": self.student.backbone, "student.dino_head": self.student.dino_head,
                "teacher.backbone": self.teacher.backbone, "teacher.dino_head": self.teacher.dino_head,
                "dino_loss": self.dino_loss, "ibot_loss": self.ibot_loss}

    def to(self, device: torch.device) -> SSLMetaArch:
        for module in (self.student, self.teacher, self.dino_loss, self.ibot_loss):
            module.to(device)
        return self

    def distribute(self, device: torch.device) -> None:
        """Under a process group, run the student through DDP (its gradients averaged over the ranks); the teacher
        needs no wrapper, as the EMA of identical students stays identical on every rank."""
        if dist.is_initialized():
            self.student_pass = DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None)

    def losses(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor,
               teacher_temp: float) -> StepOutput:
        """The step's loss from 2B global crops [2B, 3, H, W] (crop-major), the local crops (None without) and the
        iBOT masks of the globals [2B, N]. The teacher's centres, under centering, move on by this batch."""
        # bf16 autocast on CUDA only (no grad scaler needed); the losses themselves run in fp32.
        autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                  enabled=global_crops.device.type == "cuda" and self.bf16)
        with autocast:
            t_cls, t_patch, t_cls_features = self.teacher(global_crops, masks)
        t_cls_probs, t_patch_probs = self.teacher_targets(t_cls, t_patch, teacher_temp)
        with autocast:
            s = self.student_pass(global_crops, local_crops if self.n_local else None, masks)
        s_crops = list(s["global_logits"].chunk(2))
        if self.n_local:
            s_crops += list(s["local_logits"].chunk(self.n_local))
        terms = {
            "dino": self.dino_loss(s_crops, list(t_cls_probs.chunk(2))),
            "ibot": self.ibot_loss.forward_masked(s["patch_logits"], t_patch_probs, masks),
            # Per global crop: two views of one image must not be each other's nearest neighbour (as upstream).
            "koleo": sum(self.koleo_loss(c) for c in s["global_cls"].chunk(2)),
        }
        w = self.loss_cfg
        loss = w.dino_weight * terms["dino"] + w.ibot_weight * terms["ibot"] + w.koleo_weight * terms["koleo"]
        return StepOutput(loss, terms, t_cls_probs, t_patch_probs, t_cls_features, s["global_logits"])

    @torch.no_grad()
    def teacher_targets(self, t_cls: torch.Tensor, t_patch: torch.Tensor,
                        teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher probabilities for the CLS and the masked-patch logits, by centering or Sinkhorn-Knopp
        (dinov2/loss/)."""
        if self.loss_cfg.centering == "sinkhorn_knopp":
            return (self.dino_loss.sinkhorn_knopp_teacher(t_cls, teacher_temp),
                    self.ibot_loss.sinkhorn_knopp_teacher(t_patch, teacher_temp))
        probs = (self.dino_loss.softmax_center_teacher(t_cls, teacher_temp),
                 self.ibot_loss.softmax_center_teacher(t_patch, teacher_temp))
        self.dino_loss.update_center(t_cls)  # used from the next step on (one-step lag)
        self.ibot_loss.update_center(t_patch)
        return probs

    def diagnostics(self, out: StepOutput) -> dict[str, float]:
        """The collapse diagnostics of one step (trainer.diagnostics)."""
        return step_diagnostics(out.teacher_cls_probs, out.teacher_patch_probs, out.student_global_logits,
                                self.loss_cfg.student_temp, out.teacher_cls_features,
                                self.teacher.dino_head.last_layer.weight_g)

    def clip_gradients(self) -> None:
        """Clipped per module, as DINOv2 clips per FSDP-wrapped submodule (dinov2/train/train.py); 0 means no
        clipping (as upstream's `if clip_grad:`), not a zero norm, which would erase every gradient."""
        if self.optim_cfg.clip_grad > 0:
            for module in (self.student.backbone, self.student.dino_head):
                nn.utils.clip_grad_norm_(module.parameters(), self.optim_cfg.clip_grad)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: t <- m t + (1 - m) s, over all parameters at once (dinov2/train/ssl_meta_arch.py)."""
        t_params = list(self.teacher.parameters())
        s_params = list(self.student.parameters())
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

    def param_groups(self) -> list[dict]:
        """AdamW groups keyed by (lr multiplier, wd multiplier, is last layer), as DINOv2 fuses them
        (dinov2/utils/param_groups.py): layer-wise lr decay over the backbone's depth, optim.patch_embed_lr_mult
        on the patch embedding, no weight decay on biases, norms and LayerScale gamma; the head's weight-normed
        gain is decayed like DINOv2's."""
        backbone, decay = self.student.backbone, self.optim_cfg.layerwise_decay
        groups: dict[tuple, dict] = {}
        named = [(f"backbone.{n}", n, p) for n, p in backbone.named_parameters()]
        named += [(f"dino_head.{n}", None, p) for n, p in self.student.dino_head.named_parameters()]
        for full, backbone_name, p in named:
            if not p.requires_grad:
                continue
            lr_mult = 1.0
            if backbone_name is not None:
                lr_mult = decay ** (backbone.n_blocks + 1 - layer_id(backbone_name, backbone.n_blocks))
                if backbone_name.startswith("patch_embed"):
                    lr_mult *= self.optim_cfg.patch_embed_lr_mult
            wd_mult = 0.0 if full.endswith("bias") or "norm" in full or "gamma" in full else 1.0
            is_last = "last_layer" in full
            key = (lr_mult, wd_mult, is_last)
            groups.setdefault(key, {"params": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
                                    "is_last_layer": is_last})["params"].append(p)
        return list(groups.values())


def layer_id(name: str, n_blocks: int) -> int:
    """Depth of a backbone parameter for layer-wise lr decay: embeddings and tokens 0, block i -> i + 1, the
    final norm n_blocks + 1 (dinov2/utils/param_groups.py)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token", "register_tokens")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_blocks + 1


def apply_schedules(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    """This step's lr and weight decay, times each group's multipliers (dinov2/train/train.py apply_optim_scheduler)."""
    for g in optimizer.param_groups:
        lr = values["last_layer_lr"] if g["is_last_layer"] else values["lr"]
        g["lr"] = lr * g["lr_multiplier"]
        g["weight_decay"] = values["wd"] * g["wd_multiplier"]


def load_pretrained_backbone(backbone: nn.Module, path: str) -> None:
    """Continue from a DINOv2-layout file (RAD-DINO's backbone_compatible.safetensors, a hub .pth) or a HF folder."""
    from trainer.convert import load_dinov2, load_hf

    src = load_hf(path) if Path(path).is_dir() else load_dinov2(path)
    try:
        backbone.load_state_dict(src.state_dict(), strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"model.pretrained={path} does not fit model.arch / patch_size / img_size / "
                           f"num_register_tokens of this config: {e}") from e


def load_pretrained_head(head: DINOHead, path: str) -> None:
    """A DINO head safetensors file (e.g. RAD-DINO's dino_head.safetensors; names as DINOv2's head)."""
    tensors = load_file(path)
    for prefix in ("teacher.", "student.", "module.", "dino_head."):
        tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"model.pretrained_head={path} does not fit head.* of this config: {e}") from e
