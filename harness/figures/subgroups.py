"""Subgroup plot: macro AUROC per subgroup (sex, age band) and the gaps between subgroups, point and 95% CI."""
from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from harness.figures.common import HOLLOW_NOTE, SIGNIFICANT, TITLE_SIZE, interval_panel, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FILE = "subgroups.png"
#: (metric, panel title, whether 0 is the line of no difference)
PANELS = (("subgroup_auroc", "macro AUROC per subgroup", False),
          ("subgroup_gap", "gap between subgroups (AUROC difference)", True))


def draw(table: pl.DataFrame, reference: str | None, title: str) -> tuple["Figure", pl.DataFrame] | None:
    """One panel per metric of PANELS that the table has, a row per (group, model); None when it has neither."""
    shown = [(m, t, z) for m, t, z in PANELS
             if not table.filter((pl.col("metric") == m) & pl.col("point").is_not_null()).is_empty()]
    if not shown:
        return None
    sizes = [table.filter(pl.col("metric") == m).height for m, _, _ in shown]
    fig = new_figure(5.5 * len(shown), 1.4 + 0.3 * max(sizes))
    axes = fig.subplots(1, len(shown), squeeze=False).ravel()
    drawn: list[dict] = []
    for ax, (metric, panel_title, zero) in zip(axes, shown):
        drawn += interval_panel(ax, table.filter(pl.col("metric") == metric), reference, zero_line=zero)
        ax.set_title(panel_title, fontsize=TITLE_SIZE)
    ref = f"square: reference `{reference}`; " if reference else ""
    hollow = f"; {HOLLOW_NOTE}" if any(d["outside"] for d in drawn) else ""
    fig.suptitle(f"{title}: subgroups, point and 95% CI\n({ref}{SIGNIFICANT}: p_holm < 0.05 in the results table"
                 f"{hollow})", fontsize=10)
    return fig, pl.DataFrame(drawn)
