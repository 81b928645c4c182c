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
from harness.common.paths import safe_name
from harness.log import progress
from harness.protocols import TaskRun, label_status, parquet_bytes, register_protocol

#: The classification sections' headline metrics: (results key, column title).
CLASSIFICATION_METRICS = (("auroc", "AUROC"), ("auprc", "AUPRC"))
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 1, 6))
MAX_ITER = 2000


@dataclass
class LabelResult:
    name: str
    evaluable: bool
    reason: str = ""
    C: float | None = None
    cv_auroc: float | None = None
    counts: dict = field(default_factory=dict)
    #: "low"/"high" when C is the grid's smallest/largest value (the optimum may lie beyond it), else ""
    C_at_edge: str = ""
    #: logistic fits (cross-validation and final) and how many stopped at max_iter without converging
    fits: int = 0
    not_converged: int = 0


@dataclass
class ProbeResult:
    scores: np.ndarray            # [n_test, L] probabilities; NaN columns for non-evaluable labels
    labels: list[LabelResult]


def _counts(y_train: np.ndarray, y_test: np.ndarray) -> dict:
    return {"train_pos": int(y_train.sum()), "train_neg": int((1 - y_train).sum()),
            "test_pos": int(y_test.sum()), "test_neg": int((1 - y_test).sum())}


class _FitLog:
    """Counts logistic fits and those that hit max_iter: recorded in the results, not silenced."""

    def __init__(self) -> None:
        self.fits = 0
        self.not_converged = 0


def _fit(x: np.ndarray, y: np.ndarray, C: float, seed: int, log: _FitLog | None = None) -> LogisticRegression:
    clf = LogisticRegression(C=C, max_iter=MAX_ITER, tol=1e-5, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        # The weakest penalties may stop short of convergence on separable folds; the CV scores the result as it
        # is (what the user would get), and the count goes into the results JSON.
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    if log is not None:
        log.fits += 1
        log.not_converged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf


def grid_edge(grid: tuple[float, ...], value: float) -> str:
    """"low"/"high" when `value` is the first/last grid point (the CV optimum may lie beyond the grid), else ""."""
    if len(grid) > 1 and value == grid[0]:
        return "low"
    if len(grid) > 1 and value == grid[-1]:
        return "high"
    return ""


def choose_C(x: np.ndarray, y: np.ndarray, groups: np.ndarray, Cs: tuple[float, ...], seed: int,
             max_folds: int = 5, log: _FitLog | None = None) -> tuple[float, float]:
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
            scores[c, f] = roc_auc_score(y[va], _fit(xtr, y[tr], C, seed, log).decision_function(xva))
    mean = np.nanmean(scores, axis=1) if np.isfinite(scores).any() else np.full(len(Cs), np.nan)
    if not np.isfinite(mean).any():
        return Cs[len(Cs) // 2], float("nan")
    best = int(np.nanargmax(mean))  # first maximum = smallest C = strongest regularisation
    return Cs[best], float(mean[best])


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, groups_train: np.ndarray, x_test: np.ndarray,
                 y_test: np.ndarray, label_names: list[str], seed: int = 0,
                 Cs: tuple[float, ...] = DEFAULT_CS, skip: dict[int, str] | None = None) -> ProbeResult:
    """Fit one probe per label; `y_*` are [n, L] 0/1 arrays, `groups_train` the patient id of each train row.
    `skip` maps label indices not to fit to the reason they are not evaluable."""
    skip = skip or {}
    scaler = StandardScaler().fit(x_train)
    xtr, xte = scaler.transform(x_train), scaler.transform(x_test)
    scores = np.full((len(x_test), len(label_names)), np.nan)
    results = []
    for j, name in enumerate(label_names):
        ytr, yte = y_train[:, j].astype(int), y_test[:, j].astype(int)
        counts = _counts(ytr, yte)
        if j in skip:
            results.append(LabelResult(name, False, skip[j], counts=counts))
            continue
        if len(np.unique(ytr)) < 2 or len(np.unique(yte)) < 2:
            which = "training" if len(np.unique(ytr)) < 2 else "test"
            results.append(LabelResult(name, False, f"only one class in the {which} split", counts=counts))
            continue
        log = _FitLog()
        C, cv_auroc = choose_C(x_train, ytr, groups_train, Cs, seed, log=log)
        clf = _fit(xtr, ytr, C, seed, log)
        scores[:, j] = clf.predict_proba(xte)[:, 1]
        # A C that fell back to the grid's middle (no CV possible) was not chosen, so it is not "at an edge".
        edge = grid_edge(Cs, C) if np.isfinite(cv_auroc) else ""
        results.append(LabelResult(name, True, C=C, cv_auroc=cv_auroc, counts=counts, C_at_edge=edge,
                                   fits=log.fits, not_converged=log.not_converged))
    return ProbeResult(scores, results)


@register_protocol("linear", description="logistic-regression probe per label on global features; AUROC, AUPRC")
def run_linear(tr: TaskRun, encoders: list[Encoder]) -> Section:
    """The linear-probe protocol: fit per model, bootstrap on the shared resamples, pair with the reference."""
    t = tr.task.table
    train, test = tr.split == "train", tr.split == "test"
    y = t.labels.astype(int)
    groups = np.asarray(t.patient_ids)
    test_rows = np.flatnonzero(test)
    test_keys = tr.patient_keys(test_rows)
    evaluable, reasons = label_status(tr.task, tr.split, tr.min_positive_patients)
    skip = {j: why for j, why in enumerate(reasons) if not evaluable[j]}
    probes = {e.name: linear_probe(tr.features[e.name].global_[train], y[train], groups[train],
                                   tr.features[e.name].global_[test], y[test], t.label_names, seed=tr.seed,
                                   skip=skip)
              for e in progress(encoders, "linear probe: fits")}
    # Which labels are evaluable depends only on the labels and the split, so it is the same for every model.
    labels = probes[encoders[0].name].labels
    ok = [j for j, lab in enumerate(labels) if lab.evaluable]
    names = [t.label_names[j] for j in ok]
    columns = [f"macro {title}" for _, title in CLASSIFICATION_METRICS] + [f"{n} AUPRC" for n in names]
    notes = [f"Per-label columns: AUPRC (the paper's headline classification metric). Reference for paired "
             f"differences: `{tr.reference}`."]
    not_eval = [lab for lab in labels if not lab.evaluable]
    if not_eval:
        notes.append("Not evaluable, left out of macro means: " + "; ".join(
            f"{lab.name} ({lab.reason}: train {lab.counts['train_pos']}+/{lab.counts['train_neg']}-, "
            f"test {lab.counts['test_pos']}+/{lab.counts['test_neg']}-)" for lab in not_eval) + ".")
    edges = [f"`{e.name}` {lab.name} (C = {lab.C:g}, {lab.C_at_edge} end)" for e in encoders
             for lab in probes[e.name].labels if lab.C_at_edge]
    if edges:
        notes.append("Penalty chosen at the edge of its grid (the best C may lie beyond it): " + "; ".join(edges)
                     + ".")
    unconverged = sum(lab.not_converged for e in encoders for lab in probes[e.name].labels)
    if unconverged:
        notes.append(f"{unconverged} of {sum(lab.fits for e in encoders for lab in probes[e.name].labels)} "
                     "logistic fits stopped at the iteration limit without converging (per label in the results "
                     "JSON: `not_converged`).")
    if not ok:
        for enc in encoders:  # the reasons, with counts, still belong in the results
            tr.results.setdefault(enc.name, {})["linear"] = {
                "metrics": None, "paired_to_reference": None, "labels": [vars(lab) for lab in probes[enc.name].labels]}
        return Section("Linear probe (classification)", [], {e.name: {} for e in encoders}, notes=notes)

    summaries, resampled = {}, {}
    for enc in progress(encoders, "linear probe: bootstrap"):
        scores = probes[enc.name].scores[:, ok]
        summaries[enc.name], resampled[enc.name] = stats.classification_summary(scores, y[test][:, ok], names,
                                                                                tr.weights)
        tr.predictions[enc.name] = [
            {"image_id": t.image_ids[i], "patient_key": k, "label": n, "target": int(y[i, j]), "score": float(s)}
            for jj, (j, n) in enumerate(zip(ok, names))
            for i, k, s in zip(test_rows, test_keys, scores[:, jj])]
        tr.files[f"results/{tr.out_name}/{safe_name(enc.name)}.predictions.parquet"] = parquet_bytes(
            tr.predictions[enc.name])
    rows, paired = classification_rows(summaries, resampled, names, tr.reference)
    for enc in encoders:
        tr.results.setdefault(enc.name, {})["linear"] = {
            "metrics": summaries[enc.name], "paired_to_reference": paired_record(paired, enc.name, tr.reference),
            "labels": [vars(lab) for lab in probes[enc.name].labels],
        }
    return Section("Linear probe (classification)", columns, rows, notes=notes)


def classification_rows(summaries: dict[str, dict], resampled: dict[str, dict], names: list[str], reference: str
                        ) -> tuple[dict[str, dict[str, Cell]], dict[str, dict]]:
    """The cells of a classification section (macro AUROC and AUPRC, † where the paired difference to the reference
    is significant after Holm; per-label AUPRC) and the paired comparisons, from each model's bootstrap summary on
    the shared resamples. Models keep the order of `summaries`."""
    paired = {m: stats.compare_to_reference({name: r[m] for name, r in resampled.items()},
                                            {name: s[m]["macro"]["point"] for name, s in summaries.items()},
                                            reference) for m, _ in CLASSIFICATION_METRICS}
    rows: dict[str, dict[str, Cell]] = {}
    for name, s in summaries.items():
        row = {}
        for m, title in CLASSIFICATION_METRICS:
            p_holm = paired[m][name]["p_holm"] if name != reference else None
            row[f"macro {title}"] = Cell.from_summary(s[m]["macro"], p_holm is not None and p_holm < 0.05)
        for n in names:
            row[f"{n} AUPRC"] = Cell.from_summary(s["auprc"]["per_label"][n])
        rows[name] = row
    return rows, paired


def paired_record(paired: dict[str, dict], name: str, reference: str) -> dict | None:
    """A model's paired comparisons for its results JSON (None for the reference itself)."""
    return None if name == reference else {m: paired[m][name] for m, _ in CLASSIFICATION_METRICS}
