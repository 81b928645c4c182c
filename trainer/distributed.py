"""Process groups: join one when launched by torchrun or SLURM, this process's rank, and means over the ranks.

One process (no launcher) is a world of one: every helper here is then a no-op, so the loop reads the same either
way. Gloo on CPU, NCCL on GPU; the sample stream and the checkpoints do not depend on the world size
(trainer.data, trainer.checkpoint), so a run may resume on another number of GPUs.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def setup_distributed() -> None:
    """Join the process group when launched by torchrun or SLURM (gloo on CPU, nccl on GPU); no-op otherwise."""
    if dist.is_initialized():
        return
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise RuntimeError("SLURM multi-task run without MASTER_ADDR/MASTER_PORT: export them in the job script "
                               "(or launch with torchrun / submitit, which set them)")
    if int(env.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the ranks, in place (every rank gets the same numbers)."""
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def step_seed(seed: int, it: int, rank: int) -> int:
    """The seed of one rank's step: every random draw of a step (crops, masks, drop-path) follows from it, so a
    resumed run repeats an uninterrupted one."""
    return int(np.random.SeedSequence([seed, it, rank]).generate_state(1)[0])
