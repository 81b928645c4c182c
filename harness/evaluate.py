"""One task, some encoders, some protocols: every number they give, computed and returned, nothing written.

    from harness.evaluate import EvalOptions, evaluate
    from harness.outputs import write

    results = evaluate(task, encoders, ["linear", "knn"], EvalOptions(bootstrap=200))
    write(results, Path("leaderboards"))

`evaluate` splits the task by patient (or, with ``split="validation"``, takes its training patients and splits them
again), draws the patient bootstrap once for every model, extracts every feature the protocols declared in as few
passes as possible (`harness.features.extract_store`, cached on disk), runs each protocol with the results of those
it runs after, and returns a `TaskResults`. Its only files are its caches (features, and under ``results/`` the
protocols' per-model work); it prints nothing, it logs (`harness.log`). `harness.outputs` writes a `TaskResults`
into an output folder; the command line (`harness.run`) parses, checks, and calls the two.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tabulate import tabulate

from baselines.registry import DEFAULT_GLOBAL_POOL, Encoder, WeightsMissing, build_encoder
from harness import stats, tidy
from harness.cost import cost_rows, model_cost
from harness.common.devices import pick_device
from harness.common.paths import cache_dir, safe_name
from harness.features import DEFAULT_DENSE_BUDGET_GB, FeatureCache, extract_store, precision
from harness.probes import PROTOCOLS
from harness.protocols import (MIN_POSITIVE_PATIENTS, ProbeOptions, ProtocolResult, TaskRun, dense_rows,
                               label_status)
from harness.results_cache import ProtocolCache, ResultsCache, code_digest, data_digest
from harness.splits import make_split, pseudonym, split_hash, validation_split
from harness.taskspec import TaskSpec
from harness.tasks.base import Subset, Task

log = logging.getLogger(__name__)

SPLITS = ("test", "validation")


@dataclass(frozen=True)
class EvalOptions:
    """Everything an evaluation is run with besides its task, encoders and protocols (the flags of
    ``raddino-bench eval`` of the same names; the defaults are its defaults)."""

    seed: int = 0                        # the split, the probes' cross-validation and the bootstrap
    test_fraction: float = 0.3           # patients in the test split when the task has no official one
    #: "test": fit on the training patients, score the test patients; "validation": the training patients only,
    #: split again (`harness.splits.validation_split`)
    split: str = "test"
    bootstrap: int = stats.DEFAULT_RESAMPLES
    min_positive_patients: int = MIN_POSITIVE_PATIENTS
    reference: str | None = None         # the model every other one is paired with (None: the first)
    input_policy: str = "native"         # how the encoders were built (recorded with the results)
    global_pool: str = DEFAULT_GLOBAL_POOL
    probe: ProbeOptions = field(default_factory=ProbeOptions)
    cache_dir: Path = field(default_factory=cache_dir)
    recompute: bool = False              # ignore the results cache's entries (and write them again)
    device: str = "auto"
    batch_size: int = 16                 # images per feature-extraction batch
    workers: int = 1                     # DataLoader workers decoding images
    dense_cache_gb: float = DEFAULT_DENSE_BUDGET_GB

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r}: choose one of {', '.join(SPLITS)}")


@dataclass(frozen=True)
class TaskResults:
    """Everything one evaluation computed, in the order the leaderboard shows it: what `harness.outputs.write`
    writes, and what a script reads directly."""

    name: str                            # stem of the output files: the task plus the options that change it
    task: Task                           # the task evaluated (for split="validation", its training patients)
    split: np.ndarray                    # 'train' / 'test' per image of `task`
    split_hash: str
    summary: dict                        # counts of images, patients and positives, overall and per split part
    encoders: tuple[Encoder, ...]
    reference: str
    options: EvalOptions
    precision: dict                      # where and how the features were computed (`harness.features.precision`)
    feature_keys: Mapping[str, str]      # model -> feature-cache key of its global features
    protocols: Mapping[str, ProtocolResult]  # in run order
    #: model -> what it cost to run on this task (`harness.cost.model_cost`): computed on every run, never merged
    cost: Mapping[str, dict] = field(default_factory=dict)

    @property
    def tidy(self) -> list[tidy.TidyRow]:
        """Every protocol's rows of the tidy results table, then the cost rows, with the run's global pooling."""
        rows = [r for p in self.protocols.values() for r in p.tidy] + cost_rows(self.name, self.cost)
        return tidy.with_pool(rows, self.options.global_pool)


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
    """What a non-default global pooling adds to the output name (``-pool_avg``), so that two poolings of one task
    never write the same files."""
    return "" if pool == DEFAULT_GLOBAL_POOL else "-" + safe_name(f"pool_{pool.replace('+', '_')}")


def results_name(stem: str, options: EvalOptions) -> str:
    """The output name of an evaluation of a task whose files are named `stem` (`output_name`): plus
    ``-validation`` for a validation split and the pooling's suffix."""
    return stem + ("-validation" if options.split == "validation" else "") + pool_suffix(options.global_pool)


def load_encoders(names: Sequence[str], weights_dir: Path | None, options: EvalOptions, explicit: set[str]
                  ) -> tuple[list[Encoder], list[tuple[str, str]]]:
    """Build each encoder with the options' input policy and pooling; a model named explicitly with missing
    weights is an error (WeightsMissing), under 'all' a skip: (encoders, [(name, why skipped)])."""
    encoders, skipped = [], []
    for name in names:
        try:
            encoders.append(build_encoder(name, weights_dir, options.input_policy, options.global_pool))
        except WeightsMissing as e:
            if name in explicit:
                raise
            skipped.append((name, str(e)))
    return encoders, skipped


def validation_task(task: Task, split: np.ndarray, seed: int) -> tuple[Subset, np.ndarray]:
    """The task's training patients only, as a task of their own, with the inner split (harness.splits.
    validation_split) in the train / test roles: the test patients' images are never read."""
    inner = np.array(validation_split(task.table.patient_ids, list(split), seed))
    rows = np.flatnonzero(inner != "test")
    return Subset(task, rows, "validation"), np.where(inner[rows] == "val", "test", "train")


def split_summary(task: Task, split: np.ndarray) -> dict:
    """The task's summary (`Task.summary`) with the images, patients and positives of each part of the split."""
    t, summary = task.table, task.summary()
    for part in ("train", "test"):
        idx = split == part
        summary[f"{part}_images"] = int(idx.sum())
        summary[f"{part}_patients"] = len({p for p, s in zip(t.patient_ids, split) if s == part})
        summary[f"{part}_positives"] = {n: int(t.labels[idx, j].sum()) for j, n in enumerate(t.label_names)}
    return summary


def log_summary(s: dict) -> None:
    """The task's summary, logged before its features are extracted."""
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


def test_weights(task: Task, split: np.ndarray, options: EvalOptions) -> np.ndarray:
    """[resamples, test images] patient-bootstrap weights, shared by every model and protocol: drawn over the
    pseudonyms the outputs carry (so a reader can redraw them), conditioned on a positive and a negative patient of
    every evaluable label (so every macro keeps its label set in every resample)."""
    t = task.table
    test_idx = np.flatnonzero(split == "test")
    evaluable, _ = label_status(task, split, options.min_positive_patients)
    keys = [pseudonym(t.patient_ids[i], task.name) for i in test_idx]
    return stats.bootstrap_weights(keys, options.bootstrap, options.seed,
                                   required=stats.class_requirements(t.labels[test_idx], evaluable))


def evaluate(task: Task, encoders: Sequence[Encoder], protocols: Sequence[str], options: EvalOptions | None = None,
             *, name: str | None = None) -> TaskResults:
    """Run `protocols` (and those they run after, dependencies first) for every encoder on `task` with `options`
    (default: `EvalOptions()`). `name` is the stem of the outputs the results will be written as (default: the
    task's name, `results_name`). ValueError for a reference that is not among the encoders, or an encoder built
    with another global pooling than the options'."""
    options = options or EvalOptions()
    encoders = tuple(encoders)
    reference = options.reference or encoders[0].name
    if reference not in {e.name for e in encoders}:
        raise ValueError(f"reference {reference!r} is not among the encoders ({', '.join(e.name for e in encoders)})")
    pooled = [e.name for e in encoders if e.global_pool != options.global_pool]
    if pooled:
        raise ValueError(f"encoder(s) {', '.join(pooled)} pool their global features otherwise than the options' "
                         f"{options.global_pool!r}: build them with global_pool={options.global_pool!r}")
    name = name or results_name(safe_name(task.name), options)
    protocols = PROTOCOLS.ordered(protocols)
    device = pick_device(options.device)
    t = task.table
    split = np.array(make_split(t.patient_ids, options.seed, options.test_fraction, t.split))
    if options.split == "validation":
        task, split = validation_task(task, split, options.seed)
    summary = split_summary(task, split)
    log_summary(summary)
    weights = test_weights(task, split, options)
    log.info(f"features ({len(encoders)} encoder(s), cache {options.cache_dir}):")
    store = extract_store(task, list(encoders), FeatureCache(options.cache_dir), dense_rows(task, protocols),
                          batch_size=options.batch_size, workers=options.workers, device=device,
                          dense_budget_gb=options.dense_cache_gb)
    cache = ResultsCache(options.cache_dir / "results", recompute=options.recompute)
    keys = ProtocolCache(cache, data_digest(task, split, weights, options.seed, options.min_positive_patients),
                         {p: code_digest(PROTOCOLS.get(p).target.partition(":")[0]) for p in protocols})
    tr = TaskRun(task, split, weights, store, seed=options.seed, reference=reference,
                 min_positive_patients=options.min_positive_patients, out_name=name, options=options.probe,
                 results=keys)
    results: dict[str, ProtocolResult] = {}
    for proto in protocols:
        entry = PROTOCOLS.get(proto)
        log.info(f"protocol {proto} ...")
        # A protocol gets the results of those it runs after, in the order it declares them.
        results[proto] = entry.load()(tr, list(encoders), *(results[dep] for dep in entry.after))
    log.info(f"results cache ({cache.root}): {cache.hits} model result(s) reused, {cache.misses} computed")
    cost = {e.name: model_cost(e, store.entries(e.name)) for e in encoders}
    return TaskResults(name, task, split, split_hash(task.table.image_ids, list(split)), summary, encoders, reference,
                       options, precision(device), {e.name: store[e.name].key for e in encoders}, results, cost)
