"""``python -m harness.run``: evaluate frozen encoders on tasks and write leaderboards.

    python -m harness.run --models all --tasks demo
    python -m harness.run --models pixels,random-vit --tasks csv:../shared/data/ieee8023-covid-cxr/labels.csv

Per task: build it, print its summary, make (or check) the patient-level split and write it with its hash,
extract features for every encoder in one pass (cached), run each protocol, bootstrap on shared patient
resamples, and write ``<out>/<task>.md`` plus ``<out>/results/<task>/<model>.json`` and per-image predictions.
Everything for one task is computed before anything of it is written, and every file is written atomically.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tabulate import tabulate

import baselines  # noqa: F401  (registers the encoders)
import harness.probes  # noqa: F401  (registers the protocols)
import harness.tasks
from baselines.registry import Encoder, WeightsMissing, build_encoder, default_weights_dir, registered, resolve_names
from harness import stats
from harness.features import DEFAULT_DENSE_BUDGET_GB, FeatureCache, extract
from harness.io import atomic_path, atomic_write_json, atomic_write_text, safe_name
from harness.leaderboard import render
from harness.protocols import PROTOCOLS, TaskRun, feature_sets
from harness.splits import make_split, split_hash, write_split
from harness.tasks.base import Task, TaskContext, TaskError, build_task


@dataclass
class TaskSpec:
    name: str
    arg: str | None
    protocols: tuple[str, ...]


def parse_task_spec(spec: str) -> TaskSpec:
    """``demo``, ``demo:linear``, ``csv:PATH``, ``csv:PATH:linear``: a trailing protocol name picks protocols."""
    name, _, rest = spec.partition(":")
    protocols = tuple(p.name for p in PROTOCOLS.values() if p.default)
    if rest:
        head, _, tail = rest.rpartition(":")
        if tail in PROTOCOLS:
            protocols, rest = (tail,), head
        elif not head and rest in PROTOCOLS:
            protocols, rest = (rest,), ""
    return TaskSpec(name, rest or None, protocols)


def split_task_list(tasks: str) -> list[str]:
    """Comma-separated task specs. A piece of the form KEY=VALUE continues the previous task's arguments
    (``demo:n_patients=50,size=128``); a comma inside a csv: path is not supported (rename the file)."""
    specs: list[str] = []
    for piece in (t.strip() for t in tasks.split(",")):
        if not piece:
            continue
        if specs and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=[^:]*(:[A-Za-z_-]+)?", piece):
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def parse_data_roots(values: list[str]) -> tuple[Path | None, dict[str, Path]]:
    root, named = None, {}
    for v in values:
        key, sep, path = v.partition("=")
        if sep and re.fullmatch(r"[A-Za-z0-9_-]+", key):
            named[key] = Path(path).expanduser()
        else:
            root = Path(v).expanduser()
    return root, named


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.run",
        description="Evaluate frozen chest X-ray encoders with identical protocols; write Markdown leaderboards "
                    "with patient-clustered bootstrap CIs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="all",
                   help="comma list of encoders (see --list), 'all' = every registered encoder whose weights are "
                        "present (the others are listed as skipped, with where to put their files); "
                        "ckpt:DIR evaluates a trainer checkpoint")
    p.add_argument("--tasks", default="demo",
                   help="comma list of tasks: demo, csv:PATH/labels.csv, and dataset names (vindr, candid, rsna) "
                        "when registered; append :PROTOCOL to run one protocol only")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR|NAME=DIR",
                   help="folder holding the datasets (vindr-cxr/, candid-ptx/, rsna-pneumonia/), or NAME=DIR for "
                        "one dataset; repeatable")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help=f"folder with one sub-folder of weights per model (default: ${{RADDINO_BENCH_WEIGHTS}}, "
                        f"else {default_weights_dir()})")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("RADDINO_BENCH_CACHE", ".cache/raddino-bench")),
                   help="feature cache (content-addressed; safe to delete); $RADDINO_BENCH_CACHE sets the default")
    p.add_argument("--out", type=Path, default=Path("leaderboards"),
                   help="where leaderboards (<task>.md), results/ and splits/ are written")
    p.add_argument("--bootstrap", type=int, default=stats.DEFAULT_RESAMPLES,
                   help="number of patient-level bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the probe's CV and the bootstrap")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="fraction of patients in the test split when the task has no predefined one")
    p.add_argument("--reference", default=None,
                   help="model every other is compared with (paired bootstrap); default: the first model")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--input-policy", choices=("native", "harmonised"), default="native",
                   help="native: each model's own resize/crop; harmonised: every model gets the whole radiograph "
                        "resized to its input size without cropping")
    p.add_argument("--batch-size", type=int, default=16, help="images per feature-extraction batch")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers decoding images")
    p.add_argument("--dense-cache-gb", type=float, default=DEFAULT_DENSE_BUDGET_GB,
                   help="disk budget of one dense cache entry (one model, one task); a larger one is not cached and "
                        "the segmentation heads re-encode each batch instead, with the same results")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) missing or unreadable images instead of stopping")
    p.add_argument("--on-duplicate", choices=("merge", "error"), default="merge",
                   help="byte-identical images under different patient ids: merge their patients (one split, one "
                        "bootstrap unit; the count is in the task summary) or stop with an error")
    p.add_argument("--list", action="store_true", help="list registered encoders and tasks, then exit")
    return p


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_encoders(names: list[str], weights_dir: Path | None, policy: str, explicit: set[str]
                  ) -> tuple[list[Encoder], list[tuple[str, str]]]:
    """Build each encoder; a model named explicitly with missing weights is an error, under 'all' a skip."""
    encoders, skipped = [], []
    for name in names:
        try:
            encoders.append(build_encoder(name, weights_dir, policy))
        except WeightsMissing as e:
            if name in explicit:
                raise
            skipped.append((name, str(e)))
    return encoders, skipped


def provenance() -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    pkgs = ("raddino-bench", "torch", "numpy", "scikit-learn", "polars", "pydicom", "safetensors", "transformers")
    return {"git_commit": commit, "git_dirty": dirty, "python": sys.version.split()[0],
            "packages": {p: version(p) for p in pkgs}}


def evaluate_task(spec: TaskSpec, encoders: list[Encoder], args: argparse.Namespace, ctx: TaskContext,
                  cache: FeatureCache, device: torch.device, reference: str) -> Path:
    task = build_task(spec.name, spec.arg, ctx)
    t = task.table
    summary = task.summary()
    split = np.array(make_split(t.patient_ids, args.seed, args.test_fraction, t.split))
    for part in ("train", "test"):
        idx = split == part
        summary[f"{part}_images"] = int(idx.sum())
        summary[f"{part}_patients"] = len({p for p, s in zip(t.patient_ids, split) if s == part})
        summary[f"{part}_positives"] = {n: int(t.labels[idx, j].sum()) for j, n in enumerate(t.label_names)}
    print_summary(summary)

    test_idx = np.flatnonzero(split == "test")
    weights = stats.bootstrap_weights([t.patient_ids[i] for i in test_idx], args.bootstrap, args.seed)
    print(f"features ({len(encoders)} encoder(s), cache {args.cache_dir}):")

    def extract_for(sub: Task, encs: list[Encoder], dense: bool) -> dict:
        return extract(sub, encs, cache, dense=dense, batch_size=args.batch_size, workers=args.workers,
                       device=device, dense_budget_gb=args.dense_cache_gb)

    # Everything the protocols declared, in as few passes as possible; then the global features of every image,
    # a cache hit by now.
    for view, dense in feature_sets(task, spec.protocols):
        extract_for(view, encoders, dense)
    feats = extract_for(task, encoders, False)
    tr = TaskRun(task, split, split_hash(t.image_ids, list(split)), weights, feats, summary, extract=extract_for,
                 seed=args.seed, reference=reference)
    sections = []
    for proto in spec.protocols:
        print(f"protocol {proto} ...")
        sections.append(PROTOCOLS[proto].run(tr, encoders))

    return write_outputs(tr, encoders, sections, args)


def write_outputs(tr: TaskRun, encoders: list[Encoder], sections: list, args: argparse.Namespace) -> Path:
    """Split file, per-model results and predictions, extra files, then the leaderboard: each atomically."""
    task, t, summary, reference, out = tr.task, tr.task.table, tr.summary, tr.reference, args.out
    split = tr.split
    tname = safe_name(task.name)
    write_split(out / "splits" / f"{tname}.csv", task.name, t.image_ids, t.patient_ids, list(split))
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    prov = provenance()
    for enc in encoders:
        res = {
            "task": task.name, "model": enc.name, "encoder": enc.identity(), "input_policy": args.input_policy,
            "split": {"hash": tr.split_hash, "seed": args.seed, "file": f"splits/{tname}.csv",
                      "test_fraction": args.test_fraction},
            "bootstrap": {"n_resamples": args.bootstrap, "seed": args.seed, "unit": "patient", "ci": "percentile 95%"},
            "reference": reference, "dataset": summary, "protocols": tr.results.get(enc.name, {}),
            "provenance": prov, "date": date,
        }
        folder = out / "results" / tname
        atomic_write_json(folder / f"{safe_name(enc.name)}.json", res)
        if tr.predictions.get(enc.name):
            with atomic_path(folder / f"{safe_name(enc.name)}.predictions.parquet") as tmp:
                pl.DataFrame(tr.predictions[enc.name]).write_parquet(tmp)
    for rel, blob in tr.files.items():
        with atomic_path(out / rel) as tmp:
            tmp.write_bytes(blob)
    header = [
        ("Task", f"`{task.name}`: {summary['images']} images, {summary['patients']} patients"),
        ("Split", f"patient-level, seed {args.seed}: train {summary['train_images']} images / "
                  f"{summary['train_patients']} patients, test {summary['test_images']} images / "
                  f"{summary['test_patients']} patients; hash `{tr.split_hash}` (`splits/{tname}.csv`)"),
        ("Bootstrap", f"{args.bootstrap} patient-level resamples, seed {args.seed}, percentile 95% CI"),
        ("Input policy", args.input_policy),
        ("Reference", f"`{reference}`"),
        ("Generated", f"{date} by `python -m harness.run` (results in `results/{tname}/`)"),
    ]
    md = render(f"Leaderboard: {task.name}", header, sections)
    path = out / f"{tname}.md"
    atomic_write_text(path, md)
    return path


def print_summary(s: dict) -> None:
    print(f"\ntask {s['task']}: {s['images']} images, {s['patients']} patients; sex known {s['sex_known']} "
          f"(M {s['sex_counts']['M']}, F {s['sex_counts']['F']}), age known {s['age_known']}, masks {s['masks']}")
    if s["patients_merged"]:
        print(f"{s['patients_merged']} patient id(s) merged into others: they share byte-identical images")
    rows = [[n, s["positives"][n], s["train_positives"][n], s["test_positives"][n]] for n in s["positives"]]
    print(tabulate(rows, headers=["label", "positives", "train", "test"], tablefmt="simple"))
    print(f"split: train {s['train_images']} images / {s['train_patients']} patients, "
          f"test {s['test_images']} images / {s['test_patients']} patients")
    if s["skipped"]:
        print(f"skipped {len(s['skipped'])} file(s):")
        for item in s["skipped"][:20]:
            print(f"  {item['file']}: {item['reason']}")


def list_registered() -> None:
    print(tabulate([[n, "name:ARG" if e.takes_arg else "", ", ".join(e.expected_files) or "(none)", e.description]
                    for n, e in registered().items()], headers=["encoder", "form", "weight files", "what"]))
    print()
    print(tabulate([[n, "name:ARG" if e.takes_arg else "", e.description]
                    for n, e in harness.tasks.base.registered_tasks().items()], headers=["task", "form", "what"]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        list_registered()
        return 0
    if args.bootstrap < 1:
        print("error: --bootstrap must be at least 1", file=sys.stderr)
        return 2
    names = resolve_names(args.models)
    explicit = {m.strip() for m in args.models.split(",")} - {"all"}
    try:
        encoders, skipped = load_encoders(names, args.weights_dir, args.input_policy, explicit)
    except (WeightsMissing, KeyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tabulate([[e.name, "ready", e.weights_digest[:12]] for e in encoders]
                   + [[n, "skipped", why] for n, why in skipped], headers=["encoder", "status", "weights / reason"]))
    if not encoders:
        print("error: no encoder could be loaded", file=sys.stderr)
        return 2
    reference = args.reference or encoders[0].name
    if reference not in {e.name for e in encoders}:
        print(f"error: --reference {reference!r} is not among the loaded models", file=sys.stderr)
        return 2
    root, named = parse_data_roots(args.data_root)
    ctx = TaskContext(data_root=root, data_roots=named, skip_bad=args.skip_bad, seed=args.seed,
                      on_duplicate=args.on_duplicate)
    cache = FeatureCache(args.cache_dir)
    device = pick_device(args.device)
    written = []
    for raw in split_task_list(args.tasks):
        spec = parse_task_spec(raw)
        try:
            written.append(evaluate_task(spec, encoders, args, ctx, cache, device, reference))
        except (TaskError, ValueError, FloatingPointError) as e:
            print(f"error: task {raw!r}: {e}", file=sys.stderr)
            return 1
    for w in written:
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
