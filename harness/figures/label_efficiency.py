"""The label-efficiency curves: per model, macro AUROC against the fraction of training patients (log axis) with its
95% interval as a band. The label-efficiency protocol draws it from its own curves into
``<name>_label_efficiency.png`` beside the leaderboard (docs/protocols.md)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from harness.figures.common import BAND_ALPHA, LEGEND_SIZE, new_figure, style_panel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Said on the figure beside a hollow point: its macro averages another label set than the full training split's.
OTHER_LABELS_NOTE = "hollow: macro over another label set than at the largest fraction (not joined)"


def figure_file(out_name: str) -> str:
    """The figure's file name beside the leaderboard ``<out_name>.md``."""
    return f"{out_name}_label_efficiency.png"


def fraction_label(f: float) -> str:
    """A fraction as the section's columns and the figure's ticks name it (0.1 -> ``10%``)."""
    return f"{100 * f:g}%"


def _segments(flags: list[bool]) -> list[list[int]]:
    """Runs of consecutive indices with the same flag, as index lists."""
    runs: list[list[int]] = []
    for i, flag in enumerate(flags):
        if runs and flags[runs[-1][-1]] == flag:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def draw(curves: dict[str, list[dict]], title: str) -> "Figure":
    """The curves, per model its points with their interval band; the tests compare its plotted values with the
    section's. `curves[model]` are rows with "fraction", "labels" (the macro's label names) and the macro summary
    "macro_auroc" ({"point", "lo", "hi"}).

    A point whose macro averages other labels than the model's largest fraction is drawn hollow and is not joined
    to the others by the line (a line through it would read as one curve over one label set); the figure says so."""
    fig = new_figure(6.0, 4.0)
    ax = fig.subplots()
    other_labels = False
    for i, (model, rows) in enumerate(curves.items()):
        shown = [r for r in rows if r["macro_auroc"]["point"] is not None]
        if not shown:
            continue
        full = set(max(shown, key=lambda r: r["fraction"])["labels"])
        same = [set(r["labels"]) == full for r in shown]
        other_labels |= not all(same)
        colour = f"C{i % 10}"  # the model's colour in matplotlib's default cycle, for its points and its band
        for k, run in enumerate(_segments(same)):
            part = [shown[i] for i in run]
            x, y = [r["fraction"] for r in part], [r["macro_auroc"]["point"] for r in part]
            if same[run[0]]:
                ax.plot(x, y, marker="o", color=colour, label=model if k == 0 else None)
            else:  # unjoined, hollow points
                ax.plot(x, y, marker="o", linestyle="none", fillstyle="none", color=colour,
                        label=model if k == 0 else None)
        banded = [r for r in shown if r["macro_auroc"]["lo"] is not None]
        ax.fill_between([r["fraction"] for r in banded], [r["macro_auroc"]["lo"] for r in banded],
                        [r["macro_auroc"]["hi"] for r in banded], color=colour, alpha=BAND_ALPHA, linewidth=0)
    if ax.get_lines():
        ax.set_xscale("log")
        # Ticks at the fractions themselves, as percentages (the section's column names), not powers of ten.
        fractions = sorted({r["fraction"] for rows in curves.values() for r in rows})
        ax.set_xticks(fractions, [fraction_label(f) for f in fractions])
        ax.minorticks_off()
        ax.legend(fontsize=LEGEND_SIZE)
        if other_labels:
            ax.text(0.01, 0.01, OTHER_LABELS_NOTE, fontsize=LEGEND_SIZE, transform=ax.transAxes, va="bottom")
    else:  # a log axis needs data: say why the figure is empty instead
        ax.text(0.5, 0.5, "no evaluable label at any fraction", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("fraction of training patients")
    ax.set_ylabel("macro AUROC (95% CI over draws and test resamples)")
    style_panel(ax, title)
    return fig
