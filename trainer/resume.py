"""Starting or continuing a run in RUN_DIR: the --output / --resume checks, the checkpoint a run resumes from, loading
it into the freshly built model and optimiser, and trimming metrics.jsonl back to it."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.common.atomic import atomic_write_text
from harness.common.errors import DataError, UsageError
from harness.common.paths import check_writable_folder
from trainer.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, restore_state
from trainer.config import TrainConfig, config_changes
from trainer.distributed import rank_and_world
from trainer.meta_arch import SSLMetaArch

log = logging.getLogger("trainer")


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


def resume_from(model: SSLMetaArch, optimizer: torch.optim.Optimizer, start: Start, device: torch.device,
                cfg: TrainConfig) -> None:
    """Load a checkpoint into the freshly built model (weights, the losses' centres) and optimiser."""
    ckpt = start.path
    restore_state(model.modules(), {k: v.to(device) for k, v in start.tensors.items()}, ckpt)
    changes = config_changes(ckpt / "config.yaml", cfg)
    # torch's load_state_dict also restores each group's options, including our multipliers: keep this run's
    # values, so that what config.yaml says is what the optimiser does.
    fresh = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(start.optimizer_state)
    except ValueError as e:
        raise UsageError(f"cannot resume from {ckpt}: this config groups the parameters differently from the "
                         f"checkpoint's ({'; '.join(changes) or 'no key differs'}), so its AdamW state does not "
                         "fit. Restore those keys to resume, or start a new --output") from e
    for g, (lr_mult, wd_mult, is_last) in zip(optimizer.param_groups, fresh):
        g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"] = lr_mult, wd_mult, is_last
    if rank_and_world()[0] == 0:
        log.info("resumed from %s at iteration %d", ckpt, start.meta["iteration"])
        if changes:
            log.warning("resuming with settings that differ from the checkpoint's: %s. From iteration %d on, "
                        "the schedules (laid out for optim.total_iters=%d) and the parameter-group multipliers "
                        "follow the new values", "; ".join(changes), start.meta["iteration"], cfg.optim.total_iters)


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
