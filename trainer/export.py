"""Export a run's TEACHER backbone, the model to evaluate and release (facebookresearch/dinov2 dinov2/train/train.py).

    python -m trainer.export RUN_OR_CKPT_DIR --format hf --out DIR       # Hugging Face Dinov2Model folder
    python -m trainer.export RUN_OR_CKPT_DIR --format dinov2 --out DIR   # DINOv2 backbone state dict

``hf`` writes ``config.json`` + ``model.safetensors``, loadable with ``transformers.AutoModel.from_pretrained(DIR)``
(``Dinov2WithRegistersModel`` when the model has registers). ``dinov2`` writes ``backbone_compatible.safetensors``
(the layout of RAD-DINO's file of that name; loads strictly into DINOv2's ``DinoVisionTransformer``) and
``vit_config.json``, our ViTConfig, because head count and position-embedding resampling are not in the weights.
A run directory means its latest checkpoint. The output directory is written atomically and never overwritten.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from harness.common.atomic import atomic_dir
from harness.common.errors import UsageError, add_verbose_flag, command
from harness.common.paths import check_writable_folder
from trainer.checkpoint import load_backbone, resolve_checkpoint
from trainer.convert import dinov2_state_dict, save_hf
from trainer.vit import VisionTransformer

DINOV2_WEIGHTS = "backbone_compatible.safetensors"
DINOV2_CONFIG = "vit_config.json"


def load_teacher(ckpt: str | Path) -> VisionTransformer:
    """The teacher backbone of a checkpoint or run directory, with a clear error when the path is wrong (and a
    CheckpointError naming the file when one is damaged)."""
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint or run directory")
    model, _ = load_backbone(ckpt, which="teacher")
    return model


def write_export(model: VisionTransformer, fmt: str, out: str | Path) -> Path:
    """Write `model` to the directory `out` in format ``hf`` or ``dinov2``."""
    if fmt == "hf":
        return save_hf(model, out)
    if fmt != "dinov2":
        raise ValueError(f"--format {fmt!r}: use 'hf' or 'dinov2'")
    with atomic_dir(out) as tmp:
        save_file(dinov2_state_dict(model), str(tmp / DINOV2_WEIGHTS), metadata={"format": "pt"})
        (tmp / DINOV2_CONFIG).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2) + "\n")
    return Path(out)


def interpolation_note(model: VisionTransformer) -> str | None:
    """Hugging Face resamples position embeddings by output size (antialias only with registers); say so when
    this model was trained otherwise, since features then differ away from the native grid."""
    cfg = model.cfg
    if cfg.interpolate_offset == 0.0 and cfg.interpolate_antialias == bool(cfg.num_register_tokens):
        return None
    return (f"note: this model resamples position embeddings with offset={cfg.interpolate_offset}, "
            f"antialias={cfg.interpolate_antialias}; Hugging Face's Dinov2 resamples by size. Features are identical "
            f"at {cfg.img_size}x{cfg.img_size} px (no resampling) and differ at other input sizes.")


PROG = "python -m trainer.export"
EXAMPLES = """\
examples:
  %(prog)s runs/exp1 --format hf --out exports/exp1-hf          # the run's latest checkpoint, for transformers
  %(prog)s runs/exp1/checkpoints/ckpt_0010000 --format dinov2 --out exports/exp1-dinov2
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a run directory (its latest checkpoint) or a checkpoints/ckpt_* directory")
    parser.add_argument("--format", required=True, choices=("hf", "dinov2"), dest="fmt")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    add_verbose_flag(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """The checkpoint's path and --out, before any weights are read (UsageError)."""
    if not Path(args.ckpt).exists():
        raise UsageError(f"{args.ckpt}: no such checkpoint or run directory")
    try:
        resolve_checkpoint(args.ckpt)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not an empty directory; remove it or write elsewhere")
    check_writable_folder(out, "--out")


@command
def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    check_args(args)
    model = load_teacher(args.ckpt)  # a damaged checkpoint: CheckpointError naming the file (exit 1)
    out = write_export(model, args.fmt, args.out)
    note = interpolation_note(model) if args.fmt == "hf" else None
    if note:
        print(note, file=sys.stderr)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
