"""Shared by the baseline parity tests: importing the reference libraries, random tiny weights, inputs."""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

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
