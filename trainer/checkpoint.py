"""Checkpoints that do not depend on the number of processes, written atomically, and the backbone loader.

A run directory holds ``config.yaml`` and ``checkpoints/ckpt_<iteration>/`` directories, each with:

- ``model.safetensors``: every tensor of the run by dotted name: ``student.backbone.*``, ``student.dino_head.*``,
  ``teacher.*`` likewise, ``dino_loss.center``, ``ibot_loss.center``. Full (unsharded) state dicts, unlike
  DINOv2's per-rank FSDP files that need the same world size to resume
  (facebookresearch/dinov2 dinov2/fsdp/__init__.py).
- ``optimizer.pt``: the AdamW state dict (tensors and plain numbers only, so it loads with ``weights_only=True``).
- ``state.json``: iteration, samples consumed by the sample stream, seed. Random numbers are re-seeded every step
  from (seed, iteration, rank), so these three numbers fix every random draw that follows.
- ``config.yaml``: a copy of the run's resolved config, so a checkpoint directory is self-contained.

A checkpoint is written into a temporary directory beside its final name and renamed into place, so a crash (or
SIGKILL) never leaves a half-written checkpoint where ``--resume auto`` would find it. Only the last K are kept.

A checkpoint damaged afterwards (a truncated copy, a full disk on a file system that lies about renames) is a
`CheckpointError` naming the file: every reader here checks what it reads. `check_checkpoint` does so cheaply
(the headers, not the tensors), to find the newest intact checkpoint of a run.
"""
from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from harness.common.atomic import atomic_dir
from harness.common.errors import DataError, first_line
from trainer.config import ModelConfig, TrainConfig, config_from_dict, save_config


class CheckpointError(DataError):
    """A checkpoint's file is missing, cannot be read, or does not fit the others; the message names it."""


CKPT_RE = re.compile(r"^ckpt_(\d{7,})$")


def build_backbone(model: ModelConfig) -> nn.Module:
    """The VisionTransformer a ModelConfig describes (used for training and for reloading)."""
    from trainer.vit import build_vit

    overrides: dict[str, Any] = {
        "img_size": model.img_size, "patch_size": model.patch_size, "num_register_tokens": model.num_register_tokens,
        "layerscale_init": model.layerscale_init, "drop_path_rate": model.drop_path_rate,
        "interpolate_offset": model.interpolate_offset, "interpolate_antialias": model.interpolate_antialias,
    }
    if model.depth is not None:
        overrides["depth"] = model.depth
    return build_vit(model.arch, **overrides)


def flat_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """{"student.backbone": module, ...} -> {"student.backbone.blocks.0...": cpu tensor, ...}."""
    out = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            out[f"{prefix}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return out


def restore_state(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Load each module's part of a flat state dict strictly; a missing or extra key names the checkpoint."""
    used = set()
    for prefix, module in modules.items():
        part = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        used.update(f"{prefix}.{k}" for k in part)
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"{where}: {prefix} does not match this run's model: {e}") from e
    extra = sorted(set(tensors) - used)
    if extra:
        raise RuntimeError(f"{where}: unexpected tensors {extra[:5]} (was it written by another model?)")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], optimizer_state: dict, state: dict,
                    cfg: TrainConfig, keep_last: int) -> Path:
    """Write ``checkpoints/ckpt_<state['iteration']>`` atomically, then drop all but the last ``keep_last``."""
    final = Path(run_dir) / "checkpoints" / f"ckpt_{state['iteration']:07d}"
    # replace: re-saving the same iteration (e.g. preempted right after a periodic save) supersedes it.
    with atomic_dir(final, replace=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        save_config(cfg, tmp / "config.yaml")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def load_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, optimizer state, state.json) of one checkpoint directory, every file read and checked
    (CheckpointError naming the first one that is not right)."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    read_config(ckpt_dir)
    tensors = _read(ckpt_dir / "model.safetensors", lambda p: load_file(str(p)))
    optimizer_state = _read(ckpt_dir / "optimizer.pt",
                            lambda p: torch.load(p, map_location="cpu", weights_only=True))
    if not isinstance(optimizer_state, dict) or not {"state", "param_groups"} <= set(optimizer_state):
        raise CheckpointError(f"{ckpt_dir / 'optimizer.pt'} holds no optimizer state dict")
    return tensors, optimizer_state, state


def check_checkpoint(ckpt_dir: Path) -> None:
    """CheckpointError naming the first damaged file of a checkpoint; cheap: state.json and config.yaml are parsed,
    but of the weights and the optimizer state only the headers that a truncated file loses are read (the
    safetensors header with its length, the zip directory at the end of optimizer.pt)."""
    ckpt_dir = Path(ckpt_dir)
    read_state(ckpt_dir)
    read_config(ckpt_dir)

    def safetensors_header(path: Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            f.keys()

    _read(ckpt_dir / "model.safetensors", safetensors_header)
    _read(ckpt_dir / "optimizer.pt", lambda p: zipfile.ZipFile(p).close())


def read_state(ckpt_dir: Path) -> dict:
    """state.json, with its iteration and sample count, and the iteration its directory's name says."""
    path = Path(ckpt_dir) / "state.json"
    state = _read(path, lambda p: json.loads(p.read_text()))
    if not (isinstance(state, dict) and isinstance(state.get("iteration"), int)
            and isinstance(state.get("samples_seen"), int)):
        raise CheckpointError(f"{path} is damaged: it has no 'iteration' and 'samples_seen' integers")
    named = CKPT_RE.match(Path(ckpt_dir).name)
    if named and int(named.group(1)) != state["iteration"]:
        raise CheckpointError(f"{path} is damaged: it says iteration {state['iteration']} in a directory named for "
                              f"iteration {int(named.group(1))}")
    return state


def read_config(ckpt_dir: Path) -> TrainConfig:
    """The config.yaml of a checkpoint, as a TrainConfig."""
    path = Path(ckpt_dir) / "config.yaml"
    raw = _read(path, lambda p: yaml.safe_load(p.read_text()))
    if not isinstance(raw, dict):  # an empty file would otherwise be read as the recipe (rad-dino)
        raise CheckpointError(f"{path} is damaged: not a training config (no mapping in it)")
    try:
        return config_from_dict(raw)
    except ValueError as e:
        raise CheckpointError(f"{path} is damaged: not a training config ({e})") from None


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    """`reader(path)`, any failure of it a CheckpointError naming the file: whatever a damaged file makes a parser
    raise (SafetensorError, a zip error, JSONDecodeError, ...) means the same thing to the caller."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return reader(path)
    except Exception as e:
        raise CheckpointError(f"{path} is damaged or unreadable ({type(e).__name__}: {first_line(e)})") from e


def newest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run that `check_checkpoint` passes."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            check_checkpoint(ckpt)
        except CheckpointError:
            continue
        return ckpt
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint directory (with state.json) nor a run directory "
                                "with checkpoints/ckpt_*")
    return latest


def load_backbone(path: str | Path, which: str = "teacher") -> tuple[nn.Module, dict]:
    """The student or teacher backbone of a checkpoint (or of a run's latest one), in eval mode, and its config.

    The teacher is the model to evaluate and export, as DINOv2 evaluates its teacher (dinov2/train/train.py). A
    damaged file is a CheckpointError naming it and, for a run directory, the newest intact checkpoint to use.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}: use 'teacher' or 'student'")
    ckpt = resolve_checkpoint(path)
    try:
        cfg = read_config(ckpt)
        tensors = _read(ckpt / "model.safetensors", lambda p: load_file(str(p)))
    except CheckpointError as e:
        intact = newest_intact(Path(path)) if ckpt != Path(path) else None  # `path` named a run: its latest
        if intact is None or intact == ckpt:
            raise
        raise CheckpointError(f"{e}; the newest intact checkpoint of {path} is {intact}: give that directory "
                              "instead") from e
    backbone = build_backbone(cfg.model)
    prefix = f"{which}.backbone."
    tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        backbone.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: {which} backbone does not match its config.yaml: {e}") from e
    return backbone.eval(), cfg.to_dict()
