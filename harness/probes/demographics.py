"""Demographics: what frozen global features say about sex and age, and whether classification depends on them.

Two probes on the same standardised global features as the linear probe, fitted on the training split only:
- sex: logistic regression (the linear probe itself, with F as the positive class), scored by AUROC;
- age: ridge regression, its penalty chosen by patient-grouped cross-validation on the training split (mean
  absolute error over folds; ties go to the stronger penalty), scored by MAE (years), R^2 and Pearson r. A
  statsmodels OLS of true on predicted age, with patient-clustered standard errors, gives the calibration slope
  and intercept (a ridge probe shrinks towards the mean age: slope > 1) in the results JSON.

Subgroup view: the linear probe's test scores for the task's own labels (the predictions of the linear protocol,
which this one runs after, so the view scores exactly the probe of the leaderboard's linear section) are scored
separately for men and women and per age band, macro AUROC over the
labels evaluable in every group of the view (--min-positive-patients positive and negative patients within each
group), with the gap between groups (men - women; youngest - oldest band).
A gap's interval covering 0 means no detectable dependence on that attribute at this sample size.

Images with unknown sex or age are excluded from what needs them and counted in the notes; nothing is imputed.
Per test image, the sex score and age prediction are published (``<model>.demographics.parquet``).
All intervals and paired deltas use the task's patient-level bootstrap resamples, restricted to the test images
that take part (an image's weight depends only on its patient, so the restriction is still a patient bootstrap).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler

from harness import ranks, stats
from harness.leaderboard import Cell, Section
from harness.common.hashing import array_digest
from harness.common.paths import safe_name
from harness.log import progress
from harness.probes.linear import LabelResult, grid_edge, linear_probe
from harness.protocols import ProtocolResult, TaskRun, parquet_bytes
from harness.tasks.base import Task, TaskTable
from harness.tidy import TidyRow, rows_of

if TYPE_CHECKING:
    from baselines.registry import Encoder

NAME = "demographics"
TITLE = "Demographics (sex, age) and subgroup performance"
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 7))
#: (lower bound inclusive, upper bound exclusive, name); youngest first, the gap is first minus last.
AGE_BANDS = ((0.0, 50.0, "<50"), (50.0, 70.0, "50-69"), (70.0, np.inf, "70+"))
MIN_AGE_TRAIN = 5


# ------------------------------------------------------------------------------------------------------- probes

def choose_alpha(x: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas: tuple[float, ...], seed: int,
                 max_folds: int = 5) -> tuple[float, float]:
    """Ridge penalty by patient-grouped CV (mean fold MAE); returns (alpha, cv_mae). Ties: the larger alpha."""
    n_folds = min(max_folds, len(np.unique(groups)))
    if n_folds < 2:
        return alphas[len(alphas) // 2], float("nan")
    cv = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    mae = np.zeros((len(alphas), n_folds))
    for f, (tr, va) in enumerate(cv.split(x, y, groups)):
        scaler = StandardScaler().fit(x[tr])
        xtr, xva = scaler.transform(x[tr]), scaler.transform(x[va])
        for a, alpha in enumerate(alphas):
            mae[a, f] = np.abs(Ridge(alpha=alpha).fit(xtr, y[tr]).predict(xva) - y[va]).mean()
    mean = mae.mean(axis=1)
    best = len(alphas) - 1 - int(np.argmin(mean[::-1]))  # last minimum = largest alpha = strongest penalty
    return alphas[best], float(mean[best])


@dataclass
class AgeProbe:
    predictions: np.ndarray
    alpha: float
    cv_mae: float


def age_probe(x_train: np.ndarray, y_train: np.ndarray, groups_train: np.ndarray, x_test: np.ndarray,
              seed: int = 0, alphas: tuple[float, ...] = DEFAULT_ALPHAS) -> AgeProbe:
    """Ridge regression of age on standardised features, penalty by grouped CV, refitted on all training rows."""
    alpha, cv_mae = choose_alpha(x_train, y_train, groups_train, alphas, seed)
    scaler = StandardScaler().fit(x_train)
    model = Ridge(alpha=alpha).fit(scaler.transform(x_train), y_train)
    return AgeProbe(model.predict(scaler.transform(x_test)), alpha, cv_mae)


def calibration(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> dict | None:
    """OLS of true age on predicted age with patient-clustered standard errors: slope, intercept, 95% CIs."""
    import statsmodels.api as sm

    if len(np.unique(groups)) < 3 or np.ptp(y_pred) == 0:
        return None
    _, codes = np.unique(groups, return_inverse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-cluster warnings: the CI is reported as computed
        fit = sm.OLS(y_true, sm.add_constant(y_pred)).fit(cov_type="cluster", cov_kwds={"groups": codes})
    ci = fit.conf_int(0.05)
    return {"intercept": float(fit.params[0]), "intercept_ci": [float(ci[0][0]), float(ci[0][1])],
            "slope": float(fit.params[1]), "slope_ci": [float(ci[1][0]), float(ci[1][1])],
            "r2_ols": float(fit.rsquared), "n": len(y_true), "clusters": int(codes.max() + 1)}


# ------------------------------------------------------------------------------------------------------ helpers

def _cell(s: dict | None, paired: dict | None = None) -> Cell:
    return Cell.from_summary(s, paired is not None and (paired.get("p_holm") or 1.0) < 0.05)


def _gap_cell(s: dict | None) -> Cell:
    """A signed gap is not ranked (neither larger nor smaller is 'best'): shown as text, never bold."""
    if s is None or s["point"] is None:
        return Cell(None, note="n/e")
    ci = f" [{s['lo']:+.3f}, {s['hi']:+.3f}]" if s["lo"] is not None else ""
    partial = f" (n={s['n_valid']})" if s["n_valid"] < s["n_resamples"] else ""
    return Cell(None, note=f"{s['point']:+.3f}{ci}{partial}")


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def age_bands(age: np.ndarray) -> np.ndarray:
    """Band index per image (-1 for unknown age)."""
    out = np.full(len(age), -1)
    for b, (lo, hi, _) in enumerate(AGE_BANDS):
        out[np.isfinite(age) & (age >= lo) & (age < hi)] = b
    return out


def subgroup_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, groups: dict[str, np.ndarray],
                   label_names: list[str], patient_keys: list[str] | None = None, min_patients: int = 1
                   ) -> tuple[dict, dict[str, tuple[float, np.ndarray]]]:
    """Macro AUROC per group over the labels evaluable in *every* group (finite scores; at least `min_patients`
    patients with a positive and with a negative image in the group, both classes without `patient_keys`),
    per-label AUROC per group, and the gap first group - last group. `groups` maps a name to a bool mask over
    test rows. A resample in which a group lacks a class of one of these labels leaves that group's macro
    undefined (counted in n_valid), so every macro averages the same labels. Also returns each group's macro AUROC
    as (point, [B] on the resamples): what its rank is read from."""
    usable = np.isfinite(scores).all(axis=0)
    keys = None if patient_keys is None else np.asarray(patient_keys)
    for sel in groups.values():
        if not sel.any():
            usable &= False
        elif keys is None:
            usable &= stats.evaluable_labels(labels[sel])
        else:
            usable &= stats.evaluable_labels(labels[sel], keys[sel], min_patients)
    out = {"labels": [n for n, u in zip(label_names, usable) if u], "groups": {}, "gap": None}
    if not usable.any():
        return out, {}
    resampled = {}
    for name, sel in groups.items():
        s, y, w = scores[sel][:, usable], labels[sel][:, usable], weights[:, sel]
        point = stats.binary_metrics(s, y)["auroc"]
        boot = stats.binary_metrics(s, y, w)["auroc"]
        every = np.ones(usable.sum(), dtype=bool)
        macro_point = float(stats.macro_mean(point, every)[0])
        resampled[name] = (macro_point, stats.macro_mean(boot, every))
        out["groups"][name] = {
            "n_images": int(sel.sum()),
            "macro_auroc": stats.summarise(macro_point, resampled[name][1]),
            "per_label": {lab: stats.summarise(point[0, j], boot[:, j]) for j, lab in enumerate(out["labels"])},
        }
    order = list(groups)
    first, last = order[0], order[-1]
    out["gap"] = stats.summarise(resampled[first][0] - resampled[last][0], resampled[first][1] - resampled[last][1])
    out["gap_between"] = [first, last]
    return out, resampled


def linear_scores(linear: ProtocolResult, model: str, t: TaskTable, test_rows: np.ndarray) -> np.ndarray:
    """[n_test, L] test scores of the task's labels from the linear protocol's predictions (NaN where a label was
    not evaluable)."""
    scores = np.full((len(test_rows), len(t.label_names)), np.nan)
    position = {t.image_ids[r]: k for k, r in enumerate(test_rows)}
    column = {n: j for j, n in enumerate(t.label_names)}
    for row in linear.predictions.get(model, ()):
        if row["label"] in column and row["image_id"] in position:
            scores[position[row["image_id"]], column[row["label"]]] = row["score"]
    return scores


# -------------------------------------------------------------------------------------------- fitting, scoring

@dataclass
class Cohort:
    """Which images each demographic probe trains and scores on: rows of known sex and of known age in each
    split (`sex_cols` / `age_cols`: their positions among the test rows, i.e. columns of the bootstrap weights),
    whether each probe can be fitted at all, and the subgroups of the test rows (bool masks) for the view."""

    train_rows: np.ndarray
    test_rows: np.ndarray
    sex: np.ndarray          # 'M', 'F' or '' per image of the task
    age: np.ndarray          # float, NaN unknown
    missing: dict
    sex_train: np.ndarray
    sex_test: np.ndarray
    sex_cols: np.ndarray
    age_train: np.ndarray
    age_test: np.ndarray
    age_cols: np.ndarray
    sex_ok: bool
    age_ok: bool
    sex_groups: dict[str, np.ndarray]
    band_groups: dict[str, np.ndarray]

    def female(self, rows: np.ndarray) -> np.ndarray:
        """The sex probe's target (F = 1) of `rows`."""
        return (self.sex[rows] == "F").astype(int)


def cohort(tr: TaskRun) -> Cohort:
    t = tr.task.table
    train_rows, test_rows = np.flatnonzero(tr.split == "train"), np.flatnonzero(tr.split == "test")
    sex = np.array([s or "" for s in t.sex])
    age = np.asarray(t.age, dtype=float)
    missing = {
        "sex_unknown": {"train": int((sex[train_rows] == "").sum()), "test": int((sex[test_rows] == "").sum())},
        "age_unknown": {"train": int((~np.isfinite(age[train_rows])).sum()),
                        "test": int((~np.isfinite(age[test_rows])).sum())},
    }
    sex_tr, sex_te = train_rows[sex[train_rows] != ""], test_rows[sex[test_rows] != ""]
    age_tr, age_te = train_rows[np.isfinite(age[train_rows])], test_rows[np.isfinite(age[test_rows])]
    y_tr, y_te = (sex[sex_tr] == "F").astype(int), (sex[sex_te] == "F").astype(int)
    # The view needs both sexes / at least two age bands in the test split.
    bands = age_bands(age[test_rows])
    return Cohort(
        train_rows, test_rows, sex, age, missing, sex_tr, sex_te, np.flatnonzero(sex[test_rows] != ""),
        age_tr, age_te, np.flatnonzero(np.isfinite(age[test_rows])),
        sex_ok=len(np.unique(y_tr)) == 2 and len(np.unique(y_te)) == 2,
        age_ok=len(age_tr) >= MIN_AGE_TRAIN and len(age_te) >= 2 and np.ptp(age[age_te]) > 0,
        sex_groups={"M": sex[test_rows] == "M", "F": sex[test_rows] == "F"},
        band_groups={name: bands == b for b, (_, _, name) in enumerate(AGE_BANDS) if (bands == b).any()})


@dataclass
class Fitted:
    """One model's demographic probes: the sex probe (its label record and test scores, over `sex_test`) and the
    age probe (over `age_test`), None where the cohort cannot fit them."""

    sex: LabelResult | None
    sex_scores: np.ndarray | None
    age: AgeProbe | None


def fit_probes(tr: TaskRun, c: Cohort, x: np.ndarray) -> Fitted:
    """Fit the sex and age probes of one model's global features `x` on the training rows of known value."""
    groups = np.asarray(tr.task.table.patient_ids)
    sex_lab, sex_scores, age = None, None, None
    if c.sex_ok:
        probe = linear_probe(x[c.sex_train], c.female(c.sex_train)[:, None], groups[c.sex_train], x[c.sex_test],
                             c.female(c.sex_test)[:, None], ["female"], seed=tr.seed,
                             n_jobs=tr.options.n_jobs)
        sex_lab, sex_scores = probe.labels[0], probe.scores[:, 0]
    if c.age_ok:
        age = age_probe(x[c.age_train], c.age[c.age_train], groups[c.age_train], x[c.age_test], seed=tr.seed)
    return Fitted(sex_lab, sex_scores, age)


def fitted_tree(fitted: Fitted, c: Cohort, weights: np.ndarray, patient_ids: np.ndarray) -> dict:
    """One model's probes, their scores on the shared resamples and the age calibration, as plain data (what the
    results cache keeps)."""
    return {"sex": vars(fitted.sex) if fitted.sex is not None else None, "sex_scores": fitted.sex_scores,
            "age": vars(fitted.age) if fitted.age is not None else None,
            "scored": score_probes(c, fitted, weights),
            "calibration": None if fitted.age is None else
            calibration(c.age[c.age_test], fitted.age.predictions, patient_ids[c.age_test])}


METRICS = ("sex_auroc", "age_mae", "age_r2", "age_r")


def score_probes(c: Cohort, fitted: Fitted, weights: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
    """Sex AUROC, age MAE, R² and Pearson r of one model on the shared resamples (restricted to the test images of
    known value), for the metrics its cohort could fit."""
    out = {}
    if fitted.sex is not None:
        s, y = fitted.sex_scores, c.female(c.sex_test)
        out["sex_auroc"] = (float(stats.binary_metrics(s, y)["auroc"][0, 0]),
                            stats.binary_metrics(s, y, weights[:, c.sex_cols])["auroc"][:, 0])
    if fitted.age is not None:
        y, w, pred = c.age[c.age_test], weights[:, c.age_cols], fitted.age.predictions
        err = np.abs(pred - y)
        out["age_mae"] = (float(err.mean()), stats.weighted_mean(err, w))
        out["age_r2"] = (float(stats.weighted_r2(y, pred)[0]), stats.weighted_r2(y, pred, w))
        out["age_r"] = (float(stats.weighted_pearson(y, pred)[0]), stats.weighted_pearson(y, pred, w))
    return out


def subgroups(tr: TaskRun, c: Cohort, scores: np.ndarray) -> tuple[dict, dict[str, tuple[float, np.ndarray]]]:
    """The subgroup view of one model's linear-probe test scores: macro AUROC per sex and per age band, and the
    gaps (None for a view the test split cannot form); and each group's resampled macro AUROC, by its tidy label
    (``men``, ``age <50``)."""
    t = tr.task.table
    y_test, keys = t.labels[c.test_rows].astype(int), tr.patient_keys(c.test_rows)
    view: dict = {"source": "linear protocol predictions", "sex": None, "age": None}
    resampled: dict[str, tuple[float, np.ndarray]] = {}
    if all(g.any() for g in c.sex_groups.values()):
        view["sex"], by_group = subgroup_auroc(scores, y_test, tr.weights, c.sex_groups, t.label_names, keys,
                                               tr.min_positive_patients)
        resampled.update({subgroup_label(SEX_COLUMNS[g]): b for g, b in by_group.items()})
    if len(c.band_groups) >= 2:
        view["age"], by_group = subgroup_auroc(scores, y_test, tr.weights, c.band_groups, t.label_names, keys,
                                               tr.min_positive_patients)
        resampled.update({subgroup_label(f"AUROC age {b}"): v for b, v in by_group.items()})
    return view, resampled


def model_record(c: Cohort, fitted: Fitted, scored: dict[str, tuple[float, np.ndarray]], view: dict,
                 age_calibration: dict | None) -> dict:
    """What the model's results file holds for demographics (its paired differences are added once every model is
    scored)."""
    res: dict = {"missing": c.missing}
    if fitted.sex is not None:
        lab = fitted.sex
        res["sex"] = {"auroc": stats.summarise(*scored["sex_auroc"]), "C": lab.C, "C_at_edge": lab.C_at_edge,
                      "cv_auroc": lab.cv_auroc, "fits": lab.fits, "not_converged": lab.not_converged,
                      "n_train": len(c.sex_train), "n_test": len(c.sex_test), "positive_class": "F"}
    if fitted.age is not None:
        ap = fitted.age
        res["age"] = {m.removeprefix("age_"): stats.summarise(*scored[m]) for m in ("age_mae", "age_r2", "age_r")}
        res["age"].update(alpha=ap.alpha, alpha_at_edge=grid_edge(DEFAULT_ALPHAS, ap.alpha)
                          if np.isfinite(ap.cv_mae) else "", cv_mae=ap.cv_mae, n_train=len(c.age_train),
                          n_test=len(c.age_test), calibration=age_calibration)
    res["subgroups"] = view
    return res


def per_image_parquet(tr: TaskRun, c: Cohort, fitted: Fitted) -> bytes:
    """Per test image, so every interval can be recomputed from the published files (missing values: null)."""
    t = tr.task.table
    sex_score, age_pred = np.full(len(c.test_rows), np.nan), np.full(len(c.test_rows), np.nan)
    if fitted.sex is not None:
        sex_score[c.sex_cols] = fitted.sex_scores
    if fitted.age is not None:
        age_pred[c.age_cols] = fitted.age.predictions
    return parquet_bytes([
        {"image_id": t.image_ids[r], "patient_key": k, "sex": c.sex[r] or None, "sex_score": _num(sc),
         "age": _num(c.age[r]), "age_pred": _num(ap_)}
        for r, k, sc, ap_ in zip(c.test_rows, tr.patient_keys(c.test_rows), sex_score, age_pred)])


# ----------------------------------------------------------------------------------------- rendering, protocol

SEX_COLUMNS = {"M": "AUROC men", "F": "AUROC women"}
SEX_GAP = "gap men−women"
#: (column, record key) of the probes' metrics, in the section's order
PROBE_COLUMNS = (("sex AUROC (F vs M)", "sex_auroc"), ("age MAE (years)", "age_mae"), ("age R²", "age_r2"),
                 ("age Pearson r", "age_r"))


def _metric(record: dict, metric: str) -> dict | None:
    """A probe metric's summary in a model's record (``sex_auroc`` -> record["sex"]["auroc"])."""
    part, _, name = metric.partition("_")
    return record.get(part, {}).get(name)


def view_cells(c: Cohort, record: dict) -> list[tuple[str, dict | None, bool]]:
    """(column, summary, is a gap) of the subgroup columns of one model, in the section's order: per sex, the sex
    gap, then per age band and the age gap when the test split holds at least two bands."""
    sx, ag = record["subgroups"]["sex"], record["subgroups"]["age"]
    cells = [(SEX_COLUMNS[g], sx["groups"].get(g, {}).get("macro_auroc") if sx else None, False) for g in ("M", "F")]
    cells.append((SEX_GAP, sx["gap"] if sx else None, True))
    bands = list(c.band_groups)
    if len(bands) >= 2:
        cells += [(f"AUROC age {b}", ag["groups"].get(b, {}).get("macro_auroc") if ag else None, False)
                  for b in bands]
        cells.append((f"gap {bands[0]} − {bands[-1]}", ag["gap"] if ag else None, True))
    return cells


def section_rows(c: Cohort, records: dict[str, dict], ranked: Ranked) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """The section's columns and cells: the probes' metrics († where the paired difference to the reference is
    significant after Holm), the headline ones after their rank column, then the subgroup view (gaps as signed
    text, never ranked)."""
    rows: dict[str, dict[str, Cell]] = {}
    columns: list[str] = []
    for col, m in PROBE_COLUMNS:
        columns += [HEADLINE[m], col] if m in HEADLINE else [col]
    for model, record in records.items():
        paired = record["paired_to_reference"] or {}
        rows[model] = {col: _cell(_metric(record, m), paired.get(m)) for col, m in PROBE_COLUMNS}
        rows[model].update({title: Cell.from_rank(ranked[(m, "")][0][model]) if (m, "") in ranked else
                            Cell(None, note="n/e") for m, title in HEADLINE.items()})
        rows[model].update({col: _gap_cell(s) if gap else _cell(s) for col, s, gap in view_cells(c, record)})
    first = next(iter(records.values()))
    return columns + [col for col, _, _ in view_cells(c, first)], rows


def section_notes(c: Cohort, records: dict[str, dict], reference: str) -> list[str]:
    first = next(iter(records.values()))["subgroups"]

    def used(view: str) -> str:
        return ", ".join(first[view]["labels"]) if first[view] and first[view]["labels"] else "none"

    probes = (f"Sex: logistic probe (F positive), {len(c.sex_train)} train / {len(c.sex_test)} test images with known "
              "sex" + ("" if c.sex_ok else " — n/e: needs both sexes in the training and the test split")
              + f". Age: ridge probe, penalty by patient-grouped CV, {len(c.age_train)} train / {len(c.age_test)} test "
              "images with known age"
              + ("" if c.age_ok else f" — n/e: needs >= {MIN_AGE_TRAIN} training and 2 distinct test ages")
              + ". Calibration (OLS of true on predicted age, patient-clustered SEs) is in the results JSON.")
    m = c.missing
    excluded = (f"Excluded, never imputed: sex unknown for {m['sex_unknown']['train']} train and "
                f"{m['sex_unknown']['test']} test images; age unknown for {m['age_unknown']['train']} "
                f"train and {m['age_unknown']['test']} test images.")
    bands_text = ", ".join(f"{n} ({int(g.sum())} test images)" for n, g in c.band_groups.items())
    subgroup_text = ("Subgroup columns: macro AUROC of the linear probe on the task's labels within each group, over "
                     f"the labels evaluable in every group of the view (sex: {used('sex')}; age: {used('age')}). Gaps "
                     "are signed differences with their paired bootstrap CI (not ranked); a CI covering 0 means no "
                     "detectable dependence. Age bands: "
                     f"{bands_text or 'fewer than two bands in the test split'}.")
    edges = [f"`{e}` sex C = {r['sex']['C']:g} ({r['sex']['C_at_edge']} end)" for e, r in records.items()
             if r.get("sex", {}).get("C_at_edge")]
    edges += [f"`{e}` age alpha = {r['age']['alpha']:g} ({r['age']['alpha_at_edge']} end)"
              for e, r in records.items() if r.get("age", {}).get("alpha_at_edge")]
    unconverged = sum(r.get("sex", {}).get("not_converged", 0) for r in records.values())
    notes = [probes, excluded, subgroup_text,
             f"Reference model for paired differences: `{reference}` († on sex AUROC and the age metrics).",
             "Rank columns: sex AUROC and age MAE (the lowest error first). The age R², Pearson r and every "
             "subgroup's AUROC are ranked in the results JSON (`ranks`) and the tidy table, with pairwise win "
             "probabilities for the two headline metrics; a high sex or age score means the features encode it, "
             "which the ranks order, not endorse."]
    if edges:
        notes.append("Penalty chosen at the edge of its grid (the best value may lie beyond it): "
                     + "; ".join(edges) + ".")
    if unconverged:
        notes.append(f"{unconverged} sex-probe logistic fits stopped at the iteration limit without converging "
                     "(`not_converged` in the results JSON).")
    return notes


def subgroup_label(column: str, gap: bool = False) -> str:
    """A subgroup column's tidy label: ``men``, ``age <50``, ``men-women``, ``<50 - 70+``."""
    return column.removeprefix("gap ").replace("−", "-") if gap else column.removeprefix("AUROC ")


def demographics_tidy(tr: TaskRun, c: Cohort, records: dict[str, dict], ranked: Ranked) -> list[TidyRow]:
    """Tidy rows of the section's cells: the probes' metrics (label ""), then ``subgroup_auroc`` per group and
    ``subgroup_gap`` labelled as their columns name them (``men``, ``age <50``, ``men-women``, ``<50 - 70+``);
    then the ranks of every ranked column (`harness.ranks.ranked_rows`)."""
    rows = []
    for model, record in records.items():
        paired = record["paired_to_reference"] or {}
        for _, m in PROBE_COLUMNS:
            rows += rows_of(tr.out_name, NAME, model, m, "", _metric(record, m), paired.get(m))
        for col, s, gap in view_cells(c, record):
            rows += rows_of(tr.out_name, NAME, model, "subgroup_gap" if gap else "subgroup_auroc",
                            subgroup_label(col, gap), s)
    for (metric, label), (summary, wins) in ranked.items():
        rows += ranks.ranked_rows(tr.out_name, NAME, metric, label, summary, wins)
    return rows


#: (metric, label) -> (`ranks.rank_summary`, `ranks.win_probabilities` or None); label "" for the probes' metrics
Ranked = dict[tuple[str, str], tuple[dict, dict | None]]
#: the probes' metrics with a rank column in the section and win probabilities: what each probe is read for
HEADLINE = {"sex_auroc": "rank (sex AUROC)", "age_mae": "rank (age MAE)"}


def rank_columns(scored: dict[str, dict[str, tuple[float, np.ndarray]]],
                 group_resampled: dict[str, dict[str, tuple[float, np.ndarray]]]) -> Ranked:
    """Ranks of the models on every ranked column, over the shared resamples: the probes' four metrics (the MAE
    ranks the lowest first; win probabilities for the headline ones) and each subgroup's macro AUROC. The signed
    gaps are not ranked: neither sign is better."""
    out: Ranked = {}
    models = list(scored)
    for m in METRICS:
        if not models or any(m not in scored[e] for e in models):  # the cohort decides: every model or none
            continue
        higher = m != "age_mae"
        resampled = {e: scored[e][m][1] for e in models}
        out[(m, "")] = (ranks.rank_summary(resampled, {e: scored[e][m][0] for e in models}, higher),
                        ranks.win_probabilities(resampled, higher) if m in HEADLINE else None)
    for label in (group_resampled[models[0]] if models else {}):
        if any(label not in group_resampled[e] for e in models):
            continue
        out[("subgroup_auroc", label)] = (ranks.rank_summary({e: group_resampled[e][label][1] for e in models},
                                                             {e: group_resampled[e][label][0] for e in models}), None)
    return out


def section_inputs(task: Task) -> dict:
    """The sex and age the probes learn: a demographics section of an earlier run is kept only when they are
    unchanged."""
    t = task.table
    return {"sex": array_digest(np.array([s or "" for s in t.sex])), "age": array_digest(np.asarray(t.age, float))}


def fit_and_score(tr: TaskRun, encoders: list[Encoder], linear: ProtocolResult) -> ProtocolResult:
    """Fit the sex and age probes per model, score them and the linear probe's predictions (`linear`, the linear
    protocol's result) per subgroup on the shared resamples, pair every model with the reference."""
    c = cohort(tr)
    t = tr.task.table
    records: dict[str, dict] = {}
    scored: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
    group_resampled: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
    files = {}
    # Besides the features, labels and split (every entry's key has those): the sex and age the probes learn.
    settings = {"alphas": list(DEFAULT_ALPHAS), "sex": array_digest(c.sex), "age": array_digest(c.age)}
    for enc in progress(encoders, "demographics: fits and bootstrap"):
        x = tr.features[enc.name].global_
        work = tr.results.memo(NAME, tr.features[enc.name], settings,
                               lambda x=x: fitted_tree(fit_probes(tr, c, x), c, tr.weights, np.asarray(t.patient_ids)))
        fitted = Fitted(LabelResult(**work["sex"]) if work["sex"] else None, work["sex_scores"],
                        AgeProbe(**work["age"]) if work["age"] else None)
        scored[enc.name] = work["scored"]
        view, group_resampled[enc.name] = subgroups(tr, c, linear_scores(linear, enc.name, t, c.test_rows))
        records[enc.name] = model_record(c, fitted, scored[enc.name], view, work["calibration"])
        files[f"results/{tr.out_name}/{safe_name(enc.name)}.demographics.parquet"] = per_image_parquet(tr, c, fitted)

    reference = tr.reference
    paired = {}
    for m in METRICS:
        if reference in scored and m in scored[reference]:
            have = {e: v[m] for e, v in scored.items() if m in v}
            paired[m] = stats.compare_to_reference({e: b for e, (_, b) in have.items()},
                                                   {e: p for e, (p, _) in have.items()}, reference)
    ranked = rank_columns(scored, group_resampled)
    for enc in encoders:
        records[enc.name]["paired_to_reference"] = None if enc.name == reference else {
            m: paired[m][enc.name] for m in paired}
        records[enc.name]["ranks"] = ranks_record(ranked, enc.name)

    columns, rows = section_rows(c, records, ranked)
    section = Section(TITLE, columns, rows,
                      higher_is_better={"age MAE (years)": False, **{title: False for title in HEADLINE.values()}},
                      notes=section_notes(c, records, reference))
    return ProtocolResult(NAME, section, records, files=files, tidy=demographics_tidy(tr, c, records, ranked))


def ranks_record(ranked: Ranked, model: str) -> dict:
    """A model's ranks for its results JSON: ``{"sex_auroc": {...}, ..., "subgroup_auroc": {"men": {...}}}``."""
    out: dict = {}
    for (metric, label), (summary, wins) in ranked.items():
        entry = ranks.rank_record(summary, wins, model)
        if label:
            out.setdefault(metric, {})[label] = entry
        else:
            out[metric] = entry
    return out
