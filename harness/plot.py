"""``python -m harness.plot RUN_OUT [--task NAME]``: redraw every figure of a harness run from its saved files.

RUN_OUT is a folder ``python -m harness.run --out`` wrote (``<name>.md``, ``results/<name>.parquet``,
``results/<name>/...``). Nothing is recomputed: the figures read the tidy table and the per-image files, and are
written to ``RUN_OUT/figures/<name>/*.png``, whose paths are printed. See docs/figures.md."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.common.errors import DataError, UsageError, add_verbose_flag, command
from harness.common.paths import check_writable_folder
from harness.figures import FigureInputError, draw_task_figures


def task_names(out: Path) -> list[str]:
    """The tasks with results in `out`: a tidy table ``results/<name>.parquet`` or a folder ``results/<name>/``."""
    results = out / "results"
    if not results.is_dir():
        return []
    names = {p.stem for p in results.glob("*.parquet")} | {p.name for p in results.iterdir() if p.is_dir()}
    return sorted(names)


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_out", metavar="RUN_OUT", type=Path, help="a harness output folder (harness.run --out)")
    p.add_argument("--task", metavar="NAME", help="only this task's figures (its output name, as in <name>.md)")
    add_verbose_flag(p)
    args = p.parse_args(argv)
    names = task_names(args.run_out)
    if not names:
        raise UsageError(f"{args.run_out} has no results (no results/<name>.parquet nor results/<name>/); point "
                         "RUN_OUT at a folder written by `python -m harness.run --out RUN_OUT`")
    if args.task is not None:
        if args.task not in names:
            raise UsageError(f"--task {args.task}: {args.run_out} has no results of it; it has {', '.join(names)}")
        names = [args.task]
    check_writable_folder(args.run_out / "figures", "RUN_OUT")
    try:
        for name in names:
            for path in draw_task_figures(args.run_out, name):
                print(path)
    except FigureInputError as e:
        raise DataError(str(e)) from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
