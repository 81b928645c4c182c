"""Label efficiency: the linear probe refitted on a fraction of the training patients, test split unchanged.

For each fraction f of ``--label-fractions`` below 1, ``--label-draws`` seeded draws each keep round(f * P) of the
P training patients (at least one), all images of a kept patient included. Draw d is the first patients of one
permutation of the sorted patient pseudonyms made by a generator seeded with (seed, d), so a draw's smaller
fractions are subsets of its larger ones and the curve moves only by what is added. The fraction 1 is the whole
training split, fitted once (every draw would be the same): it is the linear probe itself.

A label enters the macro of a fraction when it is evaluable for the linear probe (``label_status``) and every draw
of that fraction holds a positive and a negative training patient of it; otherwise it is reported as not
evaluable at that fraction, with the patient counts per draw.

Draws and resamples: every draw is scored on the same test images with the task's shared bootstrap resamples.
The point is the mean over draws of the draws' macro AUROC; in resample b the value is the mean over draws of
their macro AUROC in resample b, and the 95% interval is the percentile interval of those values. It is the
test-sampling uncertainty of the draw-averaged curve; the spread between draws (min-max of their points) is
given in the results JSON and the notes. Paired differences to the reference use the same per-resample means
(every model sees the same draws), Holm-corrected per fraction.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness import stats
from harness.leaderboard import Cell, Section
from harness.log import progress
from harness.probes.linear import linear_probe
from harness.protocols import ProtocolResult, TaskRun, label_status
from harness.common.hashing import array_digest
from harness.tidy import rows_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from baselines.registry import Encoder

NAME = "label-efficiency"
TITLE = "Label efficiency (linear probe on a fraction of the training patients)"


def fraction_label(f: float) -> str:
    return f"{100 * f:g}%"


def draw_patients(patients: np.ndarray, fractions: tuple[float, ...], n_draws: int, seed: int
                  ) -> dict[float, list[np.ndarray]]:
    """Per fraction, the kept patients of each draw (one draw, everyone, for the fraction 1). `patients` must be
    the sorted unique pseudonyms, so the draws depend on the patients and the seed only."""
    orders = [np.random.default_rng([seed, d]).permutation(len(patients)) for d in range(n_draws)]
    out: dict[float, list[np.ndarray]] = {}
    for f in fractions:
        if f >= 1.0:
            out[f] = [patients]
        else:
            n = max(1, round(f * len(patients)))
            out[f] = [patients[np.sort(order[:n])] for order in orders]
    return out


def figure_png(curves: dict[str, list[dict]], title: str) -> tuple[bytes, "Figure"]:
    """The curves as a PNG (one line with its interval band per model, fraction on a log axis), and the figure,
    whose plotted values the tests compare with the section. `curves[model]` are rows with "fraction" and the
    macro summary "macro_auroc" ({"point", "lo", "hi"})."""
    import io

    # Imported here: matplotlib's first import builds a font cache, which importing this module should not
    # pay. The Agg canvas is used directly, so no pyplot state or global backend is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for model, rows in curves.items():
        shown = [r for r in rows if r["macro_auroc"]["point"] is not None]
        if not shown:
            continue
        x = [r["fraction"] for r in shown]
        (line,) = ax.plot(x, [r["macro_auroc"]["point"] for r in shown], marker="o", label=model)
        banded = [r for r in shown if r["macro_auroc"]["lo"] is not None]
        ax.fill_between([r["fraction"] for r in banded], [r["macro_auroc"]["lo"] for r in banded],
                        [r["macro_auroc"]["hi"] for r in banded], color=line.get_color(), alpha=0.2, linewidth=0)
    if ax.get_lines():
        ax.set_xscale("log")
        # Ticks at the fractions themselves, as percentages (the section's column names), not powers of ten.
        fractions = sorted({r["fraction"] for rows in curves.values() for r in rows})
        ax.set_xticks(fractions, [fraction_label(f) for f in fractions])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    else:  # a log axis needs data: say why the figure is empty instead
        ax.text(0.5, 0.5, "no evaluable label at any fraction", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("fraction of training patients")
    ax.set_ylabel("macro AUROC (95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue(), fig


def fit_and_score(tr: TaskRun, encoders: list[Encoder]) -> ProtocolResult:
    t = tr.task.table
    y = np.asarray(t.labels).astype(int)
    train_rows = np.flatnonzero(tr.split == "train")
    test = tr.split == "test"
    groups = np.asarray(t.patient_ids)
    train_keys = np.array(tr.patient_keys(train_rows))
    patients = np.unique(train_keys)
    fractions, n_draws = tuple(sorted(set(tr.options.label_fractions))), tr.options.label_draws
    draws = draw_patients(patients, fractions, n_draws, tr.seed)
    evaluable, _ = label_status(tr.task, tr.split, tr.min_positive_patients)

    notes = [f"Macro AUROC of the linear probe refitted on a fraction of the {len(patients)} training patients "
             f"(`--label-fractions`), {n_draws} seeded patient draws per fraction below 100% (`--label-draws`, "
             "nested: a draw's smaller fractions are subsets of its larger ones), the test split unchanged; 100% is "
             "the linear probe itself. Cell: mean over draws [95% CI of that mean over the shared test-patient "
             "resamples; it leaves out the spread between draws, listed below]. Reference for paired differences: "
             f"`{tr.reference}`, Holm-corrected per fraction."]
    columns, per_fraction = [], []
    for f in fractions:
        chosen = [np.isin(train_keys, kept) for kept in draws[f]]  # per draw, which training rows it keeps
        rows_d = [train_rows[c] for c in chosen]
        pos_neg = [stats.patients_per_class(y[train_rows[c]], train_keys[c]) for c in chosen]
        ok = [j for j in np.flatnonzero(evaluable) if all(p[j] > 0 and n[j] > 0 for p, n in pos_neg)]
        lost = [f"{t.label_names[j]} (positive/negative training patients per draw: "
                + ", ".join(f"{p[j]}/{n[j]}" for p, n in pos_neg) + ")"
                for j in np.flatnonzero(evaluable) if j not in ok]
        col = f"{fraction_label(f)} ({len(draws[f][0])} patients)"
        columns.append(col)
        per_fraction.append((f, col, rows_d, ok, lost))
        if lost:
            notes.append(f"Not evaluable at {fraction_label(f)}, left out of its macro: " + "; ".join(lost) + ".")
    if len({tuple(ok) for *_, ok, _ in per_fraction}) > 1:
        notes.append("The fractions' macros average different label sets (see above): compare them with care.")
    notes.append(f"Figure: [{tr.out_name}_label_efficiency.png]({tr.out_name}_label_efficiency.png).")

    curves: dict[str, list[dict]] = {e.name: [] for e in encoders}
    cells: dict[str, dict[str, Cell]] = {e.name: {} for e in encoders}
    for f, col, rows_d, ok, _ in per_fraction:
        skip = {j: "not evaluable at this fraction" for j in range(len(t.label_names)) if j not in ok}
        points, resampled = {}, {}

        def draws_of(x: np.ndarray, rows_d: list[np.ndarray] = rows_d, ok: list[int] = ok,
                     skip: dict[int, str] = skip) -> dict:
            """One model's probes on every draw of this fraction: each draw's macro AUROC and its resamples."""
            points_d, boot_d = [], []
            for rows in rows_d if ok else []:  # no label to score: nothing to fit
                probe = linear_probe(x[rows], y[rows], groups[rows], x[test], y[test], t.label_names, seed=tr.seed,
                                     skip=skip, n_jobs=tr.options.n_jobs)
                summary, boot = stats.classification_summary(probe.scores[:, ok], y[test][:, ok],
                                                             [t.label_names[j] for j in ok], tr.weights)
                points_d.append(summary["auroc"]["macro"]["point"])
                boot_d.append(boot["auroc"])
            return {"points": points_d, "boot": boot_d}

        settings = {"fraction": f, "draws": [array_digest(r) for r in rows_d], "labels": [int(j) for j in ok]}
        for enc in progress(encoders, f"label efficiency {f:g}: fits and bootstrap"):
            x = tr.features[enc.name].global_
            work = tr.memo(NAME, tr.feature_key(enc.name), settings, lambda x=x: draws_of(x))
            draw_points, draw_boot = work["points"], work["boot"]
            if ok:
                points[enc.name] = float(np.mean(draw_points))
                resampled[enc.name] = np.mean(draw_boot, axis=0)
            curves[enc.name].append({
                "fraction": f, "patients": len(draws[f][0]), "draws": len(rows_d),
                "labels": [t.label_names[j] for j in ok],
                "macro_auroc": stats.summarise(points[enc.name], resampled[enc.name]) if ok else
                {"point": None, "lo": None, "hi": None},
                "draw_points": draw_points})
        paired = stats.compare_to_reference(resampled, points, tr.reference) if ok else {}
        for enc in encoders:
            row = curves[enc.name][-1]
            row["paired_to_reference"] = paired.get(enc.name)
            p_holm = (paired.get(enc.name) or {}).get("p_holm")
            cells[enc.name][col] = Cell.from_summary(row["macro_auroc"], p_holm is not None and p_holm < 0.05,
                                                     note="n/e: no evaluable label")
    spread = [f"`{m}` " + ", ".join(f"{fraction_label(r['fraction'])} {min(r['draw_points']):.3f}-"
                                    f"{max(r['draw_points']):.3f}" for r in rows if len(r["draw_points"]) > 1)
              for m, rows in curves.items()]
    if any(len(r["draw_points"]) > 1 for rows in curves.values() for r in rows):
        notes.append("Spread of the draws' macro AUROC (min-max): " + "; ".join(spread) + ".")
    png, _ = figure_png(curves, f"{tr.task.name}: label efficiency")
    records = {e.name: {"fractions": list(fractions), "draws": n_draws, "seed": tr.seed, "curve": curves[e.name]}
               for e in encoders}
    # One row per fraction, the curve's macro AUROC over draws, labelled by the fraction itself (macro@0.1).
    tidy = [row for e in encoders for r in curves[e.name]
            for row in rows_of(tr.out_name, NAME, e.name, "auroc", f"macro@{r['fraction']:g}", r["macro_auroc"],
                               r["paired_to_reference"])]
    return ProtocolResult(NAME, Section(TITLE, columns, cells, notes=notes), records,
                          files={f"{tr.out_name}_label_efficiency.png": png}, tidy=tidy)
