"""DINOv2 + iBOT + KoLeo pretraining (the RAD-DINO recipe), readable top to bottom.

    python -m trainer.train --config small --data /path/to/images --output runs/small eval.task=csv:labels.csv
    torchrun --nproc_per_node 4 -m trainer.train --config rad-dino --data train.csv --output runs/rd --resume auto

The loop and the command line (as facebookresearch/dinov2 ``dinov2/train/train.py``); the objective, what one step
computes, is trainer.meta_arch.SSLMetaArch. One step:
  1. load this rank's batch, make 2 global + n local crops on the device, sample iBOT masks for the globals;
  2. the objective's loss: teacher targets, one packed student pass, DINO + iBOT + KoLeo with their weights;
     a non-finite loss stops the run;
  3. clip gradients, AdamW with scheduled lr / wd per parameter group, then the EMA teacher update.
Everything random in a step is seeded from (seed, iteration, rank), so a resumed run repeats an uninterrupted one.
Before the first step every input is checked, and nothing is written or built until the checks pass.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from harness.common.devices import check_here, pick_device
from harness.common.errors import EXIT_INTERRUPTED, UsageError, add_verbose_flag, command
from trainer.checkpoint import flat_state, latest_checkpoint, save_checkpoint
from trainer.config import TrainConfig, load_config, save_config, to_yaml
from trainer.crops import MultiCropAugmentation
from trainer.data import RankBatches, SampleStream, make_loader
from trainer.diagnostics import CollapseMonitor
from trainer.distributed import all_mean, rank_and_world, setup_distributed, step_seed
from trainer.masking import sample_masks
from trainer.meta_arch import SSLMetaArch, apply_schedules
from trainer.meter import Meter, log_to_file, setup_logging
from trainer.resume import Start, check_output, checkpoint_to_resume, resume_from, truncate_metrics
from trainer.schedules import Schedules
from trainer.signals import StopSignal

if TYPE_CHECKING:  # the probe pulls in the harness, which only runs with eval.task set
    from trainer.monitor import InTrainingProbe

log = logging.getLogger("trainer")


@dataclass
class TrainState:
    model: SSLMetaArch
    optimizer: torch.optim.Optimizer
    iteration: int = 0      # completed iterations
    samples_seen: int = 0   # positions of the sample stream consumed by all ranks together
    stopped_by: str | None = None


def train(cfg: TrainConfig, output: str | Path, resume: str | None = None) -> TrainState:
    """Run (or continue) pretraining; returns the final state. Joins no process group itself (see main).

    Everything the run needs is checked before its folder is made or any model is built: --output and --resume,
    the device, the data, the probe task (UsageError) and the checkpoint to resume from (a damaged one is skipped
    for the newest intact one, with a warning). A run that fails these checks leaves nothing behind.
    """
    output = Path(output)
    device, stream, probe, start = prepare(cfg, output, resume)
    state = build_state(cfg, output, device, start)
    Loop(state, cfg, output, device, stream, probe).run()
    return state


def prepare(cfg: TrainConfig, output: Path, resume: str | None) -> tuple[torch.device, SampleStream,
                                                                          InTrainingProbe | None, Start | None]:
    """The checks of `train`, in order; then the run's folder and its train.log (rank 0)."""
    rank, _ = rank_and_world()
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
    return device, stream, probe, start


def build_state(cfg: TrainConfig, output: Path, device: torch.device, start: Start | None) -> TrainState:
    """The objective and its optimiser, fresh or from ``start``; rank 0 writes config.yaml and RUN/init."""
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = SSLMetaArch(cfg).to(device)
    optimizer = torch.optim.AdamW(model.param_groups(), betas=cfg.optim.adamw_betas, foreach=True)
    state = TrainState(model, optimizer)
    if start is not None:
        resume_from(model, optimizer, start, device, cfg)
        state.iteration, state.samples_seen = start.meta["iteration"], start.meta["samples_seen"]
    if rank_and_world()[0] == 0:
        truncate_metrics(output / "metrics.jsonl", state.iteration if start is not None else None)
        save_config(cfg, output / "config.yaml")
        if cfg.run.save_initial and state.iteration == 0:
            save_initial(state, output, cfg)
    return state


@dataclass
class StepResult:
    """What the loop records of one step."""
    values: dict[str, float]                # the schedules' values (lr, wd, momentum, ...)
    logged: torch.Tensor                    # total, dino, ibot, koleo, averaged over the ranks
    n_bad: int                              # unreadable images replaced in this batch (--skip-bad)
    diagnostics: dict[str, float] | None    # on the logged steps: the collapse diagnostics


class Loop:
    """The steps from ``state.iteration`` to optim.total_iters; a signal or a collapse stops them early, after a
    checkpoint."""

    def __init__(self, state: TrainState, cfg: TrainConfig, output: Path, device: torch.device,
                 stream: SampleStream, probe: InTrainingProbe | None):
        self.state, self.cfg, self.output, self.device, self.stream, self.probe = state, cfg, output, device, \
            stream, probe
        self.rank, self.world = rank_and_world()
        self.sched = Schedules.from_config(cfg.optim, peak_lr=cfg.optim.scaled_lr(self.world))
        c = cfg.crops
        self.augment = MultiCropAugmentation(c.global_size, c.local_size, c.n_local, global_scale=c.global_scale,
                                             local_scale=c.local_scale, mean=c.mean, std=c.std,
                                             global1_blur_p=c.blur_p[0], global2_blur_p=c.blur_p[1],
                                             local_blur_p=c.blur_p[2])
        self.grid = (c.global_size // cfg.model.patch_size,) * 2
        state.model.distribute(device)
        images_per_step = cfg.optim.batch_size_per_gpu * self.world
        if self.rank == 0:
            log.info("%d images, world size %d, %d images per step, %d iterations from %d, peak lr %.3g",
                     len(stream), self.world, images_per_step, cfg.optim.total_iters, state.iteration,
                     self.sched.lr.max())
        self.meter = Meter(output if self.rank == 0 else None, device, images_per_step)
        self.monitor = CollapseMonitor(cfg.run.collapse_window, cfg.run.collapse_margin)

    def run(self) -> None:
        state, cfg = self.state, self.cfg
        if self.probe is not None and state.iteration == 0:
            self.meter.probe(self.probe(state.model.teacher.backbone, 0))
        loader = make_loader(self.stream, cfg.optim.batch_size_per_gpu, cfg.data.load_size or cfg.crops.global_size,
                             self.rank, self.world, state.samples_seen, cfg.data.skip_bad, cfg.data.num_workers,
                             self.device.type == "cuda", cfg.data.cache_images)
        # Closed however the loop ends: loader workers outlive an exception otherwise, and the process never exits.
        with StopSignal() as stop, contextlib.closing(loader):
            while state.iteration < cfg.optim.total_iters:
                if self.after_step(stop, self.step(loader)):
                    break

    def step(self, loader: Iterator[dict]) -> StepResult:
        """One optimisation step on this rank's next batch. A non-finite loss stops the run before the step is
        taken."""
        cfg, model, optimizer = self.cfg, self.state.model, self.state.optimizer
        it = self.state.iteration
        seed = step_seed(cfg.run.seed, it, self.rank)
        torch.manual_seed(seed)  # drop-path draws
        gen = torch.Generator(self.device).manual_seed(seed)
        values = self.sched.at(it)
        batch = next(loader)
        global_crops, local_crops = self.augment(batch["images"].to(self.device, non_blocking=True), gen)
        masks = sample_masks(global_crops.shape[0], self.grid, cfg.loss.mask_ratio_min_max,
                             cfg.loss.mask_sample_probability, generator=gen).to(self.device)
        out = model.losses(global_crops, local_crops, masks, values["teacher_temp"])
        logged = all_mean(torch.stack([out.loss.detach(), *(t.detach() for t in out.terms.values())]).float())
        log_now = (it + 1) % cfg.run.log_every == 0 or it == 0
        diagnostics = model.diagnostics(out) if log_now else None
        if not torch.isfinite(logged).all():  # the same verdict on every rank: `logged` is all-reduced
            last = latest_checkpoint(self.output)
            raise FloatingPointError(
                f"non-finite loss at iteration {it + 1} (total, dino, ibot, koleo = {logged.tolist()}); "
                f"stopping without a step. Last good checkpoint: {last or 'none'} (resume with --resume auto "
                "after lowering optim.base_lr, raising optim.warmup_iters, or checking the data)")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        model.clip_gradients()
        apply_schedules(optimizer, values)
        optimizer.step()
        model.update_teacher(values["momentum"])
        return StepResult(values, logged, batch["n_bad"], diagnostics)

    def after_step(self, stop: StopSignal, done: StepResult) -> bool:
        """Count the step, log it, watch for collapse, probe and checkpoint when due; True when the run stops."""
        state, cfg, total = self.state, self.cfg, self.cfg.optim.total_iters
        state.iteration += 1
        state.samples_seen += cfg.optim.batch_size_per_gpu * self.world
        self.meter.record(state.iteration, total, done.logged, done.n_bad, done.values, done.diagnostics)
        collapsed = watch_collapse(self.monitor, state.iteration, done.diagnostics, cfg, self.device) \
            if done.diagnostics else False
        stopping = stop.agreed(self.device) or collapsed
        if self.probe is not None and (stopping or state.iteration == total
                                       or (cfg.eval.every and state.iteration % cfg.eval.every == 0)):
            self.meter.probe(self.probe(state.model.teacher.backbone, state.iteration))
        if stopping or state.iteration % cfg.run.checkpoint_every == 0 or state.iteration == total:
            save(state, self.output, cfg)
        if stopping:
            state.stopped_by = "collapse" if collapsed else stop.name()
            if self.rank == 0:
                log.info("stopped by %s at iteration %d after writing a checkpoint; rerun with --resume auto",
                         state.stopped_by, state.iteration)
        return stopping


def save(state: TrainState, output: Path, cfg: TrainConfig) -> Path | None:
    """Rank 0 writes (the state is identical on every rank); the others wait so nobody races ahead."""
    rank, _ = rank_and_world()
    path = None
    if rank == 0:
        meta = {"iteration": state.iteration, "samples_seen": state.samples_seen, "seed": cfg.run.seed}
        path = save_checkpoint(output, flat_state(state.model.modules()), state.optimizer.state_dict(), meta, cfg,
                               cfg.run.keep_last)
        log.info("checkpoint %s", path)
    if dist.is_initialized():
        dist.barrier()
    return path


def save_initial(state: TrainState, output: Path, cfg: TrainConfig) -> None:
    """The weights before the first step, as a checkpoint of its own (RUN/init), outside the rotation of
    ``run.keep_last``: "did it learn?" is answered by ``--models ckpt:RUN/init,ckpt:RUN``."""
    meta = {"iteration": 0, "samples_seen": 0, "seed": cfg.run.seed}
    path = save_checkpoint(output / "init", flat_state(state.model.modules()), state.optimizer.state_dict(), meta,
                           cfg, keep_last=1)
    log.info("initial weights saved to %s (compare a run with them: --models ckpt:%s,ckpt:%s)", path,
             output / "init", output)


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
