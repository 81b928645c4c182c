"""Age calibration: true against predicted age on the test images, one panel per model, with the identity line;
the panel title carries the tidy table's age MAE and Pearson r (not recomputed)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from harness.figures.common import GRID_ALPHA, grid_shape, lookup, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FILE = "age_calibration.png"
#: Columns of `results/<name>/<model>.demographics.parquet` the scatter needs (null where the age is unknown).
DEMOGRAPHICS_COLUMNS = ("age", "age_pred")


def _value(row: dict | None, fmt: str) -> str:
    return "not in table" if row is None else format(row["point"], fmt)


def draw(demographics: dict[str, pl.DataFrame], table: pl.DataFrame | None, title: str
         ) -> tuple["Figure", pl.DataFrame] | None:
    """A panel per model with at least one test image of known age; returns the figure and, per model, the points
    drawn (age, age_pred) and the MAE and r of its title; None when no model has one."""
    ages = pl.col("age", "age_pred")
    known = {m: df.with_columns(ages.cast(pl.Float64).fill_nan(None)).drop_nulls(["age", "age_pred"])
             for m, df in demographics.items()}
    known = {m: df for m, df in known.items() if df.height}
    if not known:
        return None
    n_rows, n_cols = grid_shape(len(known), 4)
    fig = new_figure(3.8 * n_cols, 3.9 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    lo = min(min(df["age"].min(), df["age_pred"].min()) for df in known.values())
    hi = max(max(df["age"].max(), df["age_pred"].max()) for df in known.values())
    drawn = []
    for ax, (model, df) in zip(axes, known.items()):
        mae, r = (lookup(table, model, "demographics", m, "") for m in ("age_mae", "age_r"))
        ax.scatter(df["age"].to_numpy(), df["age_pred"].to_numpy(), s=10, alpha=0.6, color="tab:blue",
                   edgecolors="none")
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle=":", label="identity")
        ax.set_xlim(lo - 2, hi + 2)
        ax.set_ylim(lo - 2, hi + 2)
        ax.set_aspect("equal")
        ax.set_xlabel("true age (years)")
        ax.set_ylabel("predicted age (years)")
        ax.set_title(f"{model}\nMAE {_value(mae, '.2f')} years, r {_value(r, '.3f')}", fontsize=9)
        ax.grid(alpha=GRID_ALPHA)
        drawn.append({"model": model, "age": df["age"].to_list(), "age_pred": df["age_pred"].to_list(),
                      "age_mae": None if mae is None else mae["point"], "age_r": None if r is None else r["point"]})
    for ax in axes[len(known):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: age predicted by the ridge probe against the true age (test images; dotted: identity)",
                 fontsize=10)
    return fig, pl.DataFrame(drawn)
