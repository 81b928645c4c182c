"""Forest plot of a task's headline metrics: every model's point and 95% CI, one panel per (protocol, metric)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from harness.figures.common import HOLLOW_NOTE, SIGNIFICANT, TITLE_SIZE, grid_shape, interval_panel, new_figure
from harness.probes import PROTOCOLS
from harness.tidy import COST

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FILE = "forest.png"
#: the tidy metrics of `harness.ranks.ranked_rows`: not metrics on the forest's scales
RANK_PREFIXES = ("rank_", "p_best_", "win_")


def headline_rows(table: pl.DataFrame) -> pl.DataFrame:
    """The rows a forest plot shows: macro means and label-less metrics (the leaderboard's headline columns), plus
    segmentation's per-structure Dice (its headline, one row per structure). Per-label, per-subgroup and
    per-fraction rows belong to the other figures, and the cost rows (counts and rates, no interval) to none."""
    dice = (pl.col("protocol") == "seg") & pl.col("metric").str.starts_with("dice")
    ranked = pl.any_horizontal(pl.col("metric").str.starts_with(p) for p in RANK_PREFIXES)  # drawn by figures.wins
    return table.filter((pl.col("label").is_in(["", "macro"]) | dice) & ~ranked & (pl.col("protocol") != COST))


def panels(rows: pl.DataFrame) -> list[tuple[str, str]]:
    """(protocol, metric) pairs: protocols in the leaderboard's order, the protocol table's run order
    (`PROTOCOLS.ordered`), then any protocol the table does not know, in the order the rows list them; metrics in
    the order the rows list them."""
    pairs = list(dict.fromkeys(zip(rows["protocol"].to_list(), rows["metric"].to_list())))
    rank = {p: i for i, p in enumerate(PROTOCOLS.ordered(PROTOCOLS))}
    return sorted(pairs, key=lambda pm: rank.get(pm[0], len(rank)))  # stable: row order within a protocol


def family(metric: str) -> str:
    """The scale a metric is read on: panels of one family share their x range, so that equal differences look
    equal across panels (with a range per panel, 0.002 between two k-NN AUROCs can fill one). AUROCs of any protocol
    (``auroc``, ``sex_auroc``) are one family, Dice of any head another (``dice_linear``, ``dice_multi-level``), IoU
    another; any other metric (an MAE in years, an R^2) is its own."""
    for name in ("auroc", "auprc"):
        if metric == name or metric.endswith(f"_{name}"):
            return name
    return metric.split("_")[0] if metric.startswith(("dice_", "iou_")) else metric


def family_ranges(rows: pl.DataFrame, pad: float = 0.12) -> dict[str, tuple[float, float]]:
    """Per metric family, the x range that holds every point and interval end of its rows, widened by `pad` of
    its width each side (room for the † right of the widest interval); a family whose values are all equal gets
    a range of 0.02 around them."""
    values: dict[str, list[float]] = {}
    for r in rows.iter_rows(named=True):
        values.setdefault(family(r["metric"]), []).extend(v for v in (r["point"], r["lo"], r["hi"]) if v is not None)
    out = {}
    for name, vs in values.items():
        lo, hi = min(vs), max(vs)
        margin = pad * (hi - lo) if hi > lo else 0.01
        out[name] = (lo - margin, hi + margin)
    return out


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
    ranges = family_ranges(rows)
    for ax, (protocol, metric) in zip(axes, pairs):
        mine = rows.filter((pl.col("protocol") == protocol) & (pl.col("metric") == metric))
        drawn += interval_panel(ax, mine, reference)
        ax.set_xlim(*ranges[family(metric)])
        macro = " (macro)" if (mine["label"] == "macro").all() else ""
        ax.set_title(f"{protocol}: {metric}{macro}", fontsize=TITLE_SIZE)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    ref = f"square: reference `{reference}`; " if reference else ""
    hollow = f"; {HOLLOW_NOTE}" if any(d["outside"] for d in drawn) else ""
    fig.suptitle(f"{title}: headline metrics, point and 95% CI, x range shared per metric family\n({ref}"
                 f"{SIGNIFICANT} paired difference to the reference significant after Holm, p < 0.05{hollow})",
                 fontsize=10)
    return fig, pl.DataFrame(drawn)
