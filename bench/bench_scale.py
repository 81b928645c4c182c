"""How the harness's time and memory grow with the number of images: N = 1k, 4k, 16k by default.

    python bench/bench_scale.py [--sizes 1000,4000,16000] [--stages extract,linear,bootstrap,seg,throughput]
                                [--threads 1] [--seg-epochs 1] [--labels 20] [--probe-jobs 1,2] [--workdir DIR]

Each (stage, N) runs in a subprocess of its own, so the peak RSS it reports (ru_maxrss of the stage's process, and
of its DataLoader workers when they peak higher) belongs to that stage alone. Stages, on synthetic tasks (a real
encoder pass over 16k images would take hours on a CPU):
- extract: the real extraction path (DataLoader worker, shards written as they fill, atomic publish) with the
  `pixels` encoder, dense grids included (64 x 28 x 28 fp16, 100 kB per image), on random 256 px images;
- linear: the linear probe as the protocol runs it (patient-grouped 5-fold CV over 6 C values, then a refit, per
  label) on generated 768-d global features with the correlations of an encoder's (32 latent factors plus noise)
  and --labels labels (default 20, prevalences spread geometrically over 1-30%), 70/30 patient split; once per
  --probe-jobs value (default 1 and the usable cores), checking that every number is bit-identical across them.
  Its CPU time adds the probe's worker processes (shut down and reaped after each run, so their start-up is
  counted); peak RSS is the main process's, with the largest worker's beside it (VmHWM, read before shutdown);
- bootstrap: 1000 patient-bootstrap resamples of AUROC/AUPRC for 14 labels over N test images (the resampled
  weight matrix of `harness.stats`);
- seg: the whole segmentation protocol (`segmentation.fit_and_score`: both heads, scoring at mask resolution, bootstrap, per-image
  file, overlays) streaming generated dense features (patch grid + 2 layers, 128 x 16 x 16 fp16 each, i.e. a ViT
  at 224 px; 196 kB per image) from a cache entry written beforehand by an untimed preparation subprocess, with
  128 px elliptical masks; --seg-epochs epochs (default 1, the protocol's budget has 12: time scales with it);
- throughput: images/s of decode + preprocess alone (the extraction's worker code, 16-bit 2048 px PNGs to RAD-DINO's
  518 px input) against the encoder alone (a random-weights ViT-B/14 at 518 px, built locally: nothing is
  downloaded), at the same thread count; the ratio says which of the two limits extraction. Not repeated per N.

It prints a table (wall and CPU seconds, peak RSS) and, per stage, how time and peak RSS grow from the smallest N
to each larger one (the reference measured in the same run): time should grow about like N, and the seg stage's
peak RSS must stay within 1.5x of its value at the smallest N (it streams). For the linear stage it adds a table
per N and n_jobs (CPU ms per logistic fit, speed-up, identity) and the probe's time beside the other stages'
at the same N. The default sizes took 3.5 minutes
on 2 busy cores with the old one-label linear stage; its 20 labels at two n_jobs values add about 4 CPU-minutes at
16k (docs/benchmarks-linear-probe.md). The cache of the largest seg/extract task (~3 GB) lives in --workdir and
is removed after each N.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

# Runnable as `python bench/bench_scale.py` from a checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("extract", "linear", "bootstrap", "seg", "throughput")
SEG_GRID, SEG_CHANNELS, SEG_LEVELS, MASK_SIZE = 16, 128, 3, 128
THROUGHPUT_DECODE, THROUGHPUT_ENCODE = 16, 4


def _peak_rss_mb() -> float:
    """Peak resident memory of this process and of its (finished) children such as DataLoader workers, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # Linux reports kB


# ------------------------------------------------------------------------------------------------ synthetic tasks

def _table(n: int, has_mask: bool):
    from harness.tasks.base import TaskTable

    return TaskTable([f"s{i:06d}" for i in range(n)], [f"P{i // 2:06d}" for i in range(n)], ["x"],
                     np.zeros((n, 1), np.int8), [None] * n, np.full(n, np.nan),
                     has_mask=np.ones(n, dtype=bool) if has_mask else None)


def _split(n: int) -> np.ndarray:
    """Patient-level: patients P0..P(n/2), 30% of them in the test split."""
    return np.where((np.arange(n) // 2) % 10 < 3, "test", "train")


def _noise_task(n: int):
    from harness.tasks.base import Task

    class NoiseImages(Task):
        name = "scale-noise"
        skipped: list = []

        def __init__(self) -> None:
            self.table = _table(n, has_mask=False)

        def load_image(self, i: int) -> np.ndarray:
            return np.random.default_rng(i).random((256, 256), dtype=np.float32)

        def content_digest(self) -> str:
            return f"scale-noise-{n}"

    return NoiseImages()


def _ellipse(i: int) -> np.ndarray:
    """bool [1, 128, 128]: an ellipse whose centre and radii vary with i (a 'lung')."""
    y, x = np.ogrid[:MASK_SIZE, :MASK_SIZE]
    y, x = y / MASK_SIZE, x / MASK_SIZE
    cy, cx = 0.5 + 0.1 * np.sin(i), 0.5 + 0.1 * np.cos(1.7 * i)
    ry, rx = 0.25 + 0.05 * np.sin(0.3 * i), 0.2 + 0.05 * np.cos(0.7 * i)
    return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1)[None]


def _seg_task(n: int):
    from harness.tasks.base import Task

    class Ellipses(Task):
        name = "scale-seg"
        mask_names = ("lungs",)
        skipped: list = []

        def __init__(self) -> None:
            self.table = _table(n, has_mask=True)

        def load_mask(self, i: int) -> np.ndarray:
            return _ellipse(i)

        def load_image(self, i: int) -> np.ndarray:  # read for the overlays only
            return np.where(_ellipse(i)[0], 0.2, 0.7).astype(np.float32)

        def content_digest(self) -> str:
            return f"scale-seg-{n}"

    return Ellipses()


def _seg_encoder():
    """Stands in for a ViT-S/14 at 224 px (16 x 16 patch grid); its features come from the prepared cache entry,
    `encode` is never called."""
    from baselines.floors import PixelsEncoder
    from baselines.preprocess import Preprocess

    enc = PixelsEncoder(Preprocess(size=224, policy="resize_stretch", interpolation="area", mean=(0.5,),
                                   std=(0.25,), channels=1), block=14)
    enc.name = "synthetic-vit"
    return enc


def _seg_key(n: int) -> str:
    return f"{n:08d}-bench-scale-seg"


# -------------------------------------------------------------------------------------------------------- stages

def stage_extract(n: int, work: Path, args: argparse.Namespace) -> dict:
    from baselines.floors import PIXELS_PREPROCESS, PixelsEncoder
    from harness.features import FeatureCache, extract

    t0, c0 = time.perf_counter(), time.process_time()
    fs = extract(_noise_task(n), [PixelsEncoder(PIXELS_PREPROCESS)], FeatureCache(work / "cache"), dense=True,
                 batch_size=16, workers=1, log=lambda *_: None)["pixels"]
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "shards": len(fs.patch.parts)}


def _linear_features(n: int, n_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, 768] float32 features from 32 latent factors plus noise (correlated, like an encoder's), [n, L] labels
    driven by the same factors with prevalences from 1% to 30%, and the patient id of each row."""
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(n, 32))
    x = latent @ (rng.normal(size=(32, 768)) / np.sqrt(32)) + 0.5 * rng.normal(size=(n, 768))
    logits = latent @ (0.3 * rng.normal(size=(32, n_labels))) + rng.normal(size=(n, n_labels))
    prevalence = np.geomspace(0.01, 0.30, n_labels)
    cut = np.array([np.quantile(logits[:, j], 1 - p) for j, p in enumerate(prevalence)])
    return x.astype(np.float32), (logits > cut).astype(np.int8), np.array([f"P{i // 2}" for i in range(n)])


def _workers_peak_mb() -> float:
    """Largest peak RSS (VmHWM) among this process's live children, e.g. the probe's worker processes, in MB; 0
    without any. (ru_maxrss of reaped children would report the parent's size: it is copied into each at fork.)"""
    peak = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid():
                hwm = [ln for ln in (stat.parent / "status").read_text().splitlines() if ln.startswith("VmHWM:")]
                peak = max(peak, int(hwm[0].split()[1]) if hwm else 0)
        except (OSError, IndexError, ValueError):  # a process that ended while we looked
            continue
    return peak / 1024


def _children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def stage_linear(n: int, work: Path, args: argparse.Namespace) -> dict:
    from joblib.externals.loky import get_reusable_executor

    from harness.probes.linear import linear_probe

    x, y, groups = _linear_features(n, args.labels)
    split = _split(n)
    tr, te = split == "train", split == "test"
    runs, first = [], None
    for jobs in args.probe_jobs:
        t0, c0, w0 = time.perf_counter(), time.process_time(), _children_cpu()
        result = linear_probe(x[tr], y[tr], groups[tr], x[te], y[te], [f"y{j}" for j in range(args.labels)],
                              seed=0, n_jobs=jobs)
        wall = time.perf_counter() - t0
        workers_mb = _workers_peak_mb()
        if jobs > 1:  # reaped workers enter RUSAGE_CHILDREN, their CPU and peak RSS with them (n_jobs 1 has none)
            get_reusable_executor().shutdown(wait=True)
        cpu = time.process_time() - c0 + _children_cpu() - w0
        numbers = (result.scores.tobytes(), repr([vars(lab) for lab in result.labels]))  # repr: NaN == NaN
        first = first or numbers
        runs.append({"n_jobs": jobs, "seconds": wall, "cpu_seconds": cpu, "identical": numbers == first,
                     "fits": sum(lab.fits for lab in result.labels),
                     "not_converged": sum(lab.not_converged for lab in result.labels),
                     "worker_rss_mb": workers_mb})
    cv = [lab.cv_auroc for lab in result.labels if lab.evaluable]
    return {"seconds": runs[0]["seconds"], "cpu_seconds": runs[0]["cpu_seconds"], "labels": args.labels,
            "fitted_labels": len(cv), "mean_cv_auroc": float(np.nanmean(cv)), "runs": runs}


def stage_bootstrap(n: int, work: Path, args: argparse.Namespace) -> dict:
    from bench_bootstrap import synthetic  # the test set bench_bootstrap.py measures, at this N

    from harness.stats import binary_metrics, bootstrap_weights

    scores, labels, patients = synthetic(n, 14, 0)
    t0, c0 = time.perf_counter(), time.process_time()
    binary_metrics(scores, labels, bootstrap_weights(patients, 1000, 0))
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def stage_seg_prepare(n: int, work: Path, args: argparse.Namespace) -> dict:
    """Untimed: a dense cache entry of generated features that carry the mask (so the heads have something to
    learn), written shard by shard like extraction writes one."""
    from harness.features import FeatureCache

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(SEG_LEVELS, SEG_CHANNELS, 1, 1)).astype(np.float32)
    pool = rng.normal(size=(32, SEG_LEVELS, SEG_CHANNELS, SEG_GRID, SEG_GRID)).astype(np.float32)
    cell = MASK_SIZE // SEG_GRID
    w = FeatureCache(work / "cache").writer(_seg_key(n), dense=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, n, 64):
        idx = np.arange(s, min(s + 64, n))
        masks = np.stack([_ellipse(i) for i in idx]).astype(np.float32)  # [b, 1, 128, 128]
        signal = masks.reshape(len(idx), 1, SEG_GRID, cell, SEG_GRID, cell).mean(axis=(3, 5))
        grids = [(2 * signal * weights[j] + pool[idx % len(pool), j]).astype(np.float16) for j in range(SEG_LEVELS)]
        w.add(np.concatenate([g.mean(axis=(2, 3)) for g in grids], axis=1).astype(np.float32), grids)
    w.publish({"key": _seg_key(n), "n_images": n, "synthetic": True})
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def stage_seg(n: int, work: Path, args: argparse.Namespace) -> dict:
    from harness import stats
    from harness.features import FeatureCache, FeatureStore
    from harness.probes.segmentation import BUDGET, fit_and_score, masked_rows
    from harness.protocols import TaskRun

    task, enc = _seg_task(n), _seg_encoder()
    fs = FeatureCache(work / "cache").load(_seg_key(n), dense=True)
    if fs is None:
        raise SystemExit(f"bench_scale: no prepared seg cache entry for N={n} under {work}; run the seg stage "
                         "through the parent script, which prepares it first")
    split = _split(n)
    test = np.flatnonzero(split == "test")
    weights = stats.bootstrap_weights([task.table.patient_ids[i] for i in test], 1000, 0)
    tr = TaskRun(task, split, weights, FeatureStore({}, [(masked_rows(task), {enc.name: fs})]), seed=0,
                 reference=enc.name)
    budget = dataclasses.replace(BUDGET, epochs=args.seg_epochs)
    t0, c0 = time.perf_counter(), time.process_time()
    result = fit_and_score(tr, [enc], budget)
    dice = result.to_record(enc.name)["heads"]["multi-level"]["lungs"]["dice"]["point"]
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "dice": dice}


def stage_throughput(n: int, work: Path, args: argparse.Namespace) -> dict:
    """Decode + preprocess alone vs encoder alone, ViT-B/14 at 518 px, on --threads threads each."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader

    from baselines.floors import ViTEncoder
    from baselines.rad_dino import NATIVE
    from harness.features import _collate, _Images, encode_batch
    from harness.tasks.base import Task
    from harness.tasks.demo import DemoTask, PhantomConfig
    from harness.common.imaging import load_radiograph
    from trainer.vit import vit_base

    # Radiograph-sized 16-bit PNGs (2048 px, as CXR exports are), rendered untimed from demo phantoms.
    phantoms = DemoTask(PhantomConfig(n_patients=THROUGHPUT_DECODE, size=512, max_images_per_patient=1))
    files = []
    for i in range(THROUGHPUT_DECODE):
        img = Image.fromarray((phantoms.load_image(i) * 65535).astype(np.uint16)).resize((2048, 2048))
        files.append(work / f"cxr{i}.png")
        img.save(files[-1])

    class Files(Task):
        name = "scale-png"
        skipped: list = []

        def __init__(self) -> None:
            self.table = _table(len(files), has_mask=False)

        def load_image(self, i: int) -> np.ndarray:
            return load_radiograph(files[i])

        def content_digest(self) -> str:
            return "scale-png"

    loader = DataLoader(_Images(Files(), [NATIVE]), batch_size=4, num_workers=0, collate_fn=_collate)
    t0, c0 = time.perf_counter(), time.process_time()
    inputs = [x for _, (x,) in loader]
    decode_s = time.perf_counter() - t0

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = vit_base(patch_size=14, img_size=518, layerscale_init=1.0)
    enc = ViTEncoder("vit-b-random", model, NATIVE, "random")
    device = torch.device("cpu")
    x = inputs[0][:THROUGHPUT_ENCODE]
    encode_batch(enc, x[:1], device)  # warm-up: one-time allocations
    t0 = time.perf_counter()
    encode_batch(enc, x, device)
    encode_s = time.perf_counter() - t0
    decode_rate, encode_rate = THROUGHPUT_DECODE / decode_s, len(x) / encode_s
    return {"seconds": decode_s + encode_s, "cpu_seconds": time.process_time() - c0, "decode_img_s": decode_rate,
            "encode_img_s": encode_rate,
            "ratio": decode_rate / encode_rate}


CHILDREN: dict[str, Callable[[int, Path, argparse.Namespace], dict]] = {
    "extract": stage_extract, "linear": stage_linear, "bootstrap": stage_bootstrap, "seg-prepare": stage_seg_prepare,
    "seg": stage_seg, "throughput": stage_throughput}


# -------------------------------------------------------------------------------------------------------- parent

def run_child(stage: str, n: int, work: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--n", str(n), "--workdir", str(work),
           "--threads", str(args.threads), "--seg-epochs", str(args.seg_epochs), "--labels", str(args.labels),
           "--probe-jobs", ",".join(map(str, args.probe_jobs))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_scale: stage {stage} at N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_extra(r: dict) -> str:
    keys = {"shards": "{} shards", "fitted_labels": "{} labels", "mean_cv_auroc": "mean cv AUROC {:.3f}",
            "dice": "Dice {:.3f}",
            "decode_img_s": "decode+preprocess {:.2f} img/s", "encode_img_s": "encoder {:.3f} img/s",
            "ratio": "ratio {:.1f}x"}
    extra = [f.format(r[k]) for k, f in keys.items() if k in r]
    for run in r.get("runs", []):
        extra.append(f"n_jobs {run['n_jobs']}: {run['seconds']:.2f} s wall, {run['cpu_seconds']:.1f} s CPU"
                     f"{'' if run['identical'] else ' NOT IDENTICAL'}")
    return ", ".join(extra)


def _linear_table(by_n: dict[int, dict], others: dict[str, dict[int, dict]]) -> None:
    """The probe's runs per N and n_jobs: time per logistic fit, speed-up over the first n_jobs in the same
    process, identity of the numbers, and the probe's time beside the other stages' at the same N."""
    print("\n| N | labels (fitted) | fits | not converged | n_jobs | wall s | CPU s (main + workers) | CPU ms / fit | "
          "wall vs first | peak RSS MB main / worker | identical |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for n, r in by_n.items():
        base = r["runs"][0]["seconds"]
        for run in r["runs"]:
            worker = f"{run['worker_rss_mb']:.0f}" if run["worker_rss_mb"] else "-"
            print(f"| {n} | {r['labels']} ({r['fitted_labels']}) | {run['fits']} | {run['not_converged']} | "
                  f"{run['n_jobs']} | {run['seconds']:.2f} | {run['cpu_seconds']:.1f} | "
                  f"{1000 * run['cpu_seconds'] / run['fits']:.1f} | {base / run['seconds']:.2f}x | "
                  f"{r['peak_rss_mb']:.0f} / {worker} | "
                  f"{'yes' if run['identical'] else 'NO'} |")
    for n, r in by_n.items():
        beside = [f"{stage} {rows[n]['seconds']:.1f} s" for stage, rows in others.items()
                  if stage not in ("linear", "throughput") and n in rows]
        if beside:
            fastest = min(run["seconds"] for run in r["runs"])
            print(f"N={n}: linear probe {fastest:.1f} s wall (fastest n_jobs) beside " + ", ".join(beside))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,4000,16000", help="comma list of task sizes N (default 1000,4000,16000)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every stage (default 1)")
    ap.add_argument("--seg-epochs", type=int, default=1, help="epochs of the seg stage's heads (protocol: 12)")
    ap.add_argument("--labels", type=int, default=20, help="labels of the linear stage (default 20)")
    ap.add_argument("--probe-jobs", default=None,
                    help="comma list of the linear stage's n_jobs, each run on the same features (default: 1 and the "
                         "usable cores)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder for caches and files (default: $TMPDIR)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from joblib import cpu_count as usable_cores  # what harness.protocols.usable_cores returns, without torch

    try:
        args.probe_jobs = [int(j) for j in (args.probe_jobs or f"1,{usable_cores()}").split(",") if j.strip()]
    except ValueError:
        ap.error(f"--probe-jobs {args.probe_jobs!r}: expected a comma list of integers, e.g. 1,2")
    if not args.probe_jobs or min(args.probe_jobs) < 1 or args.labels < 1:
        ap.error("--probe-jobs must list integers >= 1 and --labels must be at least 1")
    args.probe_jobs = list(dict.fromkeys(args.probe_jobs))

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        result = CHILDREN[args.child](args.n, args.workdir, args)
        result["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(result))
        return

    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--sizes {args.sizes!r}: expected a comma list of integers, e.g. 1000,4000,16000")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not sizes or min(sizes) < 20:
        ap.error(f"--stages must be among {', '.join(STAGES)} (got {', '.join(unknown) or 'none'}) and --sizes "
                 "integers >= 20")

    print(f"bench_scale: sizes {sizes}, {args.threads} thread(s), seg epochs {args.seg_epochs}, linear probe "
          f"{args.labels} labels at n_jobs {args.probe_jobs}; {usable_cores()} usable cores, machine load (1/5/15 min) "
          f"at start {' '.join(f'{x:.2f}' for x in os.getloadavg())} (above the core count: other jobs share the "
          "CPUs, so read CPU seconds and ratios rather than wall times)")
    rows: dict[str, dict[int, dict]] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.workdir) as tmp:
        for stage in stages:
            for n in sizes[:1] if stage == "throughput" else sizes:
                work = Path(tmp) / f"{stage}-{n}"
                work.mkdir()
                if stage == "seg":
                    prep = run_child("seg-prepare", n, work, args)
                    print(f"  (seg N={n}: prepared {n} images of dense features in {prep['seconds']:.1f} s, untimed)")
                r = rows.setdefault(stage, {})[n] = run_child(stage, n, work, args)
                print(f"  {stage:<10} N={n if stage != 'throughput' else '-':>6}: {r['seconds']:8.2f} s wall, {r['cpu_seconds']:8.2f} s CPU, peak RSS "
                      f"{r['peak_rss_mb']:7.0f} MB  {_fmt_extra(r)}", flush=True)
                shutil.rmtree(work)

    print(f"\n| stage | N | wall s | CPU s (main process) | peak RSS MB | time vs N={sizes[0]} | RSS vs N={sizes[0]} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for stage, by_n in rows.items():
        ref = by_n[min(by_n)]
        for n, r in by_n.items():
            if stage == "throughput":  # a fixed number of images, not a task of N
                print(f"| {stage} | - | {r['seconds']:.2f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mb']:.0f} | - | - |")
                continue
            print(f"| {stage} | {n} | {r['seconds']:.2f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['seconds'] / ref['seconds']:.2f}x (N x{n / min(by_n):g}) | "
                  f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x |")
    if "linear" in rows:
        _linear_table(rows["linear"], rows)
    if "seg" in rows and len(rows["seg"]) > 1:
        lo, hi = min(rows["seg"]), max(rows["seg"])
        ratio = rows["seg"][hi]["peak_rss_mb"] / rows["seg"][lo]["peak_rss_mb"]
        print(f"\nseg peak RSS at N={hi} / N={lo}: {ratio:.2f}x (bound 1.5x): {'ok' if ratio <= 1.5 else 'EXCEEDED'}")
    if "throughput" in rows:
        r = next(iter(rows["throughput"].values()))
        limit = "the encoder" if r["ratio"] > 1 else "decode + preprocess"
        print(f"throughput (ViT-B/14 at 518 px, {args.threads} thread(s)): decode + preprocess "
              f"{r['decode_img_s']:.2f} img/s, encoder {r['encode_img_s']:.3f} img/s, ratio {r['ratio']:.1f}x: "
              f"{limit} limits extraction")
    print(f"total {time.perf_counter() - t_start:.0f} s; machine load at end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
