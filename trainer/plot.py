"""Learning curves of a pretraining run, from its RUN_DIR/metrics.jsonl, as one PNG.

    python -m trainer.plot RUN_DIR [--out PNG]      # default RUN_DIR/learning_curves.png

Panels, each against the iteration and drawn only when the run logged its keys (older runs lack the collapse
diagnostics and the probe):
  losses            total, dino, ibot, koleo
  entropies         teacher target entropy (CLS, patch), student entropy (CLS), KL(teacher || student) (CLS),
                    with ln K (uniform targets) and 0 (one-hot targets) as the two collapse limits
  teacher features  mean per-dimension std of the L2-normalised teacher CLS features (0 = all images alike)
  prototypes used   prototypes that are some image's argmax this step (1 = one prototype for everything)
  prototype gain    mean weight-norm gain of the teacher's prototypes (towards 0 flattens every distribution)
  lr, teacher temperature, momentum
  probe             every ``probe_*`` score (AUROC, r), with its ``probe_*_lo`` / ``probe_*_hi`` interval as a band;
  probe error       the ``probe_*_mae`` metrics (years), on their own axis

`figure_data` returns exactly the series drawn, so what the PNG shows can be checked against the JSON lines.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.common.atomic import atomic_write_bytes
from harness.common.errors import UsageError, add_verbose_flag, command
from harness.common.paths import check_writable_folder
from harness.common.plotting import BAND_ALPHA, LEGEND_SIZE, new_figure, png_bytes, style_panel

METRICS = "metrics.jsonl"
DEFAULT_PNG = "learning_curves.png"
#: The PNG's Software text chunk (`harness.common.plotting.png_bytes`): no matplotlib version, no date.
SOFTWARE = "raddino-bench trainer.plot"


@dataclass
class Series:
    key: str                        # the metrics.jsonl key the points come from
    label: str
    x: list[int]                    # iterations of the lines that have the key, in file order
    y: list[float]
    lo: list[float] | None = None   # confidence band (probe metrics with _lo and _hi keys)
    hi: list[float] | None = None
    dashed: bool = False


@dataclass
class Panel:
    title: str
    series: list[Series]
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label) reference lines


# (key, label, dashed) per panel; a panel whose keys were never logged is left out.
_PANELS: list[tuple[str, list[tuple[str, str, bool]]]] = [
    ("losses", [("loss", "total", False), ("dino", "dino", False), ("ibot", "ibot", False),
                ("koleo", "koleo", False)]),
    ("entropies (nats)", [("target_entropy_cls", "teacher target, CLS", False),
                          ("target_entropy_patch", "teacher target, patch", False),
                          ("student_entropy_cls", "student, CLS", False),
                          ("kl_teacher_student_cls", "KL(teacher || student), CLS", False),
                          ("ln_k", "ln K (uniform)", True)]),
    ("teacher CLS feature std", [("teacher_feature_std", "teacher_feature_std", False)]),
    ("prototypes used", [("prototypes_used", "prototypes_used", False)]),
    ("teacher prototype gain", [("prototype_gain", "prototype_gain", False)]),
    ("learning rate", [("lr", "lr", False)]),
    ("teacher temperature", [("teacher_temp", "teacher_temp", False)]),
    ("teacher momentum", [("momentum", "momentum", False)]),
]


class MetricsError(ValueError):
    """metrics.jsonl is missing or unreadable; the message names the file and what to do."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The JSON objects of RUN_DIR/metrics.jsonl, in file order (training lines and probe lines alike); a partial
    last line, the one a running run is writing or a killed one left, is left out."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise MetricsError(f"{path} not found: RUN_DIR must be a trainer run directory (the --output of "
                           "python -m trainer.train) that has logged at least one step")
    rows = []
    text = path.read_text()
    lines = text.splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):  # the line a running (or killed) run is writing
                continue
            raise MetricsError(f"{path}:{n}: not a JSON line ({e}); delete or repair that line") from e
        if not isinstance(row, dict) or "iteration" not in row:
            raise MetricsError(f"{path}:{n}: expected a JSON object with an 'iteration' key")
        rows.append(row)
    if not rows:
        raise MetricsError(f"{path} has no lines yet: wait for the first logged step (run.log_every)")
    return rows


def _series(rows: list[dict], key: str, label: str, dashed: bool = False) -> Series | None:
    have = [r for r in rows if r.get(key) is not None]
    if not have:
        return None
    return Series(key, label, [int(r["iteration"]) for r in have], [float(r[key]) for r in have], dashed=dashed)


def _probe_series(rows: list[dict]) -> list[Series]:
    keys = sorted({k for r in rows for k in r if k.startswith("probe_") and not k.endswith(("_lo", "_hi"))})
    out = []
    for key in keys:
        s = _series(rows, key, key.removeprefix("probe_"))
        lo_key, hi_key = f"{key}_lo", f"{key}_hi"
        have = [r for r in rows if r.get(key) is not None]
        # A band only when every point has both bounds: a partial band would be drawn against the wrong points.
        if all(r.get(lo_key) is not None and r.get(hi_key) is not None for r in have):
            s.lo = [float(r[lo_key]) for r in have]
            s.hi = [float(r[hi_key]) for r in have]
        out.append(s)
    return out


def figure_data(rows: list[dict]) -> list[Panel]:
    """The panels and series `plot` draws from these metrics lines (see the module docstring)."""
    panels = []
    for title, specs in _PANELS:
        series = [s for key, label, dashed in specs if (s := _series(rows, key, label, dashed)) is not None]
        if not series:
            continue
        panel = Panel(title, series)
        if title.startswith("entropies"):
            panel.hlines.append((0.0, "0 (one-hot)"))
        if title == "prototypes used":
            ln_k = _series(rows, "ln_k", "ln K")
            if ln_k is not None:
                panel.hlines.append((float(round(math.exp(ln_k.y[-1]))), "K"))
        panels.append(panel)
    probe = _probe_series(rows)
    # Scores in [-1, 1] (AUROC, r) and errors in the task's units (age MAE, years) get separate axes, so that
    # neither squashes the other.
    scores = [s for s in probe if not s.key.endswith("_mae")]
    errors = [s for s in probe if s.key.endswith("_mae")]
    if scores:
        panels.append(Panel("probe", scores))
    if errors:
        panels.append(Panel("probe error (years)", errors))
    return panels


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the learning-curve PNG of a run; returns its path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    panels = figure_data(rows)
    out = Path(out) if out is not None else run_dir / DEFAULT_PNG
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure(6.0 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        for s in panel.series:
            (line,) = ax.plot(s.x, s.y, "--" if s.dashed else "-", marker="." if len(s.x) < 30 else None,
                              label=s.label)
            if s.lo is not None:
                ax.fill_between(s.x, s.lo, s.hi, color=line.get_color(), alpha=BAND_ALPHA, linewidth=0)
        for y, label in panel.hlines:
            ax.axhline(y, color="grey", linewidth=0.8, linestyle=":", label=label)
        style_panel(ax, panel.title)
        ax.set_xlabel("iteration")
        if len(panel.series) + len(panel.hlines) > 1:
            ax.legend(fontsize=LEGEND_SIZE)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{run_dir.resolve().name}: {len(rows)} metrics lines, last iteration "
                 f"{max(int(r['iteration']) for r in rows)}")
    atomic_write_bytes(out, png_bytes(fig, SOFTWARE))
    return out


PROG = "python -m trainer.plot"
EXAMPLES = """\
examples:
  %(prog)s runs/exp1                          # runs/exp1/learning_curves.png
  %(prog)s runs/exp1 --out figures/exp1.png
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trainer run directory (holds metrics.jsonl)")
    p.add_argument("--out", help=f"PNG to write (default RUN_DIR/{DEFAULT_PNG})")
    add_verbose_flag(p)
    return p


@command
def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run_dir) / DEFAULT_PNG
    check_writable_folder(out.parent, "--out")
    try:
        out = plot(args.run_dir, args.out)
    except MetricsError as e:  # no metrics.jsonl, or a damaged one: the RUN_DIR given is not one to plot
        raise UsageError(str(e)) from None
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
