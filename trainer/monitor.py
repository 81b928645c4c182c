"""The in-training probe: every ``eval.every`` steps, the teacher's frozen features through the harness's own probes,
scored on a validation split of the task's training patients, never on its test split.

It is DINO's k-NN monitor in spirit, built from the evaluation harness (same task reader, same preprocessing as the
``ckpt:`` encoder, same probe code), with one difference that matters: a probe that steers a choice (when to stop,
which checkpoint, which recipe, which pooling) must not see the test patients. So:

- the task (``csv:PATH``, ``demo``, ``vindr`` ... with ``eval.data_root``) is split by patient exactly as
  ``harness.run`` splits it (``eval.seed``, ``eval.test_fraction``); its test rows are dropped before any image is
  read, and its training patients are split again (``harness.splits.validation_split``, ``eval.val_fraction``):
  the probes fit on the inner training patients and score on the validation ones;
- features are the teacher backbone's final-normed tokens, pooled as the harness's ``--global-pool`` pools them
  (``baselines.registry.pool_global``), for each pooling in ``eval.pools``;
- per pooling: the k-NN probe's macro AUROC (``probe_knn_auroc_<pool>``, cheap, DINO's monitor) and the linear
  probe's (``probe_linear_auroc_<pool>``, logistic regression, C by patient-grouped CV), over the labels
  harness.run would evaluate on this split; for the first pooling also sex (AUROC) and age (ridge MAE, r) when
  the task has them.

Points only: the bootstrap CIs and the paired test against the initial weights come from ``harness.run`` on the
saved checkpoints (docs/pretraining.md, "Does it learn?"), on the test split, once per finished run.

The trainer proper never imports the harness; this module does, lazily, only when ``eval.task`` is set.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.common.errors import command
from harness.splits import VALIDATION_FRACTION


@dataclass
class ProbeData:
    """A task's validation-probe inputs (the training patients only), decoded and preprocessed once."""

    name: str
    pixels: torch.Tensor          # [N, C, S, S] float32, the ckpt: encoder's input
    split: np.ndarray             # 'train' / 'val' per image: the inner split of the task's training patients
    rows: np.ndarray              # each image's row in the task (never a test-split row)
    patients: np.ndarray
    labels: np.ndarray            # [N, L] 0/1
    label_names: list[str]
    sex: np.ndarray               # 'M', 'F' or '' per image
    age: np.ndarray               # float, NaN unknown
    skip: dict[int, str]          # labels the harness would not evaluate on this split, and why
    test_digests: frozenset[str]  # sha256 of the test-split image files (to warn about pretraining on them)


def load_probe_data(spec: str, cfg_dict: dict, data_root: str | None, seed: int, test_fraction: float,
                    val_fraction: float = VALIDATION_FRACTION) -> ProbeData:
    """Build the harness task ``spec`` (``csv:PATH``, ``demo``, ``vindr`` ...) and the inputs of its validation
    probe, before training. Test-split images are never decoded.

    Raises the harness's own TaskError / ValueError for a missing file or an unknown task.
    """
    from baselines.ckpt import checkpoint_preprocess
    from baselines.preprocess import preprocess_batch
    from harness.protocols import MIN_POSITIVE_PATIENTS, label_status
    from harness.splits import make_split, validation_split
    from harness.tasks.base import Subset, TaskContext, build_task
    from harness.taskspec import parse_data_roots, read_task

    task_spec = read_task(spec)
    root, named = parse_data_roots([data_root] if data_root else [])
    task = build_task(task_spec.name, task_spec.arg, TaskContext(data_root=root, data_roots=named, seed=seed))
    t = task.table
    outer = make_split(t.patient_ids, seed, test_fraction, t.split)
    inner = np.array(validation_split(t.patient_ids, outer, seed, val_fraction))
    rows = np.flatnonzero(inner != "test")
    test_rows = np.flatnonzero(inner == "test")
    digests = task.file_digests()
    view = Subset(task, rows, "validation")
    split = np.where(inner[rows] == "val", "val", "train")
    # The evaluable-label rule of harness.run (its default --min-positive-patients), with 'val' in the test role.
    evaluable, reasons = label_status(view, np.where(split == "val", "test", "train"), MIN_POSITIVE_PATIENTS)
    pre = checkpoint_preprocess(cfg_dict)
    pixels = preprocess_batch([torch.from_numpy(view.load_image(i))[None] for i in range(len(view))], pre)
    vt = view.table
    return ProbeData(task.name, pixels, split, rows, np.asarray(vt.patient_ids), vt.labels.astype(int),
                     list(vt.label_names), np.array([s or "" for s in vt.sex]), np.asarray(vt.age, dtype=float),
                     {j: why for j, why in enumerate(reasons) if not evaluable[j]},
                     frozenset(digests[i] for i in test_rows) if digests is not None else frozenset())


def test_overlap(data: ProbeData, paths: list) -> int:
    """How many pretraining images (files) are byte-identical to a test-split image of the probe's task."""
    from harness.splits import count_identical_files

    return count_identical_files(paths, data.test_digests)


@torch.no_grad()
def teacher_features(backbone: nn.Module, pixels: torch.Tensor, device: torch.device, pools: tuple[str, ...],
                     batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per pooling, the [N, D] global features of ``backbone`` (in eval mode; its training mode is restored), pooled
    exactly as the harness pools a ``ckpt:`` encoder's tokens."""
    from baselines.registry import Features, pool_global

    was_training = backbone.training
    backbone.eval()
    out: dict[str, list[torch.Tensor]] = {p: [] for p in pools}
    try:
        for i in range(0, len(pixels), batch_size):
            f = backbone.forward_features(pixels[i:i + batch_size].to(device))
            tokens = f["x_norm_patchtokens"]  # [B, N, C]: the grid's layout does not matter to a mean
            feats = Features(f["x_norm_clstoken"], tokens.transpose(1, 2)[:, :, None, :])
            for p in pools:
                out[p].append(pool_global(feats, p).cpu())
    finally:
        backbone.train(was_training)
    return {p: torch.cat(v).numpy() for p, v in out.items()}


def _macro(y: np.ndarray, scores: np.ndarray, evaluable: list[int]) -> float:
    from sklearn.metrics import roc_auc_score

    aurocs = [roc_auc_score(y[:, j], scores[:, j]) for j in evaluable]
    return float(np.mean(aurocs)) if aurocs else math.nan


def probe_metrics(feats: dict[str, np.ndarray], data: ProbeData, seed: int, knn_k: int = 20,
                  knn_temperature: float = 0.07) -> dict[str, float]:
    """Per pooling, k-NN and linear macro AUROC on the validation split; for the first pooling also sex AUROC and
    age MAE and r, from the harness's probe functions."""
    from sklearn.metrics import roc_auc_score

    from harness.probes.demographics import age_probe
    from harness.probes.knn import knn_scores
    from harness.probes.linear import linear_probe

    train, val = data.split == "train", data.split == "val"
    evaluable = [j for j in range(len(data.label_names)) if j not in data.skip]
    out: dict[str, float] = {"eval_labels": len(evaluable)}
    for pool, x in feats.items():
        k = min(knn_k, int(train.sum()))
        out[f"probe_knn_auroc_{pool}"] = _macro(data.labels[val],
                                                knn_scores(x[train], data.labels[train], x[val], k, knn_temperature),
                                                evaluable)
        probe = linear_probe(x[train], data.labels[train], data.patients[train], x[val], data.labels[val],
                             data.label_names, seed=seed, skip=data.skip)
        out[f"probe_linear_auroc_{pool}"] = _macro(data.labels[val], probe.scores, evaluable)
    x = next(iter(feats.values()))
    known = data.sex != ""
    tr, te = train & known, val & known
    y_tr, y_te = (data.sex[tr] == "F").astype(int), (data.sex[te] == "F").astype(int)
    if len(np.unique(y_tr)) == 2 and len(np.unique(y_te)) == 2:
        sex = linear_probe(x[tr], y_tr[:, None], data.patients[tr], x[te], y_te[:, None], ["sex"], seed=seed)
        out["probe_sex_auroc"] = float(roc_auc_score(y_te, sex.scores[:, 0]))
    known = np.isfinite(data.age)
    tr, te = train & known, val & known
    if tr.sum() >= 5 and te.sum() >= 3:
        age = age_probe(x[tr], data.age[tr], data.patients[tr], x[te], seed=seed)
        out["probe_age_mae"] = float(np.abs(age.predictions - data.age[te]).mean())
        out["probe_age_r"] = float(np.corrcoef(age.predictions, data.age[te])[0, 1])
    return out


class InTrainingProbe:
    """Probe a backbone on a task; ``__call__`` returns a metrics row for metrics.jsonl."""

    def __init__(self, data: ProbeData, seed: int, device: torch.device, pools: tuple[str, ...] = ("cls",)):
        self.data, self.seed, self.device, self.pools = data, seed, device, tuple(pools)

    def __call__(self, backbone: nn.Module, iteration: int) -> dict[str, float]:
        t0 = time.perf_counter()
        feats = teacher_features(backbone, self.data.pixels, self.device, self.pools)
        row = {"iteration": iteration, **probe_metrics(feats, self.data, self.seed)}
        row["eval_seconds"] = time.perf_counter() - t0
        return row


# ------------------------------------------------------------------------------------------------ after training

def run_checkpoints(run: Path) -> list[Path]:
    """The step-0 weights (``RUN/init``) and every kept checkpoint of a run, in training order."""
    from trainer.checkpoint import CKPT_RE

    found = sorted((p for p in (run / "checkpoints").glob("ckpt_*") if CKPT_RE.match(p.name)),
                   key=lambda p: int(CKPT_RE.match(p.name).group(1)))
    init = sorted((run / "init" / "checkpoints").glob("ckpt_*"))
    return init[:1] + found


def _iteration(ckpt: Path) -> int:
    return 0 if ckpt.parent.parent.name == "init" else int(ckpt.name.removeprefix("ckpt_"))


@command
def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.monitor RUN --task TASK``: the validation probe on a finished (or running) run's step-0
    weights and every kept checkpoint, for runs trained without ``eval.task`` or to compare runs afterwards. Writes
    ``RUN/validation.jsonl`` (one line per checkpoint) and prints a table; exits 2 on a usage error."""
    import argparse
    import json
    import sys

    from tabulate import tabulate

    from harness.common.atomic import atomic_write_text
    from harness.common.errors import AT_LEAST_0, OPEN_UNIT, UsageError, add_verbose_flag, check_flag
    from harness.common.paths import check_writable_folder
    from trainer.checkpoint import load_backbone

    p = argparse.ArgumentParser(prog="python -m trainer.monitor", description=main.__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a training run directory (with init/ and checkpoints/)")
    p.add_argument("--task", required=True, help="harness task spec, e.g. csv:/data/eval/labels.csv")
    p.add_argument("--data-root", default=None, help="harness --data-root for registered datasets")
    p.add_argument("--pools", default="cls,avg,cls+avg", help="comma list of harness --global-pool values")
    p.add_argument("--seed", type=int, default=0, help="the harness's split seed (its default)")
    p.add_argument("--test-fraction", type=float, default=0.3, help="the harness's test fraction (its default)")
    p.add_argument("--val-fraction", type=float, default=VALIDATION_FRACTION,
                   help="share of the training patients scored (the rest fit the probes)")
    p.add_argument("--iterations", default="",
                   help="comma list of the iterations to probe (0 = the step-0 weights); default: every kept one")
    add_verbose_flag(p)
    args = p.parse_args(argv)
    check_flag("--seed", args.seed, AT_LEAST_0)
    check_flag("--test-fraction", args.test_fraction, OPEN_UNIT)
    check_flag("--val-fraction", args.val_fraction, OPEN_UNIT)
    pools = tuple(x for x in args.pools.split(",") if x)
    if not pools or any(x not in ("cls", "avg", "cls+avg") for x in pools):
        raise UsageError(f"--pools {args.pools!r}: a comma list of cls, avg, cls+avg")
    ckpts = run_checkpoints(args.run) if args.run.is_dir() else []
    if args.iterations:
        try:
            wanted = {int(x) for x in args.iterations.split(",") if x.strip()}
        except ValueError:
            raise UsageError(f"--iterations {args.iterations!r}: a comma list of integers") from None
        ckpts = [c for c in ckpts if _iteration(c) in wanted]
    if not ckpts:
        raise UsageError(f"{args.run}: no init/ or checkpoints/ckpt_* here; pass a training run directory")
    check_writable_folder(args.run, "RUN")  # validation.jsonl goes there, after every checkpoint is probed
    _, cfg = load_backbone(ckpts[-1])
    try:
        data = load_probe_data(args.task, cfg, args.data_root, args.seed, args.test_fraction, args.val_fraction)
    except (ValueError, OSError) as e:
        raise UsageError(f"--task {args.task!r}: {e}") from e
    rows = []
    for ckpt in ckpts:
        backbone, _ = load_backbone(ckpt)
        rows.append(InTrainingProbe(data, args.seed, torch.device("cpu"), pools)(backbone, _iteration(ckpt)))
        print(f"{ckpt}: " + "  ".join(f"{k.removeprefix('probe_')} {v:.4f}" for k, v in rows[-1].items()
                                      if k.startswith("probe_")), file=sys.stderr)
    # Rows of iterations probed earlier (another --iterations call) are kept, so checkpoints can be probed as a
    # run writes them; a row probed again is replaced.
    out = args.run / "validation.jsonl"
    done = {r["iteration"] for r in rows}
    kept = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []
    merged = sorted([r for r in kept if r.get("iteration") not in done] + rows, key=lambda r: r["iteration"])
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in merged))
    keys = [k for k in rows[0] if k.startswith("probe_")]
    print(tabulate([[r["iteration"], *(r.get(k) for k in keys)] for r in rows],
                   headers=["iteration", *(k.removeprefix("probe_") for k in keys)], floatfmt=".4f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
