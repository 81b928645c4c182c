"""Stopping on a signal: checkpoint after the current step and leave, on every rank at the same step."""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption, scancel) and SIGINT (Ctrl-C) ask the loop to checkpoint and leave after
    this step. A second SIGINT stops at once, without a checkpoint, as an impatient Ctrl-C expects."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, device: torch.device) -> bool:
        """All ranks stop at the same step if any of them got a signal."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def name(self) -> str:
        """What stopped the run, for the log and TrainState.stopped_by: SIGTERM, SIGINT, ..."""
        return signal.Signals(self.received).name if self.received else "a signal on another rank"
