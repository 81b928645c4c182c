"""Linear probe: one logistic regression per label on frozen, standardised global features.

The regularisation strength is chosen by patient-grouped, stratified cross-validation on the training split
only (mean AUROC over folds; ties go to the stronger regularisation), then the probe is refitted on the whole
training split and scores the test split. A label with a single class in the training split, or in the test
split, is reported as not evaluable with its counts, never as NaN.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from joblib import Parallel, delayed
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from harness import ranks, stats
from harness.leaderboard import Cell, Section
from harness.common.paths import safe_name
from harness.log import progress
from harness.probe_fits import FitLog, fold_scores, refit_scores
from harness.protocols import ProtocolResult, TaskRun, label_status, parquet_bytes, usable_cores
from harness.tidy import TidyRow, rows_of

if TYPE_CHECKING:
    from baselines.registry import Encoder

NAME = "linear"
TITLE = "Linear probe (classification)"
#: The classification sections' headline metrics: (results key, column title).
CLASSIFICATION_METRICS = (("auroc", "AUROC"), ("auprc", "AUPRC"))
#: the section's rank column: each model's rank by macro AUROC with its 95% interval over the shared resamples
RANK_COLUMN = "rank (macro AUROC)"
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
    #: no cross-validation fold could be scored (fewer than two training patients of a class): C is `fallback_C`
    C_fallback: bool = False


@dataclass
class ProbeResult:
    scores: np.ndarray            # [n_test, L] probabilities; NaN columns for non-evaluable labels
    labels: list[LabelResult]


def _counts(y_train: np.ndarray, y_test: np.ndarray) -> dict:
    return {"train_pos": int(y_train.sum()), "train_neg": int((1 - y_train).sum()),
            "test_pos": int(y_test.sum()), "test_neg": int((1 - y_test).sum())}


def grid_edge(grid: tuple[float, ...], value: float) -> str:
    """"low"/"high" when `value` is the first/last grid point (the CV optimum may lie beyond the grid), else ""."""
    if len(grid) > 1 and value == grid[0]:
        return "low"
    if len(grid) > 1 and value == grid[-1]:
        return "high"
    return ""


def _cv_folds(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int, max_folds: int
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """One label's patient-grouped, stratified CV folds (train rows, validation rows): `max_folds`, fewer when a
    class has fewer patients, none when a class has fewer than two (nothing could be held out)."""
    n_folds = min(max_folds, len(np.unique(groups[y == 1])), len(np.unique(groups[y == 0])))
    if n_folds < 2:
        return []
    return list(StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x, y, groups))


def fallback_C(Cs: tuple[float, ...] = DEFAULT_CS) -> float:
    """The C a label gets when no cross-validation fold could be scored (fewer than two patients of a class): the
    grid's middle, 0.1 for the default grid."""
    return Cs[len(Cs) // 2]


def _best_C(Cs: tuple[float, ...], scores: np.ndarray) -> tuple[float, float]:
    """(C, mean fold AUROC) from [C, fold] validation AUROCs (a fold that could not be scored is NaN throughout);
    `fallback_C` and NaN when no fold was scored."""
    if not np.isfinite(scores).any():
        return fallback_C(Cs), float("nan")
    mean = np.nanmean(scores, axis=1)
    best = int(np.nanargmax(mean))  # first maximum = smallest C = strongest regularisation
    return Cs[best], float(mean[best])


def _grid_by_fold(Cs: tuple[float, ...], per_fold: list[np.ndarray]) -> np.ndarray:
    """[C, fold] validation AUROCs from each fold's scores over the grid."""
    return np.stack(per_fold, axis=1) if per_fold else np.empty((len(Cs), 0))


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, groups_train: np.ndarray, x_test: np.ndarray,
                 y_test: np.ndarray, label_names: list[str], seed: int = 0,
                 Cs: tuple[float, ...] = DEFAULT_CS, skip: dict[int, str] | None = None,
                 n_jobs: int | None = None) -> ProbeResult:
    """Fit one probe per label; `y_*` are [n, L] 0/1 arrays, `groups_train` the patient id of each train row.
    `skip` maps label indices not to fit to the reason they are not evaluable.

    The fits run in `n_jobs` processes (default: every usable core): first every (label, CV fold) pair, each over
    the whole C grid, then every label's refit at its chosen C. Each fit uses one BLAS thread wherever it runs
    (`harness.probe_fits`), so the results are bit-identical for any `n_jobs`."""
    skip = skip or {}
    scores = np.full((len(x_test), len(label_names)), np.nan)
    results: dict[int, LabelResult] = {}
    fitted: dict[int, np.ndarray] = {}  # label index -> its 0/1 training targets
    counts: dict[int, dict] = {}
    for j, name in enumerate(label_names):
        ytr, yte = y_train[:, j].astype(int), y_test[:, j].astype(int)
        counts[j] = _counts(ytr, yte)
        if j in skip:
            results[j] = LabelResult(name, False, skip[j], counts=counts[j])
        elif len(np.unique(ytr)) < 2 or len(np.unique(yte)) < 2:
            which = "training" if len(np.unique(ytr)) < 2 else "test"
            results[j] = LabelResult(name, False, f"only one class in the {which} split", counts=counts[j])
        else:
            fitted[j] = ytr
    folds = [(j, tr, va) for j, ytr in fitted.items() for tr, va in _cv_folds(x_train, ytr, groups_train, seed, 5)]
    max_iter = MAX_ITER  # read here, in this process: a worker process would not see a patched module attribute
    with Parallel(n_jobs=max(1, min(n_jobs or usable_cores(), len(folds)))) as parallel:
        runs = parallel(delayed(fold_scores)(x_train, fitted[j], tr, va, Cs, seed, max_iter) for j, tr, va in folds)
        logs = {j: FitLog() for j in fitted}
        per_fold: dict[int, list[np.ndarray]] = {j: [] for j in fitted}
        for (j, _, _), (fold, fold_log) in zip(folds, runs):
            per_fold[j].append(fold)
            logs[j].add(fold_log)
        chosen = {j: _best_C(Cs, _grid_by_fold(Cs, per_fold[j])) for j in fitted}
        scaler = StandardScaler().fit(x_train)
        refits = parallel(delayed(refit_scores)(x_train, ytr, x_test, scaler, chosen[j][0], seed, max_iter)
                          for j, ytr in fitted.items())
    for j, (probs, refit_log) in zip(fitted, refits):
        scores[:, j] = probs
        logs[j].add(refit_log)
        C, cv_auroc = chosen[j]
        # A C that fell back to the grid's middle (no CV possible) was not chosen, so it is not "at an edge".
        edge = grid_edge(Cs, C) if np.isfinite(cv_auroc) else ""
        results[j] = LabelResult(label_names[j], True, C=C, cv_auroc=cv_auroc, counts=counts[j], C_at_edge=edge,
                                 fits=logs[j].fits, not_converged=logs[j].not_converged,
                                 C_fallback=not np.isfinite(cv_auroc))
    return ProbeResult(scores, [results[j] for j in range(len(label_names))])


def fallback_note(which: list[str]) -> str:
    """The section note for labels whose C fell back to `fallback_C`; `which` describes each (name and counts)."""
    return (f"`C` not cross-validated, fixed at C = {fallback_C():g} (the grid's middle), since a fold needs two "
            "training patients of each class: " + "; ".join(which) + ".")


def fit_and_score(tr: TaskRun, encoders: list[Encoder]) -> ProtocolResult:
    """The linear-probe protocol: fit per model, bootstrap on the shared resamples, pair with the reference."""
    t = tr.task.table
    train, test = tr.split == "train", tr.split == "test"
    y = t.labels.astype(int)
    groups = np.asarray(t.patient_ids)
    test_rows = np.flatnonzero(test)
    test_keys = tr.patient_keys(test_rows)
    evaluable, reasons = label_status(tr.task, tr.split, tr.min_positive_patients)
    skip = {j: why for j, why in enumerate(reasons) if not evaluable[j]}

    def probe_and_bootstrap(x: np.ndarray) -> dict:
        """One model's fits and the bootstrap of its own metrics (what the results cache keeps)."""
        probe = linear_probe(x[train], y[train], groups[train], x[test], y[test], t.label_names, seed=tr.seed,
                             skip=skip, n_jobs=tr.options.n_jobs)
        ok = [j for j, lab in enumerate(probe.labels) if lab.evaluable]
        summary, resampled = stats.classification_summary(
            probe.scores[:, ok], y[test][:, ok], [t.label_names[j] for j in ok], tr.weights) if ok else (None, None)
        return {"scores": probe.scores, "labels": [vars(lab) for lab in probe.labels], "summary": summary,
                "resampled": resampled}

    settings = {"Cs": list(DEFAULT_CS), "max_iter": MAX_ITER, "skip": {str(j): why for j, why in skip.items()}}
    work = {e.name: tr.results.memo(NAME, tr.features[e.name], settings,
                                    lambda e=e: probe_and_bootstrap(tr.features[e.name].global_))
            for e in progress(encoders, "linear probe: fits and bootstrap")}
    probes = {m: ProbeResult(w["scores"], [LabelResult(**lab) for lab in w["labels"]]) for m, w in work.items()}
    # Which labels are evaluable depends only on the labels and the split, so it is the same for every model.
    labels = probes[encoders[0].name].labels
    ok = [j for j, lab in enumerate(labels) if lab.evaluable]
    names = [t.label_names[j] for j in ok]
    columns = classification_columns(names)
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
    # Whether a fold can be made depends on the labels and the split only, so these labels are the same for every
    # model; the counts are of patients, the unit the folds are grouped by.
    fell_back = [j for j, lab in enumerate(labels) if any(probes[e.name].labels[j].C_fallback for e in encoders)]
    if fell_back:
        pos, neg = stats.patients_per_class(y[train], groups[train])
        notes.append(fallback_note([f"{t.label_names[j]} ({pos[j]} positive / {neg[j]} negative training patients)"
                                    for j in fell_back]))
    unconverged = sum(lab.not_converged for e in encoders for lab in probes[e.name].labels)
    if unconverged:
        notes.append(f"{unconverged} of {sum(lab.fits for e in encoders for lab in probes[e.name].labels)} "
                     "logistic fits stopped at the iteration limit without converging (per label in the results "
                     "JSON: `not_converged`).")
    if not ok:
        # The reasons, with counts, still belong in the results.
        records = {e.name: {"metrics": None, "paired_to_reference": None,
                            "labels": [vars(lab) for lab in probes[e.name].labels]} for e in encoders}
        return ProtocolResult(NAME, Section(TITLE, [], {e.name: {} for e in encoders}, notes=notes), records)

    summaries, resampled, predictions, files = {}, {}, {}, {}
    for enc in encoders:
        scores = probes[enc.name].scores[:, ok]
        summaries[enc.name], resampled[enc.name] = work[enc.name]["summary"], work[enc.name]["resampled"]
        predictions[enc.name] = prediction_rows(t.image_ids, y, ok, names, test_rows, test_keys, scores)
        files[f"results/{tr.out_name}/{safe_name(enc.name)}.predictions.parquet"] = parquet_bytes(
            list(predictions[enc.name]))
    ranked = classification_ranks(summaries, resampled)
    rows, paired = classification_rows(summaries, resampled, ranked, names, tr.reference)
    records = {e.name: {"metrics": summaries[e.name],
                        "paired_to_reference": paired_record(paired, e.name, tr.reference),
                        "ranks": ranks_record(ranked, e.name),
                        "labels": [vars(lab) for lab in probes[e.name].labels]} for e in encoders}
    return ProtocolResult(NAME, Section(TITLE, columns, rows, CLASSIFICATION_HIGHER_IS_BETTER, notes), records,
                          predictions, files,
                          classification_tidy(tr.out_name, NAME, summaries, paired, ranked, names, tr.reference))


def prediction_rows(image_ids: list[str], y: np.ndarray, labels: list[int], names: list[str], test_rows: np.ndarray,
                    test_keys: list[str], scores: np.ndarray) -> tuple[dict, ...]:
    """A classification probe's per-image test predictions, label by label (image_id, pseudonymous patient_key,
    label, target, score): what its parquet publishes and demographics scores per subgroup. `scores` [test, len(
    labels)] holds the columns of `labels` (indices into `y`'s columns, named `names`)."""
    return tuple({"image_id": image_ids[i], "patient_key": key, "label": n, "target": int(y[i, j]), "score": float(s)}
                 for jj, (j, n) in enumerate(zip(labels, names))
                 for i, key, s in zip(test_rows, test_keys, scores[:, jj]))


def split_counts(y: np.ndarray, train: np.ndarray, test: np.ndarray, j: int) -> str:
    """Label `j`'s positive and negative images in the training and test splits, as a section note writes them."""
    return (f"train {int(y[train, j].sum())}+/{int((1 - y[train, j]).sum())}-, "
            f"test {int(y[test, j].sum())}+/{int((1 - y[test, j]).sum())}-")


def classification_columns(names: list[str]) -> list[str]:
    """A classification section's columns: the rank, the macro metrics, then per-label AUPRC."""
    return [RANK_COLUMN] + [f"macro {title}" for _, title in CLASSIFICATION_METRICS] + [f"{n} AUPRC" for n in names]


#: rank 1 is the best: the lowest rank is bold
CLASSIFICATION_HIGHER_IS_BETTER = {RANK_COLUMN: False}


def _macro_points(summaries: dict[str, dict], metric: str) -> dict[str, float | None]:
    return {name: s[metric]["macro"]["point"] for name, s in summaries.items()}


def classification_ranks(summaries: dict[str, dict], resampled: dict[str, dict]) -> dict[str, tuple[dict, dict]]:
    """Per macro metric: (`ranks.rank_summary`, `ranks.win_probabilities`) of the models on the shared resamples."""
    return {m: (ranks.rank_summary({n: r[m] for n, r in resampled.items()}, _macro_points(summaries, m)),
                ranks.win_probabilities({n: r[m] for n, r in resampled.items()})) for m, _ in CLASSIFICATION_METRICS}


def ranks_record(ranked: dict[str, tuple[dict, dict]], name: str) -> dict:
    """A model's ranks for its results JSON: per macro metric its rank, interval, probability of being best, and
    its probability of beating each other model."""
    return {m: ranks.rank_record(summary, wins, name) for m, (summary, wins) in ranked.items()}


def classification_rows(summaries: dict[str, dict], resampled: dict[str, dict], ranked: dict[str, tuple[dict, dict]],
                        names: list[str], reference: str) -> tuple[dict[str, dict[str, Cell]], dict[str, dict]]:
    """The cells of a classification section (macro AUROC and AUPRC, † where the paired difference to the reference
    is significant after Holm; per-label AUPRC) and the paired comparisons, from each model's bootstrap summary on
    the shared resamples. Models keep the order of `summaries`."""
    paired = {m: stats.compare_to_reference({name: r[m] for name, r in resampled.items()},
                                            {name: s[m]["macro"]["point"] for name, s in summaries.items()},
                                            reference) for m, _ in CLASSIFICATION_METRICS}
    rows: dict[str, dict[str, Cell]] = {}
    for name, s in summaries.items():
        row = {RANK_COLUMN: Cell.from_rank(ranked["auroc"][0][name])}
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


def classification_tidy(task: str, protocol: str, summaries: dict[str, dict], paired: dict[str, dict],
                        ranked: dict[str, tuple[dict, dict]], names: list[str], reference: str) -> list[TidyRow]:
    """Tidy rows of a classification section: per model, macro then per-label AUROC, then AUPRC; the macros carry
    their paired difference to the reference (the per-label numbers are not compared). Then, per macro metric, the
    ranks (`harness.ranks.ranked_rows`: rank with interval, probability of being best, win probabilities)."""
    rows = []
    for model, s in summaries.items():
        for m, _ in CLASSIFICATION_METRICS:
            rows += rows_of(task, protocol, model, m, "macro", s[m]["macro"],
                            paired[m].get(model) if model != reference else None)
            for n in names:
                rows += rows_of(task, protocol, model, m, n, s[m]["per_label"][n])
    for m, _ in CLASSIFICATION_METRICS:
        rows += ranks.ranked_rows(task, protocol, m, "macro", *ranked[m])
    return rows
