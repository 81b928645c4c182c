"""Label efficiency: the linear probe refitted on a fraction of the training patients, test split unchanged.

Draws. For each fraction f of ``--label-fractions`` below 1, ``--label-draws`` seeded draws each keep round(f * P) of
the P training patients, all images of a kept patient included. The draws are stratified by label and nested:
draw d orders the sorted patient pseudonyms by a permutation from a generator seeded with (seed, d), then moves to
the front, for each class (positive, negative) of each evaluable label that the patients already moved lack, the
first patient of the permutation that has it (DINOv2's few-shot sampling likewise keeps examples of every class).
A fraction keeps the first patients of that order: every draw of every fraction holds a positive and a negative
training patient of every evaluable label, so every fraction's macro averages the same labels, and a draw's
smaller fractions are subsets of its larger ones (the curve moves only by what is added). When those front
patients outnumber round(f * P), the fraction keeps as many as the largest front among its draws, and the notes
say so. The fraction 1 is the whole training split, fitted once (every draw would be the same): the linear probe.

Intervals. A cell's point is the mean over draws of the draws' macro AUROC. Its 95% interval is the percentile
interval over (draw, test resample) pairs: the task's shared bootstrap resample b is scored with the probe of draw b
mod D (resamples are independent of the draws, so this is a random pairing in which every draw is used equally). The
interval thus holds the between-draw variability as well as the test-sampling one: it is the interval of what one
draw of f of the patients gives on a new test sample, which is wider than the uncertainty of the mean over D draws
and so also covers how the mean moves with the draw seed (tests/harness/probes/test_label_efficiency.py checks
that). It rests on the D draws made; with one draw it cannot hold the draws' variability, and the notes say so. The
paired difference to the reference pairs the same (draw, resample) for every model (every model sees the same
draws), so its test, Holm-corrected per fraction, accounts for the draw; † is shown only where it does (two or more
draws, or the fraction 1, which has no draw). docs/statistics.md has the reasoning.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from harness import ranks, stats
from harness.figures.common import png_bytes
from harness.figures.label_efficiency import draw as draw_curves, figure_file, fraction_label
from harness.leaderboard import Cell, Section
from harness.log import progress
from harness.probes.linear import fallback_note, linear_probe
from harness.protocols import ProtocolResult, TaskRun, label_status
from harness.common.hashing import array_digest
from harness.tidy import rows_of

if TYPE_CHECKING:
    from baselines.registry import Encoder

NAME = "label-efficiency"
TITLE = "Label efficiency (linear probe on a fraction of the training patients)"
#: Part of every results-cache key of this protocol: changed whenever the draws or what a cached entry means
#: change, so that no entry computed by an earlier method is read (2: draws stratified by label).
METHOD = 2

log = logging.getLogger(__name__)


def _draw_order(strata: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One draw's order of the patients (rows of `strata`, bool [P, K]: patient p has class k) and how many at its
    front were moved there to hold every class."""
    order = rng.permutation(len(strata))
    front: list[int] = []
    held = np.zeros(strata.shape[1], dtype=bool)
    for k in range(strata.shape[1]):
        if not held[k]:
            p = int(order[np.argmax(strata[order, k])])  # the first patient of the permutation with class k
            front.append(p)
            held |= strata[p]
    moved = np.isin(order, front)
    return np.concatenate([order[moved], order[~moved]]), len(front)


def draw_patients(patients: np.ndarray, fractions: tuple[float, ...], n_draws: int, seed: int,
                  strata: np.ndarray | None = None) -> dict[float, list[np.ndarray]]:
    """Per fraction, the kept patients of each draw (one draw, everyone, for the fraction 1). `patients` must be
    the sorted unique pseudonyms, so the draws depend on the patients, `strata` and the seed only. `strata` (bool
    [P, K], row p for patients[p]) are the classes every draw must hold a patient of; each must have one."""
    strata = np.zeros((len(patients), 0), dtype=bool) if strata is None else np.asarray(strata, dtype=bool)
    if strata.shape[0] != len(patients):
        raise ValueError(f"strata have {strata.shape[0]} rows for {len(patients)} patients; give one per patient")
    empty = np.flatnonzero(~strata.any(axis=0))
    if empty.size:
        raise ValueError(f"strata column(s) {empty.tolist()} hold no patient: no draw can hold that class")
    drawn = [_draw_order(strata, np.random.default_rng([seed, d])) for d in range(n_draws)]
    front = max((n for _, n in drawn), default=0)
    out: dict[float, list[np.ndarray]] = {}
    for f in fractions:
        if f >= 1.0:
            out[f] = [patients]
        else:
            n = max(1, round(f * len(patients)), front)
            out[f] = [patients[np.sort(order[:n])] for order, _ in drawn]
    return out


def paired_resamples(boot: np.ndarray) -> np.ndarray:
    """[D, B] per-draw values on the shared resamples -> [B]: resample b scored by draw b mod D."""
    boot = np.asarray(boot)
    b = np.arange(boot.shape[1])
    return boot[b % boot.shape[0], b]


def patient_strata(y: np.ndarray, keys: np.ndarray, labels: list[int]) -> np.ndarray:
    """bool [P, 2K] over the sorted unique `keys`: whether patient p has a positive image of labels[k] (column k)
    and a negative one (column K + k)."""
    _, patient = np.unique(keys, return_inverse=True)
    pos = np.zeros((patient.max(initial=-1) + 1, len(labels)), dtype=bool)
    neg = np.zeros_like(pos)
    np.logical_or.at(pos, patient, y[:, labels].astype(bool))
    np.logical_or.at(neg, patient, ~y[:, labels].astype(bool))
    return np.concatenate([pos, neg], axis=1)


def plan(tr: TaskRun, patients: np.ndarray, fractions: tuple[float, ...], n_draws: int, draws: dict,
         train_rows: np.ndarray, train_keys: np.ndarray) -> tuple[list[str], list[str], list[tuple]]:
    """The section's opening notes, its columns, and per fraction (fraction, column, per draw the training rows it
    keeps)."""
    accounts = n_draws > 1
    notes = [f"Macro AUROC of the linear probe refitted on a fraction of the {len(patients)} training patients "
             f"(`--label-fractions`), {n_draws} seeded patient draws per fraction below 100% (`--label-draws`; "
             "stratified: every draw holds a positive and a negative training patient of every evaluable label; "
             "nested: a draw's smaller fractions are subsets of its larger ones), the test split unchanged; 100% is "
             "the linear probe itself. Cell: mean over draws [95% CI over (draw, test resample) pairs: it holds the "
             "spread between draws as well as the test sampling]. Reference for paired differences: "
             f"`{tr.reference}`, on the same pairs, Holm-corrected per fraction."]
    if not accounts and any(f < 1.0 for f in fractions):
        notes.append("One draw per fraction: below 100% the intervals and tests cannot hold the spread between "
                     "draws, so no † is shown there; use `--label-draws` 2 or more (5 or more for a stable interval).")
    columns, per_fraction = [], []
    for f in fractions:
        rows_d = [train_rows[np.isin(train_keys, kept)] for kept in draws[f]]  # per draw, the training rows it keeps
        col = f"{fraction_label(f)} ({len(draws[f][0])} patients)"
        columns.append(col)
        per_fraction.append((f, col, rows_d))
        nominal = max(1, round(f * len(patients)))
        if f < 1.0 and len(draws[f][0]) > nominal:
            notes.append(f"{fraction_label(f)} keeps {len(draws[f][0])} patients, not {nominal}: that many are "
                         "needed to hold a positive and a negative patient of every evaluable label in every draw.")
    return notes, columns, per_fraction


def closing_notes(curves: dict[str, list[dict]], fell_back: list[str]) -> list[str]:
    """The notes after the fits: labels whose C fell back, and the spread of each fraction's draws."""
    notes = []
    if fell_back:
        notes.append(fallback_note(fell_back))
    spread = [f"`{m}` " + ", ".join(f"{fraction_label(r['fraction'])} {min(r['draw_points']):.3f}-"
                                    f"{max(r['draw_points']):.3f}" for r in rows if len(r["draw_points"]) > 1)
              for m, rows in curves.items()]
    if any(len(r["draw_points"]) > 1 for rows in curves.values() for r in rows):
        notes.append("Spread of the draws' macro AUROC (min-max): " + "; ".join(spread) + ".")
    return notes


def curve_figure(curves: dict[str, list[dict]], tr: TaskRun) -> tuple[dict[str, bytes], list[str]]:
    """The label-efficiency figure as a file of the run, and the note linking it; neither, with a warning, when
    drawing fails: a figure is never worth the section's numbers."""
    png = figure_file(tr.out_name)
    try:
        return {png: png_bytes(draw_curves(curves, f"{tr.task.name}: label efficiency"))}, [f"Figure: [{png}]({png})."]
    except Exception as e:  # matplotlib raises many types
        log.warning(f"warning: {tr.out_name}: figure {png} not drawn: {type(e).__name__}: {e}")
        return {}, []


def fit_and_score(tr: TaskRun, encoders: list[Encoder]) -> ProtocolResult:
    t = tr.task.table
    y = np.asarray(t.labels).astype(int)
    train_rows = np.flatnonzero(tr.split == "train")
    test = tr.split == "test"
    groups = np.asarray(t.patient_ids)
    train_keys = np.array(tr.patient_keys(train_rows))
    patients = np.unique(train_keys)
    fractions, n_draws = tuple(sorted(set(tr.options.label_fractions))), tr.options.label_draws
    evaluable, _ = label_status(tr.task, tr.split, tr.min_positive_patients)
    ok = [int(j) for j in np.flatnonzero(evaluable)]
    # Evaluable labels have both classes among the training images, so every stratum has a patient.
    draws = draw_patients(patients, fractions, n_draws, tr.seed, patient_strata(y[train_rows], train_keys, ok))
    names = [t.label_names[j] for j in ok]
    skip = {j: "not evaluable" for j in range(len(t.label_names)) if j not in ok}
    # Between-draw variability enters the intervals and tests only with two or more draws; the fraction 1 has none.
    accounts = n_draws > 1

    notes, columns, per_fraction = plan(tr, patients, fractions, n_draws, draws, train_rows, train_keys)
    curves: dict[str, list[dict]] = {e.name: [] for e in encoders}
    cells: dict[str, dict[str, Cell]] = {e.name: {} for e in encoders}
    fell_back: list[str] = []
    ranked: dict[float, tuple[dict, dict]] = {}  # fraction -> (`ranks.rank_summary`, `ranks.win_probabilities`)
    for f, col, rows_d in per_fraction:
        points, resampled, fallback_draws = {}, {}, {}

        def draws_of(x: np.ndarray, rows_d: list[np.ndarray] = rows_d) -> dict:
            """One model's probes on every draw of this fraction: each draw's macro AUROC, its resamples, and the
            labels whose C could not be cross-validated."""
            points_d, boot_d, fallback_d = [], [], []
            for rows in rows_d if ok else []:  # no label to score: nothing to fit
                probe = linear_probe(x[rows], y[rows], groups[rows], x[test], y[test], t.label_names, seed=tr.seed,
                                     skip=skip, n_jobs=tr.options.n_jobs)
                summary, boot = stats.classification_summary(probe.scores[:, ok], y[test][:, ok], names, tr.weights)
                points_d.append(summary["auroc"]["macro"]["point"])
                boot_d.append(boot["auroc"])
                fallback_d.append([j for j in ok if probe.labels[j].C_fallback])
            return {"points": points_d, "boot": boot_d, "fallback": fallback_d}

        settings = {"method": METHOD, "fraction": f, "draws": [array_digest(r) for r in rows_d], "labels": ok}
        for enc in progress(encoders, f"label efficiency {f:g}: fits and bootstrap"):
            x = tr.features[enc.name].global_
            work = tr.results.memo(NAME, tr.features[enc.name], settings, lambda x=x: draws_of(x))
            draw_points = work["points"]
            for d, labels in enumerate(work["fallback"]):
                for j in labels:
                    fallback_draws.setdefault(int(j), set()).add(d)
            if ok:
                points[enc.name] = float(np.mean(draw_points))
                resampled[enc.name] = paired_resamples(work["boot"])
            curves[enc.name].append({
                "fraction": f, "patients": len(draws[f][0]), "draws": len(rows_d), "labels": names,
                "macro_auroc": stats.summarise(points[enc.name], resampled[enc.name]) if ok else
                {"point": None, "lo": None, "hi": None},
                "draw_points": draw_points})
        # Whether a fold can be made depends on the labels and the draw only: the same for every model.
        fell_back += [f"{t.label_names[j]} at {fraction_label(f)} ({len(ds)} of {len(rows_d)} draw(s))"
                      for j, ds in sorted(fallback_draws.items())]
        paired = stats.compare_to_reference(resampled, points, tr.reference) if ok else {}
        marks = accounts or f >= 1.0
        if ok and marks:  # ranked where the intervals hold the draws' spread, as the paired tests
            ranked[f] = (ranks.rank_summary(resampled, points), ranks.win_probabilities(resampled))
        for enc in encoders:
            row = curves[enc.name][-1]
            row["paired_to_reference"] = paired.get(enc.name) if marks else None
            row["ranks"] = ranks.rank_record(*ranked[f], enc.name) if f in ranked else None
            p_holm = (row["paired_to_reference"] or {}).get("p_holm")
            cells[enc.name][col] = Cell.from_summary(row["macro_auroc"], p_holm is not None and p_holm < 0.05,
                                                     note="n/e: no evaluable label")
    if ranked:
        columns, cells = rank_column(ranked, columns, cells)
        notes.append(f"{columns[0]}: the ranks at the smallest fraction ranked; every ranked fraction's ranks and "
                     "pairwise win probabilities are in the results JSON (`curve[].ranks`) and the tidy table. A "
                     "fraction below 100% is ranked only with two or more draws, as its † is.")
    files, figure_note = curve_figure(curves, tr)
    notes += closing_notes(curves, fell_back) + figure_note
    records = {e.name: {"fractions": list(fractions), "draws": n_draws, "seed": tr.seed, "method": METHOD,
                        "curve": curves[e.name]} for e in encoders}
    # One row per fraction, the curve's macro AUROC over draws, labelled by the fraction itself (macro@0.1).
    tidy = [row for e in encoders for r in curves[e.name]
            for row in rows_of(tr.out_name, NAME, e.name, "auroc", f"macro@{r['fraction']:g}", r["macro_auroc"],
                               r["paired_to_reference"])]
    tidy += [row for f, r in ranked.items() for row in ranks.ranked_rows(tr.out_name, NAME, "auroc", f"macro@{f:g}", *r)]
    higher_is_better = {columns[0]: False} if ranked else {}
    return ProtocolResult(NAME, Section(TITLE, columns, cells, higher_is_better, notes), records, files=files,
                          tidy=tidy)


def rank_column(ranked: dict[float, tuple[dict, dict]], columns: list[str], cells: dict[str, dict[str, Cell]]
                ) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """The columns and cells with a rank column in front: the ranks at the smallest fraction that is ranked (the
    fewest labels: what the section is about). Every ranked fraction's ranks are in the results and tidy table."""
    f = min(ranked)
    title = f"rank (macro AUROC at {fraction_label(f)})"
    return [title] + columns, {m: {title: Cell.from_rank(ranked[f][0][m]), **row} for m, row in cells.items()}
