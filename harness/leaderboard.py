"""Markdown leaderboards, and the check that committed leaderboards still match a fresh run.

A leaderboard is ``<out>/<task>.md``: a header saying exactly what it was computed on (dataset size, split sizes
and hash, seeds, resamples, input policy, reference model, date), then one section per protocol, each a table
with models as rows and metrics as columns, cells ``0.873 [0.851, 0.894]``. The best point estimate per column
is bold; ``†`` marks a paired difference to the reference model that is significant after Holm correction. Every
number shown with an interval is also a row of the task's tidy table (``<out>/results/<task>.csv``, see
`harness.tidy`), which is what the check compares: the cost section's counts exactly, its measured extraction
rates never (they measure the machine, `harness.tidy.MEASURED`).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tabulate import tabulate

from harness import tidy
from harness.ranks import format_rank
from harness.common.errors import AT_LEAST_0, UsageError, add_verbose_flag, check_flag, command

SIGNIFICANT = "†"
REFRESH_COMMAND = "bash leaderboards/refresh.sh"


@dataclass
class Cell:
    point: float | None
    lo: float | None = None
    hi: float | None = None
    significant: bool = False
    note: str = ""  # shown instead of numbers when point is None (e.g. "n/e: 0 positives in test")
    #: resamples in which the metric was defined, out of how many; shown when fewer than all
    n_valid: int | None = None
    n_resamples: int | None = None
    #: a rank cell (`harness.ranks`): integers, shown as ``2 [1, 4]``
    rank: bool = False

    @classmethod
    def from_summary(cls, s: dict | None, significant: bool = False, note: str = "n/e") -> Cell:
        """A cell from `stats.summarise` output (None: not evaluable, shown as `note`)."""
        if s is None or s.get("point") is None:
            return cls(None, note=note)
        return cls(s["point"], s["lo"], s["hi"], significant, n_valid=s.get("n_valid"),
                   n_resamples=s.get("n_resamples"))

    @classmethod
    def from_rank(cls, s: dict) -> Cell:
        """A rank cell from a `harness.ranks.rank_summary` entry (n/a when the model's point is undefined)."""
        if s.get("rank") is None:
            return cls(None, note="n/a")
        return cls(float(s["rank"]), None if s["lo"] is None else float(s["lo"]),
                   None if s["hi"] is None else float(s["hi"]), rank=True)


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: dict[str, dict[str, Cell]]      # model -> column -> cell
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def section_to_json(s: Section) -> dict:
    """A section as JSON-able data, kept beside the leaderboard so a later one-protocol run can re-render the
    sections it did not recompute exactly as they were."""
    return asdict(s)


def section_from_json(d: dict) -> Section:
    rows = {model: {col: Cell(**cell) for col, cell in row.items()} for model, row in d["rows"].items()}
    return Section(d["title"], list(d["columns"]), rows, dict(d.get("higher_is_better", {})), list(d.get("notes", [])))


def fmt_cell(c: Cell, best: bool) -> str:
    if c.point is None:
        return c.note or "n/e"
    if c.rank:
        return format_rank({"rank": round(c.point), "lo": None if c.lo is None else round(c.lo),
                            "hi": None if c.hi is None else round(c.hi)}, bold=best)
    point = f"{c.point:.3f}"
    if best:
        point = f"**{point}**"
    ci = f" [{c.lo:.3f}, {c.hi:.3f}]" if c.lo is not None and c.hi is not None else ""
    partial = c.n_valid is not None and c.n_resamples is not None and c.n_valid < c.n_resamples
    return point + ci + (f" (n={c.n_valid})" if partial else "") + (f" {SIGNIFICANT}" if c.significant else "")


def render_section(s: Section) -> str:
    best: dict[str, float] = {}
    for col in s.columns:
        vals = [r[col].point for r in s.rows.values() if col in r and r[col].point is not None]
        if vals:
            best[col] = max(vals) if s.higher_is_better.get(col, True) else min(vals)
    table = []
    for model, row in s.rows.items():
        cells = []
        for col in s.columns:
            c = row.get(col, Cell(None, note="—"))
            cells.append(fmt_cell(c, c.point is not None and len(s.rows) > 1 and c.point == best.get(col)))
        table.append([model, *cells])
    body = tabulate(table, headers=["model", *s.columns], tablefmt="github", disable_numparse=True)
    notes = "".join(f"\n{n}\n" for n in s.notes)
    return f"## {s.title}\n\n{body}\n{notes}"


def render(title: str, header: list[tuple[str, str]], sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in header]
    lines += ["", f"Cells: point estimate [95% patient-clustered bootstrap CI]; **bold** = best in column; "
              f"{SIGNIFICANT} = paired difference to the reference model significant at 0.05 after Holm correction "
              "per column (across the models compared with the reference). (n=k): the interval is over the k "
              "resamples in which the metric is defined, fewer than all. n/e = not evaluable, with counts. A rank "
              "column: 1 = best by the point estimates [95% interval of the models' ranks over the same resamples]; "
              "the probability of being best and the pairwise win probabilities are in the results JSON and the "
              "tidy table.", ""]
    return "\n".join(lines) + "\n" + "\n".join(render_section(s) for s in sections)


# --- comparing fresh leaderboards with the committed ones -----------------------------------------------------

@dataclass
class Mismatch:
    file: str
    where: str
    committed: str
    fresh: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: committed {self.committed!r}, fresh run {self.fresh!r}"


def compare_tables(committed: Path, fresh: Path, tol: float = 0.002) -> list[Mismatch]:
    """The committed tidy table against the fresh one: equal when the CSV text is; otherwise every row present in
    only one of them and every number that moved by more than `tol` (n_valid exactly), one mismatch each."""
    if committed.read_bytes() == fresh.read_bytes():
        return []
    return [Mismatch(fresh.name, f"{row}, {col}", a, b)
            for row, col, a, b in tidy.differences(tidy.read(committed), tidy.read(fresh), tol)]


def check_dirs(committed: Path, fresh: Path, tol: float = 0.002) -> list[Mismatch]:
    """Every leaderboard in `fresh` must have a committed twin, and every tidy table (``results/<task>.csv``) must
    match its committed twin within `tol`."""
    committed, fresh = Path(committed), Path(fresh)
    out = [Mismatch(f.name, "whole file", "absent", "present")
           for f in sorted(fresh.glob("*.md")) if not (committed / f.name).exists()]
    for f in sorted((fresh / "results").glob("*.csv")):
        c = committed / "results" / f.name
        if not c.exists():
            out.append(Mismatch(f"results/{f.name}", "whole file", "absent", "present"))
            continue
        out += compare_tables(c, f, tol)
    return out


PROG = "python -m harness.leaderboard"
CHECK_EXAMPLES = """\
examples:
  %(prog)s leaderboards /tmp/lb                 # after: bash leaderboards/refresh.sh /tmp/lb
  %(prog)s leaderboards /tmp/lb --tol 0.0005    # a stricter tolerance on every number
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The ``check`` command's parser (``raddino-bench check`` is ``PROG check``)."""
    p = argparse.ArgumentParser(prog=prog)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="compare freshly generated leaderboards with the committed ones",
                       description="Compare freshly generated leaderboards with the committed ones (their tidy "
                                   "results tables, results/<task>.csv): exit 1 listing every stale number. The "
                                   "cost section's counts (parameters, input size, tokens, feature dim) must match "
                                   "exactly; its measured images/s depend on the machine and are not compared.",
                       epilog=CHECK_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("committed", type=Path, help="folder of the committed leaderboards")
    c.add_argument("fresh", type=Path, help="folder of freshly generated ones")
    c.add_argument("--tol", type=float, default=0.002,
                   help="largest difference of a number that is not stale (whether p_holm < 0.05 must match exactly)")
    add_verbose_flag(c)
    return p


@command
def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """``python -m harness.leaderboard check COMMITTED_DIR FRESH_DIR``: exit 1 listing every stale number."""
    args = build_parser(prog).parse_args(argv)
    check_flag("--tol", args.tol, AT_LEAST_0)  # NaN would call every number stale
    for flag, folder in (("COMMITTED", args.committed), ("FRESH", args.fresh)):
        if not folder.is_dir():
            raise UsageError(f"{flag} {folder}: not a folder (give the committed leaderboards and a fresh copy)")
    try:
        bad = check_dirs(args.committed, args.fresh, args.tol)
    except ValueError as e:  # a table that cannot be read names its file
        raise UsageError(str(e)) from e
    n = len(list((Path(args.fresh) / "results").glob("*.csv")))
    if not bad and n == 0:  # e.g. a refresh that failed before writing: nothing was checked, so nothing is current
        raise UsageError(f"{args.fresh} holds no results table (results/<task>.csv) to compare; regenerate it with "
                         f"{REFRESH_COMMAND}")
    if not bad:
        print(f"leaderboards up to date: {n} results table(s) match within {args.tol}")
        return 0
    print(f"{len(bad)} stale leaderboard number(s) (tolerance {args.tol}):")
    for m in bad:
        print(f"  {m}")
    print(f"refresh them with: {REFRESH_COMMAND}   (then commit leaderboards/)")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
