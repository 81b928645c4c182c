"""The figure of a pretraining ablation (``python -m harness.ablate``: ``ablation.png``), drawn from its table
(``ablation.parquet``: one row per variant and metric, with the paired difference to the base variant).

One panel per (task, metric): every variant's point and 95% CI, grouped by the axis it changes (the base, at its
value, in every group of one axis; the base's step-0 weights last), a dotted line at the base, and over each
variant its paired difference to the base, with † where it is significant after Holm. The styles are the other
figures' (`harness.figures.common`): the base a black square, the others blue circles.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from harness.figures.common import OTHER_COLOUR, REFERENCE_COLOUR, SIGNIFICANT, new_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FILE = "ablation.png"
#: The variant every other one is compared with, and the row of its step-0 weights (the ablation's names).
BASE, INIT = "base", "init"
INIT_COLOUR = "grey"


def _group_members(rows: list[dict], group: str, base: dict | None, base_settings: dict[str, str]) -> list[dict]:
    """The rows of one axis group, the base first (at its value on that axis) when the group is one of its axes."""
    members = [r for r in rows if r["axis"] == group]
    if group in base_settings and base is not None:
        members.insert(0, {**base, "value": base_settings[group]})
    return members


def _panel(ax: Axes, rows: list[dict], groups: list[str], base_settings: dict[str, str]) -> None:
    """One metric's points, intervals and paired differences, grouped along x; each errorbar is labelled with its
    variant (what the tests read)."""
    base = next((r for r in rows if r["variant"] == BASE), None)
    x, ticks, labels = 0.0, [], []
    for g in groups:
        members = _group_members(rows, g, base, base_settings)
        if not members:
            continue
        start = x
        for r in members:
            is_base = r["variant"] == BASE
            lo = r["lo"] if r["lo"] is not None else r["point"]
            hi = r["hi"] if r["hi"] is not None else r["point"]
            ax.errorbar([x], [r["point"]], yerr=[[r["point"] - lo], [hi - r["point"]]],
                        fmt="s" if is_base else "o", capsize=3, label=r["variant"],
                        color=REFERENCE_COLOUR if is_base else (INIT_COLOUR if g == INIT else OTHER_COLOUR))
            if r["delta"] is not None:  # the paired difference to the base, † when significant after Holm
                ax.annotate(f"Δ {r['delta']:+.3f}{' ' + SIGNIFICANT if r['significant'] else ''}", (x, hi),
                            xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=7)
            ticks.append(x)
            labels.append(r["value"])
            x += 1
        ax.text((start + x - 1) / 2, -0.16, g, transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=9, fontweight="bold")
        x += 0.6
    if base is not None:
        ax.axhline(base["point"], color=REFERENCE_COLOUR, linewidth=0.8, linestyle=":")
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_xlim(-0.6, x - 1.0)  # x is past the last group here
    ax.margins(y=0.15)  # room for the Δ labels above the intervals
    ax.grid(axis="y", alpha=0.3)


def figure(rows: list[dict], base_settings: dict[str, str]) -> Figure:
    """The figure of the table's `rows` (columns task, axis, value, variant, metric, point, lo, hi, delta,
    significant); `base_settings`: the base variant's value on every axis."""
    metrics = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    others = dict.fromkeys(r["axis"] for r in rows if r["axis"] not in (*base_settings, BASE, INIT))
    groups = [*base_settings, *others, INIT]
    per_panel = len(rows) / max(len(metrics), 1) + len(groups)
    # Two panels a row from three metrics on, so a dozen metrics stay a readable page rather than a long strip.
    ncols = 1 if len(metrics) <= 2 else 2
    nrows = math.ceil(len(metrics) / ncols)
    fig = new_figure(ncols * max(6.0, 0.55 * per_panel + 2), 3.0 * nrows)
    panels = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in panels[len(metrics):]:
        ax.set_visible(False)
    for ax, (task, metric) in zip(panels, metrics):
        _panel(ax, [r for r in rows if (r["task"], r["metric"]) == (task, metric) and r["point"] is not None],
               groups, base_settings)
        ax.set_title(f"{task}: {metric}", fontsize=10)
    fig.suptitle(f"Point and 95% CI per variant (square: base)\nΔ: paired difference to the base; {SIGNIFICANT} "
                 "significant after Holm", fontsize=9)
    return fig
