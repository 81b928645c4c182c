"""Markdown leaderboards, and the check that a committed leaderboard still matches a fresh run.

A leaderboard is ``<out>/<task>.md``: a header saying exactly what it was computed on (dataset size, split sizes
and hash, seeds, resamples, input policy, reference model, date), then one section per protocol, each a table
with models as rows and metrics as columns, cells ``0.873 [0.851, 0.894]``. The best point estimate per column
is bold; ``†`` marks a paired difference to the reference model that is significant after Holm correction.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tabulate import tabulate

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

    @classmethod
    def from_summary(cls, s: dict | None, significant: bool = False, note: str = "n/e") -> Cell:
        """A cell from `stats.summarise` output (None: not evaluable, shown as `note`)."""
        if s is None or s.get("point") is None:
            return cls(None, note=note)
        return cls(s["point"], s["lo"], s["hi"], significant, n_valid=s.get("n_valid"),
                   n_resamples=s.get("n_resamples"))


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
              "resamples in which the metric is defined, fewer than all. n/e = not evaluable, with counts.", ""]
    return "\n".join(lines) + "\n" + "\n".join(render_section(s) for s in sections)


# --- comparing a fresh leaderboard with a committed one -------------------------------------------------------

_NUM = re.compile(r"-?\d+\.\d+|-?\d+")


@dataclass
class Mismatch:
    file: str
    where: str
    committed: str
    fresh: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: committed {self.committed!r}, fresh run {self.fresh!r}"


def _tables(md: str) -> dict[tuple[str, str], dict[str, str]]:
    """(section, model) -> {column: cell text} for every table row under a '## ' heading."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    section, headers = "", []
    for line in md.splitlines():
        if line.startswith("## "):
            section, headers = line[3:].strip(), []
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not headers:
                headers = cells
            elif not set("".join(cells)) <= set("-: "):
                out[(section, cells[0])] = dict(zip(headers[1:], cells[1:]))
        else:
            headers = [] if not line.strip() else headers
    return out


def compare(committed_md: str, fresh_md: str, file: str, tol: float = 0.002) -> list[Mismatch]:
    """Every table cell of the committed file must be in the fresh one with the same numbers (within `tol`).
    Bold and significance marks are ignored (a p-value at the threshold may flip them); text must match."""
    a, b = _tables(committed_md), _tables(fresh_md)
    out = []
    for key in sorted(set(a) | set(b)):
        where = f"section '{key[0]}', row '{key[1]}'"
        if key not in a or key not in b:
            out.append(Mismatch(file, where, "present" if key in a else "absent", "present" if key in b else "absent"))
            continue
        for col in sorted(set(a[key]) | set(b[key])):
            ca = a[key].get(col, "").replace("**", "").replace(SIGNIFICANT, "").strip()
            cb = b[key].get(col, "").replace("**", "").replace(SIGNIFICANT, "").strip()
            na, nb = _NUM.findall(ca), _NUM.findall(cb)
            same_text = _NUM.sub("#", ca) == _NUM.sub("#", cb)
            if not same_text or len(na) != len(nb) or any(abs(float(x) - float(y)) > tol for x, y in zip(na, nb)):
                out.append(Mismatch(file, f"{where}, column '{col}'", ca, cb))
    return out


def check_dirs(committed: Path, fresh: Path, tol: float = 0.002) -> list[Mismatch]:
    """Compare every leaderboard in `fresh` with its committed twin (a missing committed file is a mismatch)."""
    out = []
    for f in sorted(Path(fresh).glob("*.md")):
        c = Path(committed) / f.name
        if not c.exists():
            out.append(Mismatch(f.name, "whole file", "absent", "present"))
            continue
        out += compare(c.read_text(), f.read_text(), f.name, tol)
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
                       description="Compare freshly generated leaderboards with the committed ones: exit 1 listing "
                                   "every stale cell.",
                       epilog=CHECK_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("committed", type=Path, help="folder of the committed leaderboards")
    c.add_argument("fresh", type=Path, help="folder of freshly generated ones")
    c.add_argument("--tol", type=float, default=0.002, help="largest difference of a number that is not stale")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """``python -m harness.leaderboard check COMMITTED_DIR FRESH_DIR``: exit 1 listing every stale cell."""
    args = build_parser(prog).parse_args(argv)
    bad = check_dirs(args.committed, args.fresh, args.tol)
    n = len(list(Path(args.fresh).glob("*.md")))
    if not bad:
        print(f"leaderboards up to date: {n} file(s) match within {args.tol}")
        return 0
    print(f"{len(bad)} stale leaderboard cell(s) (tolerance {args.tol}):")
    for m in bad:
        print(f"  {m}")
    print(f"refresh them with: {REFRESH_COMMAND}   (then commit leaderboards/)")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
