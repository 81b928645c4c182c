"""GPU readiness check: is this CUDA machine ready to pretrain? At most about 8 minutes on one GPU.

    pip install -e '.[gpu]'                 # after the README install: adds xformers
    python bench/gpu_check.py               # synthetic radiograph-like PNGs in a temp folder
    python bench/gpu_check.py --data ../shared/data/ieee8023-covid-cxr/images --run-dir runs/gpu-check

Checks, printed as ONE table (check, result, ratio/value, verdict):
  1. attention: xformers' memory-efficient kernel against PyTorch SDPA (the two backends of trainer.vit.attention),
     on a packed multi-crop layout and on a plain batch: equal within bf16 tolerance; their fwd+bwd time ratio;
  2. the student's packed multi-crop pass against separate passes per crop size (a full training step, the code
     of bench/trainer_step.py): throughput ratio;
  3. --steps (300) bf16 steps of ViT-S/14 at 224 px through trainer.train.train, then the run's last logged losses
     and collapse diagnostics (whatever keys its metrics.jsonl has);
  4. peak CUDA memory of that run, against the device's total;
  5. one 2-process DDP run (2 steps) on this one GPU over NCCL: both ranks must end with identical weights.
     Recent NCCL versions refuse two ranks on one device: the row then says "skipped: <reason>".

Without CUDA it says so and runs the same code paths at tiny size, so CI exercises them: SDPA against a plain
softmax(QK^T)V reference instead of xformers, fp32, a few steps, DDP on gloo. Exit status: 0 when no check
failed, 1 when one did, 2 for a usage error.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.metadata
import math
import queue
import resource
import socket
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, as the other bench scripts

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from tabulate import tabulate

from trainer import vit
from trainer.config import TrainConfig, load_config
from trainer.plot import read_metrics
from trainer.train import train
from trainer_step import make_step, step_config

DIAGNOSTICS = ["ln_k", "target_entropy_cls", "target_entropy_patch", "student_entropy_cls",
               "kl_teacher_student_cls", "teacher_feature_std", "prototypes_used", "prototype_gain"]
COLLAPSE_MARGIN = 0.01  # target entropy within 1% of ln K of either limit (the trainer's run.collapse_margin)
FAIL = "FAIL"


@dataclass(frozen=True)
class Profile:
    """Sizes of one run of the checks: the GPU check, or its tiny CPU dry run."""

    device: torch.device
    bf16: bool
    arch: str
    depth: int | None                           # None: the preset's
    patch: int
    global_size: int
    local_size: int
    n_local: int
    out_dim: int                                # prototypes K
    head_hidden: int | None                     # None: the preset's DINO head
    head_bottleneck: int | None
    heads: int                                  # attention check: ViT-S has 6 heads of 64
    head_dim: int
    batch: int                                  # source images per step (2 global + n_local crops each)
    attn_reps: int
    bench_steps: int                            # timed steps per packed/separate measurement
    train_steps: int
    ddp_steps: int
    n_images: int                               # synthetic images, and their side in pixels
    image_px: int
    num_workers: int
    log_every: int
    attn_tol: float                             # max abs difference allowed between the two attention paths

    def geometry(self) -> list[str]:
        """Model, head and crop overrides shared by checks 2, 3 and 5."""
        out = [f"model.arch={self.arch}", f"model.patch_size={self.patch}", f"model.img_size={self.global_size}",
               f"crops.global_size={self.global_size}", f"crops.local_size={self.local_size}",
               f"crops.n_local={self.n_local}", f"head.out_dim={self.out_dim}"]
        for key, value in (("model.depth", self.depth), ("head.hidden_dim", self.head_hidden),
                           ("head.bottleneck_dim", self.head_bottleneck)):
            if value is not None:
                out.append(f"{key}={value}")
        return out

    def train_config(self, steps: int, data: str, batch: int) -> TrainConfig:
        cfg = load_config("rad-dino", [*self.geometry(), f"optim.batch_size_per_gpu={batch}",
                                       f"data.num_workers={self.num_workers}", f"run.log_every={self.log_every}"],
                          steps=steps)
        cfg.data.sources = [data]
        cfg.run.bf16 = self.bf16
        return cfg


def gpu_profile(steps: int) -> Profile:
    return Profile(device=torch.device("cuda", 0), bf16=True, arch="vit_small", depth=None, patch=14,
                   global_size=224, local_size=98, n_local=8, out_dim=65536, head_hidden=None, head_bottleneck=None,
                   heads=6, head_dim=64, batch=32, attn_reps=20, bench_steps=10, train_steps=steps, ddp_steps=2,
                   n_images=128, image_px=256, num_workers=4, log_every=10, attn_tol=2e-2)


def cpu_profile() -> Profile:
    # Patch 8 at 32 px (16 patches), so that iBOT masks and the packed layout have something to do.
    return Profile(device=torch.device("cpu"), bf16=False, arch="vit_tiny", depth=1, patch=8, global_size=32,
                   local_size=16, n_local=2, out_dim=64, head_hidden=32, head_bottleneck=16, heads=2, head_dim=8,
                   batch=4, attn_reps=3, bench_steps=1, train_steps=3, ddp_steps=2, n_images=16, image_px=48,
                   num_workers=0, log_every=1, attn_tol=1e-5)


@dataclass
class Row:
    check: str
    result: str
    value: str
    verdict: str


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, check: str, result: str, value: str, verdict: str) -> None:
        self.rows.append(Row(check, result, value, verdict))

    @property
    def failed(self) -> bool:
        return any(r.verdict.startswith(FAIL) for r in self.rows)

    def table(self) -> str:
        # Error messages end up in cells: one line each, and no bare "|" to break the table's columns.
        def cell(text: str) -> str:
            return " ".join(text.split()).replace("|", "/")

        return tabulate([[cell(c) for c in (r.check, r.result, r.value, r.verdict)] for r in self.rows],
                        headers=["check", "result", "ratio/value", "verdict"], tablefmt="github")


# ----------------------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], None], reps: int, device: torch.device) -> float:
    """Median wall time of `fn` over `reps` calls after one warm-up call (kernel selection, allocator)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------------------
# 1. Attention paths


AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, layout or None) -> output, all [B, N, heads, head_dim]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   layout: vit.BlockDiagonal | None) -> torch.Tensor:
    """trainer.vit.attention forced onto its SDPA path (what it does on CUDA when xformers is absent)."""
    with mock.patch.object(vit, "uses_xformers", lambda device: False):
        return vit.attention(q, k, v, layout)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        layout: vit.BlockDiagonal | None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V in fp32 with a dense block-diagonal mask: the definition, N^2 memory."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if layout is not None:
        ids = torch.repeat_interleave(torch.arange(layout.n_sequences, device=q.device),
                                      torch.tensor(layout.seqlens, device=q.device))
        scores = scores.masked_fill(ids[:, None] != ids[None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float()).to(q.dtype)


def check_attention(p: Profile, report: Report) -> None:
    if p.device.type == "cuda":
        if not vit.uses_xformers(p.device):
            report.add("attention: xformers vs SDPA", "xformers is not importable", "-",
                       f"{FAIL}: pip install -e '.[gpu]' (xformers matching this torch)")
            return
        (name_a, fn_a), (name_b, fn_b) = ("xformers", vit.attention), ("SDPA", sdpa_attention)
    else:
        (name_a, fn_a), (name_b, fn_b) = ("SDPA", sdpa_attention), ("math reference", reference_attention)
    dtype = torch.bfloat16 if p.bf16 else torch.float32
    # The student's packed layout: 2 global crops and n_local local crops per image, CLS + patch tokens each.
    layout = vit.BlockDiagonal(((2 * p.batch, 1 + (p.global_size // p.patch) ** 2),
                                (p.n_local * p.batch, 1 + (p.local_size // p.patch) ** 2)))
    gen = torch.Generator(p.device).manual_seed(0)

    def qkv(b: int, n: int) -> list[torch.Tensor]:
        return [torch.randn(b, n, p.heads, p.head_dim, generator=gen, device=p.device, dtype=dtype)
                .requires_grad_() for _ in range(3)]

    packed = qkv(1, sum(layout.seqlens))
    plain = qkv(2 * p.batch, layout.runs[0][1])
    diffs = {}
    with torch.no_grad():
        for label, (q, k, v), lay in (("packed", packed, layout), ("batch", plain, None)):
            a, b = fn_a(q, k, v, lay), fn_b(q, k, v, lay)
            diffs[label] = (a.float() - b.float()).abs().max().item()
    grad = torch.randn(packed[0].shape, generator=gen, device=p.device, dtype=dtype)

    def fwd_bwd(fn: AttentionFn) -> Callable[[], None]:
        return lambda: fn(*packed, layout).backward(grad)

    t_a = median_seconds(fwd_bwd(fn_a), p.attn_reps, p.device)
    t_b = median_seconds(fwd_bwd(fn_b), p.attn_reps, p.device)
    worst = max(diffs.values())
    ok = worst <= p.attn_tol
    report.add(f"attention: {name_a} vs {name_b} ({'bf16' if p.bf16 else 'fp32'})",
               f"max abs diff packed {diffs['packed']:.1e}, batch {diffs['batch']:.1e} (tol {p.attn_tol:.0e})",
               f"fwd+bwd time {name_b}/{name_a} x{t_b / t_a:.2f}",
               "ok" if ok else f"{FAIL}: the attention backends disagree; check the xformers/torch versions")


# ----------------------------------------------------------------------------------------------------------------
# 2. Packed vs separate student pass


def check_packing(p: Profile, report: Report) -> None:
    cfg = step_config(p.geometry())
    throughput: dict[bool, list[float]] = {False: [], True: []}
    # A B B A: load drift (other jobs, GPU clocks warming up) falls on both modes alike; the best of two counts.
    for packed in (False, True, True, False):
        torch.manual_seed(0)
        step = make_step(cfg, p.batch, packed, p.device, p.bf16)
        seconds = median_seconds(functools.partial(step, 1), p.bench_steps, p.device)
        throughput[packed].append(p.batch / seconds)
        del step
        free_memory(p.device)
    sep, pk = max(throughput[False]), max(throughput[True])
    ratio = pk / sep
    if p.device.type == "cuda":
        verdict = "ok" if ratio >= 0.95 else "warn: packing does not pay here; compare xformers/torch versions"
    else:
        verdict = "n/a on CPU (only checks that both run)"
    report.add("student pass: packed vs separate", f"packed {pk:.1f} img/s, separate {sep:.1f} img/s",
               f"x{ratio:.2f}", verdict)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# 3-4. A short training run, its diagnostics and its peak memory


def synth_radiographs(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """n grey PNGs that look vaguely like frontal chest radiographs: a bright body, two dark lungs with rib
    stripes, a mediastinum, an occasional opacity, noise. Distinct images, so the losses have something to see."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        body = np.exp(-(((xx - 0.5) / rng.uniform(0.38, 0.46)) ** 6) - (((yy - 0.55) / 0.5) ** 6))
        img = 0.75 * body
        for side in (-1, 1):
            cx, cy = 0.5 + side * rng.uniform(0.15, 0.2), rng.uniform(0.42, 0.48)
            rx, ry = rng.uniform(0.11, 0.15), rng.uniform(0.24, 0.3)
            lung = np.clip(1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2, 0, 1) ** 0.5
            ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * rng.uniform(8, 11) + 0.8 * np.abs(xx - 0.5)))
            img -= lung * (0.45 - 0.12 * ribs)
        img += 0.2 * np.exp(-((xx - 0.5) / 0.06) ** 2) * (yy > 0.2)  # mediastinum and spine
        if rng.random() < 0.5:  # an opacity somewhere in a lung
            ox, oy, r = rng.uniform(0.25, 0.75), rng.uniform(0.3, 0.65), rng.uniform(0.03, 0.1)
            img += 0.3 * np.exp(-((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * r * r))
        img += rng.normal(0, 0.02, img.shape)
        Image.fromarray((255 * np.clip(img, 0, 1)).astype(np.uint8)).save(folder / f"synthetic_{i:04d}.png")
    return folder


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def check_training(p: Profile, data: str, run_dir: Path, report: Report) -> None:
    cfg = p.train_config(p.train_steps, data, p.batch)
    if p.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(p.device)
    arch = f"{cfg.model.arch}/{cfg.model.patch_size} at {cfg.crops.global_size} px, " \
           f"{'bf16' if p.bf16 else 'fp32'}, batch {cfg.optim.batch_size_per_gpu}, K={cfg.head.out_dim}"
    t0 = time.perf_counter()
    try:
        state = train(cfg, run_dir)
    except Exception as e:  # any failure here is the check's verdict, reported in the table
        report.add(f"training: {p.train_steps} steps", arch, "-", f"{FAIL}: {type(e).__name__}: {e}")
        return
    seconds = time.perf_counter() - t0
    peak = peak_memory_mb(p.device)
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    first, last = steps[0], steps[-1]
    finite = all(math.isfinite(r["loss"]) for r in steps)
    done = state.iteration == cfg.optim.total_iters
    report.add(f"training: {p.train_steps} steps ({arch})",
               f"loss {first['loss']:.3f} -> {last['loss']:.3f} (dino {last['dino']:.3f}, ibot {last['ibot']:.3f}, "
               f"koleo {last['koleo']:.3f}), {last['images_per_s']:.1f} img/s",
               f"{state.iteration}/{cfg.optim.total_iters} steps in {seconds:.0f} s",
               "ok" if finite and done else f"{FAIL}: see {run_dir / 'train.log'}")
    report_diagnostics(rows, report)
    if p.device.type == "cuda":
        total = torch.cuda.get_device_properties(p.device).total_memory / 2**20
        share = peak / total
        report.add("peak memory (training run)", f"{peak:.0f} MB of {total:.0f} MB (CUDA allocator peak)",
                   f"{100 * share:.0f}%",
                   "ok" if share < 0.9 else "warn: little headroom; lower optim.batch_size_per_gpu")
    else:
        report.add("peak memory (training run)", f"{peak:.0f} MB (process peak RSS)", "-", "n/a on CPU")


def report_diagnostics(rows: list[dict], report: Report) -> None:
    """Rows for the collapse diagnostics of the last logged step and the last probe line, whichever were logged."""
    last = [r for r in rows if "loss" in r][-1]
    for key in DIAGNOSTICS:
        if last.get(key) is not None and key != "ln_k":
            ref = f" (ln K {last['ln_k']:.3f})" if key.startswith("target_entropy") and "ln_k" in last else ""
            report.add(f"  diagnostic {key}", f"at iteration {last['iteration']}{ref}", _fmt(last[key]),
                       diagnostic_verdict(key, last))
    probes = [r for r in rows if any(k.startswith("probe_") for k in r)]
    if probes:
        for key, value in probes[-1].items():
            if key.startswith("probe_") and not key.endswith(("_lo", "_hi")):
                lo, hi = probes[-1].get(f"{key}_lo"), probes[-1].get(f"{key}_hi")
                ci = f" [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else ""
                report.add(f"  {key}", f"at iteration {probes[-1]['iteration']}", f"{_fmt(value)}{ci}", "info")


def diagnostic_verdict(key: str, row: dict) -> str:
    """Flags the two collapse limits (as trainer.diagnostics defines them), on the last logged step."""
    value = row[key]
    if value is None or not math.isfinite(value):
        return "warn: not finite"
    ln_k = row.get("ln_k")
    if key.startswith("target_entropy") and ln_k:
        if value > (1 - COLLAPSE_MARGIN) * ln_k:
            return "warn: near ln K (uniform targets)"
        if value < COLLAPSE_MARGIN * ln_k:
            return "warn: near 0 (one prototype)"
        return "ok"
    if key == "teacher_feature_std":
        return "ok" if value > 1e-3 else "warn: teacher features all alike"
    if key == "prototypes_used":
        return "ok" if value > 1 else "warn: one prototype for every image"
    return "info"


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.4g}"


# ----------------------------------------------------------------------------------------------------------------
# 5. DDP: two processes on one device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, p: Profile, data: str, run_dir: str, answers) -> None:
    """One rank: join the group, run trainer.train.train for a few steps, then compare weights across ranks."""
    try:
        torch.set_num_threads(1)
        backend = "nccl" if p.device.type == "cuda" else "gloo"
        if p.device.type == "cuda":
            torch.cuda.set_device(p.device)  # both ranks on the one GPU: what NCCL may refuse
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        cfg = p.train_config(p.ddp_steps, data, batch=max(2, p.batch // 4))
        cfg.data.num_workers = 0  # no loader processes inside the spawned ranks
        state = train(cfg, run_dir)
        weights = torch.cat([t.detach().float().flatten() for t in
                             (*state.model.student.parameters(), *state.model.teacher.parameters())])
        gathered = [torch.empty_like(weights) for _ in range(world)]
        dist.all_gather(gathered, weights)
        diff = max((g - gathered[0]).abs().max().item() for g in gathered)
        answers.put((rank, "ok", f"{state.iteration} steps, {backend}", diff))
    except Exception as e:  # reported by the parent: a skip for NCCL's refusal, else a failure
        answers.put((rank, "error", f"{type(e).__name__}: {e}", math.nan))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_ddp(p: Profile, data: str, run_dir: Path, report: Report) -> None:
    world, backend = 2, "nccl" if p.device.type == "cuda" else "gloo"
    check = f"DDP: {world} processes on one {'GPU' if p.device.type == 'cuda' else 'CPU'}, {backend}"
    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=ddp_worker, args=(r, world, port, p, data, str(run_dir), answers))
             for r in range(world)]
    for proc in procs:
        proc.start()
    results = []
    try:
        for _ in range(world):
            results.append(answers.get(timeout=300))  # a rank stuck in a collective after its peer failed
    except queue.Empty:
        pass  # ddp_row reports the ranks that did not answer
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    report.rows.append(ddp_row(check, backend, world, results))


def ddp_row(check: str, backend: str, world: int, results: list[tuple[int, str, str, float]]) -> Row:
    """The DDP check's verdict from what the ranks reported: (rank, "ok" | "error", message, weight difference)."""
    errors = [msg for _, status, msg, _ in results if status == "error"]
    if errors:
        text = "\n".join(errors)
        # NCCL's own explanation is on a later line of torch's DistBackendError ("Last error: Duplicate GPU ...").
        refused = backend == "nccl" and ("Duplicate GPU" in text or "ncclInvalidUsage" in text)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "Duplicate GPU" in ln), lines[0] if lines else "no message")[:160]
        if refused:
            return Row(check, "NCCL refused two ranks on one device", "-", f"skipped: {reason}")
        return Row(check, "a rank raised", "-", f"{FAIL}: {reason}")
    if len(results) < world:
        return Row(check, f"{len(results)} of {world} ranks answered within the time limit", "-",
                   f"{FAIL}: a rank hung or died")
    diff = max(d for *_, d in results)
    return Row(check, f"{results[0][2]}; ranks' weights equal after the steps", f"max abs diff {diff:.1e}",
               "ok" if diff == 0 else f"{FAIL}: ranks diverged (gradients not averaged?)")


# ----------------------------------------------------------------------------------------------------------------


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "NOT installed"


@contextmanager
def workspace(run_dir: str | None) -> Iterator[Path]:
    if run_dir:
        path = Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="image folder or manifest for the training checks (default: synthetic "
                                       "radiograph-like PNGs in a temp folder)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of check 3 on CUDA (default 300)")
    parser.add_argument("--run-dir", help="keep the check's runs here (train/, ddp/) instead of a temp folder; "
                                          "then `python -m trainer.plot RUN_DIR/train` draws the curves")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be >= 1")
    if args.data and not Path(args.data).exists():
        parser.error(f"--data {args.data}: no such folder or manifest; give an image folder or a .txt/.csv list")
    if args.run_dir and any((Path(args.run_dir) / sub).exists() for sub in ("train", "ddp")):
        parser.error(f"--run-dir {args.run_dir} already holds train/ or ddp/ from an earlier check: "
                     "remove them or choose another folder")

    t0 = time.perf_counter()
    if torch.cuda.is_available():
        profile = gpu_profile(args.steps)
        print(f"GPU check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"xformers {package_version('xformers')}")
    else:
        profile = cpu_profile()
        print(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): CPU dry run of "
              "the same code paths at tiny size (SDPA vs the math reference, fp32, "
              f"{profile.train_steps} steps, DDP on gloo); the figures below say nothing about a GPU")
    report = Report()
    with workspace(args.run_dir) as work:
        data = args.data or str(synth_radiographs(work / "images", profile.n_images, profile.image_px))
        check_attention(profile, report)
        check_packing(profile, report)
        check_training(profile, data, work / "train", report)
        free_memory(profile.device)
        check_ddp(profile, data, work / "ddp", report)
    print(report.table())
    print(f"{'FAILED' if report.failed else 'passed'} in {time.perf_counter() - t0:.0f} s")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
