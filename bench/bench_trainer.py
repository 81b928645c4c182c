"""Benchmark: one DINOv2 training step with the student's multi-crop pass PACKED (one block-diagonal sequence,
vit.forward_features_list) against SEPARATE passes per crop size (forward_features on globals, then on locals).

Everything else in the step is the trainer's own and identical in both modes (bench/trainer_step.py, shared with
gpu_check.py): crops on the device, iBOT masks, teacher forward, DINO + iBOT + KoLeo losses, backward, gradient
clipping, AdamW, EMA update.

    python bench/bench_trainer.py                      # vit_tiny and vit_small, 224 px globals, 8 x 98 px locals
    python bench/bench_trainer.py --archs vit_tiny --batch 8 --steps 5

Each (model, mode) runs in a fresh process, so the peak-memory figure is that process's peak resident set size
(resource.getrusage ru_maxrss) minus its value after the model, optimiser and inputs were built: the extra memory
the timed training steps needed. (tracemalloc cannot see tensor memory: torch allocates outside Python's allocator.)
Throughput counts source images per second (each yields 2 global + n local crops); the first step is a warm-up.
Each mode runs twice, in the order separate, packed, packed, separate; the table shows the better throughput and
the larger memory figure of the two.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(arch: str, packed: bool, args: argparse.Namespace, queue) -> None:
    import torch

    from trainer_step import make_step, step_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = step_config([f"model.arch={arch}", f"model.img_size={args.global_size}",
                       f"crops.global_size={args.global_size}", f"crops.local_size={args.local_size}",
                       f"crops.n_local={args.n_local}", f"head.out_dim={args.out_dim}"])
    step = make_step(cfg, args.batch, packed, torch.device("cpu"))

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(0)  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        step(i)
    elapsed = time.perf_counter() - t0
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    queue.put((args.steps * args.batch / elapsed, peak_mb))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["vit_tiny", "vit_small"])
    p.add_argument("--batch", type=int, default=4, help="source images per step")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--out-dim", type=int, default=8192, help="head prototypes K (65536 in the full recipe)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1, help="torch threads (more than 1 on a shared box can be 10x "
                                                             "slower: OpenMP threads wait on each other)")
    args = p.parse_args()

    ctx = mp.get_context("spawn")
    print(f"training step, CPU, {args.threads} threads, batch {args.batch} images -> 2 x {args.global_size} px "
          f"globals + {args.n_local} x {args.local_size} px locals, K={args.out_dim}, {args.steps} timed steps")
    print(f"{'model':10s} {'mode':9s} {'images/s':>9s} {'peak RSS delta MB':>18s}")
    for arch in args.archs:
        results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        # A B B A: the machine's load drifts (other jobs); this order gives both modes the same average slot.
        for packed in (False, True, True, False):
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(arch, packed, args, queue))
            proc.start()
            results[packed].append(queue.get())
            proc.join()
        best = {}
        for packed in (False, True):
            ips = max(r[0] for r in results[packed])
            mb = max(r[1] for r in results[packed])
            best[packed] = (ips, mb)
            print(f"{arch:10s} {'packed' if packed else 'separate':9s} {ips:9.2f} {mb:18.0f}")
        (sep_ips, sep_mb), (pk_ips, pk_mb) = best[False], best[True]
        print(f"{arch:10s} packed/separate: throughput x{pk_ips / sep_ips:.2f}, peak memory x{pk_mb / max(sep_mb, 1):.2f}")


if __name__ == "__main__":
    main()
