"""The one figure style of the project, for the harness's figures (``harness.figures``) and the trainer's learning
curves (``trainer.plot``) alike: a headless figure, the look every panel shares, and PNG bytes that depend only on
what is drawn.

matplotlib is imported inside the functions, not here: its first import builds a font cache, which importing a
module that may draw should not pay."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Font sizes of a panel's title and of a legend inside a panel.
TITLE_SIZE, LEGEND_SIZE = 10, 7
#: Opacity of the background grid and of a confidence band drawn around a line.
GRID_ALPHA, BAND_ALPHA = 0.3, 0.2
#: The resolution every PNG is saved at.
DPI = 100


def new_figure(width: float, height: float) -> "Figure":
    """A figure (inches) with constrained layout on the Agg canvas. The canvas is used directly, so no pyplot state
    or global backend is touched: this works headless and leaves a caller's own matplotlib set-up alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def style_panel(ax: "Axes", title: str, grid_axis: str = "both") -> None:
    """A panel's title and background grid, in the shared sizes."""
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.grid(axis=grid_axis, alpha=GRID_ALPHA)


def png_bytes(fig: "Figure", software: str, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes. `software` is the PNG's Software text chunk, fixed by the caller (say
    ``"raddino-bench harness.figures"``) in place of matplotlib's version, so that the bytes depend on what is
    drawn and not on the installed matplotlib or the date."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": software})
    return buf.getvalue()
