"""Forest plot of a task's headline metrics: every model's point and 95% CI, one panel per (protocol, metric)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from harness.figures.common import SIGNIFICANT, grid_shape, interval_panel, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FILE = "forest.png"
#: Panels in the order the leaderboard shows the protocols; a protocol not listed comes after, in table order.
PROTOCOL_ORDER = ("linear", "knn", "seg", "demographics", "label-efficiency")


def headline_rows(table: pl.DataFrame) -> pl.DataFrame:
    """The rows a forest plot shows: macro means and label-less metrics (the leaderboard's headline columns), plus
    segmentation's per-structure Dice (its headline, one row per structure). Per-label, per-subgroup and
    per-fraction rows belong to the other figures."""
    dice = (pl.col("protocol") == "seg") & pl.col("metric").str.starts_with("dice")
    return table.filter(pl.col("label").is_in(["", "macro"]) | dice)


def panels(rows: pl.DataFrame) -> list[tuple[str, str]]:
    """(protocol, metric) pairs, protocols in PROTOCOL_ORDER, metrics in the order the table lists them."""
    pairs = list(dict.fromkeys(zip(rows["protocol"].to_list(), rows["metric"].to_list())))
    rank = {p: i for i, p in enumerate(PROTOCOL_ORDER)}
    return sorted(pairs, key=lambda pm: rank.get(pm[0], len(rank)))  # stable: table order within a protocol


def draw(table: pl.DataFrame, reference: str | None, title: str) -> tuple["Figure", pl.DataFrame] | None:
    """The forest plot and the points it drew (model, protocol, metric, label, point, lo, hi, significant,
    reference); None when the table has no headline row with a point."""
    rows = headline_rows(table).filter(pl.col("point").is_not_null())
    if rows.is_empty():
        return None
    pairs = panels(rows)
    n_rows, n_cols = grid_shape(len(pairs), 3)
    tallest = max(rows.filter((pl.col("protocol") == p) & (pl.col("metric") == m)).height for p, m in pairs)
    fig = new_figure(5.0 * n_cols, n_rows * (1.2 + 0.28 * tallest))
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    drawn: list[dict] = []
    for ax, (protocol, metric) in zip(axes, pairs):
        mine = rows.filter((pl.col("protocol") == protocol) & (pl.col("metric") == metric))
        drawn += interval_panel(ax, mine, reference)
        macro = " (macro)" if (mine["label"] == "macro").all() else ""
        ax.set_title(f"{protocol}: {metric}{macro}", fontsize=10)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    ref = f"square: reference `{reference}`; " if reference else ""
    fig.suptitle(f"{title}: headline metrics, point and 95% CI\n({ref}{SIGNIFICANT} paired difference to the "
                 "reference significant after Holm, p < 0.05)", fontsize=10)
    return fig, pl.DataFrame(drawn)
