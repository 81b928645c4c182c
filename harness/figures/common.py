"""What every figure of a harness run shares: reading the saved files it draws from (with their schema checked), its
PNG bytes, the point-and-interval panel of the forest and subgroup plots, and the look every figure shares. That look
and the headless figure live in `harness.common.plotting`, under the trainer's plot too; they are re-exported here so
that a harness figure takes everything it shares from this one module."""
from __future__ import annotations

import math
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from harness import tidy
from harness.common import plotting
from harness.common.plotting import BAND_ALPHA as BAND_ALPHA, GRID_ALPHA as GRID_ALPHA  # re-exported (see above)
from harness.common.plotting import LEGEND_SIZE as LEGEND_SIZE, TITLE_SIZE as TITLE_SIZE
from harness.common.plotting import new_figure as new_figure, style_panel as style_panel

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Columns of the tidy results table `results/<name>.parquet`, one row per (model, protocol, metric, label).
TIDY_COLUMNS = tidy.COLUMNS
_FLOATS = ("point", "lo", "hi", "delta", "p_holm")
#: Significance mark, as in the leaderboards: the paired difference to the reference after Holm.
SIGNIFICANT = "†"
ALPHA = tidy.ALPHA
REFERENCE_COLOUR, OTHER_COLOUR = "black", "tab:blue"
#: Said in a figure's title when one of its points is drawn hollow (`interval_panel`).
HOLLOW_NOTE = "hollow: point outside its interval"
#: The Software text chunk of every harness PNG (`harness.common.plotting.png_bytes`).
SOFTWARE = "raddino-bench harness.figures"


class FigureInputError(ValueError):
    """A saved file a figure reads is unreadable or lacks a column; the message names the file and the fix."""


def note(text: str) -> None:
    """A figure that is not drawn says why (logged on stderr, hidden by -q), without stopping the others."""
    logging.getLogger("harness.figures").info(f"note: {text}")


def read_checked(path: Path, columns: Sequence[str], what: str) -> pl.DataFrame:
    """The parquet file at `path`, which must hold `columns`; FigureInputError naming the file otherwise."""
    try:
        df = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise FigureInputError(f"{path}: cannot read {what} as parquet ({type(e).__name__}: {e}); regenerate it "
                               "with `python -m harness.run`") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FigureInputError(f"{path}: {what} lacks column(s) {', '.join(missing)} (expected "
                               f"{', '.join(columns)}); regenerate it with `python -m harness.run`")
    return df


def read_tidy(path: Path) -> pl.DataFrame:
    """The tidy results table, its numbers as floats (null where a metric has none) and its empty label as ""."""
    df = read_checked(path, TIDY_COLUMNS, "the tidy results table")
    try:
        return df.with_columns(pl.col(*_FLOATS).cast(pl.Float64).fill_nan(None),
                               pl.col("label").cast(pl.Utf8).fill_null(""),
                               pl.col("model", "protocol", "metric").cast(pl.Utf8))
    except pl.exceptions.PolarsError as e:
        raise FigureInputError(f"{path}: the tidy results table has a non-numeric value in "
                               f"{', '.join(_FLOATS)} ({e}); regenerate it with `python -m harness.run`") from None


def lookup(table: pl.DataFrame | None, model: str, protocol: str, metric: str, label: str) -> dict | None:
    """The tidy row of one (model, protocol, metric, label), or None when the table has none (or no point)."""
    if table is None:
        return None
    hit = table.filter((pl.col("model") == model) & (pl.col("protocol") == protocol)
                       & (pl.col("metric") == metric) & (pl.col("label") == label))
    if hit.is_empty() or hit["point"][0] is None:
        return None
    return hit.row(0, named=True)


def png_bytes(fig: "Figure") -> bytes:
    """A harness figure as PNG bytes, the same for the same drawing (no date, no matplotlib version)."""
    return plotting.png_bytes(fig, SOFTWARE)


def grid_shape(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return math.ceil(n / cols), cols


def is_headline(label: str) -> bool:
    """A macro mean or a metric without a label: shown by the model name alone."""
    return label in ("", "macro")


def point_outside(point: float, lo: float, hi: float) -> bool:
    """Whether `point` lies outside [lo, hi] by more than rounding. A percentile interval need not contain its point
    estimate (a skewed or tiny bootstrap distribution); but a point that equals an interval end computed along
    another summation order differs from it in the last bits (-0.6054107221936009 against -0.605410722193601),
    which is not "outside"."""
    slack = 1e-9 * max(1.0, abs(point))
    return point < lo - slack or point > hi + slack


def error_bar(point: float, lo: float, hi: float) -> list[list[float]]:
    """matplotlib's xerr for one point: its distances to the interval ends, each at least 0 (matplotlib rejects a
    negative one, and a point outside its interval has one; it is then drawn hollow, its bar reaching only the
    side the interval lies on)."""
    return [[max(0.0, point - lo)], [max(0.0, hi - point)]]


def interval_panel(ax: "Axes", rows: pl.DataFrame, reference: str | None, zero_line: bool = False) -> list[dict]:
    """One point with its 95% CI per row of `rows` (columns of the tidy table), grouped by label in the order the
    rows come in, top to bottom: the reference model a black square with "(ref)" after its name, the others blue
    circles, hollow when the point lies outside its interval (`point_outside`), † right of the interval where
    p_holm < 0.05. A row without an interval is drawn as a point. Returns what was plotted, one dict per point (rows
    without a point are left out: nothing to draw)."""
    drawn, ticks, names, y = [], [], [], 0.0
    for label in rows["label"].unique(maintain_order=True):
        for r in rows.filter(pl.col("label") == label).iter_rows(named=True):
            if r["point"] is None:
                continue
            ref = r["model"] == reference
            ci = r["lo"] is not None and r["hi"] is not None
            outside = ci and point_outside(r["point"], r["lo"], r["hi"])
            ax.errorbar([r["point"]], [y], xerr=error_bar(r["point"], r["lo"], r["hi"]) if ci else None,
                        fmt="s" if ref else "o", capsize=3, color=REFERENCE_COLOUR if ref else OTHER_COLOUR,
                        fillstyle="none" if outside else "full")
            sig = r["p_holm"] is not None and r["p_holm"] < ALPHA
            if sig:
                ax.annotate(SIGNIFICANT, (max(r["hi"], r["point"]) if ci else r["point"], y), xytext=(3, 0),
                            textcoords="offset points", va="center", ha="left", fontsize=9)
            name = r["model"] + (" (ref)" if ref else "")
            names.append(name if is_headline(label) else f"{label}: {name}")
            ticks.append(y)
            drawn.append({"model": r["model"], "protocol": r["protocol"], "metric": r["metric"], "label": label,
                          "point": r["point"], "lo": r["lo"], "hi": r["hi"], "significant": sig, "reference": ref,
                          "outside": outside, "y": y})
            y += 1.0
        y += 0.5  # a gap between label groups
    if zero_line:
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_ylim(y - 0.5, -1.0)  # inverted: the first row at the top
    ax.margins(x=0.12)  # room for the † right of the widest interval
    ax.grid(axis="x", alpha=plotting.GRID_ALPHA)
    return drawn
