"""Which torch device to run on, for the harness and the trainer alike."""
from __future__ import annotations

import torch

from harness.common.errors import UsageError


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


def check_here(device: torch.device, given: str) -> None:
    """UsageError when `device` is not on this machine (``cuda`` without a GPU, ``cuda:3`` with two), before any
    model is built: `pick_device` leaves that to the first tensor moved there, deep inside the work. `given` names
    the flag or key and its value as the user wrote them (``--device cuda``)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{given}: no CUDA device on this machine (torch.cuda.is_available() is false); use "
                             "cpu, or auto to take a GPU only where there is one")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{given}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{given}: no Apple MPS device on this machine; use cpu or auto")


def _cpu_name() -> str:
    """The CPU's model name as Linux reports it (``/proc/cpuinfo``), else what the platform module knows: the
    string that says which processor a throughput was measured on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device: torch.device) -> dict:
    """What a throughput measured on `device` was measured on: the device type, the processor that ran the encoder
    (the GPU's name on CUDA, the CPU's model otherwise) and the CPU threads torch used (they decode and, on the CPU,
    compute too)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = f"Apple MPS ({_cpu_name()})"
    else:
        name = _cpu_name()
    return {"device": device.type, "processor": name, "threads": torch.get_num_threads()}
