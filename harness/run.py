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
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

import baselines
import harness.tasks
from baselines.registry import Encoder, WeightsMissing, build_encoder, default_weights_dir, registered, resolve_names
from harness import stats
from harness.features import FeatureCache, FeatureSet, extract
from harness.io import atomic_path, atomic_write_json, atomic_write_text
from harness.leaderboard import Cell, Section, render
from harness.probes.linear import linear_probe
from harness.splits import make_split, pseudonym, split_hash, write_split
from harness.tasks.base import Task, TaskContext, TaskError, build_task

PROTOCOLS = ("linear",)
DEFAULT_PROTOCOLS = ("linear",)


@dataclass
class TaskSpec:
    name: str
    arg: str | None
    protocols: tuple[str, ...]


def parse_task_spec(spec: str) -> TaskSpec:
    """``demo``, ``demo:linear``, ``csv:PATH``, ``csv:PATH:linear``: a trailing protocol name picks protocols."""
    name, _, rest = spec.partition(":")
    protocols = DEFAULT_PROTOCOLS
    if rest:
        head, _, tail = rest.rpartition(":")
        if tail in PROTOCOLS:
            protocols, rest = (tail,), head
        elif not head and rest in PROTOCOLS:
            protocols, rest = (rest,), ""
    return TaskSpec(name, rest or None, protocols)


def split_task_list(tasks: str) -> list[str]:
    """Comma-separated task specs; a comma inside a csv: path is not supported (rename the file)."""
    return [t.strip() for t in tasks.split(",") if t.strip()]


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
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/raddino-bench"),
                   help="feature cache (content-addressed; safe to delete)")
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
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) missing or unreadable images instead of stopping")
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


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


@dataclass
class TaskRun:
    """Everything one task's protocols share: the task, its split, test-set bootstrap weights, features."""

    task: Task
    split: np.ndarray
    split_hash: str
    weights: np.ndarray
    features: dict[str, FeatureSet]
    summary: dict
    results: dict[str, dict] = field(default_factory=dict)   # model -> results JSON
    predictions: dict[str, list[dict]] = field(default_factory=dict)


def run_linear(tr: TaskRun, encoders: list[Encoder], reference: str, seed: int) -> Section:
    t = tr.task.table
    train, test = tr.split == "train", tr.split == "test"
    y = t.labels.astype(int)
    groups = np.asarray(t.patient_ids)
    test_ids = [t.image_ids[i] for i in np.flatnonzero(test)]
    test_keys = [pseudonym(t.patient_ids[i], tr.task.name) for i in np.flatnonzero(test)]
    summaries, label_info = {}, {}
    for enc in encoders:
        x = tr.features[enc.name].global_
        probe = linear_probe(x[train], y[train], groups[train], x[test], y[test], t.label_names, seed=seed)
        label_info[enc.name] = probe.labels
        summaries[enc.name] = stats.classification_summary(np.nan_to_num(probe.scores, nan=0.5), y[test],
                                                           t.label_names, tr.weights)
        rows = []
        for j, name in enumerate(t.label_names):
            if not probe.labels[j].evaluable:
                continue
            rows += [{"image_id": i, "patient_key": k, "label": name, "target": int(yy), "score": float(s)}
                     for i, k, yy, s in zip(test_ids, test_keys, y[test][:, j], probe.scores[:, j])]
        tr.predictions[enc.name] = rows

    metrics = [("auroc", "AUROC"), ("auprc", "AUPRC")]
    paired = {m: stats.compare_to_reference(
        {e.name: summaries[e.name][m]["macro_resampled"] for e in encoders},
        {e.name: summaries[e.name][m]["macro"]["point"] for e in encoders}, reference) for m, _ in metrics}

    evaluable = [lab.evaluable for lab in label_info[encoders[0].name]]
    columns = [f"macro {title}" for _, title in metrics] + [f"{n} AUPRC" for n, ok in zip(t.label_names, evaluable) if ok]
    rows: dict[str, dict[str, Cell]] = {}
    for enc in encoders:
        s = summaries[enc.name]
        row = {}
        for m, title in metrics:
            mac = s[m]["macro"]
            sig = enc.name != reference and (paired[m][enc.name]["p_holm"] or 1.0) < 0.05
            row[f"macro {title}"] = Cell(mac["point"], mac["lo"], mac["hi"], sig)
        for n, ok in zip(t.label_names, evaluable):
            if ok:
                pl = s["auprc"]["per_label"][n]
                row[f"{n} AUPRC"] = Cell(pl["point"], pl["lo"], pl["hi"])
        rows[enc.name] = row
        tr.results.setdefault(enc.name, {})["linear"] = {
            "metrics": {m: {"macro": s[m]["macro"], "per_label": s[m]["per_label"]} for m, _ in metrics},
            "paired_to_reference": None if enc.name == reference else {m: paired[m][enc.name] for m, _ in metrics},
            "labels": [lab.__dict__ for lab in label_info[enc.name]],
        }
    notes = [f"Reference model for paired differences: `{reference}`. Per-label columns: AUPRC (the paper's "
             "headline classification metric)."]
    not_eval = [lab for lab in label_info[encoders[0].name] if not lab.evaluable]
    if not_eval:
        notes.append("Not evaluable, left out of macro means: " + "; ".join(
            f"{lab.name} ({lab.reason}: train {lab.counts['train_pos']}+/{lab.counts['train_neg']}-, "
            f"test {lab.counts['test_pos']}+/{lab.counts['test_neg']}-)" for lab in not_eval) + ".")
    return Section("Linear probe (classification)", columns, rows, notes=notes)


PROTOCOL_RUNNERS = {"linear": run_linear}


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
    feats = extract(task, encoders, cache, dense=False, batch_size=args.batch_size, workers=args.workers,
                    device=device)
    tr = TaskRun(task, split, split_hash(t.image_ids, list(split)), weights, feats, summary)
    sections = []
    for proto in spec.protocols:
        print(f"protocol {proto} ...")
        sections.append(PROTOCOL_RUNNERS[proto](tr, encoders, reference, args.seed))

    # Write: split file, per-model results and predictions, then the leaderboard (each atomically).
    out = args.out
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
            import polars as pl

            with atomic_path(folder / f"{safe_name(enc.name)}.predictions.parquet") as tmp:
                pl.DataFrame(tr.predictions[enc.name]).write_parquet(tmp)
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
    ctx = TaskContext(data_root=root, data_roots=named, skip_bad=args.skip_bad, seed=args.seed)
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
