"""Demographics: what frozen global features say about sex and age, and whether classification depends on them.

Two probes on the same standardised global features as the linear probe, fitted on the training split only:
- sex: logistic regression (the linear probe itself, with F as the positive class), scored by AUROC;
- age: ridge regression, its penalty chosen by patient-grouped cross-validation on the training split (mean
  absolute error over folds; ties go to the stronger penalty), scored by MAE (years), R^2 and Pearson r. A
  statsmodels OLS of true on predicted age, with patient-clustered standard errors, gives the calibration slope
  and intercept (a ridge probe shrinks towards the mean age: slope > 1) in the results JSON.

Subgroup view: the linear probe's test scores for the task's own labels (taken from the linear protocol when it
ran, refitted here otherwise) are scored separately for men and women and per age band, macro AUROC over the
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

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler

from baselines.registry import Encoder
from harness import stats
from harness.leaderboard import Cell, Section
from harness.common.paths import safe_name
from harness.log import progress
from harness.probes.linear import grid_edge, linear_probe
from harness.protocols import TaskRun, parquet_bytes, register_protocol

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
                   label_names: list[str], patient_keys: list[str] | None = None, min_patients: int = 1) -> dict:
    """Macro AUROC per group over the labels evaluable in *every* group (finite scores; at least `min_patients`
    patients with a positive and with a negative image in the group, both classes without `patient_keys`),
    per-label AUROC per group, and the gap first group - last group. `groups` maps a name to a bool mask over
    test rows. A resample in which a group lacks a class of one of these labels leaves that group's macro
    undefined (counted in n_valid), so every macro averages the same labels."""
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
        return out
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
    return out


def _linear_scores(tr: TaskRun, enc: Encoder, test_rows: np.ndarray) -> tuple[np.ndarray, bool]:
    """[n_test, L] linear-probe scores of the task's labels (NaN where not evaluable): the linear protocol's own
    predictions when it ran, else a fresh fit of the same probe. Returns (scores, refitted)."""
    t = tr.task.table
    scores = np.full((len(test_rows), len(t.label_names)), np.nan)
    if "linear" in tr.results.get(enc.name, {}):
        position = {t.image_ids[r]: k for k, r in enumerate(test_rows)}
        column = {n: j for j, n in enumerate(t.label_names)}
        for row in tr.predictions.get(enc.name, []):
            if row["label"] in column and row["image_id"] in position:
                scores[position[row["image_id"]], column[row["label"]]] = row["score"]
        return scores, False
    train = tr.split == "train"
    x = tr.features[enc.name].global_
    probe = linear_probe(x[train], t.labels[train].astype(int), np.asarray(t.patient_ids)[train], x[test_rows],
                         t.labels[test_rows].astype(int), t.label_names, seed=tr.seed, n_jobs=tr.options.n_jobs)
    return probe.scores, True


# ----------------------------------------------------------------------------------------------------- protocol

@register_protocol("demographics", description="sex (logistic, AUROC) and age (ridge; MAE, R2, r) from global "
                                               "features; classification AUROC per sex and age band")
def run_demographics(tr: TaskRun, encoders: list[Encoder]) -> Section:
    t = tr.task.table
    seed, reference = tr.seed, tr.reference
    groups = np.asarray(t.patient_ids)
    train_rows, test_rows = np.flatnonzero(tr.split == "train"), np.flatnonzero(tr.split == "test")
    sex = np.array([s or "" for s in t.sex])
    age = np.asarray(t.age, dtype=float)
    counts = {
        "sex_unknown": {"train": int((sex[train_rows] == "").sum()), "test": int((sex[test_rows] == "").sum())},
        "age_unknown": {"train": int((~np.isfinite(age[train_rows])).sum()),
                        "test": int((~np.isfinite(age[test_rows])).sum())},
    }
    sex_tr, sex_te = train_rows[sex[train_rows] != ""], test_rows[sex[test_rows] != ""]
    age_tr, age_te = train_rows[np.isfinite(age[train_rows])], test_rows[np.isfinite(age[test_rows])]
    sex_cols = np.flatnonzero(sex[test_rows] != "")     # columns of tr.weights
    age_cols = np.flatnonzero(np.isfinite(age[test_rows]))
    y_sex_tr, y_sex_te = (sex[sex_tr] == "F").astype(int), (sex[sex_te] == "F").astype(int)
    sex_ok = len(np.unique(y_sex_tr)) == 2 and len(np.unique(y_sex_te)) == 2
    age_ok = len(age_tr) >= MIN_AGE_TRAIN and len(age_te) >= 2 and np.ptp(age[age_te]) > 0

    # Subgroup masks over the test rows; the view needs both sexes / at least two age bands in the test split.
    sex_groups = {"M": sex[test_rows] == "M", "F": sex[test_rows] == "F"}
    bands = age_bands(age[test_rows])
    band_groups = {name: bands == b for b, (_, _, name) in enumerate(AGE_BANDS) if (bands == b).any()}
    y_test = t.labels[test_rows].astype(int)
    test_keys = tr.patient_keys(test_rows)

    per_model: dict[str, dict] = {}
    resampled: dict[str, dict[str, np.ndarray]] = {m: {} for m in ("sex_auroc", "age_mae", "age_r2", "age_r")}
    points: dict[str, dict[str, float]] = {m: {} for m in resampled}
    refitted = []
    for enc in progress(encoders, "demographics: fits and bootstrap"):
        x = tr.features[enc.name].global_
        res: dict = {"missing": counts}
        sex_score, age_pred = np.full(len(test_rows), np.nan), np.full(len(test_rows), np.nan)
        if sex_ok:
            probe = linear_probe(x[sex_tr], y_sex_tr[:, None], groups[sex_tr], x[sex_te], y_sex_te[:, None],
                                 ["female"], seed=seed, n_jobs=tr.options.n_jobs)
            s = probe.scores[:, 0]
            boot = stats.binary_metrics(s, y_sex_te, tr.weights[:, sex_cols])["auroc"][:, 0]
            point = float(stats.binary_metrics(s, y_sex_te)["auroc"][0, 0])
            resampled["sex_auroc"][enc.name], points["sex_auroc"][enc.name] = boot, point
            lab = probe.labels[0]
            res["sex"] = {"auroc": stats.summarise(point, boot), "C": lab.C, "C_at_edge": lab.C_at_edge,
                          "cv_auroc": lab.cv_auroc, "fits": lab.fits, "not_converged": lab.not_converged,
                          "n_train": len(sex_tr), "n_test": len(sex_te), "positive_class": "F"}
            sex_score[sex_cols] = s
        if age_ok:
            ap = age_probe(x[age_tr], age[age_tr], groups[age_tr], x[age_te], seed=seed)
            y, w = age[age_te], tr.weights[:, age_cols]
            pred = ap.predictions
            err = np.abs(pred - y)
            for m, p, b in (("age_mae", err.mean(), stats.weighted_mean(err, w)),
                            ("age_r2", stats.weighted_r2(y, pred)[0], stats.weighted_r2(y, pred, w)),
                            ("age_r", stats.weighted_pearson(y, pred)[0], stats.weighted_pearson(y, pred, w))):
                resampled[m][enc.name], points[m][enc.name] = b, float(p)
            res["age"] = {m.removeprefix("age_"): stats.summarise(points[m][enc.name], resampled[m][enc.name])
                          for m in ("age_mae", "age_r2", "age_r")}
            res["age"].update(alpha=ap.alpha, alpha_at_edge=grid_edge(DEFAULT_ALPHAS, ap.alpha)
                              if np.isfinite(ap.cv_mae) else "", cv_mae=ap.cv_mae, n_train=len(age_tr),
                              n_test=len(age_te), calibration=calibration(y, pred, groups[age_te]))
            age_pred[age_cols] = pred
        scores, was_refitted = _linear_scores(tr, enc, test_rows)
        if was_refitted:
            refitted.append(enc.name)
        res["subgroups"] = {
            "source": "refitted linear probe" if was_refitted else "linear protocol predictions",
            "sex": subgroup_auroc(scores, y_test, tr.weights, sex_groups, t.label_names, test_keys,
                                  tr.min_positive_patients)
            if all(g.any() for g in sex_groups.values()) else None,
            "age": subgroup_auroc(scores, y_test, tr.weights, band_groups, t.label_names, test_keys,
                                  tr.min_positive_patients)
            if len(band_groups) >= 2 else None,
        }
        per_model[enc.name] = res
        # Per test image, so every interval above can be recomputed from the published files (missing: null).
        tr.files[f"results/{tr.out_name}/{safe_name(enc.name)}.demographics.parquet"] = parquet_bytes([
            {"image_id": t.image_ids[r], "patient_key": k, "sex": sex[r] or None, "sex_score": _num(sc),
             "age": _num(age[r]), "age_pred": _num(ap_)}
            for r, k, sc, ap_ in zip(test_rows, test_keys, sex_score, age_pred)])

    paired = {m: stats.compare_to_reference(resampled[m], points[m], reference)
              for m in resampled if reference in resampled[m]}
    for enc in encoders:
        per_model[enc.name]["paired_to_reference"] = None if enc.name == reference else {
            m: paired[m][enc.name] for m in paired}
        tr.results.setdefault(enc.name, {})["demographics"] = per_model[enc.name]

    columns = ["sex AUROC (F vs M)", "age MAE (years)", "age R²", "age Pearson r"]
    band_names = list(band_groups)
    sub_cols = ["AUROC men", "AUROC women", "gap men−women"]
    if len(band_names) >= 2:
        sub_cols += [f"AUROC age {b}" for b in band_names] + [f"gap {band_names[0]} − {band_names[-1]}"]
    columns += sub_cols
    rows: dict[str, dict[str, Cell]] = {}
    for enc in encoders:
        r, pm = {}, per_model[enc.name]
        pr = per_model[enc.name]["paired_to_reference"] or {}
        r["sex AUROC (F vs M)"] = _cell(pm.get("sex", {}).get("auroc"), pr.get("sex_auroc"))
        for col, m in (("age MAE (years)", "mae"), ("age R²", "r2"), ("age Pearson r", "r")):
            r[col] = _cell(pm.get("age", {}).get(m), pr.get(f"age_{m}"))
        sx = pm["subgroups"]["sex"]
        r["AUROC men"] = _cell(sx["groups"].get("M", {}).get("macro_auroc") if sx else None)
        r["AUROC women"] = _cell(sx["groups"].get("F", {}).get("macro_auroc") if sx else None)
        r["gap men−women"] = _gap_cell(sx["gap"] if sx else None)
        ag = pm["subgroups"]["age"]
        if len(band_names) >= 2:
            for b in band_names:
                r[f"AUROC age {b}"] = _cell(ag["groups"].get(b, {}).get("macro_auroc") if ag else None)
            r[f"gap {band_names[0]} − {band_names[-1]}"] = _gap_cell(ag["gap"] if ag else None)
        rows[enc.name] = r

    first = per_model[encoders[0].name]["subgroups"]

    def used(view: str) -> str:
        return ", ".join(first[view]["labels"]) if first[view] and first[view]["labels"] else "none"

    probes = (f"Sex: logistic probe (F positive), {len(sex_tr)} train / {len(sex_te)} test images with known sex"
              + ("" if sex_ok else " — n/e: needs both sexes in the training and the test split")
              + f". Age: ridge probe, penalty by patient-grouped CV, {len(age_tr)} train / {len(age_te)} test images "
              "with known age"
              + ("" if age_ok else f" — n/e: needs >= {MIN_AGE_TRAIN} training and 2 distinct test ages")
              + ". Calibration (OLS of true on predicted age, patient-clustered SEs) is in the results JSON.")
    excluded = (f"Excluded, never imputed: sex unknown for {counts['sex_unknown']['train']} train and "
                f"{counts['sex_unknown']['test']} test images; age unknown for {counts['age_unknown']['train']} "
                f"train and {counts['age_unknown']['test']} test images.")
    bands_text = ", ".join(f"{n} ({int(band_groups[n].sum())} test images)" for n in band_names)
    subgroups = ("Subgroup columns: macro AUROC of the linear probe on the task's labels within each group, over "
                 f"the labels evaluable in every group of the view (sex: {used('sex')}; age: {used('age')}). Gaps "
                 "are signed differences with their paired bootstrap CI (not ranked); a CI covering 0 means no "
                 f"detectable dependence. Age bands: {bands_text or 'fewer than two bands in the test split'}.")
    edges = [f"`{e}` sex C = {pm['sex']['C']:g} ({pm['sex']['C_at_edge']} end)" for e, pm in per_model.items()
             if pm.get("sex", {}).get("C_at_edge")]
    edges += [f"`{e}` age alpha = {pm['age']['alpha']:g} ({pm['age']['alpha_at_edge']} end)"
              for e, pm in per_model.items() if pm.get("age", {}).get("alpha_at_edge")]
    unconverged = sum(pm.get("sex", {}).get("not_converged", 0) for pm in per_model.values())
    notes = [probes, excluded, subgroups,
             f"Reference model for paired differences: `{reference}` († on sex AUROC and the age metrics)."]
    if edges:
        notes.append("Penalty chosen at the edge of its grid (the best value may lie beyond it): "
                     + "; ".join(edges) + ".")
    if unconverged:
        notes.append(f"{unconverged} sex-probe logistic fits stopped at the iteration limit without converging "
                     "(`not_converged` in the results JSON).")
    if refitted:
        notes.append("The linear protocol did not run for " + ", ".join(f"`{n}`" for n in refitted)
                     + ": its probe was refitted here with the same procedure for the subgroup view.")
    return Section(TITLE, columns, rows, higher_is_better={"age MAE (years)": False}, notes=notes)
