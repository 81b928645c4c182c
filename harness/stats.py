"""Patient-clustered bootstrap statistics: confidence intervals and paired comparisons between models.

The unit of resampling is the patient, not the image: images of one patient are correlated (follow-up studies,
two views), so an image-level bootstrap would understate the uncertainty. A resample draws the test set's P
patients P times with replacement; an image's *weight* in that resample is the number of times its patient was
drawn. Every metric is then computed on all resamples at once from a weight matrix [B, N]; with integer weights,
a weighted metric equals the plain metric on the explicitly resampled arrays (`np.repeat(x, weights[b])`), which
is what the tests and `bench/bench_bootstrap.py` check against scikit-learn.

Pairing: the draws depend only on the *sorted set* of patient ids and the seed, and an image's weight only on its
patient, so two models evaluated on the same test images get the same resamples whatever order their images come
in; resample b of model A and resample b of model B are the same patients, and their difference is a paired
bootstrap of the difference. Arrays that are combined per image (scores against labels) must of course be in one
image order: `align` gives the permutation by image id.

Conventions (also in docs/statistics.md):
- 1,000 resamples, seed 0, percentile 95% interval.
- A metric that is undefined in a resample (e.g. AUROC with no positive drawn) is NaN there; summaries drop those
  resamples and report how many were valid (`n_valid`).
- Resamples are drawn over the sorted patient *pseudonyms* (the `patient_key` of the published predictions), so a
  reader holding a predictions file and the seed can redraw them (docs/statistics.md shows how).
- Macro mean: over a fixed label set, the labels evaluable on the test split (at least `min_patients` patients with
  a positive and as many with a negative image). The resampling is conditioned on that set: a draw in which some
  evaluable label has no positive or no negative patient is rejected and another is drawn, so every label of the
  macro is defined in every resample and the point estimate and every resample average the same labels. (Letting
  each resample average only its defined labels mixes label sets and biases the interval towards the common
  labels.) A macro over labels some resample leaves undefined is NaN in that resample, never a partial mean.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
# Resamples processed at once: bounds the transposed weights [N, chunk] and the per-threshold sums [<= 2N, chunk]
# to a few tens of MB whatever the test set size.
_CHUNK_ELEMENTS = 1 << 22


def bootstrap_weights(patient_ids: Sequence[str], n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int = DEFAULT_SEED, required: np.ndarray | None = None,
                      max_rounds: int = 100) -> np.ndarray:
    """Per-image weights of `n_resamples` patient-level bootstrap resamples, int32 [B, N].

    Deterministic in (sorted unique patient ids, seed, required): the same for every model scored on the same
    patients, whatever the order of the images. `required` (bool [N, K]) conditions the draw: every resample must
    contain, for each column k, at least one image with required[:, k] (e.g. "a positive of label j", "a negative
    of label j"). Rounds of `n_resamples` draws are made from one generator; the rows that satisfy the condition
    are kept in draw order until there are `n_resamples` of them.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    ids = np.asarray(patient_ids).astype(str)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("patient_ids must be a non-empty 1-D sequence (one patient id per image)")
    patients, image_patient = np.unique(ids, return_inverse=True)
    n_patients = len(patients)
    present = None
    if required is not None:
        required = np.asarray(required, dtype=bool).reshape(len(ids), -1)
        # Patient-level: does patient p hold an image with column k?
        present = np.zeros((n_patients, required.shape[1]), dtype=np.int64)
        np.add.at(present, image_patient, required.astype(np.int64))
        present = present > 0
        if not present.any(axis=0).all():
            raise ValueError("a required column has no image at all: no resample can satisfy it")
    rng = np.random.default_rng(seed)
    offsets = np.arange(n_resamples)[:, None] * n_patients
    kept: list[np.ndarray] = []
    n_kept = 0
    for _ in range(max_rounds):
        draws = rng.integers(0, n_patients, size=(n_resamples, n_patients))
        # counts[b, p] = times patient p was drawn in resample b; one bincount over offset ids instead of B of them.
        counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_patients)
        counts = counts.reshape(n_resamples, n_patients).astype(np.int32)
        if present is not None:
            counts = counts[((counts @ present) > 0).all(axis=1)]
        kept.append(counts)
        n_kept += len(counts)
        if n_kept >= n_resamples:
            return np.concatenate(kept)[:n_resamples][:, image_patient]
    raise ValueError(f"only {n_kept} of {max_rounds * n_resamples} resamples had every evaluable label's classes; "
                     "raise --min-positive-patients so that rare labels are left out of the macro")


def patients_per_class(labels: np.ndarray, patient_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per label, the number of patients with at least one positive image and with at least one negative image:
    int [L] each. The bootstrap resamples patients, so these (not image counts) say how often a class is drawn."""
    labels = np.asarray(labels).reshape(len(labels), -1).astype(bool)
    _, patient = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)
    pos = np.zeros((patient.max() + 1, labels.shape[1]), dtype=bool)
    neg = np.zeros_like(pos)
    np.logical_or.at(pos, patient, labels)
    np.logical_or.at(neg, patient, ~labels)
    return pos.sum(axis=0), neg.sum(axis=0)


def class_requirements(labels: np.ndarray, evaluable: np.ndarray) -> np.ndarray:
    """bool [N, 2K] for `bootstrap_weights(required=...)`: a positive and a negative image of each evaluable label."""
    labels = np.asarray(labels).reshape(len(labels), -1).astype(bool)[:, np.asarray(evaluable, dtype=bool)]
    return np.concatenate([labels, ~labels], axis=1)


def align(image_ids: Sequence[str], reference_ids: Sequence[str]) -> np.ndarray:
    """Index `idx` such that `np.asarray(image_ids)[idx]` is in the order of `reference_ids`.

    Use it to put one model's per-image predictions in the order of another's before pairing; raises when the two
    lists are not the same set of images (paired statistics on different test sets are meaningless).
    """
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    if len(position) != len(image_ids) or len(set(reference_ids)) != len(reference_ids):
        raise ValueError("an image list contains duplicates; each image must appear once")
    # Counts only: image ids can embed patient ids (RSNA names images by patientId), which must not reach logs.
    missing = sum(r not in position for r in reference_ids)
    if missing or len(reference_ids) != len(image_ids):
        extra = len(image_ids) - (len(reference_ids) - missing)
        raise ValueError(f"the two image lists differ: {missing} reference images missing, {extra} images not in "
                         "the reference; evaluate both models on the same test split")
    return np.array([position[r] for r in reference_ids], dtype=np.int64)


def _as_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    """[B, N] weights; None means the full sample once (B = 1), i.e. the point estimate."""
    if weights is None:
        return np.ones((1, n), dtype=np.int32)
    weights = np.asarray(weights)
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights have shape {weights.shape}, expected (n_resamples, {n}) to match the images")
    if weights.min() < 0:
        raise ValueError("weights must be non-negative (counts of how often each image is drawn)")
    return weights


def _chunks(n_resamples: int, n_images: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(n_images, 1))
    return [slice(b, min(b + step, n_resamples)) for b in range(0, n_resamples, step)]


def _auroc_ap_chunk(scores: np.ndarray, labels: np.ndarray, weights_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of one label for a block of resamples; `weights_t` is [N, b] (image-major).

    Both metrics only need, at each distinct score that holds a positive (a "positive threshold"), the weight of
    the positives there and the negative weight above and tied with it. These are sums of image weights over
    fixed sets of images, so all of them, for all resamples, are one sparse 0/1 matrix product [sums, N] @ [N, b]:
    a single pass over the weights, with no [N, b] sort or cumulative sum.
    """
    n, b = weights_t.shape
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    positive = labels[order].astype(bool)
    # Tied scores are one threshold: `group` numbers the distinct scores in descending order.
    group = np.cumsum(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]) - 1
    pos_groups = np.unique(group[positive])
    k = len(pos_groups)
    if k == 0:
        return np.full(b, np.nan), np.full(b, np.nan)
    neg_images, neg_group = order[~positive], group[~positive]
    nxt = np.searchsorted(pos_groups, neg_group)   # first positive threshold at or below each negative
    tied = (nxt < k) & (pos_groups[np.minimum(nxt, k - 1)] == neg_group)
    tied_thresholds, tied_row = np.unique(nxt[tied], return_inverse=True)
    # Rows 0..k-1: positives at threshold i. Rows k+i: negatives scoring below threshold i-1 and at or above
    # threshold i (row 2k: below the last). Rows 2k+1+j: negatives tied with threshold tied_thresholds[j].
    rows = np.concatenate([np.searchsorted(pos_groups, group[positive]), k + nxt, 2 * k + 1 + tied_row])
    cols = np.concatenate([order[positive], neg_images, neg_images[tied]])
    indicator = sparse.csr_array((np.ones(len(rows), dtype=weights_t.dtype), (rows, cols)),
                                 shape=(2 * k + 1 + len(tied_thresholds), n))
    sums = (indicator @ weights_t).astype(np.float64)
    pos_w, tied_w = sums[:k], sums[2 * k + 1:]
    n_neg = sums[k:2 * k + 1].sum(axis=0)
    fp_at = np.cumsum(sums[k:2 * k], axis=0)   # negative weight scoring >= threshold i
    tp_at = np.cumsum(pos_w, axis=0)           # positive weight scoring >= threshold i
    n_pos = tp_at[-1].copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        # Mann-Whitney form of the ROC area: a positive beats the negatives below it and half of those tied with
        # it. Integer weights keep every term an exact integer (or half) until the last division.
        wins = (pos_w * (n_neg - fp_at)).sum(axis=0) + 0.5 * (pos_w[tied_thresholds] * tied_w).sum(axis=0)
        auroc = wins / (n_pos * n_neg)
        # scikit-learn's AP: sum over thresholds of (R_t - R_{t-1}) * P_t; recall only moves at positive
        # thresholds. Where nothing at or above a threshold was drawn, pos_w = tp_at = 0: make that 0/0 a 0/1.
        drawn = tp_at + fp_at
        drawn[drawn == 0] = 1.0
        ap = (pos_w * tp_at / drawn).sum(axis=0) / n_pos
    auroc[(n_pos == 0) | (n_neg == 0)] = np.nan
    ap[n_pos == 0] = np.nan
    return auroc, ap


def binary_metrics(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """AUROC and AUPRC (scikit-learn's average precision) per label and per resample.

    scores: float [N, L] (or [N]); labels: {0, 1} [N, L] (or [N]); weights: [B, N] from `bootstrap_weights`, or
    None for the point estimate (B = 1). Returns {"auroc": [B, L], "auprc": [B, L]}, NaN where undefined (AUROC:
    one class absent; AUPRC: no positive).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim == 1:
        scores, labels = scores[:, None], labels.reshape(-1, 1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores have shape {scores.shape} but labels {labels.shape}; they must match")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (missing labels must be removed before scoring)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    n, n_labels = scores.shape
    weights = _as_weights(weights, n)
    out = {name: np.empty((weights.shape[0], n_labels)) for name in ("auroc", "auprc")}
    for block in _chunks(weights.shape[0], n):
        weights_t = np.ascontiguousarray(weights[block].T)
        for j in range(n_labels):
            out["auroc"][block, j], out["auprc"][block, j] = _auroc_ap_chunk(scores[:, j], labels[:, j], weights_t)
    return out


def evaluable_labels(labels: np.ndarray, patient_ids: Sequence[str] | None = None,
                     min_patients: int = 1) -> np.ndarray:
    """bool [L]: labels a macro mean averages. Without patient ids: both classes present in the test set. With
    them: at least `min_patients` patients with a positive image and as many with a negative one."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    if patient_ids is None:
        positives = labels.sum(axis=0)
        return (positives > 0) & (positives < len(labels))
    pos, neg = patients_per_class(labels, patient_ids)
    return (pos >= max(min_patients, 1)) & (neg >= max(min_patients, 1))


def macro_mean(per_label: np.ndarray, evaluable: np.ndarray) -> np.ndarray:
    """Mean over the evaluable labels, per resample: [B, L] -> [B]. The label set is fixed: a resample in which
    one of them is undefined is NaN (left out of the summary and counted in n_valid), never a mean over fewer."""
    values = np.asarray(per_label)[:, np.asarray(evaluable, dtype=bool)]
    if values.shape[1] == 0:
        return np.full(len(values), np.nan)
    return values.mean(axis=1)


def weighted_mean(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean of a per-image value (Dice, absolute error, ...) per resample: [N] -> [B]."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError("per-image values must be a finite 1-D array (drop images without a value first)")
    weights = _as_weights(weights, len(values))
    return (weights @ values) / weights.sum(axis=1)


def _weighted_moments(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-resample weighted variance of x, of y and their covariance (population form, as np.var/np.cov(ddof=0)).
    Centring on the full-sample means first avoids the cancellation of E[x^2] - E[x]^2 for large offsets (ages)."""
    x = x - x.mean()
    y = y - y.mean()
    total = weights.sum(axis=1)
    mx, my = (weights @ x) / total, (weights @ y) / total
    var_x = (weights @ (x * x)) / total - mx * mx
    var_y = (weights @ (y * y)) / total - my * my
    cov = (weights @ (x * y)) / total - mx * my
    return var_x, var_y, cov


def _paired_values(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be 1-D of the same length")
    if not (np.isfinite(y_true).all() and np.isfinite(y_pred).all()):
        raise ValueError("y_true and y_pred must be finite (drop images with unknown targets first)")
    return y_true, y_pred


def weighted_pearson(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Pearson correlation per resample: [N], [N] -> [B]; NaN when either side is constant in a resample."""
    y_true, y_pred = _paired_values(y_true, y_pred)
    var_t, var_p, cov = _weighted_moments(y_true, y_pred, _as_weights(weights, len(y_true)))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(var_t * var_p)
    return np.where((var_t > 0) & (var_p > 0), r, np.nan)


def weighted_r2(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Coefficient of determination (scikit-learn's r2_score: 1 - SS_res / SS_tot) per resample: [N] -> [B];
    NaN when y_true is constant in a resample."""
    y_true, y_pred = _paired_values(y_true, y_pred)
    weights = _as_weights(weights, len(y_true))
    residual = y_true - y_pred
    ss_res = (weights @ (residual * residual)) / weights.sum(axis=1)
    var_t, _, _ = _weighted_moments(y_true, y_true, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - ss_res / var_t
    return np.where(var_t > 0, r2, np.nan)


def _finite_or_none(x: float) -> float | None:
    """JSON has no NaN: undefined numbers are written as null."""
    return float(x) if np.isfinite(x) else None


def json_ready(obj: object) -> object:
    """A copy of `obj` that `json.dumps(..., allow_nan=False)` accepts: NaN and infinities become null (strict
    JSON parsers reject NaN), numpy scalars and arrays become Python numbers and lists."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _finite_or_none(obj)
    return obj


def summarise(point: float, resampled: np.ndarray, level: float = 0.95) -> dict:
    """Point estimate with its percentile bootstrap interval over the valid (finite) resamples.

    Returns {"point", "lo", "hi", "n_valid", "n_resamples"}; numbers that are undefined are None (e.g. lo/hi when
    no resample is valid).
    """
    resampled = np.asarray(resampled, dtype=np.float64).ravel()
    valid = resampled[np.isfinite(resampled)]
    # Rounded so that level 0.95 asks for exactly the 2.5th/97.5th percentiles (100 * 0.05 / 2 is 2.500000000000002
    # in floating point), the numbers a reader recomputing an interval will use.
    tail = round(100.0 * (1.0 - level) / 2.0, 9)
    lo, hi = np.percentile(valid, [tail, 100.0 - tail]) if valid.size else (np.nan, np.nan)
    return {"point": _finite_or_none(point), "lo": _finite_or_none(lo), "hi": _finite_or_none(hi),
            "n_valid": int(valid.size), "n_resamples": int(resampled.size)}


def paired_delta(resampled_model: np.ndarray, resampled_ref: np.ndarray, point_model: float, point_ref: float,
                 level: float = 0.95) -> dict:
    """Paired bootstrap of (model - reference) on the same resamples.

    Returns {"delta", "lo", "hi", "p", "n_valid"}: the point difference, its percentile interval and a two-sided
    p-value for "no difference", over resamples where both are defined. The p-value doubles the smaller tail,
        p = min(1, 2 * (1 + min(#{d_b <= 0}, #{d_b >= 0})) / (n_valid + 1)),
    the add-one form of a Monte Carlo p-value: with B resamples nothing below ~2/B can be resolved, so it never
    reports 0. Ties d_b = 0 count in both tails, so two identical models get p = 1.
    """
    model = np.asarray(resampled_model, dtype=np.float64).ravel()
    ref = np.asarray(resampled_ref, dtype=np.float64).ravel()
    if model.shape != ref.shape:
        raise ValueError(f"{model.size} vs {ref.size} resamples: pair models on the same bootstrap weights")
    both = np.isfinite(model) & np.isfinite(ref)
    delta = model[both] - ref[both]
    summary = summarise(point_model - point_ref, delta, level)
    n_valid = summary["n_valid"]
    p = None
    if n_valid:
        smaller_tail = min(int((delta <= 0).sum()), int((delta >= 0).sum()))
        p = min(1.0, 2.0 * (1 + smaller_tail) / (n_valid + 1))
    return {"delta": summary["point"], "lo": summary["lo"], "hi": summary["hi"], "p": p, "n_valid": n_valid}


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (family-wise error) of p-values; None/NaN entries are left out of the family
    and stay None. Adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) over the ascending order."""
    raw = np.array([np.nan if p is None else p for p in pvalues], dtype=np.float64)
    present = np.flatnonzero(np.isfinite(raw))
    m = len(present)
    order = present[np.argsort(raw[present], kind="stable")]
    stepped = np.minimum(1.0, (m - np.arange(m)) * raw[order])
    adjusted = [None] * len(raw)
    for i, value in zip(order, np.maximum.accumulate(stepped)):
        adjusted[i] = float(value)
    return adjusted


def compare_to_reference(resampled: dict[str, np.ndarray], points: dict[str, float],
                         reference: str | None = None, level: float = 0.95) -> dict[str, dict]:
    """Paired deltas of every model against `reference` (default: the first model), Holm-adjusted across the
    compared models. `resampled[m]` are [B] values of one metric on the shared resamples. Returns
    {model: {"delta", "lo", "hi", "p", "p_holm", "n_valid"}} for every model except the reference."""
    names = list(resampled)
    reference = names[0] if reference is None else reference
    if reference not in resampled:
        raise ValueError(f"--reference {reference!r} is not among the evaluated models: {', '.join(names)}")
    others = [m for m in names if m != reference]
    out = {m: paired_delta(resampled[m], resampled[reference], points[m], points[reference], level) for m in others}
    for m, adjusted in zip(others, holm([out[m]["p"] for m in others])):
        out[m]["p_holm"] = adjusted
    return out


def classification_summary(scores: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                           weights: np.ndarray, level: float = 0.95) -> tuple[dict, dict[str, np.ndarray]]:
    """Per-label and macro AUROC/AUPRC with bootstrap intervals for one model.

    Returns (summary, macro_resampled): summary = {"auroc"|"auprc": {"per_label": {name: summarise(...)},
    "macro": summarise(...)}}, JSON-ready; macro_resampled = {"auroc"|"auprc": [B]}, to be kept for every model and
    paired with `compare_to_reference`.
    """
    labels = np.asarray(labels).reshape(len(labels), -1)
    if len(label_names) != labels.shape[1]:
        raise ValueError(f"{len(label_names)} label names for {labels.shape[1]} label columns")
    evaluable = evaluable_labels(labels)
    point = binary_metrics(scores, labels)
    boot = binary_metrics(scores, labels, weights)
    summary, macro_resampled = {}, {}
    for metric in ("auroc", "auprc"):
        macro_resampled[metric] = macro_mean(boot[metric], evaluable)
        summary[metric] = {
            "per_label": {name: summarise(point[metric][0, j], boot[metric][:, j], level)
                          for j, name in enumerate(label_names)},
            "macro": summarise(macro_mean(point[metric], evaluable)[0], macro_resampled[metric], level),
        }
    return summary, macro_resampled
