"""DINOv2 + iBOT + KoLeo pretraining (the RAD-DINO recipe), readable top to bottom.

    python -m trainer.train --config small --data /path/to/images --output runs/small eval.task=csv:labels.csv
    torchrun --nproc_per_node 4 -m trainer.train --config rad-dino --data train.csv --output runs/rd --resume auto

One step (as facebookresearch/dinov2 ``dinov2/train/ssl_meta_arch.py`` forward_backward and ``dinov2/train/train.py``):
  1. load this rank's batch, make 2 global + n local crops on the device, sample iBOT masks for the globals;
  2. teacher (EMA, no grad) sees the unmasked globals -> CLS and masked-patch targets (centering or Sinkhorn-Knopp);
  3. student sees masked globals + locals in ONE packed pass (vit.forward_features_list) and ONE head call;
  4. loss = dino_w * DINO + ibot_w * iBOT + koleo_w * sum_g KoLeo; a non-finite loss stops the run;
  5. clip gradients, AdamW with scheduled lr / wd per parameter group, then the EMA teacher update.
Everything random in a step is seeded from (seed, iteration, rank), so a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import logging.handlers
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harness.common.atomic import atomic_write_text
from harness.common.devices import check_here, pick_device
from harness.common.errors import EXIT_INTERRUPTED, DataError, UsageError, add_verbose_flag, command
from harness.common.paths import check_writable_folder
from trainer.checkpoint import (
    CheckpointError,
    build_backbone,
    flat_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_state,
    save_checkpoint,
)
from trainer.config import TrainConfig, load_config, save_config, to_yaml
from trainer.crops import MultiCropAugmentation
from trainer.data import RankBatches, SampleStream, make_loader
from trainer.diagnostics import CollapseMonitor, step_diagnostics
from trainer.heads import DINOHead
from trainer.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from trainer.masking import sample_masks
from trainer.schedules import Schedules

if TYPE_CHECKING:  # the probe pulls in the harness, which only runs with eval.task set
    from trainer.monitor import InTrainingProbe

log = logging.getLogger("trainer")


# ----------------------------------------------------------------------------------------------------------------
# Models


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


def build_models(cfg: TrainConfig) -> tuple[Student, Teacher]:
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
    student = Student(backbone, head)
    teacher = Teacher(copy.deepcopy(backbone), copy.deepcopy(head))
    teacher.requires_grad_(False)
    return student, teacher.eval()  # the teacher never trains: no drop-path, no gradients (as upstream)


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


# ----------------------------------------------------------------------------------------------------------------
# Optimiser


def layer_id(name: str, n_blocks: int) -> int:
    """Depth of a backbone parameter for layer-wise lr decay: embeddings and tokens 0, block i -> i + 1, the
    final norm n_blocks + 1 (dinov2/utils/param_groups.py)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token", "register_tokens")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_blocks + 1


def param_groups(student: Student, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """AdamW groups keyed by (lr multiplier, wd multiplier, is last layer), as DINOv2 fuses them
    (dinov2/utils/param_groups.py).

    No weight decay on biases, norms and LayerScale gamma; the head's weight-normed gain is decayed like DINOv2's.
    """
    n_blocks = student.backbone.n_blocks
    groups: dict[tuple, dict] = {}
    named = [(f"backbone.{n}", n, p) for n, p in student.backbone.named_parameters()]
    named += [(f"dino_head.{n}", None, p) for n, p in student.dino_head.named_parameters()]
    for full, backbone_name, p in named:
        if not p.requires_grad:
            continue
        lr_mult = 1.0
        if backbone_name is not None:
            lr_mult = layerwise_decay ** (n_blocks + 1 - layer_id(backbone_name, n_blocks))
            if backbone_name.startswith("patch_embed"):
                lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if full.endswith("bias") or "norm" in full or "gamma" in full else 1.0
        is_last = "last_layer" in full
        key = (lr_mult, wd_mult, is_last)
        groups.setdefault(key, {"params": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
                                "is_last_layer": is_last})["params"].append(p)
    return list(groups.values())


def apply_schedules(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    """This step's lr and weight decay, times each group's multipliers (dinov2/train/train.py apply_optim_scheduler)."""
    for g in optimizer.param_groups:
        lr = values["last_layer_lr"] if g["is_last_layer"] else values["lr"]
        g["lr"] = lr * g["lr_multiplier"]
        g["weight_decay"] = values["wd"] * g["wd_multiplier"]


@torch.no_grad()
def update_teacher(teacher: Teacher, student: Student, momentum: float) -> None:
    """EMA: t <- m t + (1 - m) s, over all parameters at once (dinov2/train/ssl_meta_arch.py)."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


# ----------------------------------------------------------------------------------------------------------------
# Distributed set-up and helpers


def setup_distributed() -> None:
    """Join the process group when launched by torchrun or SLURM (gloo on CPU, nccl on GPU); no-op otherwise."""
    if dist.is_initialized():
        return
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise RuntimeError("SLURM multi-task run without MASTER_ADDR/MASTER_PORT: export them in the job script "
                               "(or launch with torchrun / submitit, which set them)")
    if int(env.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def step_seed(seed: int, it: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, it, rank]).generate_state(1)[0])


def memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak, or on CPU the process's peak resident set (ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process, all its threads, and its live child processes
    (the data loader's workers, which ``RUSAGE_CHILDREN`` counts only once they exit). Children are found through
    Linux's /proc; elsewhere only this process and its finished children are counted."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:  # fields 14 and 15 of /proc/PID/stat: utime, stime in clock ticks (after the ")" of the name)
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, ValueError, IndexError):  # the worker exited between the listing and the read
                continue
    return total


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption, scancel) and SIGINT (Ctrl-C) ask the loop to checkpoint and leave after
    this step. A second SIGINT stops at once, without a checkpoint, as an impatient Ctrl-C expects."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, device: torch.device) -> bool:
        """All ranks stop at the same step if any of them got a signal."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainState:
    student: Student
    teacher: Teacher
    optimizer: torch.optim.Optimizer
    dino_loss: DINOLoss
    ibot_loss: iBOTPatchLoss
    iteration: int = 0      # completed iterations
    samples_seen: int = 0   # positions of the sample stream consumed by all ranks together
    stopped_by: str | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"student.backbone": self.student.backbone, "student.dino_head": self.student.dino_head,
                "teacher.backbone": self.teacher.backbone, "teacher.dino_head": self.teacher.dino_head,
                "dino_loss": self.dino_loss, "ibot_loss": self.ibot_loss}


def save(state: TrainState, output: Path, cfg: TrainConfig) -> Path | None:
    """Rank 0 writes (the state is identical on every rank); the others wait so nobody races ahead."""
    rank, _ = rank_and_world()
    path = None
    if rank == 0:
        meta = {"iteration": state.iteration, "samples_seen": state.samples_seen, "seed": cfg.run.seed}
        path = save_checkpoint(output, flat_state(state.modules()), state.optimizer.state_dict(), meta, cfg,
                               cfg.run.keep_last)
        log.info("checkpoint %s", path)
    if dist.is_initialized():
        dist.barrier()
    return path


def save_initial(state: TrainState, output: Path, cfg: TrainConfig) -> None:
    """The weights before the first step, as a checkpoint of its own (RUN/init), outside the rotation of
    ``run.keep_last``: "did it learn?" is answered by ``--models ckpt:RUN/init,ckpt:RUN``."""
    meta = {"iteration": 0, "samples_seen": 0, "seed": cfg.run.seed}
    path = save_checkpoint(output / "init", flat_state(state.modules()), state.optimizer.state_dict(), meta, cfg,
                           keep_last=1)
    log.info("initial weights saved to %s (compare a run with them: --models ckpt:%s,ckpt:%s)", path,
             output / "init", output)


def train(cfg: TrainConfig, output: str | Path, resume: str | None = None) -> TrainState:
    """Run (or continue) pretraining; returns the final state. Joins no process group itself (see main).

    Everything the run needs is checked before its folder is made or any model is built: --output and --resume,
    the device, the data, the probe task (UsageError) and the checkpoint to resume from (a damaged one is skipped
    for the newest intact one, with a warning). A run that fails these checks leaves nothing behind.
    """
    output = Path(output)
    rank, world = rank_and_world()
    check_output(output, resume)
    try:
        device = pick_device(cfg.run.device)
    except ValueError as e:
        raise UsageError(f"run.device={cfg.run.device!r}: {e}") from None
    check_here(device, f"run.device={cfg.run.device}")
    for key, path in (("model.pretrained", cfg.model.pretrained), ("model.pretrained_head", cfg.model.pretrained_head)):
        if path is not None and not Path(path).exists():
            raise UsageError(f"{key}={path}: no such file or folder")
    if rank == 0:
        setup_logging()
    # The data and the probe task are read before any model is built, so that a wrong --data or eval.task fails in
    # seconds, not after the 65,536-prototype head and the optimiser are built.
    stream = open_data(cfg)
    probe = build_probe(cfg, stream, device) if rank == 0 and cfg.eval.task else None
    start = checkpoint_to_resume(output, resume)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        log_to_file(output)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank

    student, teacher = build_models(cfg)
    student.to(device)
    teacher.to(device)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult),
                                  betas=cfg.optim.adamw_betas, foreach=True)
    dino_loss = DINOLoss(cfg.head.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum).to(device)
    ibot_loss = iBOTPatchLoss(cfg.head.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum).to(device)
    state = TrainState(student, teacher, optimizer, dino_loss, ibot_loss)
    if start is not None:
        resume_from(state, start, device, cfg)
    if rank == 0:
        truncate_metrics(output / "metrics.jsonl", state.iteration if start is not None else None)
        save_config(cfg, output / "config.yaml")
        if cfg.run.save_initial and state.iteration == 0:
            save_initial(state, output, cfg)

    sched = Schedules.from_config(cfg.optim, peak_lr=cfg.optim.scaled_lr(world))
    batch_size = cfg.optim.batch_size_per_gpu
    augment = MultiCropAugmentation(cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local,
                                    global_scale=cfg.crops.global_scale, local_scale=cfg.crops.local_scale,
                                    mean=cfg.crops.mean, std=cfg.crops.std, global1_blur_p=cfg.crops.blur_p[0],
                                    global2_blur_p=cfg.crops.blur_p[1], local_blur_p=cfg.crops.blur_p[2])
    grid = (cfg.crops.global_size // cfg.model.patch_size,) * 2
    koleo = KoLeoLoss()
    ddp_student = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.is_initialized() else student
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.run.bf16)
    if rank == 0:
        log.info("%d images, world size %d, %d images per step, %d iterations from %d, peak lr %.3g",
                 len(stream), world, batch_size * world, cfg.optim.total_iters, state.iteration, sched.lr.max())

    meter = Meter(output if rank == 0 else None, device, batch_size * world)
    monitor = CollapseMonitor(cfg.run.collapse_window, cfg.run.collapse_margin)
    if probe is not None and state.iteration == 0:
        meter.probe(probe(teacher.backbone, 0))
    loader = make_loader(stream, batch_size, cfg.data.load_size or cfg.crops.global_size, rank, world,
                         state.samples_seen, cfg.data.skip_bad, cfg.data.num_workers, device.type == "cuda",
                         cfg.data.cache_images)
    # Closed however the loop ends: loader workers outlive an exception otherwise, and the process never exits.
    with StopSignal() as stop, contextlib.closing(loader):
        while state.iteration < cfg.optim.total_iters:
            it = state.iteration
            seed = step_seed(cfg.run.seed, it, rank)
            torch.manual_seed(seed)  # drop-path draws
            gen = torch.Generator(device).manual_seed(seed)
            values = sched.at(it)

            batch = next(loader)
            global_crops, local_crops = augment(batch["images"].to(device, non_blocking=True), gen)
            masks = sample_masks(global_crops.shape[0], grid, cfg.loss.mask_ratio_min_max,
                                 cfg.loss.mask_sample_probability, generator=gen).to(device)
            with autocast:
                t_cls, t_patch, t_cls_features = teacher(global_crops, masks)
            t_cls_probs, t_patch_probs = teacher_targets(cfg, dino_loss, ibot_loss, t_cls, t_patch,
                                                         values["teacher_temp"])
            with autocast:
                s = ddp_student(global_crops, local_crops if cfg.crops.n_local else None, masks)
            terms = student_losses(cfg, dino_loss, ibot_loss, koleo, s, t_cls_probs, t_patch_probs, masks)
            loss = (cfg.loss.dino_weight * terms["dino"] + cfg.loss.ibot_weight * terms["ibot"]
                    + cfg.loss.koleo_weight * terms["koleo"])
            logged = all_mean(torch.stack([loss.detach(), *(t.detach() for t in terms.values())]).float())
            log_now = (it + 1) % cfg.run.log_every == 0 or it == 0
            diagnostics = step_diagnostics(t_cls_probs, t_patch_probs, s["global_logits"], cfg.loss.student_temp,
                                           t_cls_features, teacher.dino_head.last_layer.weight_g) if log_now else None
            if not torch.isfinite(logged).all():  # the same verdict on every rank: `logged` is all-reduced
                last = latest_checkpoint(output)
                raise FloatingPointError(
                    f"non-finite loss at iteration {it + 1} (total, dino, ibot, koleo = {logged.tolist()}); "
                    f"stopping without a step. Last good checkpoint: {last or 'none'} (resume with --resume auto "
                    "after lowering optim.base_lr, raising optim.warmup_iters, or checking the data)")

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Clipped per module, as DINOv2 clips per FSDP-wrapped submodule (dinov2/train/train.py); 0 means no
            # clipping (as upstream's `if clip_grad:`), not a zero norm, which would erase every gradient.
            if cfg.optim.clip_grad > 0:
                for module in (student.backbone, student.dino_head):
                    nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
            apply_schedules(optimizer, values)
            optimizer.step()
            update_teacher(teacher, student, values["momentum"])

            state.iteration += 1
            state.samples_seen += batch_size * world
            meter.record(state.iteration, cfg.optim.total_iters, logged, batch["n_bad"], values, diagnostics)
            collapsed = watch_collapse(monitor, state.iteration, diagnostics, cfg, device) if diagnostics else False
            stopping = stop.agreed(device) or collapsed
            if probe is not None and (stopping or state.iteration == cfg.optim.total_iters
                                      or (cfg.eval.every and state.iteration % cfg.eval.every == 0)):
                meter.probe(probe(teacher.backbone, state.iteration))
            if stopping or state.iteration % cfg.run.checkpoint_every == 0 \
                    or state.iteration == cfg.optim.total_iters:
                save(state, output, cfg)
            if stopping:
                state.stopped_by = ("collapse" if collapsed else signal.Signals(stop.received).name
                                    if stop.received else "a signal on another rank")
                if rank == 0:
                    log.info("stopped by %s at iteration %d after writing a checkpoint; rerun with --resume auto",
                             state.stopped_by, state.iteration)
                break
    return state


def open_data(cfg: TrainConfig) -> SampleStream:
    """The sample stream of cfg.data.sources: a --data that names no manifest, a missing one, one without images
    or one listing missing files is a UsageError naming the manifest and the fix, before any model is built. The
    first sample is decoded too, as the loader will (BadImageError): a folder of files that are no images at all
    fails here, not after the models are built."""
    try:
        stream = SampleStream(cfg.data.sources, cfg.run.seed, cfg.data.skip_bad)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
    RankBatches(stream, 1, cfg.data.load_size or cfg.crops.global_size, 0, 1, 0, cfg.data.skip_bad).load_position(0)
    return stream


def build_probe(cfg: TrainConfig, stream: SampleStream, device: torch.device) -> "InTrainingProbe":
    """The in-training probe of eval.task (trainer.monitor), warning when the pretraining images include the task's
    test images; the harness's own errors for a bad task."""
    from trainer.monitor import InTrainingProbe, load_probe_data, test_overlap

    log.info("in-training probe: reading task %s", cfg.eval.task)
    try:
        data = load_probe_data(cfg.eval.task, cfg.to_dict(), cfg.eval.data_root, cfg.eval.seed,
                               cfg.eval.test_fraction, cfg.eval.val_fraction)
    except (ValueError, OSError) as e:  # the harness's TaskError is a ValueError naming the file and the fix
        raise UsageError(f"eval.task={cfg.eval.task!r}: {e}") from e
    log.info("in-training probe: %s, validation split of its training patients: %d images (%d fit / %d scored), "
             "pools %s, every %s iterations", data.name, len(data.split), (data.split == "train").sum(),
             (data.split == "val").sum(), ",".join(cfg.eval.pools), cfg.eval.every or "(start and end only)")
    overlap = test_overlap(data, stream.paths)
    if overlap:
        log.warning("in-training probe: %d pretraining image(s) are byte-identical to test-split images of %s; "
                    "numbers harness.run reports on that split will be optimistic. Pretrain on the training "
                    "patients only (docs/pretraining.md#pretrain-on-the-training-patients-only)", overlap, data.name)
    return InTrainingProbe(data, cfg.eval.seed, device, tuple(cfg.eval.pools))


@torch.no_grad()
def teacher_targets(cfg: TrainConfig, dino_loss: DINOLoss, ibot_loss: iBOTPatchLoss, t_cls: torch.Tensor,
                    t_patch: torch.Tensor, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher probabilities for the CLS and the masked-patch logits, by centering or Sinkhorn-Knopp (dinov2/loss/)."""
    if cfg.loss.centering == "sinkhorn_knopp":
        return (dino_loss.sinkhorn_knopp_teacher(t_cls, teacher_temp),
                ibot_loss.sinkhorn_knopp_teacher(t_patch, teacher_temp))
    probs = dino_loss.softmax_center_teacher(t_cls, teacher_temp), ibot_loss.softmax_center_teacher(t_patch,
                                                                                                    teacher_temp)
    dino_loss.update_center(t_cls)  # used from the next step on (one-step lag)
    ibot_loss.update_center(t_patch)
    return probs


def student_losses(cfg: TrainConfig, dino_loss: DINOLoss, ibot_loss: iBOTPatchLoss, koleo: KoLeoLoss, s: dict,
                   t_cls_probs: torch.Tensor, t_patch_probs: torch.Tensor, masks: torch.Tensor) -> dict:
    """The three unweighted loss terms of one step."""
    s_crops = list(s["global_logits"].chunk(2))
    if cfg.crops.n_local:
        s_crops += list(s["local_logits"].chunk(cfg.crops.n_local))
    return {
        "dino": dino_loss(s_crops, list(t_cls_probs.chunk(2))),
        "ibot": ibot_loss.forward_masked(s["patch_logits"], t_patch_probs, masks),
        # Per global crop: two views of one image must not be each other's nearest neighbour (as upstream).
        "koleo": sum(koleo(c) for c in s["global_cls"].chunk(2)),
    }


def watch_collapse(monitor: CollapseMonitor, iteration: int, diagnostics: dict[str, float],
                   cfg: TrainConfig, device: torch.device) -> bool:
    """Warn (once per kind of collapse) when the targets have been degenerate for a whole window; True when the
    run was asked to stop on collapse (run.stop_on_collapse). The verdict is rank 0's; stopping is agreed on all
    ranks because every rank sees the same all-reduced targets only approximately, so rank 0 decides for all."""
    verdict = monitor.update(iteration, diagnostics)
    # On the training device: NCCL broadcasts CUDA tensors only.
    collapse = torch.tensor([1.0 if verdict is not None and cfg.run.stop_on_collapse else 0.0], device=device)
    if verdict is not None and monitor.reported != verdict.kind:
        monitor.reported = verdict.kind
        if rank_and_world()[0] == 0:
            log.warning("WARNING %s%s", verdict.message(),
                        " Stopping (run.stop_on_collapse=true)." if cfg.run.stop_on_collapse else
                        " The run goes on; set run.stop_on_collapse=true to stop such runs.")
    if dist.is_initialized():
        dist.broadcast(collapse, src=0)
    return bool(collapse.item())


def check_output(output: Path, resume: str | None) -> None:
    """--output and --resume, before anything is written: a folder that can be written, not a finished (or any)
    run's unless resuming it, and a --resume DIR that is a checkpoint directory (UsageError)."""
    check_writable_folder(output, "--output")
    if resume is None and list_checkpoints(output):
        raise UsageError(f"--output {output} already has checkpoints: pass --resume auto to continue that run, "
                         "or choose another --output")
    if resume not in (None, "auto"):
        where = Path(resume)
        if not where.is_dir():
            raise UsageError(f"--resume {resume}: no such directory; give auto (the latest checkpoint of --output) "
                             "or a RUN/checkpoints/ckpt_* directory")
        if not (where / "state.json").is_file():
            raise UsageError(f"--resume {resume}: not a checkpoint directory (no state.json); give auto or a "
                             "RUN/checkpoints/ckpt_* directory")


@dataclass
class Start:
    """The checkpoint a run resumes from, read (and checked) before any model is built."""
    path: Path
    tensors: dict[str, torch.Tensor]
    optimizer_state: dict
    meta: dict


def checkpoint_to_resume(output: Path, resume: str | None) -> Start | None:
    """``resume``: None (a fresh run), "auto" (the newest intact checkpoint of ``output``, if any) or a directory.

    Under "auto" a damaged checkpoint is skipped with a warning naming its file, and the newest intact one is used
    (that is what a requeued job needs); when all are damaged the run stops naming them. A damaged directory
    given by name is an error (CheckpointError), naming the file and pointing at "auto"."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        try:
            return Start(path, *load_checkpoint(path))
        except CheckpointError as e:
            raise CheckpointError(f"--resume {resume}: {e}; pass --resume auto to resume from the newest intact "
                                  "checkpoint of --output") from e
    damaged = []
    for path in reversed(list_checkpoints(output)):
        try:
            start = Start(path, *load_checkpoint(path))
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        if damaged and rank_and_world()[0] == 0:
            log.warning("WARNING skipped %d damaged checkpoint(s): %s; resuming from the newest intact one, %s (a "
                        "damaged one is left where it is, and replaced when the run writes its iteration again)",
                        len(damaged), "; ".join(damaged), path)
        return start
    if damaged:
        raise CheckpointError(f"every checkpoint of {output} is damaged: {'; '.join(damaged)}. Start the run again "
                              f"with another --output, or move {output / 'checkpoints'} away")
    return None


def resume_from(state: TrainState, start: Start, device: torch.device, cfg: TrainConfig) -> None:
    """Load a checkpoint into the freshly built state (models, losses' centres, optimiser, counters)."""
    ckpt = start.path
    restore_state(state.modules(), {k: v.to(device) for k, v in start.tensors.items()}, ckpt)
    changes = config_changes(ckpt / "config.yaml", cfg)
    # torch's load_state_dict also restores each group's options, including our multipliers: keep this run's
    # values, so that what config.yaml says is what the optimiser does.
    fresh = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in state.optimizer.param_groups]
    try:
        state.optimizer.load_state_dict(start.optimizer_state)
    except ValueError as e:
        raise UsageError(f"cannot resume from {ckpt}: this config groups the parameters differently from the "
                         f"checkpoint's ({'; '.join(changes) or 'no key differs'}), so its AdamW state does not "
                         "fit. Restore those keys to resume, or start a new --output") from e
    for g, (lr_mult, wd_mult, is_last) in zip(state.optimizer.param_groups, fresh):
        g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"] = lr_mult, wd_mult, is_last
    state.iteration, state.samples_seen = start.meta["iteration"], start.meta["samples_seen"]
    if rank_and_world()[0] == 0:
        log.info("resumed from %s at iteration %d", ckpt, state.iteration)
        if changes:
            log.warning("resuming with settings that differ from the checkpoint's: %s. From iteration %d on, "
                        "the schedules (laid out for optim.total_iters=%d) and the parameter-group multipliers "
                        "follow the new values", "; ".join(changes), state.iteration, cfg.optim.total_iters)


def config_changes(saved: Path, cfg: TrainConfig) -> list[str]:
    """``key: old -> new`` for every setting of ``cfg`` that differs from a checkpoint's config.yaml."""
    if not saved.is_file():
        return []
    old = _flatten(yaml.safe_load(saved.read_text()) or {})
    new = _flatten(yaml.safe_load(to_yaml(cfg)))  # the form config.yaml holds: tuples as lists
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k != "data.sources"]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def truncate_metrics(path: Path, iteration: int | None) -> None:
    """Drop the log lines of steps after the checkpoint resumed from (a killed run logged them; the resumed run
    redoes them), or every line when the run starts afresh (``iteration`` None) over a run killed before its first
    checkpoint. A partial last line, which a killed run leaves, is dropped with a warning; a damaged line before
    it stops the run naming it."""
    if not path.exists():
        return
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((line, json.loads(line)["iteration"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if n < len(lines) or text.endswith("\n"):  # every line is written whole, its newline last
                raise DataError(f"{path}:{n}: not a metrics line ({e}); delete or repair that line, then resume "
                                "again") from None
            log.warning("%s:%d: dropped a partial last line (a killed run's): %.60r", path, n, line)
    keep = [line for line, it in rows if iteration is not None and it <= iteration]
    if iteration is None and rows:
        log.warning("%s: dropped the %d lines of an earlier run that wrote no checkpoint", path, len(rows))
    atomic_write_text(path, "".join(line + "\n" for line in keep))


class Meter:
    """Text log lines (with throughput, memory and ETA) and one JSON line per logged step (rank 0)."""

    def __init__(self, output: Path | None, device: torch.device, images_per_step: int):
        self.jsonl = output / "metrics.jsonl" if output else None
        self.device, self.images_per_step = device, images_per_step
        self.t0, self.steps, self.n_bad = time.perf_counter(), 0, 0
        self.cpu0 = cpu_seconds()

    def record(self, iteration: int, total: int, logged: torch.Tensor, n_bad: int, values: dict[str, float],
               diagnostics: dict[str, float] | None) -> None:
        """One step; a log line and a JSON line when ``diagnostics`` were computed (the logged steps)."""
        self.steps += 1
        self.n_bad += n_bad
        if self.jsonl is None or diagnostics is None:
            return
        elapsed = time.perf_counter() - self.t0
        total_loss, dino, ibot, koleo = logged.tolist()
        row = {"iteration": iteration, "loss": total_loss, "dino": dino, "ibot": ibot, "koleo": koleo,
               "lr": values["lr"], "wd": values["wd"], "momentum": values["momentum"],
               "teacher_temp": values["teacher_temp"],
               "images_per_s": self.steps * self.images_per_step / elapsed, "memory_mb": memory_mb(self.device),
               "skipped_images": self.n_bad,
               # Since the previous logged row, so the sums stay right when a resume trims the rows after its
               # checkpoint; cpu_s (this rank's process and loader workers) is the compute axis of a learning curve.
               "wall_s": elapsed, "cpu_s": cpu_seconds() - self.cpu0, **diagnostics}
        self._append(row)
        eta = elapsed / self.steps * (total - iteration)
        log.info("it %d/%d  loss %.4f (dino %.4f ibot %.4f koleo %.4f)  H(t) %.3f/%.3f patch %.3f (ln K %.3f)  "
                 "KL(t|s) %.3f  std %.4f  protos %d  lr %.3g  mom %.4f  %.1f img/s  %.0f MB  eta %s%s",
                 iteration, total, total_loss, dino, ibot, koleo, diagnostics["target_entropy_cls"],
                 diagnostics["student_entropy_cls"], diagnostics["target_entropy_patch"], diagnostics["ln_k"],
                 diagnostics["kl_teacher_student_cls"], diagnostics["teacher_feature_std"],
                 diagnostics["prototypes_used"], row["lr"], row["momentum"], row["images_per_s"], row["memory_mb"],
                 format_seconds(eta),
                 f"  skipped {self.n_bad} unreadable" if self.n_bad else "")
        self.t0, self.steps, self.cpu0 = time.perf_counter(), 0, cpu_seconds()

    def probe(self, row: dict[str, float]) -> None:
        """One in-training probe result: its own JSON line (keys probe_*) and a log line."""
        if self.jsonl is None:
            return
        self._append(row)
        shown = "  ".join(f"{k.removeprefix('probe_')} {v:.4f}" for k, v in row.items()
                          if k.startswith("probe_") and isinstance(v, float))
        log.info("probe it %d  %s", row["iteration"], shown)

    def _append(self, row: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")


def format_seconds(s: float) -> str:
    h, rem = divmod(int(s), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


LOG_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


def setup_logging() -> None:
    """Log lines to stderr, and into a buffer that `log_to_file` empties into RUN_DIR/train.log once the run's
    folder exists (it is made only when every check has passed); replaces the handlers of an earlier run in this
    process."""
    log.setLevel(logging.INFO)
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(LOG_FORMAT)
    log.addHandler(stderr)
    log.addHandler(logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1))


def log_to_file(output: Path) -> None:
    """From now on, log lines go to RUN_DIR/train.log too, starting with those logged before it existed."""
    file = logging.FileHandler(output / "train.log")
    file.setFormatter(LOG_FORMAT)
    for buffer in [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        buffer.setTarget(file)
        buffer.close()  # flushes into the file
        log.removeHandler(buffer)
    log.addHandler(file)


# ----------------------------------------------------------------------------------------------------------------
# Command line


PROG = "python -m trainer.train"
EXAMPLES = """\
examples:
  %(prog)s --config smoke --data /data/cxr/train.csv --output runs/smoke
  %(prog)s --config small --data /data/a.csv@2 --data /data/b.csv@1 --output runs/mix --steps 2000 optim.base_lr=1e-4
  %(prog)s --config rad-dino --print-config > my.yaml   # a preset as a file, to edit and pass as --config
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="a preset (small, smoke, rad-dino: trainer/configs/NAME.yaml) or a YAML file")
    p.add_argument("--data", action="append", default=[],
                   help="image manifest: folder, .txt, .csv or .parquet; PATH@WEIGHT to mix several (repeatable)")
    p.add_argument("--output", help="run directory (config.yaml, checkpoints/, metrics.jsonl); required to train")
    p.add_argument("--steps", type=int, help="number of iterations; warm-ups are rescaled to keep their share")
    p.add_argument("--resume", help="'auto' (latest checkpoint in --output, if any) or a checkpoint directory")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable images instead of stopping")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (preset, --steps, overrides, --data) as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.base_lr=1e-4 crops.n_local=4")
    add_verbose_flag(p)
    return p


def parse_args(argv: list[str] | None, prog: str = PROG) -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.output is None and not args.print_config:
        p.error("the following arguments are required: --output (or --print-config to only print the config)")
    return args


@command
def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """0: trained (or stopped by SIGTERM / SIGUSR1 with a checkpoint, for a requeue); 130: stopped by Ctrl-C, with
    a checkpoint; otherwise harness.common.errors' statuses (2: a usage error, found before anything was built)."""
    args = parse_args(argv, prog)
    try:
        cfg = load_config(args.config, args.overrides, steps=args.steps)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.data:
        cfg.data.sources = args.data
    if args.skip_bad:
        cfg.data.skip_bad = True
    if args.print_config:  # the data are not read: the config is what is asked for, e.g. to copy a preset
        print(to_yaml(cfg), end="")
        return 0
    setup_distributed()
    try:
        state = train(cfg, args.output, args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return EXIT_INTERRUPTED if state.stopped_by == "SIGINT" else 0


if __name__ == "__main__":
    sys.exit(main())
