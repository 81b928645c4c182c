"""Linear probe: one logistic regression per label on frozen, standardised global features.

The regularisation strength is chosen by patient-grouped, stratified cross-validation on the training split
only (mean AUROC over folds; ties go to the stronger regularisation), then the probe is refitted on the whole
training split and scores the test split. A label with a single class in the training split, or in the test
split, is reported as not evaluable with its counts, never as NaN.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from baselines.registry import Encoder
from harness import stats
from harness.leaderboard import Cell, Section
from harness.protocols import TaskRun, register_protocol
from harness.splits import pseudonym

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 1, 6))


@dataclass
class LabelResult:
    name: str
    evaluable: bool
    reason: str = ""
    C: float | None = None
    cv_auroc: float | None = None
    counts: dict = field(default_factory=dict)


@dataclass
class ProbeResult:
    scores: np.ndarray            # [n_test, L] probabilities; NaN columns for non-evaluable labels
    labels: list[LabelResult]


def _counts(y_train: np.ndarray, y_test: np.ndarray) -> dict:
    return {"train_pos": int(y_train.sum()), "train_neg": int((1 - y_train).sum()),
            "test_pos": int(y_test.sum()), "test_neg": int((1 - y_test).sum())}


def _fit(x: np.ndarray, y: np.ndarray, C: float, seed: int) -> LogisticRegression:
    clf = LogisticRegression(C=C, max_iter=2000, tol=1e-5, random_state=seed)
    with warnings.catch_warnings():
        # The strongest C values may stop short of full convergence on separable folds; the CV scores the
        # result as it is, which is what the user would get.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(x, y)


def choose_C(x: np.ndarray, y: np.ndarray, groups: np.ndarray, Cs: tuple[float, ...], seed: int,
             max_folds: int = 5) -> tuple[float, float]:
    """Best C by patient-grouped stratified CV (mean fold AUROC); returns (C, cv_auroc)."""
    pos_groups = len(np.unique(groups[y == 1]))
    neg_groups = len(np.unique(groups[y == 0]))
    n_folds = min(max_folds, pos_groups, neg_groups)
    if n_folds < 2:
        # Too few patients of one class to hold any out: fall back to the middle of the grid, and say so.
        return Cs[len(Cs) // 2], float("nan")
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    scores = np.zeros((len(Cs), n_folds))
    for f, (tr, va) in enumerate(cv.split(x, y, groups)):
        if len(np.unique(y[tr])) < 2 or len(np.unique(y[va])) < 2:
            scores[:, f] = np.nan
            continue
        scaler = StandardScaler().fit(x[tr])
        xtr, xva = scaler.transform(x[tr]), scaler.transform(x[va])
        for c, C in enumerate(Cs):
            scores[c, f] = roc_auc_score(y[va], _fit(xtr, y[tr], C, seed).decision_function(xva))
    mean = np.nanmean(scores, axis=1) if np.isfinite(scores).any() else np.full(len(Cs), np.nan)
    if not np.isfinite(mean).any():
        return Cs[len(Cs) // 2], float("nan")
    best = int(np.nanargmax(mean))  # first maximum = smallest C = strongest regularisation
    return Cs[best], float(mean[best])


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, groups_train: np.ndarray, x_test: np.ndarray,
                 y_test: np.ndarray, label_names: list[str], seed: int = 0,
                 Cs: tuple[float, ...] = DEFAULT_CS) -> ProbeResult:
    """Fit one probe per label; `y_*` are [n, L] 0/1 arrays, `groups_train` the patient id of each train row."""
    scaler = StandardScaler().fit(x_train)
    xtr, xte = scaler.transform(x_train), scaler.transform(x_test)
    scores = np.full((len(x_test), len(label_names)), np.nan)
    results = []
    for j, name in enumerate(label_names):
        ytr, yte = y_train[:, j].astype(int), y_test[:, j].astype(int)
        counts = _counts(ytr, yte)
        if len(np.unique(ytr)) < 2 or len(np.unique(yte)) < 2:
            which = "training" if len(np.unique(ytr)) < 2 else "test"
            results.append(LabelResult(name, False, f"only one class in the {which} split", counts=counts))
            continue
        C, cv_auroc = choose_C(x_train, ytr, groups_train, Cs, seed)
        clf = _fit(xtr, ytr, C, seed)
        scores[:, j] = clf.predict_proba(xte)[:, 1]
        results.append(LabelResult(name, True, C=C, cv_auroc=cv_auroc, counts=counts))
    return ProbeResult(scores, results)


@register_protocol("linear", description="logistic-regression probe per label on global features; AUROC, AUPRC")
def run_linear(tr: TaskRun, encoders: list[Encoder]) -> Section:
    """The linear-probe protocol: fit per model, bootstrap on the shared resamples, pair with the reference."""
    t = tr.task.table
    train, test = tr.split == "train", tr.split == "test"
    y = t.labels.astype(int)
    groups = np.asarray(t.patient_ids)
    test_rows = np.flatnonzero(test)
    test_keys = [pseudonym(t.patient_ids[i], tr.task.name) for i in test_rows]
    probes = {e.name: linear_probe(tr.features[e.name].global_[train], y[train], groups[train],
                                   tr.features[e.name].global_[test], y[test], t.label_names, seed=tr.seed)
              for e in encoders}
    # Which labels are evaluable depends only on the labels and the split, so it is the same for every model.
    labels = probes[encoders[0].name].labels
    ok = [j for j, lab in enumerate(labels) if lab.evaluable]
    names = [t.label_names[j] for j in ok]
    metrics = (("auroc", "AUROC"), ("auprc", "AUPRC"))
    columns = [f"macro {title}" for _, title in metrics] + [f"{n} AUPRC" for n in names]
    notes = [f"Per-label columns: AUPRC (the paper's headline classification metric). Reference for paired "
             f"differences: `{tr.reference}`."]
    not_eval = [lab for lab in labels if not lab.evaluable]
    if not_eval:
        notes.append("Not evaluable, left out of macro means: " + "; ".join(
            f"{lab.name} ({lab.reason}: train {lab.counts['train_pos']}+/{lab.counts['train_neg']}-, "
            f"test {lab.counts['test_pos']}+/{lab.counts['test_neg']}-)" for lab in not_eval) + ".")
    if not ok:
        return Section("Linear probe (classification)", [], {e.name: {} for e in encoders}, notes=notes)

    summaries, resampled = {}, {}
    for enc in encoders:
        scores = probes[enc.name].scores[:, ok]
        summaries[enc.name], resampled[enc.name] = stats.classification_summary(scores, y[test][:, ok], names,
                                                                                tr.weights)
        tr.predictions[enc.name] = [
            {"image_id": t.image_ids[i], "patient_key": k, "label": n, "target": int(y[i, j]), "score": float(s)}
            for jj, (j, n) in enumerate(zip(ok, names))
            for i, k, s in zip(test_rows, test_keys, scores[:, jj])]
    paired = {m: stats.compare_to_reference({e.name: resampled[e.name][m] for e in encoders},
                                            {e.name: summaries[e.name][m]["macro"]["point"] for e in encoders},
                                            tr.reference) for m, _ in metrics}
    rows: dict[str, dict[str, Cell]] = {}
    for enc in encoders:
        s = summaries[enc.name]
        row = {}
        for m, title in metrics:
            mac = s[m]["macro"]
            p_holm = paired[m][enc.name]["p_holm"] if enc.name != tr.reference else None
            row[f"macro {title}"] = Cell(mac["point"], mac["lo"], mac["hi"], p_holm is not None and p_holm < 0.05)
        for n in names:
            pl = s["auprc"]["per_label"][n]
            row[f"{n} AUPRC"] = Cell(pl["point"], pl["lo"], pl["hi"])
        rows[enc.name] = row
        tr.results.setdefault(enc.name, {})["linear"] = {
            "metrics": s,
            "paired_to_reference": None if enc.name == tr.reference else {m: paired[m][enc.name] for m, _ in metrics},
            "labels": [vars(lab) for lab in probes[enc.name].labels],
        }
    return Section("Linear probe (classification)", columns, rows, notes=notes)
