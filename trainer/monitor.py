"""The in-training probe: every ``eval.every`` steps, the teacher's frozen features through the harness's own probes.

This is DINO's k-NN monitor in spirit, but it reuses the evaluation harness end to end, so a number printed during
training is the number ``python -m harness.run --models ckpt:RUN --tasks TASK:linear`` would give for the same
checkpoint (same task reader, same patient split, same preprocessing as the ``ckpt:`` encoder, same probe code):

- the task is any harness task (``csv:PATH``, ``demo``, ``vindr`` ... with ``eval.data_root``), split by patient with
  ``eval.seed`` / ``eval.test_fraction`` exactly as ``harness.run`` splits it (defaults equal to its defaults);
- features are the teacher backbone's normed CLS token (``baselines.ckpt``'s global feature), computed on the
  task's images resized as the ``ckpt:`` encoder resizes them;
- findings: ``harness.probes.linear.linear_probe`` (logistic regression, C by patient-grouped CV on the train
  split), macro AUROC over the labels harness.run evaluates (its default --min-positive-patients);
- sex: the same probe, F positive, AUROC; age: the demographics protocol's ridge probe, MAE and Pearson r.

Points only: the bootstrap CIs and the paired test against the initial weights come from ``harness.run`` on the
saved checkpoints (docs/pretraining.md, "Does it learn?").

The trainer proper never imports the harness; this module does, lazily, only when ``eval.task`` is set.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class ProbeData:
    """A task's encoder inputs, decoded and preprocessed once, with its labels and patient split."""

    name: str
    pixels: torch.Tensor          # [N, C, S, S] float32, the ckpt: encoder's input
    split: np.ndarray             # 'train' / 'test' per image
    patients: np.ndarray
    labels: np.ndarray            # [N, L] 0/1
    label_names: list[str]
    sex: np.ndarray               # 'M', 'F' or '' per image
    age: np.ndarray               # float, NaN unknown
    skip: dict[int, str]          # labels the harness would not evaluate on this split, and why


def load_probe_data(spec: str, cfg_dict: dict, data_root: str | None, seed: int, test_fraction: float
                    ) -> ProbeData:
    """Build the harness task ``spec`` (``csv:PATH``, ``demo``, ``vindr`` ...) and its inputs, before training.

    Raises the harness's own TaskError / ValueError for a missing file or an unknown task.
    """
    from baselines.ckpt import checkpoint_preprocess
    from baselines.preprocess import preprocess_batch
    from harness.protocols import MIN_POSITIVE_PATIENTS, label_status
    from harness.run import parse_data_roots, parse_task_spec
    from harness.splits import make_split
    from harness.tasks.base import TaskContext, build_task

    task_spec = parse_task_spec(spec)
    root, named = parse_data_roots([data_root] if data_root else [])
    task = build_task(task_spec.name, task_spec.arg, TaskContext(data_root=root, data_roots=named, seed=seed))
    t = task.table
    split = np.array(make_split(t.patient_ids, seed, test_fraction, t.split))
    # The same evaluable labels as harness.run with its default --min-positive-patients.
    evaluable, reasons = label_status(task, split, MIN_POSITIVE_PATIENTS)
    pre = checkpoint_preprocess(cfg_dict)
    pixels = preprocess_batch([torch.from_numpy(task.load_image(i))[None] for i in range(len(task))], pre)
    return ProbeData(task.name, pixels, split, np.asarray(t.patient_ids), t.labels.astype(int), list(t.label_names),
                     np.array([s or "" for s in t.sex]), np.asarray(t.age, dtype=float),
                     {j: why for j, why in enumerate(reasons) if not evaluable[j]})


@torch.no_grad()
def teacher_features(backbone: nn.Module, pixels: torch.Tensor, device: torch.device, batch_size: int = 32
                     ) -> np.ndarray:
    """Normed CLS tokens [N, D] of ``backbone`` (in eval mode; its training mode is restored)."""
    was_training = backbone.training
    backbone.eval()
    try:
        out = [backbone.forward_features(pixels[i:i + batch_size].to(device))["x_norm_clstoken"].float().cpu()
               for i in range(0, len(pixels), batch_size)]
    finally:
        backbone.train(was_training)
    return torch.cat(out).numpy()


def probe_metrics(x: np.ndarray, data: ProbeData, seed: int) -> dict[str, float]:
    """Findings macro AUROC, sex AUROC, age MAE and r on the test split, from the harness's probe functions."""
    from sklearn.metrics import roc_auc_score

    from harness.probes.demographics import age_probe
    from harness.probes.linear import linear_probe

    train, test = data.split == "train", data.split == "test"
    out: dict[str, float] = {}
    probe = linear_probe(x[train], data.labels[train], data.patients[train], x[test], data.labels[test],
                         data.label_names, seed=seed, skip=data.skip)
    aurocs = [roc_auc_score(data.labels[test][:, j], probe.scores[:, j])
              for j, lab in enumerate(probe.labels) if lab.evaluable]
    out["probe_macro_auroc"] = float(np.mean(aurocs)) if aurocs else math.nan
    out["eval_labels"] = len(aurocs)
    known = data.sex != ""
    tr, te = train & known, test & known
    y_tr, y_te = (data.sex[tr] == "F").astype(int), (data.sex[te] == "F").astype(int)
    if len(np.unique(y_tr)) == 2 and len(np.unique(y_te)) == 2:
        sex = linear_probe(x[tr], y_tr[:, None], data.patients[tr], x[te], y_te[:, None], ["sex"], seed=seed)
        out["probe_sex_auroc"] = float(roc_auc_score(y_te, sex.scores[:, 0]))
    known = np.isfinite(data.age)
    tr, te = train & known, test & known
    if tr.sum() >= 5 and te.sum() >= 3:
        age = age_probe(x[tr], data.age[tr], data.patients[tr], x[te], seed=seed)
        out["probe_age_mae"] = float(np.abs(age.predictions - data.age[te]).mean())
        out["probe_age_r"] = float(np.corrcoef(age.predictions, data.age[te])[0, 1])
    return out


class InTrainingProbe:
    """Probe a backbone on a task; ``__call__`` returns a metrics row for metrics.jsonl."""

    def __init__(self, data: ProbeData, seed: int, device: torch.device):
        self.data, self.seed, self.device = data, seed, device

    def __call__(self, backbone: nn.Module, iteration: int) -> dict[str, float]:
        t0 = time.perf_counter()
        x = teacher_features(backbone, self.data.pixels, self.device)
        row = {"iteration": iteration, **probe_metrics(x, self.data, self.seed)}
        row["eval_seconds"] = time.perf_counter() - t0
        return row
