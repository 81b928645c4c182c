"""``ckpt:DIR``: the teacher backbone of one of our own training runs, as an encoder under test.

DIR is a run directory (its latest checkpoint is used) or one ``checkpoints/ckpt_*`` directory. Features are the
`ViTEncoder`'s: global = the teacher's normed CLS token, patch = normed patch tokens as [B, D, h, w], layers =
four evenly spaced blocks. Preprocessing comes from the checkpoint's own config: its global crop size, the whole
radiograph stretched to that square (``resize_stretch``, as training saw it), its mean/std, 3 channels.
"""
from __future__ import annotations

from pathlib import Path

from baselines.floors import ViTEncoder
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, WeightsMissing
from harness.common.hashing import sha256_files

CKPT_FILES = ("model.safetensors", "config.yaml", "state.json")


def _as_tuple(value: float | list[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)


def checkpoint_preprocess(cfg: dict) -> Preprocess:
    """The input a checkpoint's backbone was trained on, from its resolved training config (a dict)."""
    crops = cfg["crops"]
    return Preprocess(size=int(crops["global_size"]), policy="resize_stretch", interpolation="bicubic",
                      mean=_as_tuple(crops["mean"]), std=_as_tuple(crops["std"]), channels=3)


def find_checkpoint(name: str, path: Path) -> Path:
    """The checkpoint directory DIR names, or WeightsMissing naming the path and what was expected there."""
    from trainer.checkpoint import latest_checkpoint

    hint = "pass a training run directory (with checkpoints/ckpt_*) or one checkpoints/ckpt_* directory"
    if not path.is_dir():
        raise WeightsMissing(name, path, CKPT_FILES, hint=f"the directory does not exist; {hint}")
    ckpt = path if (path / "state.json").is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise WeightsMissing(name, path, CKPT_FILES, hint=f"no checkpoint found there; {hint}")
    missing = [f for f in CKPT_FILES if not (ckpt / f).is_file()]
    if missing:
        raise WeightsMissing(name, ckpt, CKPT_FILES, hint=f"missing {', '.join(missing)}")
    return ckpt


def ckpt(spec: EncoderSpec) -> Encoder:
    from trainer.checkpoint import load_backbone

    given = Path(spec.arg).expanduser()
    ckpt_dir = find_checkpoint(spec.name, given)
    # From the path given, so that a damaged latest checkpoint of a run is named with the run's newest intact one.
    model, cfg = load_backbone(given, which="teacher")
    digest = sha256_files([ckpt_dir / "model.safetensors"])
    return ViTEncoder(spec.name, model, spec.apply_policy(checkpoint_preprocess(cfg)), digest)
