"""``python -m slurm.sweep``: a leaderboard sweep as SLURM jobs.

    python -m slurm.sweep --models all --tasks vindr,candid,rsna --data-root /data/cxr --weights-dir /data/weights \\
        --cache-dir /shared/cache --out leaderboards --cluster slurm/clusters/mycluster.yaml --gpus-per-node 1

Every flag that is not the sweep's or a cluster option is an evaluation flag, read as ``python -m harness.run`` reads it
(`harness.flags`).

1. Plan: every (model, task) pair whose features are not in the cache yet (the keys the evaluation reads).
2. One job array, one task per such pair: feature extraction into the shared cache.
3. One job that depends on the array (afterok) and evaluates every model on every task as ``harness.run`` does
   (`harness.evaluate`, `harness.outputs`): the probes and statistics read the cached features and regenerate
   the leaderboards.
4. Wait, then list every failed job with its log files. ``--retry-failed`` replays the recorded sweep
   (``<folder>/sweep.json``): the pairs cached by now are skipped, so exactly the failed work is resubmitted.

The jobs are given the flags as read and checked here (`Sweep`, typed), not a command line to parse again.

Jobs start in the directory the sweep was submitted from, so relative paths mean the same in every job.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path


from baselines.registry import WeightsMissing, build_encoder
from harness.checks import check_eval_args
from harness.common.atomic import atomic_write_json
from harness.common.devices import pick_device
from harness.common.errors import AT_LEAST_0, AT_LEAST_1, POSITIVE, UsageError, check_flag, command
from harness.evaluate import EvalOptions, load_encoders
from harness.features import FeatureCache, cache_key, extract_store, feature_passes
from harness.flags import build_parser as harness_parser
from harness.flags import eval_options, explicit_models, task_context
from harness.listing import status_table
from harness.log import setup_logging
from harness.outputs import DEFAULT_RUNS, evaluate_and_write
from harness.protocols import dense_rows, usable_cores
from harness.taskspec import TaskSpec
from harness.tasks.base import TaskContext, build_task
from slurm.cluster import (ClusterOptions, add_cluster_args, executor_parameters, make_executor, resolve_options,
                           sbatch_script)

RECORD = "sweep.json"
DEFAULT_FOLDER = Path("slurm-logs") / "sweep"   # job scripts and logs; must be visible from the compute nodes


@dataclass(frozen=True)
class Pair:
    model: str
    task: str     # the task spec as given (demo, csv:PATH, vindr, ...; TaskSpec.text)


PROG = "python -m slurm.sweep"
EXAMPLES = """\
Every other flag is passed to python -m harness.run (raddino-bench eval; see its --help).

examples:
  %(prog)s --models pixels --tasks demo:n_patients=20:linear --cache-dir /shared/cache --device cpu \\
      --time 10 --dry-run
  %(prog)s --models all --tasks vindr,candid,rsna --data-root /data/cxr --weights-dir /data/weights \\
      --cache-dir /shared/cache --out leaderboards --cluster slurm/clusters/mycluster.yaml --gpus-per-node 1
  %(prog)s --retry-failed --folder slurm-logs/sweep     # resubmit exactly the failed work
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    s = p.add_argument_group("sweep")
    s.add_argument("--probe-gpus", type=int, default=0, help="GPUs for the probe job (the probes run on CPU)")
    s.add_argument("--array-parallelism", type=int, default=64, help="feature jobs running at once")
    s.add_argument("--retry-failed", action="store_true",
                   help="rerun the sweep recorded in <folder>/sweep.json (flags given now are added to it)")
    s.add_argument("--no-wait", action="store_true", help="submit and exit without waiting for the jobs")
    s.add_argument("--poll-seconds", type=float, default=5.0)
    add_cluster_args(p)
    return p


@dataclass(frozen=True)
class Sweep:
    """What every job of a sweep runs with, read once from the harness flags by the sweep (typed and picklable: a
    job parses nothing). `probe_jobs` None: --probe-jobs was not given, and the leaderboard job fits the linear
    probes on every CPU it was given."""

    models: tuple[str, ...]            # --models, 'all' expanded
    explicit: frozenset[str]           # the models named one by one: missing weights are an error, not a skip
    specs: tuple[TaskSpec, ...]
    options: EvalOptions
    ctx: TaskContext
    weights_dir: Path | None
    out: Path | None
    verbosity: int
    probe_jobs: int | None


def sweep_settings(hargs: argparse.Namespace, probe_jobs_given: bool = True) -> Sweep:
    """The jobs' settings from the harness flags, every name checked before any encoder or task is built."""
    names, specs = check_eval_args(hargs)
    return Sweep(tuple(names), frozenset(explicit_models(hargs)), tuple(specs), eval_options(hargs),
                 task_context(hargs), hargs.weights_dir, hargs.out, hargs.verbose - hargs.quiet,
                 hargs.probe_jobs if probe_jobs_given else None)


@dataclass
class Plan:
    skipped: list[tuple[str, str]]    # (model, why) under --models all: weights not present
    pending: list[Pair]               # features to extract
    cached: list[Pair]
    sweep: Sweep                      # what the jobs run with


def make_plan(hargs: argparse.Namespace, probe_jobs_given: bool = True) -> Plan:
    """Which (model, task) features are missing from the cache. Encoders and tasks are built here, so a missing
    weight file or dataset fails now rather than in a job."""
    sweep = sweep_settings(hargs, probe_jobs_given)
    encoders, skipped = load_encoders(sweep.models, sweep.weights_dir, sweep.options, set(sweep.explicit))
    if not encoders:
        raise ValueError(f"--models {hargs.models}: no encoder could be loaded ({skipped})")
    cache, device = FeatureCache(sweep.options.cache_dir), pick_device(sweep.options.device)
    pending, cached = [], []
    for spec in sweep.specs:
        task = build_task(spec.name, spec.arg, sweep.ctx)
        sets = [(dense, t.content_digest()) for t, dense in feature_passes(task, dense_rows(task, spec.protocols))]
        for enc in encoders:
            hit = all(cache.has(cache_key(enc, digest, device), dense) for dense, digest in sets)
            (cached if hit else pending).append(Pair(enc.name, spec.text))
    return Plan(skipped, pending, cached, sweep)


# ----------------------------------------------------------------------------------------------------------------
# What the jobs run


def extract_features(pair: Pair, sweep: Sweep) -> list[str]:
    """Array task: every feature of one (model, task) pair its protocols read, into the shared cache; returns the
    cache keys."""
    o = sweep.options
    encoder = build_encoder(pair.model, sweep.weights_dir, o.input_policy, o.global_pool)
    spec = next(s for s in sweep.specs if s.text == pair.task)
    task = build_task(spec.name, spec.arg, sweep.ctx)
    store = extract_store(task, [encoder], FeatureCache(o.cache_dir), dense_rows(task, spec.protocols),
                          batch_size=o.batch_size, workers=o.workers, device=pick_device(o.device),
                          dense_budget_gb=o.dense_cache_gb)
    return store.keys_by_pass()


def make_leaderboards(sweep: Sweep) -> list[str]:
    """The dependent job: every task evaluated with every model and written (probes, statistics, leaderboards),
    from the features the array put in the cache; returns the leaderboards written."""
    setup_logging(sweep.verbosity)
    n_jobs = usable_cores() if sweep.probe_jobs is None else sweep.probe_jobs
    options = replace(sweep.options, probe=replace(sweep.options.probe, n_jobs=n_jobs))
    encoders, skipped = load_encoders(sweep.models, sweep.weights_dir, options, set(sweep.explicit))
    print(status_table(encoders, [n for n, _ in skipped], sweep.weights_dir))
    written = [str(p) for p in evaluate_and_write(sweep.specs, encoders, options, sweep.ctx, sweep.out)]
    for path in written:
        print(f"wrote {path}")
    return written


# ----------------------------------------------------------------------------------------------------------------
# Submitting and waiting


def array_parameters(args: argparse.Namespace, opts: ClusterOptions) -> dict:
    return executor_parameters(opts, job_name="raddino-features", array_parallelism=args.array_parallelism)


def probe_parameters(args: argparse.Namespace, opts: ClusterOptions, array_id: str | None) -> dict:
    params = executor_parameters(opts, job_name="raddino-leaderboards", gpus_per_node=args.probe_gpus)
    if array_id is not None:
        # afterok: the probes only run on a complete cache; kill-on-invalid-dep ends the probe job when a feature
        # job fails, instead of leaving it pending forever.
        params["dependency"] = f"afterok:{array_id}"
        params["additional_parameters"] = {**params["additional_parameters"], "kill-on-invalid-dep": "yes"}
    return params


def submit(args: argparse.Namespace, opts: ClusterOptions, plan: Plan, base: Path) -> list[tuple[str, dict, object]]:
    """Submit the array (if anything is missing) and the probe job; record them in ``<base>/sweep.json``.

    Returns (label, record entry, submitit job) per job, the probe job last."""
    folder = base / "%j"
    jobs: list[tuple[str, dict, object]] = []
    array_id = None
    if plan.pending:
        executor = make_executor(folder, array_parameters(args, opts))
        array = executor.map_array(extract_features, plan.pending, [plan.sweep] * len(plan.pending))
        array_id = array[0].job_id.split("_")[0]
        for pair, job in zip(plan.pending, array):
            entry = {"model": pair.model, "task": pair.task, "job_id": job.job_id, "stdout": str(job.paths.stdout),
                     "stderr": str(job.paths.stderr)}
            jobs.append((f"features {pair.model} x {pair.task}", entry, job))
    probe = make_executor(folder, probe_parameters(args, opts, array_id)).submit(make_leaderboards, plan.sweep)
    entry = {"job_id": probe.job_id, "stdout": str(probe.paths.stdout), "stderr": str(probe.paths.stderr)}
    jobs.append(("probes and leaderboards", entry, probe))
    atomic_write_json(base / RECORD, {"argv": args.recorded_argv, "cwd": os.getcwd(),
                                      "features": [e for _, e, _ in jobs[:-1]], "probe": entry})
    return jobs


def failure(job) -> str | None:
    """None when the job succeeded, else one line saying why: the exception its traceback ends with, or the state
    it ended in without a result (cancelled, killed, timed out, never ran)."""
    if not job.paths.result_pickle.exists():
        return f"ended without a result, state {job.state}"
    error = job.exception()
    if error is None:
        return None
    parts = str(error).split("-" * 22)  # submitit frames the remote traceback with dashes
    lines = [line.strip() for line in parts[1 if len(parts) >= 3 else 0].splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def wait_and_report(jobs: list[tuple[str, dict, object]], base: Path, poll_seconds: float) -> int:
    """Wait for every job; print failures with their logs and the retry command. 0 when all succeeded."""
    remaining = {entry["job_id"] for _, entry, _ in jobs}
    while remaining:
        for label, entry, job in jobs:
            if entry["job_id"] in remaining and job.done():
                remaining.discard(entry["job_id"])
                print(f"  finished: {label} (job {entry['job_id']})", flush=True)
        if remaining:
            time.sleep(poll_seconds)
    failed = [(label, entry, why) for label, entry, job in jobs if (why := failure(job)) is not None]
    if not failed:
        return 0
    if len(failed) > 1 and failed[-1][0] == jobs[-1][0]:  # the probe job never ran: its dependency failed
        label, entry, why = failed[-1]
        failed[-1] = (label, entry, f"{why} (not run: a feature job failed)")
    print(f"\n{len(failed)} job(s) failed:")
    for label, entry, why in failed:
        print(f"  {label}: job {entry['job_id']}: {why}\n    log: {entry['stdout']}\n    err: {entry['stderr']}")
    print(f"\nretry the failed work with: python -m slurm.sweep --retry-failed --folder {base}")
    return 1


def parse(argv: list[str], prog: str = PROG) -> tuple[argparse.Namespace, argparse.Namespace, list[str]]:
    """(sweep arguments, harness flags, the harness flags as given); --retry-failed expands to the recorded
    sweep's arguments followed by the ones given now."""
    parser = build_parser(prog)
    args, rest = parser.parse_known_args(argv)
    if args.retry_failed:
        base = args.folder or DEFAULT_FOLDER
        path = base / RECORD
        if not path.is_file():
            raise FileNotFoundError(f"--retry-failed: {path} not found; give the sweep's --folder")
        record = json.loads(path.read_text())
        if Path(record["cwd"]).resolve() != Path.cwd().resolve():
            raise ValueError(f"--retry-failed: run it from {record['cwd']}, where the sweep was submitted (its "
                             "relative paths are relative to that directory)")
        argv = record["argv"] + [a for a in argv if a != "--retry-failed"]
        args, rest = parser.parse_known_args(argv)
        args.folder = base
    args.recorded_argv = [a for a in argv if a != "--retry-failed"]
    return args, harness_parser().parse_args(rest), rest


def probe_jobs_given(harness_argv: list[str]) -> bool:
    """Whether the harness flags set --probe-jobs (else its default is the CPUs of the job that fits the probes,
    not of the machine the sweep is submitted from)."""
    parser = harness_parser()
    parser.set_defaults(probe_jobs=None)
    return parser.parse_args(harness_argv).probe_jobs is not None


@command
def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, hargs, harness_argv = parse(argv, prog)
        check_flag("--probe-gpus", args.probe_gpus, AT_LEAST_0)
        check_flag("--array-parallelism", args.array_parallelism, AT_LEAST_1)
        check_flag("--poll-seconds", args.poll_seconds, POSITIVE)
        opts = resolve_options(args)
        if hargs.device == "auto":
            # The device is part of the feature-cache key: the plan, the GPU feature jobs and the CPU leaderboard
            # job must all look features up under the device the feature jobs compute them on.
            hargs.device = "cuda" if opts.gpus_per_node else "cpu"
            harness_argv = [*harness_argv, "--device", hargs.device]
        plan = make_plan(hargs, probe_jobs_given(harness_argv))
    except UsageError:
        raise
    except (ValueError, KeyError, FileNotFoundError, WeightsMissing) as e:  # a task's files, a weights file, ...
        raise UsageError(str(e)) from e
    for name, why in plan.skipped:
        print(f"skipped {name}: {why}")
    print(f"{len(plan.pending)} feature job(s) to run, {len(plan.cached)} cached:")
    for p in plan.pending:
        print(f"  submit  {p.model} x {p.task}")
    for p in plan.cached:
        print(f"  cached  {p.model} x {p.task}")
    base = (args.folder or DEFAULT_FOLDER).resolve()
    if args.dry_run:
        if plan.pending:
            print(f"\n# feature-extraction array ({len(plan.pending)} tasks)\n"
                  + sbatch_script(base / "%j", array_parameters(args, opts), array_size=len(plan.pending)))
        params = probe_parameters(args, opts, "<array job id>" if plan.pending else None)
        print(f"\n# probes and leaderboards: python -m harness.run {' '.join(harness_argv)}\n"
              + sbatch_script(base / "%j", params))
        return 0
    jobs = submit(args, opts, plan, base)
    ids = ", ".join(entry["job_id"] for _, entry, _ in jobs[:-1]) or "none"
    print(f"submitted feature jobs: {ids}; probe job {jobs[-1][1]['job_id']}; record {base / RECORD}", flush=True)
    if args.no_wait:
        return 0
    code = wait_and_report(jobs, base, args.poll_seconds)
    if code == 0:
        print(f"leaderboards written to {hargs.out or DEFAULT_RUNS / '<task>'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
