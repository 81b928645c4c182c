"""Helpers shared by the pretrained-encoder families: offline loading, safe checkpoint reading, token grids."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from baselines.preprocess import Preprocess
from baselines.registry import Encoder, Features, WeightsMissing, sha256_files

# Set before anything imports huggingface_hub: it reads these once, at import. Loading a model must never reach
# the network; local_files_only=True on every call is the second guard.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# The OpenAI CLIP normalisation, shared by CLIP and BiomedCLIP.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def first_complete(folder: Path, layouts: tuple[tuple[str, ...], ...]) -> tuple[str, ...] | None:
    """The first file layout (tuple of names) wholly present in `folder`, or None."""
    for files in layouts:
        if all((folder / f).is_file() for f in files):
            return files
    return None


def require_layout(name: str, folder: Path, layouts: tuple[tuple[str, ...], ...], download: str) -> tuple[str, ...]:
    """The first complete file layout in `folder`; else WeightsMissing naming the folder, every accepted layout and
    the command that fetches the files on a machine with internet access."""
    found = first_complete(folder, layouts) if folder.is_dir() else None
    if found is None:
        others = " | ".join(" + ".join(files) for files in layouts[1:])
        hint = (f"Or instead: {others}. " if others else "") + f"To fetch them (with internet access): {download}"
        raise WeightsMissing(name, folder, layouts[0], hint=hint)
    return found


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a plain ``torch.save`` state dict, never unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler refuses anything that is not tensors and plain containers
        raise ValueError(f"{path}: not a plain tensor checkpoint loadable with weights_only=True ({e}). A TorchScript "
                         "or pickled-module file is not supported; use the state-dict file named in the README") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def tokens_to_grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, C] patch tokens -> [B, C, h, w]."""
    B, N, C = tokens.shape
    if N != h * w:
        raise ValueError(f"{N} patch tokens do not form a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(B, C, h, w)


def layer_indices(depth: int) -> tuple[int, ...]:
    """Four blocks spread evenly over the depth (2, 5, 8, 11 for 12 blocks): the multi-level inputs a UPerNet-style
    decoder takes from a plain ViT."""
    return tuple(sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)}))


class ModuleEncoder(Encoder):
    """An Encoder around an ``nn.Module`` (``self.model``) and a forward function returning Features."""

    def __init__(self, name: str, model: torch.nn.Module, preprocess: Preprocess, weight_files: list[Path],
                 forward: Callable[[torch.nn.Module, torch.Tensor], Features]):
        self.name = name
        self.model = model.eval()
        self.preprocess = preprocess
        self.weights_digest = sha256_files(weight_files)
        self._forward = forward
        for p in self.model.parameters():
            p.requires_grad_(False)

    def encode(self, pixels: torch.Tensor) -> Features:
        if pixels.ndim != 4 or pixels.shape[1] != self.preprocess.channels:
            raise ValueError(f"{self.name}: expected [B, {self.preprocess.channels}, H, W] pixels, "
                             f"got {tuple(pixels.shape)}")
        with torch.inference_mode():
            return self._forward(self.model, pixels)
