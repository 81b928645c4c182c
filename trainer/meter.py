"""What a run reports: its log lines (stderr and RUN_DIR/train.log) and metrics.jsonl, with throughput, memory, CPU
time and ETA (rank 0 only)."""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import resource
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("trainer")


class Meter:
    """Text log lines (with throughput, memory and ETA) and one JSON line per logged step (rank 0)."""

    def __init__(self, output: Path | None, device: torch.device, images_per_step: int):
        self.jsonl = output / "metrics.jsonl" if output else None
        self.device, self.images_per_step = device, images_per_step
        self.t0, self.steps, self.n_bad = time.perf_counter(), 0, 0
        self.cpu0 = cpu_seconds()

    def record(self, iteration: int, total: int, logged: torch.Tensor, n_bad: int, values: dict[str, float],
               diagnostics: dict[str, float] | None) -> None:
        """One step; a log line and a JSON line when ``diagnostics`` were computed (the logged steps)."""
        self.steps += 1
        self.n_bad += n_bad
        if self.jsonl is None or diagnostics is None:
            return
        elapsed = time.perf_counter() - self.t0
        total_loss, dino, ibot, koleo = logged.tolist()
        row = {"iteration": iteration, "loss": total_loss, "dino": dino, "ibot": ibot, "koleo": koleo,
               "lr": values["lr"], "wd": values["wd"], "momentum": values["momentum"],
               "teacher_temp": values["teacher_temp"],
               "images_per_s": self.steps * self.images_per_step / elapsed, "memory_mb": memory_mb(self.device),
               "skipped_images": self.n_bad,
               # Since the previous logged row, so the sums stay right when a resume trims the rows after its
               # checkpoint; cpu_s (this rank's process and loader workers) is the compute axis of a learning curve.
               "wall_s": elapsed, "cpu_s": cpu_seconds() - self.cpu0, **diagnostics}
        self._append(row)
        eta = elapsed / self.steps * (total - iteration)
        log.info("it %d/%d  loss %.4f (dino %.4f ibot %.4f koleo %.4f)  H(t) %.3f/%.3f patch %.3f (ln K %.3f)  "
                 "KL(t|s) %.3f  std %.4f  protos %d  lr %.3g  mom %.4f  %.1f img/s  %.0f MB  eta %s%s",
                 iteration, total, total_loss, dino, ibot, koleo, diagnostics["target_entropy_cls"],
                 diagnostics["student_entropy_cls"], diagnostics["target_entropy_patch"], diagnostics["ln_k"],
                 diagnostics["kl_teacher_student_cls"], diagnostics["teacher_feature_std"],
                 diagnostics["prototypes_used"], row["lr"], row["momentum"], row["images_per_s"], row["memory_mb"],
                 format_seconds(eta),
                 f"  skipped {self.n_bad} unreadable" if self.n_bad else "")
        self.t0, self.steps, self.cpu0 = time.perf_counter(), 0, cpu_seconds()

    def probe(self, row: dict[str, float]) -> None:
        """One in-training probe result: its own JSON line (keys probe_*) and a log line."""
        if self.jsonl is None:
            return
        self._append(row)
        shown = "  ".join(f"{k.removeprefix('probe_')} {v:.4f}" for k, v in row.items()
                          if k.startswith("probe_") and isinstance(v, float))
        log.info("probe it %d  %s", row["iteration"], shown)

    def _append(self, row: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")


def memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak, or on CPU the process's peak resident set (ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process, all its threads, and its live child processes
    (the data loader's workers, which ``RUSAGE_CHILDREN`` counts only once they exit). Children are found through
    Linux's /proc; elsewhere only this process and its finished children are counted."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:  # fields 14 and 15 of /proc/PID/stat: utime, stime in clock ticks (after the ")" of the name)
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, ValueError, IndexError):  # the worker exited between the listing and the read
                continue
    return total


def format_seconds(s: float) -> str:
    h, rem = divmod(int(s), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


LOG_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


def setup_logging() -> None:
    """Log lines to stderr, and into a buffer that `log_to_file` empties into RUN_DIR/train.log once the run's
    folder exists (it is made only when every check has passed); replaces the handlers of an earlier run in this
    process."""
    log.setLevel(logging.INFO)
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(LOG_FORMAT)
    log.addHandler(stderr)
    log.addHandler(logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1))


def log_to_file(output: Path) -> None:
    """From now on, log lines go to RUN_DIR/train.log too, starting with those logged before it existed."""
    file = logging.FileHandler(output / "train.log")
    file.setFormatter(LOG_FORMAT)
    for buffer in [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        buffer.setTarget(file)
        buffer.close()  # flushes into the file
        log.removeHandler(buffer)
    log.addHandler(file)
