"""Attentive probe: a small attention pool trained over each encoder's frozen last-block patch tokens.

Some encoders are made to be read through an attention pool rather than a CLS token or a mean of their tokens:
MedSigLIP's image embedding is its MAP head's (one learned probe attending over the tokens), CheXFound ships a GLoRI
attention-pooling head, and V-JEPA and DINOv2-style evaluations add an attentive probe beside the linear one. A
CLS-only or mean-pooled linear probe underrates such models, and a finding that lives in a few patches is diluted
by a mean over all of them. This protocol trains, for every encoder and with one budget for all (`AttentiveBudget`):

- a LayerNorm of the tokens (so one learning rate suits encoders whose tokens differ in scale);
- multi-head attention with one learned query over the normed tokens (keys and values are their projections);
- a linear classifier on the pooled vector, one logit per evaluable label (`label_status`), trained with binary
  cross-entropy (multi-label);
- AdamW, linear warm-up then cosine decay of the learning rate, a fixed number of epochs and batch size, chosen on
  the Kermany validation split (docs/evaluate.md#attentive-probe) and then frozen.

Initialisation and batch order are seeded by ``tr.seed``: a rerun gives the same numbers. The tokens are read from
the dense features a batch of rows at a time (the cache's shards, or re-encoded batches), never all at once, so
memory does not grow with the task. An encoder whose patch grid is not made of tokens (``pixels``: raw pixel
blocks, `Encoder.patch_tokens`) is skipped and the section says so.

Scoring is the linear probe's: per-label and macro AUROC/AUPRC on the test split with the task's shared patient
resamples, paired differences to the reference with Holm's correction, ranks and win probabilities; the per-image
test scores are published as ``results/<task>/<model>.attentive.parquet``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness import stats
from harness.common.paths import safe_name
from harness.features import FeatureSet, Grid
from harness.leaderboard import Section
from harness.log import progress
from harness.probes.linear import (CLASSIFICATION_HIGHER_IS_BETTER, classification_columns, classification_ranks,
                                   classification_rows, classification_tidy, paired_record,
                                   prediction_rows, ranks_record, split_counts)
from harness.protocols import ProtocolResult, TaskRun, label_status, parquet_bytes
from harness.tasks.base import Task, TaskError

if TYPE_CHECKING:
    from baselines.registry import Encoder

NAME = "attentive"
TITLE = "Attentive probe (classification)"
log = logging.getLogger(__name__)
#: heads of the attention pool: this many, or the largest divisor of the token width below it
MAX_HEADS = 8


@dataclass(frozen=True)
class AttentiveBudget:
    """The training budget every encoder gets. Chosen on the validation patients of the Kermany task (the training
    patients split again, never its test split) among epochs {10, 30} x learning rate {1e-3, 3e-4}, by the mean
    validation macro AUROC over the small recipe's step-0 weights and its checkpoint at step 4,000: 30 epochs at
    3e-4 had the highest, 0.867 (docs/evaluate.md#attentive-probe has the table), then frozen."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-4
    #: epochs of linear warm-up before the cosine decay
    warmup_epochs: int = 1
    weight_decay: float = 0.05


BUDGET = AttentiveBudget()


def n_heads(dim: int, most: int = MAX_HEADS) -> int:
    """The pool's heads for tokens of width `dim`: `most`, or the largest divisor of `dim` below it."""
    return next(h for h in range(min(most, dim), 0, -1) if dim % h == 0)


class AttentivePool(nn.Module):
    """One learned query attending over the LayerNormed tokens with multi-head attention, then a linear classifier.

    The attention is `nn.MultiheadAttention`'s (query, key and value projections, scaled dot products, softmax
    over the tokens, output projection; the key projection without a bias, which would add the same number to
    every token's score and so changes nothing), computed in an order that costs O(tokens x width x heads)
    instead of O(tokens x width^2): with a single query, each head's scores are the tokens dotted with one
    vector (its key projection applied to its query), and its value is the projection of its attention-weighted
    mean token. The same numbers for a fraction of the work, which the CPU budget of every encoder needs."""

    def __init__(self, dim: int, n_labels: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide the token width {dim}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.classify = nn.Linear(dim, n_labels)

    def attend(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, C] tokens -> (pooled [B, C], attention [B, T, heads], summing to 1 over the tokens)."""
        x = self.norm(tokens)
        b, _, c = x.shape
        h, d = self.heads, c // self.heads
        q = self.q_proj(self.query).view(h, d)
        # Per head, the vector each token is dotted with: its rows of the key projection applied to its query.
        k = torch.einsum("hd,hdc->hc", q, self.k_proj.weight.view(h, d, c)) / math.sqrt(d)
        attn = torch.softmax(torch.einsum("btc,hc->bth", x, k), dim=1)
        mean = torch.einsum("bth,btc->bhc", attn, x)  # each head's attention-weighted mean token
        # The weights sum to 1, so the value bias passes through the mean unchanged.
        v = torch.einsum("bhc,hdc->bhd", mean, self.v_proj.weight.view(h, d, c)) + self.v_proj.bias.view(h, d)
        return self.out_proj(v.reshape(b, c)), attn

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, C] tokens -> [B, labels] logits."""
        return self.classify(self.attend(tokens)[0])


def read_tokens(grid: Grid, rows: np.ndarray, task: Task, model: str) -> torch.Tensor:
    """float32 tokens [b, h*w, C] of the images `rows` of a [N, C, h, w] grid, one batch read from the store. A
    non-finite value (an fp16 overflow in the cache) is an error naming the images, not a NaN loss."""
    x = np.asarray(grid[rows], dtype=np.float32)
    bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if bad.any():
        ids = ", ".join(repr(task.table.image_ids[int(i)]) for i in rows[bad][:5])
        raise TaskError(f"task {task.name}, model {model}, protocol {NAME}: patch tokens of {int(bad.sum())} image(s) "
                        f"contain NaN or inf: {ids}. Dense grids are cached as float16 (largest value 65504); check "
                        f"the encoder's outputs on these images, and until then leave `{model}` out of --models.")
    return torch.from_numpy(x).flatten(2).transpose(1, 2)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning rate's multiplier at `step`: linear warm-up over `warmup` steps, then a cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_pool(grid: Grid, rows: np.ndarray, targets: np.ndarray, budget: AttentiveBudget, seed: int, task: Task,
               model: str) -> tuple[AttentivePool, list[float]]:
    """An attention pool trained on the images `rows` of `grid` ([N, C, h, w]) against 0/1 `targets` [len(rows),
    labels], and its mean training loss per epoch. The rows of each batch are read when it is trained on, in
    ascending order (the shards are read in order); the batches' membership follows a seeded permutation."""
    dim = grid.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pool = AttentivePool(dim, targets.shape[1], n_heads(dim))
    n = len(rows)
    per_epoch = math.ceil(n / budget.batch_size)
    total, warmup = budget.epochs * per_epoch, budget.warmup_epochs * per_epoch
    opt = torch.optim.AdamW(pool.parameters(), lr=budget.lr, weight_decay=budget.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total))
    gen = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(targets, dtype=torch.float32)
    losses = []
    pool.train()
    for _ in range(budget.epochs):
        order, running = torch.randperm(n, generator=gen).numpy(), 0.0
        for s in range(0, n, budget.batch_size):
            idx = np.sort(order[s:s + budget.batch_size])
            loss = F.binary_cross_entropy_with_logits(pool(read_tokens(grid, rows[idx], task, model)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        losses.append(running / n)
    return pool.eval(), losses


@torch.no_grad()
def predict(pool: AttentivePool, grid: Grid, rows: np.ndarray, batch_size: int, task: Task, model: str
            ) -> np.ndarray:
    """Sigmoid probabilities [len(rows), labels] of the images `rows`, read a batch at a time."""
    out = [torch.sigmoid(pool(read_tokens(grid, rows[s:s + batch_size], task, model))).double().numpy()
           for s in range(0, len(rows), batch_size)]
    return np.concatenate(out) if out else np.empty((0, pool.classify.out_features))


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for the duration. The pool's operations are small (a batch of tokens times a
    few vectors), so more threads only add synchronisation: on a loaded 2-core machine two threads made a training
    step 20 times slower than one. One thread also makes the numbers independent of the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def all_rows(task: Task) -> np.ndarray:
    """The images the attentive probe reads the patch tokens of: every image (training and test)."""
    return np.arange(len(task))


def fit_and_score(tr: TaskRun, encoders: list[Encoder], budget: AttentiveBudget = BUDGET) -> ProtocolResult:
    """Train every applicable encoder's attention pool on the training split, score the test split, bootstrap on
    the shared resamples and pair with the reference, exactly as the linear probe does with its logistic scores."""
    t = tr.task.table
    y = np.asarray(t.labels).astype(int)
    train, test = tr.split == "train", tr.split == "test"
    train_rows, test_rows = np.flatnonzero(train), np.flatnonzero(test)
    evaluable, reasons = label_status(tr.task, tr.split, tr.min_positive_patients)
    ok = np.flatnonzero(evaluable)
    names = [t.label_names[j] for j in ok]
    applies = [e for e in encoders if e.patch_tokens]
    skipped = [e for e in encoders if not e.patch_tokens]
    for e in skipped:
        log.info(f"  {e.name}: the attentive probe does not apply (its patch grid holds no tokens); skipped")
    reference = tr.reference if tr.reference in {e.name for e in applies} else (applies[0].name if applies else "")
    notes = [f"An attention pool trained on each model's frozen last-block patch tokens, the same budget for every "
             f"model: LayerNorm of the tokens, one learned query, multi-head attention, a linear classifier; binary "
             f"cross-entropy over the evaluable labels; AdamW (lr {budget.lr:g}, weight decay {budget.weight_decay:g}), "
             f"{budget.warmup_epochs} warm-up epoch(s) then cosine decay, {budget.epochs} epochs, batch "
             f"{budget.batch_size}, seed {tr.seed}. Per-label columns: AUPRC. Reference for paired differences: "
             f"`{reference}`" + (f" (the run's reference `{tr.reference}` does not apply)." if reference and
                                 reference != tr.reference else ".")]
    if skipped:
        notes.append("Does not apply (the patch grid holds raw pixels, not tokens), skipped: "
                     + ", ".join(f"`{e.name}`" for e in skipped) + ".")
    not_eval = [f"{n} ({why}: {split_counts(y, train, test, j)})"
                for j, (n, why) in enumerate(zip(t.label_names, reasons)) if not evaluable[j]]
    if not_eval:
        notes.append("Not evaluable, left out of macro means: " + "; ".join(not_eval) + ".")
    not_applied = {e.name: {"applies": False, "metrics": None, "paired_to_reference": None} for e in skipped}
    if not len(ok) or not applies:
        records = {**{e.name: {"metrics": None, "paired_to_reference": None} for e in applies}, **not_applied}
        return ProtocolResult(NAME, Section(TITLE, [], {e.name: {} for e in applies}, notes=notes), records)

    dense = tr.features.dense(all_rows(tr.task))
    test_keys = tr.patient_keys(test_rows)

    def train_and_bootstrap(fs: FeatureSet, model: str) -> dict:
        """One model's pool, its test scores and the bootstrap of its own metrics (what the results cache keeps)."""
        with one_thread():
            pool, losses = train_pool(fs.patch, train_rows, y[train_rows][:, ok], budget, tr.seed, tr.task, model)
            scores = predict(pool, fs.patch, test_rows, budget.batch_size, tr.task, model)
        summary, boot = stats.classification_summary(scores, y[test_rows][:, ok], names, tr.weights)
        return {"scores": scores, "summary": summary, "resampled": boot, "train_loss": losses,
                "heads": pool.heads, "tokens": int(math.prod(fs.patch.shape[2:])), "dim": int(fs.patch.shape[1])}

    settings = {"budget": asdict(budget), "labels": [int(j) for j in ok]}
    summaries, resampled, work, files = {}, {}, {}, {}
    for enc in progress(applies, "attentive probe: pools and bootstrap"):
        fs = dense[enc.name]
        work[enc.name] = tr.results.memo(NAME, fs, settings, lambda fs=fs, m=enc.name: train_and_bootstrap(fs, m))
        w = work[enc.name]
        summaries[enc.name], resampled[enc.name] = w["summary"], w["resampled"]
        files[f"results/{tr.out_name}/{safe_name(enc.name)}.attentive.parquet"] = parquet_bytes(list(
            prediction_rows(t.image_ids, y, ok, names, test_rows, test_keys, w["scores"])))
    ranked = classification_ranks(summaries, resampled)
    rows, paired = classification_rows(summaries, resampled, ranked, names, reference)
    records = {e.name: {"applies": True, "budget": asdict(budget), "heads": work[e.name]["heads"],
                        "tokens": work[e.name]["tokens"], "dim": work[e.name]["dim"],
                        "train_loss": work[e.name]["train_loss"], "reference": reference,
                        "metrics": summaries[e.name], "paired_to_reference": paired_record(paired, e.name, reference),
                        "ranks": ranks_record(ranked, e.name)} for e in applies}
    return ProtocolResult(NAME, Section(TITLE, classification_columns(names), rows, CLASSIFICATION_HIGHER_IS_BETTER,
                                        notes), {**records, **not_applied}, files=files,
                          tidy=classification_tidy(tr.out_name, NAME, summaries, paired, ranked, names, reference))
