"""Pairwise win probabilities as heatmaps: cell (row A, column B) = P(A's macro AUROC > B's) over the patient
resamples every model of the run shares (`harness.ranks`), a panel per protocol that ranks its models. A value near
0.5 says the two models are not separable on this test set, whatever their point estimates' order."""
from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from harness.figures.common import grid_shape, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FILE = "wins.png"
METRIC = "win_auroc"
#: the macro rows of `harness.ranks.ranked_rows`: label "macro vs <other model>"
PREFIX = "macro vs "


def matrices(table: pl.DataFrame, models: list[str]) -> dict[str, tuple[list[str], list[list[float | None]]]]:
    """protocol -> (models in run order, matrix with None on the diagonal and where a pair has no value)."""
    rows = table.filter((pl.col("metric") == METRIC) & pl.col("label").str.starts_with(PREFIX))
    out = {}
    for protocol in rows["protocol"].unique(maintain_order=True).to_list():
        mine = rows.filter(pl.col("protocol") == protocol)
        win = {(r["model"], r["label"].removeprefix(PREFIX)): r["point"] for r in mine.iter_rows(named=True)}
        present = set(mine["model"].to_list())
        order = [m for m in models if m in present] + sorted(present - set(models))
        out[protocol] = (order, [[None if a == b else win.get((a, b)) for b in order] for a in order])
    return out


def draw(table: pl.DataFrame, models: list[str], title: str) -> tuple["Figure", pl.DataFrame] | None:
    """The heatmaps and the cells they drew (protocol, model, other, p); None when no protocol ranked two models."""
    found = {p: m for p, m in matrices(table, models).items() if len(m[0]) > 1}
    if not found:
        return None
    n_rows, n_cols = grid_shape(len(found), 2)
    size = max(len(order) for order, _ in found.values())
    fig = new_figure(n_cols * (2.0 + 0.75 * size), n_rows * (1.6 + 0.6 * size))
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    drawn = []
    image = None
    for ax, (protocol, (order, matrix)) in zip(axes, found.items()):
        values = [[float("nan") if v is None else v for v in row] for row in matrix]
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdBu")
        ax.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(order)), order, fontsize=8)
        for i, a in enumerate(order):
            for j, b in enumerate(order):
                if matrix[i][j] is not None:
                    ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if abs(matrix[i][j] - 0.5) > 0.3 else "black")
                    drawn.append({"protocol": protocol, "model": a, "other": b, "p": matrix[i][j]})
        ax.set_title(f"{protocol}: P(row > column), macro AUROC", fontsize=10)
    for ax in axes[len(found):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[:len(found)]), shrink=0.8)
    fig.suptitle(f"{title}: pairwise win probabilities over the shared patient resamples", fontsize=10)
    return fig, pl.DataFrame(drawn)
