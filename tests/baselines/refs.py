"""Shared by the baseline parity tests: importing the reference libraries, random tiny weights, inputs (real
radiographs of the shared set among them, read at test time) and the check of a preprocessing against a model's own
image processor."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import pytest
import torch

from baselines.preprocess import Preprocess, preprocess_batch
from harness.common.imaging import load_radiograph

# In CI (CI=true) the reference libraries are installed and a missing one is a failure, never a silent skip.
REQUIRED = os.environ.get("CI") == "true" or os.environ.get("RADDINO_BENCH_REQUIRE_REFERENCE") == "1"


def reference(module: str) -> ModuleType:
    """Import a reference library (timm, open_clip, health_multimodal); skip locally when it cannot load (it needs
    torchvision, which does not import beside the CPU torch), fail in CI."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or torchvision's RuntimeError on a mismatched torch
        if REQUIRED:
            raise
        pytest.skip(f"reference library {module} not importable here ({type(e).__name__}: {e})")


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter and float buffer with noise, so no default init (LayerScale 1e-5, zero biases, unit
    BatchNorm statistics) can hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(noise.abs() + 0.5)
            elif t.ndim == 1 and ("norm" in name or "ln" in name or "bn" in name) and name.endswith("weight"):
                t.copy_(1.0 + 0.2 * noise)
            else:
                t.copy_(0.05 * noise)
    return model


def pixels(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert ours.dtype == torch.float32, f"{what}: dtype {ours.dtype}"
    err = (ours - ref).abs().max().item()
    assert err <= atol, f"{what}: max abs difference {err:.3g} > {atol}"


def radiographs(shared_cxr: Path) -> list[Path]:
    """Two real radiographs of the shared set, read at test time: the first portrait and the first landscape one (in
    name order), so that a centre crop is exercised along both axes."""
    from PIL import Image

    portrait = landscape = None
    for path in sorted((shared_cxr / "images").glob("*.png")):
        w, h = Image.open(path).size
        if h > w and portrait is None:
            portrait = path
        elif w > h and landscape is None:
            landscape = path
        if portrait and landscape:
            return [portrait, landscape]
    pytest.skip(f"{shared_cxr}: no portrait and landscape pair of PNG radiographs")


def preprocessed(paths: list[Path], pre: Preprocess) -> torch.Tensor:
    """The encoder input the harness makes of `paths`: decoded once by `load_radiograph`, then `preprocess_batch`."""
    return preprocess_batch([torch.from_numpy(load_radiograph(p))[None] for p in paths], pre)


def assert_preprocessing_matches(pre: Preprocess, processor, path: Path,
                                 intensity: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """`pre` through `preprocess_batch` on the radiograph at `path` against a transformers image processor built from
    the model's preprocessor_config.json values (`intensity`: the reference's own step on the 8-bit image before the
    processor, e.g. OpenCV's equalisation). Two ways of feeding the processor:

    - the decoded [0, 1] image itself (no rescale): equal within 1e-5 once clamped to the normalised image range,
      the clamp the processor's 8-bit path applies by rounding the resized image back to 8 bits (our resize clamps
      bicubic overshoot too); this checks the geometry, the kernel and the normalisation exactly;
    - the 8-bit image, as users call it: equal up to that 8-bit rounding of the resized image, on average under half
      a grey level."""
    from PIL import Image

    u8 = np.asarray(Image.open(path).convert("L"))
    ref_u8 = intensity(u8) if intensity is not None else u8
    ours = preprocessed([path], pre)
    channels = ours.shape[1]
    mean = torch.tensor(pre.mean).expand(channels).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).expand(channels).view(1, -1, 1, 1)
    grey = torch.from_numpy(ref_u8.astype(np.float32) / 255)[None].expand(channels, -1, -1).contiguous()
    ref = processor(images=grey, do_rescale=False, return_tensors="pt")["pixel_values"]
    ref = torch.minimum(torch.maximum(ref, -mean / std), (1 - mean) / std)
    assert_close(ours, ref, f"preprocessing of {path.name}")
    ref8 = processor(images=Image.fromarray(ref_u8).convert("RGB"), return_tensors="pt")["pixel_values"]
    assert ref8.shape == ours.shape
    half_level = (0.5 / 255 / std).min().item()
    assert (ours - ref8).abs().mean() < half_level, f"{path.name}: mean |ours - 8-bit processor| above half a level"


def assert_matches_model_and_backbone(enc, model: torch.nn.Module, backbone: torch.nn.Module, shared_cxr: Path,
                                      grid: tuple[int, int, int], what: str = "patch") -> None:
    """Our encoder against transformers' reference on two real radiographs: the global feature against the model's
    `pooler_output` (the final-normed CLS), the patch grid [C, h, w] and the four layers against the `*Backbone`'s
    feature maps (which drop register tokens themselves)."""
    x = preprocessed(radiographs(shared_cxr), enc.preprocess)
    with torch.no_grad():
        out = model.eval()(pixel_values=x)
        maps = backbone.eval()(pixel_values=x).feature_maps
    feats = enc.encode(x)
    assert_close(feats.global_, out.pooler_output, "global (final-normed CLS)")
    assert feats.patch.shape == (len(x), *grid)
    assert_close(feats.patch, maps[-1], what)
    for i, (got, want) in enumerate(zip(feats.layers, maps)):
        assert_close(got, want, f"layer {i}")
