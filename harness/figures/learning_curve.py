"""The learning curve of a pretraining run as a whole-image descriptor: macro AUROC of the linear and k-NN probes
against training steps (and CPU-hours), on the validation patients and on the test patients, beside the floors.

    python -m harness.figures.learning_curve RUN EVAL_OUT --task NAME [--out PNG]

- RUN: the training run (``metrics.jsonl`` gives the CPU-hours axis from its ``cpu_s`` column, when logged;
  ``validation.jsonl``, written by ``python -m trainer.monitor RUN --task ...``, gives the validation points).
- EVAL_OUT: a ``harness.run --out`` folder whose models include the run's step-0 weights and checkpoints, named
  ``ckpt:RUN/init`` and ``ckpt:RUN/checkpoints/ckpt_NNNNNNN`` (the iteration is read from the name). Every other
  model of that table (``pixels``, ``random-vit``, ...) is drawn as a floor: a horizontal line with its CI band.

Test points carry their 95% patient-clustered bootstrap CI; validation points are the monitor's point estimates
(its split is the one recipes and checkpoints are chosen on; the test split is only reported). One pooling: the
table's own (``global_pool``), and the validation keys of the same pooling.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from harness.common.atomic import atomic_write_bytes
from harness.common.errors import UsageError, add_verbose_flag, command
from harness.figures.common import GRID_ALPHA, FigureInputError, new_figure, png_bytes, read_tidy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROBES = (("linear", "linear probe"), ("knn", "k-NN probe"))
DEFAULT_PNG = "learning_curve.png"
_CKPT = re.compile(r"(?:^|/)ckpt_(\d+)/?$")
_INIT = re.compile(r"(?:^|/)init/?$")


@dataclass
class Curve:
    iterations: list[int]
    point: list[float]
    lo: list[float | None] = field(default_factory=list)
    hi: list[float | None] = field(default_factory=list)


@dataclass
class Floor:
    model: str
    point: float
    lo: float | None
    hi: float | None


@dataclass
class CurveData:
    """Exactly what `draw` plots, per probe: the test curve (with CIs), the validation curve and the floors."""

    task: str
    pool: str
    test: dict[str, Curve]
    validation: dict[str, Curve]
    floors: dict[str, list[Floor]]
    cpu_hours: tuple[list[int], list[float]] | None  # (iteration, cumulative CPU-hours), from metrics.jsonl


def checkpoint_iteration(model: str) -> int | None:
    """The iteration a ``ckpt:`` model name points at (``.../init`` is 0, ``.../ckpt_0000600`` is 600); None for
    any other model."""
    if not model.startswith("ckpt:"):
        return None
    path = model.removeprefix("ckpt:")
    if _INIT.search(path):
        return 0
    m = _CKPT.search(path)
    return int(m.group(1)) if m else None


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise FigureInputError(f"{path}, line {n}: not JSON ({e}); regenerate the file") from None
    return rows


def cpu_hours(metrics: Path) -> tuple[list[int], list[float]] | None:
    """(iterations, cumulative CPU-hours at each) from the run's ``cpu_s`` column (CPU seconds since the previous
    logged row), starting at (0, 0); None when the run did not log it (runs before the column existed)."""
    if not metrics.is_file():
        return None
    rows = [r for r in _jsonl(metrics) if "cpu_s" in r and "iteration" in r]
    if not rows:
        return None
    its = [0] + [int(r["iteration"]) for r in rows]
    hours = np.concatenate([[0.0], np.cumsum([float(r["cpu_s"]) for r in rows]) / 3600]).tolist()
    return its, hours


def curve_data(run: Path, evaluation: Path, task: str) -> CurveData:
    """Read the run's and the evaluation's files (FigureInputError naming the file when one is missing)."""
    table_path = evaluation / "results" / f"{task}.parquet"
    if not table_path.is_file():
        raise FigureInputError(f"{table_path} does not exist: pass a harness.run --out folder and the task's output "
                               "name (as in <name>.md)")
    table = read_tidy(table_path).filter((pl.col("metric") == "auroc") & (pl.col("label") == "macro"))
    pools = table["global_pool"].unique().to_list() if "global_pool" in table.columns else ["cls"]
    pool = pools[0] if pools else "cls"
    test: dict[str, Curve] = {}
    floors: dict[str, list[Floor]] = {}
    for probe, _ in PROBES:
        rows = sorted(((checkpoint_iteration(r["model"]), r) for r in
                       table.filter(pl.col("protocol") == probe).iter_rows(named=True)),
                      key=lambda x: (x[0] is None, x[0] or 0))
        on_curve = [(it, r) for it, r in rows if it is not None and r["point"] is not None]
        test[probe] = Curve([it for it, _ in on_curve], [r["point"] for _, r in on_curve],
                            [r["lo"] for _, r in on_curve], [r["hi"] for _, r in on_curve])
        floors[probe] = [Floor(r["model"], r["point"], r["lo"], r["hi"]) for it, r in rows
                         if it is None and r["point"] is not None]
    validation: dict[str, Curve] = {}
    val_path = run / "validation.jsonl"
    val_rows = sorted(_jsonl(val_path), key=lambda r: r["iteration"]) if val_path.is_file() else []
    for probe, _ in PROBES:
        key = f"probe_{probe}_auroc_{pool}"
        hits = [(int(r["iteration"]), float(r[key])) for r in val_rows if r.get(key) is not None]
        validation[probe] = Curve([i for i, _ in hits], [v for _, v in hits])
    if not any(c.iterations for c in test.values()) and not any(c.iterations for c in validation.values()):
        raise FigureInputError(f"nothing to draw: no ckpt:.../init or ckpt:.../ckpt_N model in {table_path} and no "
                               f"{val_path}; evaluate the run's checkpoints by name, or run trainer.monitor")
    return CurveData(task, pool, test, validation, floors, cpu_hours(run / "metrics.jsonl"))


def draw(data: CurveData) -> "Figure":
    if data.cpu_hours is not None:
        its, hours = (np.asarray(a, dtype=float) for a in data.cpu_hours)
        if len(its) > 1:  # extend linearly past both ends: np.interp clamps, which piles the axis margin's ticks up
            far = 1e6 * max(1.0, its[-1])
            lead, tail = (hours[1] - hours[0]) / (its[1] - its[0]), (hours[-1] - hours[-2]) / (its[-1] - its[-2])
            its = np.concatenate([[its[0] - far], its, [its[-1] + far]])
            hours = np.concatenate([[hours[0] - lead * far], hours, [hours[-1] + tail * far]])
        to_hours = (lambda x: np.interp(x, its, hours), lambda h: np.interp(h, hours, its))
    fig = new_figure(11, 4.2)
    axes = fig.subplots(1, len(PROBES), sharey=True)
    for ax, (probe, title) in zip(axes, PROBES):
        t, v = data.test[probe], data.validation[probe]
        if t.iterations:
            err = np.array([[max(0.0, p - lo) if lo is not None else 0.0 for p, lo in zip(t.point, t.lo)],
                            [max(0.0, hi - p) if hi is not None else 0.0 for p, hi in zip(t.point, t.hi)]])
            ax.errorbar(t.iterations, t.point, yerr=err, fmt="o-", capsize=3, color="tab:blue",
                        label="test patients (95% CI)")
        if v.iterations:
            ax.plot(v.iterations, v.point, "s--", color="tab:orange", label="validation patients")
        for k, f in enumerate(data.floors[probe]):
            colour = f"C{k + 2}"
            ax.axhline(f.point, color=colour, linestyle=":", label=f"{f.model} (test)")
            if f.lo is not None and f.hi is not None:
                ax.axhspan(f.lo, f.hi, color=colour, alpha=0.12, linewidth=0)
        ax.set_title(f"{title}, macro AUROC ({data.pool})")
        ax.set_xlabel("training step")
        ax.grid(alpha=GRID_ALPHA)
        if data.cpu_hours is not None:
            ax.secondary_xaxis("top", functions=to_hours).set_xlabel("CPU-hours")
    axes[0].set_ylabel("macro AUROC")
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{data.task}: the run's teacher against its step-0 weights (step 0) and the floors")
    return fig


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.figures.learning_curve",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the training run directory")
    p.add_argument("evaluation", type=Path, help="a harness.run --out folder with the run's checkpoints as models")
    p.add_argument("--task", required=True, help="the task's output name in that folder (as in <name>.md)")
    p.add_argument("--out", type=Path, default=None, help=f"the PNG (default: RUN/{DEFAULT_PNG})")
    add_verbose_flag(p)
    args = p.parse_args(argv)
    try:
        data = curve_data(args.run, args.evaluation, args.task)
    except FigureInputError as e:  # a folder or file named on the command line that does not hold what it should
        raise UsageError(str(e)) from None
    out = args.out or args.run / DEFAULT_PNG
    atomic_write_bytes(out, png_bytes(draw(data)))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
