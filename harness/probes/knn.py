"""k-NN probe, as in the DINO papers' evaluation: weighted votes of the k most cosine-similar training images.

It equals DINOv2's ``KnnModule`` with a single k, which differs from that module's default of several k's (their
votes share one softmax over the largest k) and from DINO v1's unnormalised vote sum (rank correlation 0.991 between
the two scores, measured in review).

Features are the same frozen global features as the linear probe's, L2-normalised (not standardised: cosine
similarity is the metric the DINO papers use). A test image's neighbours are the `k` training images of highest
cosine similarity; each votes with weight exp(cos / T), and the score of a label is the weight of the neighbours
positive for it over the weight of all `k` neighbours (a vote share in [0, 1], one per label: multi-label by
per-label votes). Nothing is fitted, so there is no cross-validation; k and T are flags (``--knn-k``,
``--knn-temperature``, DINO's 20 and 0.07 by default).

Ties: neighbours are ranked by similarity, equal similarities by training row (the earlier image first), so the
neighbour set is a function of the data alone. A `k` larger than the training split is clamped to its size, and
the section notes say so. Labels, bootstrap resamples and the paired comparison with the reference are the linear
probe's; per test image the scores are published (``<model>.knn.parquet``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness import stats
from harness.common.paths import safe_name
from harness.leaderboard import Section
from harness.log import progress
from harness.probes.linear import (CLASSIFICATION_HIGHER_IS_BETTER, classification_columns, classification_ranks,
                                   classification_rows, classification_tidy, paired_record,
                                   prediction_rows, ranks_record, split_counts)
from harness.protocols import ProtocolResult, TaskRun, label_status, parquet_bytes

if TYPE_CHECKING:
    from baselines.registry import Encoder

NAME = "knn"
TITLE = "k-NN probe (classification)"
#: test rows per similarity block: bounds the [rows, n_train] similarity and rank arrays to tens of MB
_BLOCK = 256


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in float64; an all-zero row stays zero (similarity 0 to everything)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def knn_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, k: int,
               temperature: float) -> np.ndarray:
    """Per test row and label, the exp(cos / T)-weighted share of its `k` nearest training rows that are positive:
    float [n_test, L]. `y_train` is 0/1 [n_train, L]; 1 <= k <= n_train (a larger k is the caller's choice to
    clamp, not silently changed here)."""
    y_train = np.asarray(y_train, dtype=np.float64).reshape(len(x_train), -1)
    if not 1 <= k <= len(x_train):
        raise ValueError(f"k = {k} neighbours, but the training split has {len(x_train)} images")
    if not temperature > 0:
        raise ValueError(f"the temperature must be positive, got {temperature}")
    xtr, xte = _unit(x_train), _unit(x_test)
    scores = np.empty((len(xte), y_train.shape[1]))
    for start in range(0, len(xte), _BLOCK):
        sim = xte[start:start + _BLOCK] @ xtr.T
        # Stable sort: among equal similarities the earlier training row ranks first, so ties are deterministic.
        nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(sim, nearest, axis=1)
        # Shifting by the row's largest similarity scales every weight of the row alike (the share is unchanged)
        # and keeps exp() finite at small temperatures.
        w = np.exp((top - top[:, :1]) / temperature)
        share = np.einsum("nk,nkl->nl", w, y_train[nearest]) / w.sum(axis=1, keepdims=True)
        # The two sums round differently: an all-positive neighbourhood could score an ulp above another one,
        # which AUROC would rank; clipping keeps such images tied at exactly 1.
        scores[start:start + _BLOCK] = np.clip(share, 0.0, 1.0)
    return scores


def fit_and_score(tr: TaskRun, encoders: list[Encoder]) -> ProtocolResult:
    """Score every model's k-NN votes on the test split, bootstrap on the shared resamples, pair with the
    reference, exactly as the linear probe does with its logistic scores."""
    t = tr.task.table
    y = np.asarray(t.labels).astype(int)
    train, test = tr.split == "train", tr.split == "test"
    test_rows = np.flatnonzero(test)
    evaluable, reasons = label_status(tr.task, tr.split, tr.min_positive_patients)
    ok = np.flatnonzero(evaluable)
    names = [t.label_names[j] for j in ok]
    k_asked, temperature = tr.options.knn_k, tr.options.knn_temperature
    k = min(k_asked, int(train.sum()))
    setting = {"k": k, "k_requested": k_asked, "temperature": temperature}
    notes = [f"Cosine k-NN on L2-normalised global features, k = {k}, temperature {temperature:g}: per label, the "
             "exp(cos/T)-weighted share of positive neighbours (`--knn-k`, `--knn-temperature`); equal "
             "similarities rank the earlier training image first. Per-label columns: AUPRC. Reference for paired "
             f"differences: `{tr.reference}`."]
    if k < k_asked:
        notes.append(f"--knn-k {k_asked} is more than the {k} training images: clamped to {k}.")
    not_eval = [f"{n} ({why}: {split_counts(y, train, test, j)})"
                for j, (n, why) in enumerate(zip(t.label_names, reasons)) if not evaluable[j]]
    if not_eval:
        notes.append("Not evaluable, left out of macro means: " + "; ".join(not_eval) + ".")
    columns = classification_columns(names)
    if not len(ok) or k < 1:
        records = {e.name: {**setting, "metrics": None, "paired_to_reference": None} for e in encoders}
        return ProtocolResult(NAME, Section(TITLE, [], {e.name: {} for e in encoders}, notes=notes), records)

    test_keys = tr.patient_keys(test_rows)

    def score_and_bootstrap(x: np.ndarray) -> dict:
        """One model's k-NN scores and the bootstrap of its own metrics (what the results cache keeps)."""
        scores = knn_scores(x[train], y[train][:, ok], x[test], k, temperature)
        summary, boot = stats.classification_summary(scores, y[test][:, ok], names, tr.weights)
        return {"scores": scores, "summary": summary, "resampled": boot}

    summaries, resampled, files = {}, {}, {}
    settings = {"k": k, "temperature": temperature, "labels": [int(j) for j in ok]}
    for enc in progress(encoders, "k-NN probe: scores and bootstrap"):
        x = tr.features[enc.name].global_
        work = tr.results.memo(NAME, tr.features[enc.name], settings, lambda x=x: score_and_bootstrap(x))
        scores, summaries[enc.name], resampled[enc.name] = work["scores"], work["summary"], work["resampled"]
        files[f"results/{tr.out_name}/{safe_name(enc.name)}.knn.parquet"] = parquet_bytes(list(
            prediction_rows(t.image_ids, y, ok, names, test_rows, test_keys, scores)))
    ranked = classification_ranks(summaries, resampled)
    rows, paired = classification_rows(summaries, resampled, ranked, names, tr.reference)
    records = {e.name: {**setting, "metrics": summaries[e.name],
                        "paired_to_reference": paired_record(paired, e.name, tr.reference),
                        "ranks": ranks_record(ranked, e.name)} for e in encoders}
    return ProtocolResult(NAME, Section(TITLE, columns, rows, CLASSIFICATION_HIGHER_IS_BETTER, notes), records,
                          files=files, tidy=classification_tidy(tr.out_name, NAME, summaries, paired, ranked, names,
                                                                tr.reference))
