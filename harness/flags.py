"""The flags of an evaluation command line (``raddino-bench eval``, and the ones ``slurm.sweep`` passes on): the
parser, and the typed values they stand for once `harness.checks` has accepted them: `EvalOptions`, the tasks'
`TaskContext`, the encoders to load.

The evaluation command (`harness.run`) and the sweep read the same flags the same way through here, so that a flag
means one thing everywhere; nobody imports the command itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from baselines.registry import DEFAULT_GLOBAL_POOL, GLOBAL_POOLS, default_weights_dir
from harness import stats
from harness.common.paths import cache_dir
from harness.evaluate import SPLITS, EvalOptions
from harness.features import DEFAULT_DENSE_BUDGET_GB
from harness.protocols import MIN_POSITIVE_PATIENTS, ProbeOptions, usable_cores
from harness.taskspec import parse_data_roots, parse_fractions
from harness.tasks.base import TaskContext

PROG = "python -m harness.run"

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
    _add_inputs(p)
    _add_settings(p)
    _add_running(p)
    return p


def _add_inputs(p: argparse.ArgumentParser) -> None:
    """What is evaluated and where things are: the models, the tasks and their protocols, the data, the weights,
    the caches and the output folder."""
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


def _add_settings(p: argparse.ArgumentParser) -> None:
    """The settings that can change the numbers: the statistics, the protocols' options, the split, the
    reference, the device (its precision), the input policy and the pooling (each one recorded with the results)."""
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
    p.add_argument("--split", choices=SPLITS, default="test",
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


def _add_running(p: argparse.ArgumentParser) -> None:
    """How the work runs and what it prints, none of which changes a number: batches, workers, the dense cache's
    budget, bad and duplicate images, listing and verbosity."""
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


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """The options the flags stand for (checked by `harness.checks.check_eval_args` first)."""
    probe = ProbeOptions(knn_k=args.knn_k, knn_temperature=args.knn_temperature,
                         label_fractions=parse_fractions(args.label_fractions), label_draws=args.label_draws,
                         n_jobs=args.probe_jobs)
    return EvalOptions(seed=args.seed, test_fraction=args.test_fraction, split=args.split, bootstrap=args.bootstrap,
                       min_positive_patients=args.min_positive_patients, reference=args.reference,
                       input_policy=args.input_policy, global_pool=args.global_pool, probe=probe,
                       cache_dir=args.cache_dir, recompute=args.recompute, device=args.device,
                       batch_size=args.batch_size, workers=args.workers, dense_cache_gb=args.dense_cache_gb)


def task_context(args: argparse.Namespace) -> TaskContext:
    """What every task is built with: --data-root, --skip-bad, --seed and --on-duplicate."""
    root, named = parse_data_roots(args.data_root)
    return TaskContext(data_root=root, data_roots=named, skip_bad=args.skip_bad, seed=args.seed,
                       on_duplicate=args.on_duplicate)


def explicit_models(args: argparse.Namespace) -> set[str]:
    """The models --models names one by one (not through 'all'): their missing weights are an error, not a skip."""
    return {m.strip() for m in args.models.split(",")} - {"all"}
