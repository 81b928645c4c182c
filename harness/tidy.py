"""The tidy results table: one row per number a leaderboard shows with an interval, in long format.

``<out>/results/<name>.parquet`` and ``<out>/results/<name>.csv`` (``<name>``: the task's output name, as the
leaderboard's) hold the same rows with exactly the columns of `COLUMNS`:

- ``task``: the task's output name; ``model``; ``protocol``: the protocol's registry name (``linear``, ``knn``,
  ``seg``, ``demographics``, ``label-efficiency``), or ``cost`` for the cost section (`harness.cost`), which every
  run writes;
- ``metric`` in snake_case (``auroc``, ``auprc``, ``dice_linear``, ``sex_auroc``, ``subgroup_gap``, ...) and
  ``label``: what the metric is of (a finding, a structure, a group, ``macro``), ``""`` when the metric is a single
  number per model;
- ``point``, ``lo``, ``hi``: the estimate and its 95% patient-bootstrap interval (lo/hi null without one);
- ``delta``, ``p_holm``: the paired difference to the reference model and its Holm-adjusted p-value (what the
  leaderboard's † uses), null for the reference itself and for numbers that are not compared;
- ``n_valid``: resamples in which the metric was finite, null where that does not apply;
- ``global_pool``: the run's ``--global-pool`` (``cls``, ``avg``, ``cls+avg``), the features the global protocols
  read; segmentation rows carry it too, though the heads read the patch tokens and do not depend on it.

The cost rows are counts (``parameters``, ``input_size``, ``tokens``, ``feature_dim``, label ``""``) and the
measured extraction rate (``forward_images_per_s``, labelled with the machine it was measured on), with no interval.

Rows are in leaderboard order (protocol sections, then models, then the section's columns; the cost rows last), so
the CSV is the same from one run to the next but for the measured rates, and the committed copy is what
``harness.leaderboard check`` compares: the counts exactly, the rates not at all (`MEASURED`).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import polars as pl

COLUMNS = ("task", "model", "protocol", "metric", "label", "point", "lo", "hi", "delta", "p_holm", "n_valid",
           "global_pool")
SCHEMA = {"task": pl.String, "model": pl.String, "protocol": pl.String, "metric": pl.String, "label": pl.String,
          "point": pl.Float64, "lo": pl.Float64, "hi": pl.Float64, "delta": pl.Float64, "p_holm": pl.Float64,
          "n_valid": pl.Int64, "global_pool": pl.String}
#: the columns that identify a row (a table holds each combination once; one table is one --global-pool, whose
#: output name differs from the others)
KEY = ("task", "model", "protocol", "metric", "label")
#: the numbers of a row, compared within a tolerance by `differences`
NUMBERS = ("point", "lo", "hi", "delta", "p_holm", "n_valid")
#: the protocol name of the cost section's rows (`harness.cost`), and the metric of its measured extraction rate
COST = "cost"
RATE_METRIC = "forward_images_per_s"
#: (protocol, metric) of the rows that measure the machine, not the model: a rate depends on the hardware and its
#: load, and is absent where it was not recorded, so `differences` compares neither its value nor its presence
MEASURED = ((COST, RATE_METRIC),)
#: protocols whose numbers are counts (parameters, input size, tokens, feature width): compared exactly, no tolerance
EXACT = (COST,)


class TidyRow(NamedTuple):
    task: str
    model: str
    protocol: str
    metric: str
    label: str
    point: float | None
    lo: float | None
    hi: float | None
    delta: float | None
    p_holm: float | None
    n_valid: int | None
    global_pool: str = ""   # set by `with_pool` when the run writes the table


def rows_of(task: str, protocol: str, model: str, metric: str, label: str, summary: dict | None,
            paired: dict | None = None) -> list[TidyRow]:
    """The row of one leaderboard number from its `stats.summarise` dict (and its `stats.compare_to_reference`
    entry, None for the reference or an uncompared number); no row for a number that was not evaluable."""
    if summary is None or summary.get("point") is None:
        return []
    paired = paired or {}
    return [TidyRow(task, model, protocol, metric, label, summary["point"], summary.get("lo"), summary.get("hi"),
                    paired.get("delta"), paired.get("p_holm"), summary.get("n_valid"))]


def with_pool(rows: list[TidyRow], pool: str) -> list[TidyRow]:
    """`rows` stamped with the run's global pooling."""
    return [r._replace(global_pool=pool) for r in rows]


def frame(rows: list[TidyRow]) -> pl.DataFrame:
    return pl.DataFrame([tuple(r) for r in rows], schema=SCHEMA, orient="row")


def csv_text(rows: list[TidyRow]) -> str:
    return frame(rows).write_csv()


def parquet_bytes(rows: list[TidyRow]) -> bytes:
    buf = io.BytesIO()
    frame(rows).write_parquet(buf)
    return buf.getvalue()


def read(path: Path) -> list[TidyRow]:
    """The rows of a table written by `csv_text` or `parquet_bytes` (by its suffix); ValueError naming the file
    when it cannot be read or does not have exactly the columns."""
    try:
        df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, schema_overrides=SCHEMA)
    except pl.exceptions.PolarsError as e:
        raise ValueError(f"{path}: not a readable results table ({e})") from e
    if tuple(df.columns) != COLUMNS:
        raise ValueError(f"{path}: columns {', '.join(df.columns)}; expected exactly {', '.join(COLUMNS)}")
    # A CSV's empty label reads back as null: it is the empty string written.
    return [TidyRow(*r) for r in df.with_columns(pl.col("label").fill_null("")).iter_rows()]


#: The level below which p_holm earns a † (in the leaderboards, the figures and the check below).
ALPHA = 0.05


def differences(committed: list[TidyRow], fresh: list[TidyRow], tol: float) -> list[tuple[str, str, str, str]]:
    """(row, column, committed value, fresh value) for every row present in only one table and every number that
    differs by more than `tol` (a null against a number always differs; n_valid and the numbers of the `EXACT`
    protocols must match exactly). The significance decision must match exactly too: p_holm 0.049 against 0.051 is
    within any tolerance of 0.002 but flips a †, so that is reported as column ``p_holm < 0.05``. The `MEASURED`
    rows are left out of both tables."""
    a = {tuple(getattr(r, k) for k in KEY): r for r in committed if (r.protocol, r.metric) not in MEASURED}
    b = {tuple(getattr(r, k) for k in KEY): r for r in fresh if (r.protocol, r.metric) not in MEASURED}
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        where = " ".join(f"{k}={v!r}" for k, v in zip(KEY, key))
        if key not in a or key not in b:
            out.append((where, "whole row", "present" if key in a else "absent", "present" if key in b else "absent"))
            continue
        if a[key].global_pool != b[key].global_pool:
            out.append((where, "global_pool", a[key].global_pool, b[key].global_pool))
        for col in NUMBERS:
            x, y = getattr(a[key], col), getattr(b[key], col)
            if x is None or y is None:
                same = x is None and y is None
            else:
                same = x == y if col == "n_valid" or a[key].protocol in EXACT else abs(x - y) <= tol
            if not same:
                out.append((where, col, str(x), str(y)))
        x, y = a[key].p_holm, b[key].p_holm
        if x is not None and y is not None and (x < ALPHA) != (y < ALPHA):
            out.append((where, f"p_holm < {ALPHA:g}", str(x < ALPHA), str(y < ALPHA)))
    return out
