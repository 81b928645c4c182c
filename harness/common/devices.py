"""Which torch device to run on, for the harness and the trainer alike."""
from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``. Where CUDA is available, a
    bare ``cuda`` becomes the current CUDA device with its index, as DistributedDataParallel's ``device_ids`` needs
    (each rank has set its own with ``torch.cuda.set_device``). Where it is not, ``cuda`` is returned as asked and
    fails where it is used: a sweep planned on a login node without GPUs still submits jobs for GPU nodes."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device
