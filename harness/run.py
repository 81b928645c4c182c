"""``python -m harness.run`` (= ``raddino-bench eval``): evaluate frozen encoders on tasks and write leaderboards.

    python -m harness.run --models all --tasks demo
    python -m harness.run --models pixels,random-vit --tasks csv:../shared/data/ieee8023-covid-cxr/labels.csv

Every name on the command line is checked first (`harness.checks`): a usage error exits 2 before any weights are
loaded. Per task: build it, log its summary, make (or check) the patient-level split and write it with its hash,
extract features for every encoder in one pass (cached), run each protocol, bootstrap on shared patient
resamples, and write ``<out>/<name>.md`` (``--out`` unset: ``runs/<name>/<name>.md``) plus ``<out>/results/<name>/<model>.json`` and per-image predictions
(``<name>``: the task's name plus the options that change its numbers, see `output_name`).
Everything for one task is computed before anything of it is written, and every file is written atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from baselines.registry import (
    DEFAULT_GLOBAL_POOL,
    GLOBAL_POOLS,
    Encoder,
    WeightsMissing,
    build_encoder,
    default_weights_dir,
)
from harness import stats, tidy
from harness.checks import check_eval_args, default_protocols
from harness.common.atomic import atomic_path, atomic_write_text
from harness.common.devices import check_here, pick_device
from harness.common.errors import DataError, UsageError, command
from harness.common.paths import cache_dir, check_writable_folder, safe_name
from harness.common.hashing import array_digest
from harness.features import DEFAULT_DENSE_BUDGET_GB, FeatureCache, extract, precision
from harness.figures import FigureInputError, draw_task_figures, figure_links
from harness.leaderboard import render, section_from_json, section_to_json
from harness.listing import list_registered, status_table
from harness.log import setup_logging
from harness.probes import PROTOCOLS
from harness.registry import resolve
from harness.protocols import (MIN_POSITIVE_PATIENTS, ProbeOptions, ProtocolResult, TaskRun, feature_sets,
                               label_status, usable_cores)
from harness.results_cache import ResultsCache, ResultsCacheFull
from harness.splits import make_split, pseudonym, split_hash, validation_split, write_split
from harness.taskspec import TaskSpec, parse_task_list
from harness.taskspec import parse_task_spec as _parse_spec
from harness.tasks.base import Subset, Task, TaskContext, TaskError, build_task

#: Named, not __name__: run as ``python -m harness.run`` this module is __main__, outside the harness logger.
log = logging.getLogger("harness.run")

PROG = "python -m harness.run"
#: Where each task's outputs go when --out is not given: runs/<output name>/, never the committed leaderboards/.
DEFAULT_RUNS = Path("runs")


def parse_task_spec(spec: str) -> TaskSpec:
    """``demo``, ``demo:linear``, ``csv:PATH``, ``csv:PATH:linear``: a trailing protocol name picks protocols.
    One spec: a comma belongs to its argument. The protocols come in run order, with those they run after
    (``demo:demographics`` runs the linear probe first)."""
    parsed = _parse_spec(spec, PROTOCOLS, default_protocols())
    return dataclasses.replace(parsed, protocols=PROTOCOLS.ordered(parsed.protocols))


def split_task_list(tasks: str) -> list[str]:
    """Comma-separated task specs, each as written. A piece of the form KEY=VALUE continues the previous task's
    arguments (``demo:n_patients=50,size=128``); a path with a comma goes through --task-arg instead."""
    return [s.text for s in parse_task_list(tasks, PROTOCOLS, default_protocols())]


def task_out_dir(out: Path | None, name: str) -> Path:
    """The folder a task's leaderboard, results/ and splits/ go in: --out when given, else runs/<name>/."""
    return DEFAULT_RUNS / name if out is None else out


def parse_data_roots(values: list[str]) -> tuple[Path | None, dict[str, Path]]:
    root, named = None, {}
    for v in values:
        key, sep, path = v.partition("=")
        if sep and re.fullmatch(r"[A-Za-z0-9_-]+", key):
            named[key] = Path(path).expanduser()
        else:
            root = Path(v).expanduser()
    return root, named


EXAMPLES = """\
examples:
  %(prog)s --models pixels,random-vit --tasks demo:n_patients=50,size=128 --protocols linear,knn
  %(prog)s --models all --tasks csv --task-arg csv.path=/data/a,b/labels.csv --out leaderboards
  %(prog)s --models rad-dino,ckpt:runs/exp1 --tasks vindr:agg=any:linear --data-root /data/cxr -v
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every flag's help, examples laid out as written."""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate frozen chest X-ray encoders with identical protocols; write Markdown leaderboards "
                    "with patient-clustered bootstrap CIs.",
        epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--models", default="all",
                   help="comma list of encoders (see --list), 'all' = every registered encoder whose weights are "
                        "present (the others are listed as skipped, with where to put their files); "
                        "ckpt:DIR evaluates a trainer checkpoint")
    p.add_argument("--tasks", default="demo",
                   help="comma list of tasks: demo, csv:PATH/labels.csv, and dataset names (vindr, candid, rsna) "
                        "when registered; NAME:KEY=VALUE,KEY=VALUE sets a task's options; append :PROTOCOL to run "
                        "one protocol only (its section is merged into the task's leaderboard when that was made "
                        "with the same settings)")
    p.add_argument("--task-arg", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="one option of every task NAME in --tasks, the value taken verbatim (a path with a comma: "
                        "csv.path=/data/a,b/labels.csv; demo.n_patients=50); repeatable")
    p.add_argument("--protocols", default=None, metavar="P1,P2",
                   help="protocols of every task that names none (default: the protocols marked 'by default' in "
                        "raddino-bench ls)")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR|NAME=DIR",
                   help="folder holding the datasets (vindr-cxr/, candid-ptx/, rsna-pneumonia/), or NAME=DIR for "
                        "one dataset; repeatable")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help=f"folder with one sub-folder of weights per model (default: ${{RADDINO_BENCH_WEIGHTS}}, "
                        f"else {default_weights_dir()})")
    p.add_argument("--cache-dir", type=Path,
                   default=cache_dir(),
                   help="feature cache, and under results/ the protocols' per-model fits (content-addressed; safe "
                        "to delete); $RADDINO_BENCH_CACHE sets the default")
    p.add_argument("--recompute", action="store_true",
                   help="recompute every probe fit, segmentation head and bootstrap instead of reusing those of an "
                        "earlier run with the same features, data, settings and code (the cache is still updated)")
    p.add_argument("--out", type=Path, default=None,
                   help="where leaderboards (<name>.md: the task name plus the options that change its numbers), "
                        "results/ and splits/ are written; unset: each task in its own runs/<name>/")
    p.add_argument("--bootstrap", type=int, default=stats.DEFAULT_RESAMPLES,
                   help="number of patient-level bootstrap resamples")
    p.add_argument("--min-positive-patients", type=int, default=MIN_POSITIVE_PATIENTS,
                   help="a label is evaluable (enters macro means and the tables) only with at least this many "
                        "test patients with a positive image, and as many with a negative one")
    p.add_argument("--knn-k", type=int, default=ProbeOptions.knn_k,
                   help="neighbours of the k-NN probe (clamped to the training split's size, with a note)")
    p.add_argument("--knn-temperature", type=float, default=ProbeOptions.knn_temperature,
                   help="temperature T of the k-NN probe's vote weights exp(cos / T)")
    p.add_argument("--label-fractions", default=",".join(f"{f:g}" for f in ProbeOptions.label_fractions),
                   help="comma list of fractions in (0, 1] of the training patients the label-efficiency protocol "
                        "(TASK:label-efficiency) refits the linear probe on")
    p.add_argument("--label-draws", type=int, default=ProbeOptions.label_draws,
                   help="seeded patient draws per label-efficiency fraction below 1")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the probe's CV and the bootstrap")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="fraction of patients in the test split when the task has no predefined one")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="test: fit on the training patients, score the test patients (report this, once); "
                        "validation: drop the test patients, fit on most training patients and score the others "
                        "(harness.splits.validation_split; choose recipes, checkpoints and poolings on this)")
    p.add_argument("--reference", default=None,
                   help="model every other is compared with (paired bootstrap); default: the first model")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--input-policy", choices=("native", "harmonised"), default="native",
                   help="native: each model's own resize/crop; harmonised: every model gets the whole radiograph "
                        "resized to its input size without cropping")
    p.add_argument("--global-pool", choices=GLOBAL_POOLS, default=DEFAULT_GLOBAL_POOL,
                   help="the one vector per image the global protocols read, the same for every model: cls = the "
                        "model's global embedding (a ViT's normed CLS token), avg = the mean of its last layer's "
                        "patch tokens, cls+avg = both concatenated (docs/evaluate.md#global-pooling)")
    p.add_argument("--batch-size", type=int, default=16, help="images per feature-extraction batch")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers decoding images")
    p.add_argument("--probe-jobs", type=int, default=usable_cores(),
                   help="processes fitting the linear probes (default: the CPUs this process may use); each fit uses "
                        "one BLAS thread, so the numbers are the same for any value")
    p.add_argument("--dense-cache-gb", type=float, default=DEFAULT_DENSE_BUDGET_GB,
                   help="disk budget of one dense cache entry (one model, one task); a larger one is not cached and "
                        "the segmentation heads re-encode each batch instead, with the same results")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) missing or unreadable images instead of stopping")
    p.add_argument("--on-duplicate", choices=("merge", "error"), default="merge",
                   help="byte-identical images under different patient ids: merge their patients (one split, one "
                        "bootstrap unit; the count is in the task summary) or stop with an error")
    p.add_argument("--list", action="store_true",
                   help="list registered encoders (whether their weights are present, and where), tasks and "
                        "protocols, then exit (= raddino-bench ls)")
    p.add_argument("-q", "--quiet", action="count", default=0,
                   help="only warnings and errors on stderr (stdout keeps the tables and 'wrote' lines)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="debug messages, progress bars even when stderr is not a terminal, and an error's traceback")
    return p


def load_encoders(names: list[str], weights_dir: Path | None, policy: str, explicit: set[str],
                  global_pool: str = DEFAULT_GLOBAL_POOL) -> tuple[list[Encoder], list[tuple[str, str]]]:
    """Build each encoder; a model named explicitly with missing weights is an error, under 'all' a skip."""
    encoders, skipped = [], []
    for name in names:
        try:
            encoders.append(build_encoder(name, weights_dir, policy, global_pool))
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


def validation_task(task: Task, split: np.ndarray, seed: int) -> tuple[Subset, np.ndarray]:
    """The task's training patients only, as a task of their own, with the inner split (harness.splits.
    validation_split) in the train / test roles: the test patients' images are never read."""
    inner = np.array(validation_split(task.table.patient_ids, list(split), seed))
    rows = np.flatnonzero(inner != "test")
    return Subset(task, rows, "validation"), np.where(inner[rows] == "val", "test", "train")


def evaluate_task(spec: TaskSpec, encoders: list[Encoder], args: argparse.Namespace, ctx: TaskContext,
                  cache: FeatureCache, device: torch.device, reference: str) -> Path:
    task = build_task(spec.name, spec.arg, ctx)
    t = task.table
    summary = task.summary()
    split = np.array(make_split(t.patient_ids, args.seed, args.test_fraction, t.split))
    if args.split == "validation":
        task, split = validation_task(task, split, args.seed)
        t = task.table
        summary = task.summary()
    for part in ("train", "test"):
        idx = split == part
        summary[f"{part}_images"] = int(idx.sum())
        summary[f"{part}_patients"] = len({p for p, s in zip(t.patient_ids, split) if s == part})
        summary[f"{part}_positives"] = {n: int(t.labels[idx, j].sum()) for j, n in enumerate(t.label_names)}
    print_summary(summary)
    out_name = (output_name(spec, task.parent if args.split == "validation" else task)
                + ("-validation" if args.split == "validation" else "") + pool_suffix(args.global_pool))
    out = task_out_dir(args.out, out_name)
    # The folders this task writes, now that its name is known: before any feature is computed, not after.
    for folder in (out, out / "splits", out / "results" / out_name, out / "figures" / out_name):
        check_writable_folder(folder, "--out")

    test_idx = np.flatnonzero(split == "test")
    # Drawn over the pseudonyms the outputs carry (so a reader can redraw them), conditioned on a positive and a
    # negative patient of every evaluable label (so every macro keeps its label set in every resample).
    evaluable, _ = label_status(task, split, args.min_positive_patients)
    keys = [pseudonym(t.patient_ids[i], task.name) for i in test_idx]
    weights = stats.bootstrap_weights(keys, args.bootstrap, args.seed,
                                      required=stats.class_requirements(t.labels[test_idx], evaluable))
    log.info(f"features ({len(encoders)} encoder(s), cache {args.cache_dir}):")

    def extract_for(sub: Task, encs: list[Encoder], dense: bool) -> dict:
        return extract(sub, encs, cache, dense=dense, batch_size=args.batch_size, workers=args.workers,
                       device=device, dense_budget_gb=args.dense_cache_gb)

    # Everything the protocols declared, in as few passes as possible; then the global features of every image,
    # a cache hit by now.
    # The protocols asked for and those they run after (dependencies first).
    protocols = PROTOCOLS.ordered(spec.protocols)
    for view, dense in feature_sets(task, protocols):
        extract_for(view, encoders, dense)
    feats = extract_for(task, encoders, False)
    results_cache = ResultsCache(args.cache_dir / "results", recompute=args.recompute)
    tr = TaskRun(task, split, split_hash(t.image_ids, list(split)), weights, feats, summary, extract=extract_for,
                 seed=args.seed, reference=reference, min_positive_patients=args.min_positive_patients,
                 out_name=out_name, options=probe_options(args), results_cache=results_cache)
    results: dict[str, ProtocolResult] = {}
    for proto in protocols:
        entry = PROTOCOLS.get(proto)
        log.info(f"protocol {proto} ...")
        # A protocol gets the results of those it runs after, in the order it declares them.
        results[proto] = entry.load()(tr, encoders, *(results[dep] for dep in entry.after))
    log.info(f"results cache ({results_cache.root}): {results_cache.hits} model result(s) reused, "
             f"{results_cache.misses} computed")
    return write_outputs(tr, encoders, results, args, spec, device)


#: ``results/<name><MANIFEST>``, beside the task's results folder (whose *.json are one per model): the settings
#: of the run and every section as data, so that a run of one protocol can be merged into the leaderboard, and
#: the files each protocol published, so that none is left stale.
MANIFEST = ".leaderboard.json"


def output_name(spec: TaskSpec, task: Task) -> str:
    """Stem of a task's output files: the task name plus the options that change its numbers, so two runs that
    differ in them never write the same files. ``csv:`` adds the CSV's stem unless it is ``labels.csv`` (two CSVs
    in one folder), other tasks their KEY=VALUE options sorted (a path value by its last component):
    ``vindr:agg=any`` -> ``vindr-agg_any``, ``rsna:splits=/x/RSNA`` -> ``rsna-splits_RSNA``. Without options
    the name is the task's (``demo``, ``csv-<folder>``). Options are taken as written: ``vindr:agg=majority``,
    the default, gets its own name."""
    base = safe_name(task.name)
    if not spec.arg:
        return base
    if spec.name == "csv":
        stem = Path(spec.arg).stem
        return base if stem == "labels" else f"{base}-{safe_name(stem)}"
    parts = []
    for piece in sorted(p for p in spec.arg.split(",") if p):
        key, sep, value = piece.partition("=")
        value = Path(value).name if ("/" in value or os.sep in value) else value
        parts.append(safe_name(f"{key}_{value}" if sep else key))
    return "-".join([base, *parts])


def pool_suffix(pool: str) -> str:
    """What a non-default --global-pool adds to the output name (``-pool_avg``), so that two poolings of one task
    never write the same files."""
    return "" if pool == DEFAULT_GLOBAL_POOL else "-" + safe_name(f"pool_{pool.replace('+', '_')}")


def parse_fractions(text: str) -> tuple[float, ...]:
    """``--label-fractions``: sorted distinct fractions, each in (0, 1]; ValueError otherwise."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--label-fractions must be a comma list of numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 < v <= 1.0]  # NaN fails the comparison too
    if not values or bad:
        raise ValueError(f"--label-fractions must be in (0, 1], got {text!r}")
    return tuple(sorted(set(values)))


def probe_options(args: argparse.Namespace) -> ProbeOptions:
    """The protocols' own settings from the flags (already checked by `main`)."""
    return ProbeOptions(knn_k=args.knn_k, knn_temperature=args.knn_temperature,
                        label_fractions=parse_fractions(args.label_fractions), label_draws=args.label_draws,
                        n_jobs=args.probe_jobs)


def split_description(task: Task, split: np.ndarray, seed: int) -> str:
    """How the split was made: an official split where the task gives one for every image (the seed played no
    part), else seeded by patient (around the official rows when some have one); for ``--split validation``, the
    training patients of that split divided again."""
    if isinstance(task, Subset) and task.name.endswith("/validation"):
        return (f"validation split (--split validation): the training patients of the "
                f"{split_description(task.parent, split, seed)} split only, divided again by patient "
                f"(harness.splits.validation_split, seed {seed} + 7919); its 'test' rows are the validation "
                f"patients, and the task's test patients are not read")
    t = task.table
    given = [s for s in (t.split or []) if s]
    if t.split is not None and len(given) == len(t):
        return "official test split (the seed played no part)"
    if given:
        return f"official split where the task gives one ({len(given)} images), the other patients by seed {seed}"
    return f"patient-level, seed {seed}"


def label_header(tr: TaskRun) -> str:
    """The task's labels, which enter the tables and macro means, and why the others do not."""
    t = tr.task.table
    ok, reasons = label_status(tr.task, tr.split, tr.min_positive_patients)
    used = ", ".join(n for n, k in zip(t.label_names, ok) if k) or "none"
    left = "; ".join(f"{n} ({why})" for n, k, why in zip(t.label_names, ok, reasons) if not k)
    return (f"{used} (evaluable: at least {tr.min_positive_patients} positive and {tr.min_positive_patients} negative "
            f"test patients, both classes in training)" + (f"; not evaluable: {left}" if left else ""))


def pooling_header(pool: str, encoders: list[Encoder]) -> str:
    """The leaderboard's pooling line: the one pooling every model's global feature went through, and what it means
    for the models whose tokens are not a ViT's."""
    what = {"cls": "each model's global embedding (a ViT's final-normed CLS token)",
            "avg": "the mean of each model's last-layer patch tokens (final-normed for a ViT)",
            "cls+avg": "each model's global embedding and the mean of its last-layer patch tokens, concatenated"}[pool]
    notes = "; ".join(dict.fromkeys(e.pooling_note for e in encoders if e.pooling_note))
    return f"`{pool}`: {what}; the segmentation heads read the patch tokens and do not depend on it" + (
        f" ({notes})" if notes else "")


def write_json(path: Path, obj: object) -> None:
    """Strict JSON: NaN is written as null, and allow_nan=False makes any that slips through an error."""
    atomic_write_text(path, json.dumps(stats.json_ready(obj), indent=2, allow_nan=False, default=str) + "\n")


def run_settings(tr: TaskRun, encoders: list[Encoder], args: argparse.Namespace, device: torch.device) -> dict:
    """What every section of one leaderboard must share to be shown together (the date aside), one field each: the
    task's content (images, label values, split), the shared settings, and each model's features (their
    feature-cache key covers the encoder, its weights and code, the extraction code, the precision and the
    images). A protocol's own options (k, fractions) are not here: each section states those it was computed
    with."""
    t = tr.task.table
    return {"task": tr.task.name, "images": tr.task.content_digest(), "labels": list(t.label_names),
            "label_values": array_digest(np.asarray(t.labels)), "split_hash": tr.split_hash,
            "seed": args.seed, "test_fraction": args.test_fraction, "n_resamples": args.bootstrap,
            "min_positive_patients": args.min_positive_patients, "input_policy": args.input_policy,
            "global_pool": args.global_pool, "reference": tr.reference,
            "models": {e.name: {"weights": e.weights_digest, "features": tr.features[e.name].key,
                                "precision": precision(device)} for e in encoders}}


#: Why the sections of an earlier run cannot stand beside this one's, by the run setting that differs (any other
#: setting: its name).
_DIFFERS = {"task": "another task", "images": "the task's images differ", "labels": "the label names differ",
            "label_values": "the label values differ", "split_hash": "the split differs", "seed": "--seed differs",
            "test_fraction": "--test-fraction differs", "n_resamples": "--bootstrap differs",
            "min_positive_patients": "--min-positive-patients differs", "input_policy": "--input-policy differs",
            "global_pool": "--global-pool differs", "reference": "--reference differs"}


def settings_differences(old: dict | None, new: dict) -> list[str]:
    """Why sections computed under `old` run settings are not comparable with `new` ones (empty: they are)."""
    if not isinstance(old, dict):
        return ["it was written by an older version"]
    why = [_DIFFERS.get(k, f"{k} differs") for k in sorted(set(old) | set(new))
           if k != "models" and old.get(k) != new.get(k)]
    old_models = old.get("models") if isinstance(old.get("models"), dict) else {}
    changed = [m for m in new["models"] if m in old_models and old_models[m] != new["models"][m]]
    if changed:
        why.append(f"the features of {', '.join(changed)} differ (encoder weights or code, extraction code, "
                   "precision or images)")
    if set(old_models) != set(new["models"]):
        why.append(f"the models differ ({', '.join(old_models) or 'none'} then, {', '.join(new['models'])} now)")
    return why


def section_inputs(task: Task, protocol: str) -> dict:
    """Digests of the task data `protocol` depends on besides the run settings (sex and age, masks)."""
    target = PROTOCOLS.get(protocol).inputs
    return resolve(target)(task) if target else {}


def recompute_command(spec: TaskSpec, encoders: list[Encoder], protocols: list[str]) -> str:
    """The command that computes `protocols` again and merges them into this run's leaderboard (the run's other
    options to be repeated)."""
    if spec.arg and "," in spec.arg:  # a comma cannot be written in --tasks
        task = f"{spec.name} --task-arg {spec.name}.path={spec.arg}"
    else:
        task = f"{spec.name}:{spec.arg}" if spec.arg else spec.name
    return (f"{PROG} --models {','.join(e.name for e in encoders)} --tasks {task} --protocols "
            f"{','.join(protocols)} (with this run's other options)")


def _read_json(path: Path) -> dict | None:
    """The object in a JSON file written by an earlier run; None when absent or unreadable (then nothing of that
    run is merged)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _read_tidy(path: Path) -> list[tidy.TidyRow] | None:
    """The rows of a tidy table written by an earlier run; None when absent or unreadable."""
    try:
        return tidy.read(path)
    except (OSError, ValueError):
        return None


def write_outputs(tr: TaskRun, encoders: list[Encoder], results: dict[str, ProtocolResult],
                  args: argparse.Namespace, spec: TaskSpec, device: torch.device) -> Path:
    """Split file, per-model results, the protocols' files, the tidy table, then the leaderboard: each atomically.

    A run of some protocols into a folder that holds a leaderboard of the same task replaces those protocols'
    sections, results, files and tidy rows, and keeps each other section only when it was computed from the same
    content with the same settings (`run_settings`: images, label values, split, each model's features and
    precision, the shared flags) and the task data it depends on are unchanged (`section_inputs`: sex and age,
    masks). Any other section is dropped, with its files; the log and the leaderboard's header say which, why,
    and the command that computes it again. Either way, files of the old leaderboard that this one does not list
    are deleted, so nothing stale stays beside the new files."""
    task, t, summary, reference = tr.task, tr.task.table, tr.summary, tr.reference
    name = tr.out_name
    out = task_out_dir(args.out, name)
    folder = out / "results" / name
    settings = run_settings(tr, encoders, args, device)
    manifest = out / "results" / f"{name}{MANIFEST}"
    tidy_paths = (out / "results" / f"{name}.parquet", out / "results" / f"{name}.csv")
    old = _read_json(manifest)
    old_tidy = _read_tidy(tidy_paths[0]) if old is not None else None
    inputs = {p: section_inputs(task, p) for p in results}
    kept: dict[str, dict] = {}
    dropped: dict[str, list[str]] = {}  # protocol -> why
    if old is not None:
        shared = settings_differences(old.get("settings") if old_tidy is not None else None, settings)
        for p, entry in old.get("protocols", {}).items():
            if p in results or p not in PROTOCOLS.entries:
                continue
            now = {} if shared else section_inputs(task, p)  # not read (masks: a pass) when dropped anyway
            why = shared or ([] if entry.get("inputs", {}) == now else
                             [f"the task data it depends on differ ({', '.join(now)})"])
            if why:
                dropped[p] = why
            else:
                kept[p] = entry
    elif (out / f"{name}.md").exists():
        dropped["every section"] = ["it was written by an older version (no manifest)"]
    dropped_note = ""
    if dropped:
        reasons = "; ".join(f"{p}: {', '.join(why)}" for p, why in dropped.items())
        redo = [p for p in PROTOCOLS.ordered(PROTOCOLS) if p in dropped]
        dropped_note = f"{', '.join(dropped)} of an earlier run ({reasons})" + (
            f"; to compute them again: `{recompute_command(spec, encoders, redo)}`" if redo else "")
        log.warning(f"note: {out / (name + '.md')}: sections dropped, not merged: {dropped_note}")
    # Leaderboard order: the whole table's run order, whichever protocols this run computed.
    order = [p for p in PROTOCOLS.ordered(PROTOCOLS) if p in kept or p in results]
    files = {p: sorted(results[p].files) if p in results else kept[p]["files"] for p in order}
    model_files = [f"results/{name}/{safe_name(e.name)}.json" for e in encoders]
    listed = {f for p in order for f in files[p]} | set(model_files)

    write_split(out / "splits" / f"{name}.csv", task.name, t.image_ids, t.patient_ids, list(tr.split))
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    prov = provenance()
    for enc, rel in zip(encoders, model_files):
        earlier = (_read_json(out / rel) or {}).get("protocols", {}) if kept else {}
        records = {p: earlier[p] for p in kept if p in earlier}
        records.update({p: r.to_record(enc.name) for p, r in results.items() if enc.name in r.records})
        res = {
            "task": task.name, "model": enc.name, "encoder": enc.identity(), "input_policy": args.input_policy,
            "global_pool": args.global_pool,
            "split": {"hash": tr.split_hash, "seed": args.seed, "file": f"splits/{name}.csv",
                      "test_fraction": args.test_fraction, "how": split_description(task, tr.split, args.seed)},
            "bootstrap": {"n_resamples": args.bootstrap, "seed": args.seed, "unit": "patient", "ci": "percentile 95%",
                          "drawn_over": "sorted patient_key",
                          "conditioned_on": "a positive and a negative patient of every evaluable label",
                          "min_positive_patients": args.min_positive_patients},
            "reference": reference, "dataset": summary, "protocols": {p: records[p] for p in order if p in records},
            "provenance": prov, "date": date,
        }
        write_json(out / rel, res)
    for result in results.values():
        for rel, blob in result.files.items():
            with atomic_path(out / rel) as tmp:
                tmp.write_bytes(blob)
    rows = [r for p in order for r in (tidy.with_pool(results[p].tidy, args.global_pool) if p in results else
                                       [r for r in old_tidy or [] if r.protocol == p])]
    with atomic_path(tidy_paths[0]) as tmp:
        tmp.write_bytes(tidy.parquet_bytes(rows))
    atomic_write_text(tidy_paths[1], tidy.csv_text(rows))
    all_sections = {p: results[p].to_section() if p in results else section_from_json(kept[p]["section"])
                    for p in order}
    write_json(manifest, {"settings": settings, "protocols": {
        p: {"section": section_to_json(all_sections[p]), "files": files[p],
            "inputs": inputs[p] if p in results else kept[p].get("inputs", {}),
            "date": date if p in results else kept[p]["date"]} for p in order}})
    aggregation = summary.get("reader_aggregation")
    header = [
        ("Task", f"`{task.name}`: {summary['images']} images, {summary['patients']} patients"
                 + (f" (outputs named `{name}`)" if name != safe_name(task.name) else "")
                 + (f"; {task.header_note}" if task.header_note else "")),
        ("Labels", label_header(tr)),
        ("Label rule", f"readers aggregated per image by `{aggregation}`" if aggregation else
                       "one 0/1 value per image as the task gives it (no aggregation)"),
        ("Split", f"{split_description(task, tr.split, args.seed)}: train {summary['train_images']} images / "
                  f"{summary['train_patients']} patients, test {summary['test_images']} images / "
                  f"{summary['test_patients']} patients; hash `{tr.split_hash}` (`splits/{name}.csv`)"),
        ("Bootstrap", f"{args.bootstrap} patient-level resamples, seed {args.seed}, percentile 95% CI; drawn over the "
                      "sorted `patient_key`s, each with a positive and a negative patient of every evaluable label; "
                      f"--min-positive-patients {args.min_positive_patients}"),
        ("Input policy", args.input_policy),
        ("Global pooling", pooling_header(args.global_pool, encoders)),
        ("Reference", f"`{reference}`"),
        ("Generated", f"{date} by `python -m harness.run` (results in `results/{name}/`)"
                      + ("" if len(results) == len(order) else "; sections " + ", ".join(
                          f"{p} of {kept[p]['date']}" for p in order if p in kept) + " kept from an earlier run")),
    ]
    if dropped_note:
        header.append(("Dropped", dropped_note))
    md = render(f"Leaderboard: {task.name}", header, [all_sections[p] for p in order])
    # Drawn from the files just written (what `python -m harness.plot` reads too), so a figure shows the table's
    # own numbers; linked at the end of the leaderboard.
    try:
        figures = draw_task_figures(out, name)
    except FigureInputError as e:  # the numbers are written; a figure that cannot be drawn does not lose them
        log.warning(f"figures of {name} not drawn: {e}")
        figures = []
    if figures:
        md = md.rstrip("\n") + "\n\n## Figures\n\n" + "\n".join(figure_links(name, figures)).rstrip("\n") + "\n"
    path = out / f"{name}.md"
    atomic_write_text(path, md)
    stale = {f for p in (old or {}).get("protocols", {}).values() for f in p.get("files", [])}
    stale |= {str(f.relative_to(out)) for f in folder.glob("*") if f.is_file()}  # files of older versions too
    for rel in sorted(stale - listed):
        (out / rel).unlink(missing_ok=True)
    return path


def print_summary(s: dict) -> None:
    """The task's summary, logged (stderr) before its features are extracted."""
    log.info(f"\ntask {s['task']}: {s['images']} images, {s['patients']} patients; sex known {s['sex_known']} "
             f"(M {s['sex_counts']['M']}, F {s['sex_counts']['F']}), age known {s['age_known']}, masks {s['masks']}")
    if s["patients_merged"]:
        log.info(f"{s['patients_merged']} patient id(s) merged into others: they share byte-identical images")
    rows = [[n, s["positives"][n], s["train_positives"][n], s["test_positives"][n]] for n in s["positives"]]
    log.info(tabulate(rows, headers=["label", "positives", "train", "test"], tablefmt="simple"))
    log.info(f"split: train {s['train_images']} images / {s['train_patients']} patients, "
             f"test {s['test_images']} images / {s['test_patients']} patients")
    if s["skipped"]:
        log.warning(f"skipped {len(s['skipped'])} file(s):\n" + "\n".join(
            f"  {item['file']}: {item['reason']}" for item in s["skipped"][:20]))


@command
def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    if args.list:
        list_registered(args.weights_dir)
        return 0
    names, specs = check_eval_args(args)
    device = pick_device(args.device)
    check_here(device, f"--device {args.device}")  # the sweep plans GPU jobs on machines without one; here the work runs here
    for spec in specs:
        log.debug(f"task {spec.text!r}: {spec.name}, argument {spec.arg!r}, protocols {', '.join(spec.protocols)}; "
                  f"output in {args.out if args.out is not None else DEFAULT_RUNS / '<output name>'}")
    explicit = {m.strip() for m in args.models.split(",")} - {"all"}
    try:
        encoders, skipped = load_encoders(names, args.weights_dir, args.input_policy, explicit, args.global_pool)
    except (WeightsMissing, KeyError, ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    print(status_table(encoders, [n for n, _ in skipped], args.weights_dir))
    if not encoders:
        raise UsageError("no encoder could be loaded")
    reference = args.reference or encoders[0].name
    if reference not in {e.name for e in encoders}:
        raise UsageError(f"--reference {reference!r} is not among the loaded models")
    root, named = parse_data_roots(args.data_root)
    ctx = TaskContext(data_root=root, data_roots=named, skip_bad=args.skip_bad, seed=args.seed,
                      on_duplicate=args.on_duplicate)
    cache = FeatureCache(args.cache_dir)
    written = []
    for spec in specs:
        try:
            written.append(evaluate_task(spec, encoders, args, ctx, cache, device, reference))
        except UsageError:  # a folder of this task's outputs that cannot be written
            raise
        except (TaskError, ValueError, FloatingPointError, ResultsCacheFull) as e:
            raise DataError(f"task {spec.text!r}: {e}") from e
    for w in written:
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
