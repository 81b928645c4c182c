"""ROC and precision-recall curves per label from the linear probe's per-image test predictions, a curve per
model; the legend's AUROC / AUPRC (with its 95% CI) is read from the tidy table, not recomputed, so the figure
and the table cannot disagree."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from harness.figures.common import LEGEND_SIZE, grid_shape, lookup, new_figure, style_panel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Columns of `results/<name>/<model>.predictions.parquet` the curves need (its rows are test images only).
PREDICTION_COLUMNS = ("label", "target", "score")
#: kind -> (file, tidy metric, legend title, x axis, y axis)
KINDS = {"roc": ("roc.png", "auroc", "AUROC (95% CI)", "false positive rate", "true positive rate"),
         "pr": ("pr.png", "auprc", "AUPRC (95% CI)", "recall", "precision")}


def curve(target: np.ndarray, score: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the ROC curve (false vs true positive rate, from (0, 0) to (1, 1)) or of the precision-recall
    curve (recall vs precision, from recall 1 at the prevalence to recall 0 at precision 1), as scikit-learn
    computes them; thresholds that change neither curve's drawn steps are dropped (lighter, same picture)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    if kind == "roc":
        fpr, tpr, _ = roc_curve(target, score)
        return fpr, tpr
    precision, recall, _ = precision_recall_curve(target, score, drop_intermediate=True)
    return recall, precision


def _legend(model: str, row: dict | None) -> str:
    if row is None:
        return f"{model}: not in the results table"
    ci = f" [{row['lo']:.3f}, {row['hi']:.3f}]" if row["lo"] is not None and row["hi"] is not None else ""
    return f"{model}: {row['point']:.3f}{ci}"


def draw(predictions: dict[str, pl.DataFrame], table: pl.DataFrame, kind: str, title: str
         ) -> tuple["Figure", pl.DataFrame] | None:
    """One panel per label, a curve per model of `predictions` (model -> its predictions file); the chance line
    (ROC: the diagonal; PR: the label's prevalence among the test images). Returns the figure and what it drew:
    per (label, model) the curve (x, y), the legend's value, lo, hi from the table, and the chance level; None
    when no label has both classes."""
    _, metric, legend_title, x_name, y_name = KINDS[kind]
    labels = list(dict.fromkeys(lab for df in predictions.values() for lab in df["label"].to_list()))
    per_label = {}
    for lab in labels:
        mine = {m: df.filter(pl.col("label") == lab) for m, df in predictions.items()}
        mine = {m: df for m, df in mine.items() if df["target"].n_unique() == 2}  # one class: no curve exists
        if mine:
            per_label[lab] = mine
    if not per_label:
        return None
    n_rows, n_cols = grid_shape(len(per_label), 3)
    fig = new_figure(4.6 * n_cols, 4.2 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    drawn = []
    for ax, (lab, mine) in zip(axes, per_label.items()):
        # Every model is scored on the same test images, so the first model's targets give the prevalence.
        prevalence = float(next(iter(mine.values()))["target"].mean())
        chance = None if kind == "roc" else prevalence
        for model, df in mine.items():
            x, y = curve(df["target"].to_numpy(), df["score"].to_numpy(), kind)
            row = lookup(table, model, "linear", metric, lab)
            ax.plot(x, y, label=_legend(model, row), drawstyle="steps-post" if kind == "pr" else "default")
            drawn.append({"label": lab, "model": model, "metric": metric, "x": x.tolist(), "y": y.tolist(),
                          "value": None if row is None else row["point"], "lo": None if row is None else row["lo"],
                          "hi": None if row is None else row["hi"], "chance": chance})
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":", label="chance")
        else:
            ax.axhline(prevalence, color="grey", linewidth=0.8, linestyle=":", label=f"prevalence {prevalence:.3f}")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel(x_name)
        ax.set_ylabel(y_name)
        style_panel(ax, lab)
        ax.legend(title=legend_title, fontsize=LEGEND_SIZE, title_fontsize=LEGEND_SIZE,
                  loc="lower right" if kind == "roc" else "best")
    for ax in axes[len(per_label):]:
        ax.set_visible(False)
    name = "ROC" if kind == "roc" else "precision-recall"
    fig.suptitle(f"{title}: {name} curves of the linear probe on the test images (legend: {metric.upper()} from the "
                 "results table)", fontsize=10)
    return fig, pl.DataFrame(drawn)
