"""The figures of a harness run, drawn from the files it saved (nothing is recomputed): per task, into
``<out>/figures/<name>/``,

- ``forest.png``: every model's headline metrics, point and 95% CI, a panel per (protocol, metric);
- ``wins.png``: pairwise win probabilities P(A > B) of the macro AUROC over the shared resamples, a panel per
  protocol;
- ``roc.png`` and ``pr.png``: the linear probe's ROC and precision-recall curves, a panel per label;
- ``subgroups.png``: macro AUROC per subgroup and the gaps between subgroups;
- ``age_calibration.png``: true against predicted age, a panel per model;
- ``overlays_<model>.png``: segmentation overlays (true positives, false positives, false negatives).

Inputs: the tidy table ``results/<name>.parquet``, the per-image files ``results/<name>/<model>.predictions.parquet``,
``<model>.demographics.parquet``, ``<model>.overlays.npz``, and the run's settings (model order, reference model)
from ``results/<name>.leaderboard.json``. A figure whose inputs are absent is skipped with a note on stderr; an
input that is present but malformed is an error naming the file. `docs/figures.md` describes every figure."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from harness.figures import age, curves, forest, overlays, subgroups, wins
from harness.figures.common import FigureInputError, note, png_bytes, read_checked, read_tidy
from harness.common.atomic import atomic_write_bytes, atomic_write_text
from harness.common.hashing import sha256_chunks
from harness.common.paths import safe_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FigureInputError", "draw_task_figures", "figure_links", "task_figures"]

FOLDER = "figures"
#: The run's manifest beside the results folder, as harness.outputs names it (harness.outputs is not imported here:
#: it imports torch and the evaluation, and it is the one that calls draw_task_figures).
MANIFEST = ".leaderboard.json"
CAPTIONS = {forest.FILE: "Headline metrics (forest plot)", curves.KINDS["roc"][0]: "ROC curves (linear probe)",
            curves.KINDS["pr"][0]: "Precision-recall curves (linear probe)",
            subgroups.FILE: "Subgroup AUROC and gaps", age.FILE: "Age calibration",
            wins.FILE: "Pairwise win probabilities"}


def _settings(out: Path, name: str) -> dict:
    """The run's settings from its manifest ({} when absent or unreadable: the figures then do without)."""
    try:
        settings = json.loads((out / "results" / f"{name}{MANIFEST}").read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _per_model(folder: Path, models: list[str], suffix: str, columns: tuple[str, ...], what: str
               ) -> dict[str, pl.DataFrame]:
    """model -> its `<model><suffix>` file in `folder`, for the models that have one."""
    found = {}
    for model in models:
        path = folder / f"{safe_name(model)}{suffix}"
        if path.exists():
            found[model] = read_checked(path, columns, what)
    return found


def task_figures(out: Path, name: str, failures: list[str] | None = None
                 ) -> list[tuple[str, "Figure", pl.DataFrame]]:
    """(file name, figure, data it drew) of every figure task `name` of the run in `out` has inputs for; a note
    on stderr for each one skipped, a warning for each one whose drawing raised (its file name also appended to
    `failures`)."""
    results = out / "results"
    table_path = results / f"{name}.parquet"
    table = read_tidy(table_path) if table_path.exists() else None
    settings = _settings(out, name)
    reference = settings.get("reference") or None
    models = [m[0] for m in settings.get("models", []) if isinstance(m, list) and m]
    if not models and table is not None:
        models = table["model"].unique(maintain_order=True).to_list()
    drawn: list[tuple[str, "Figure", pl.DataFrame]] = []

    def keep(file: str, make: Callable[[], tuple["Figure", pl.DataFrame] | None], missing: str) -> None:
        """Draw one figure; one that fails is logged with its name and left out, never costing the others (or the
        run's results, written before any figure)."""
        try:
            made = make()
        except FigureInputError:  # a malformed input file: the caller's error, naming the file
            raise
        except Exception as e:  # any drawing failure (matplotlib raises many types): never worth a result
            failed(name, file, e)
            if failures is not None:
                failures.append(file)
            return
        if made is None:
            note(f"{name}: {file} not drawn: {missing}")
        else:
            drawn.append((file, *made))

    if table is None:
        note(f"{name}: the forest, ROC, precision-recall, subgroup and age-calibration figures are not drawn: "
             f"they read their numbers from the tidy table {table_path}, which this run did not write")
    else:
        if reference is None:
            note(f"{name}: no reference model in {results / (name + MANIFEST)}: none is marked")
        keep(forest.FILE, lambda: forest.draw(table, reference, name),
             f"no headline metric with a value in {table_path}")
        keep(wins.FILE, lambda: wins.draw(table, models, name), f"no two models ranked in {table_path}")
        predictions = _per_model(results / name, models, ".predictions.parquet", curves.PREDICTION_COLUMNS,
                                 "the linear probe's predictions")
        for kind, (file, *_) in curves.KINDS.items():
            keep(file, lambda kind=kind: curves.draw(predictions, table, kind, name) if predictions else None,
                 f"no label with both classes in results/{name}/<model>.predictions.parquet" if predictions else
                 f"no results/{name}/<model>.predictions.parquet (protocol linear)")
        keep(subgroups.FILE, lambda: subgroups.draw(table, reference, name),
             f"no subgroup_auroc or subgroup_gap row with a value in {table_path}")
        demographics = _per_model(results / name, models, ".demographics.parquet", age.DEMOGRAPHICS_COLUMNS,
                                  "the demographics predictions")
        keep(age.FILE, lambda: age.draw(demographics, table, name),
             f"no test image with a known age in results/{name}/<model>.demographics.parquet (protocol "
             "demographics)")
    rank = {m: i for i, m in enumerate(models)}
    paths = sorted((results / name).glob(f"*{overlays.SUFFIX}"))
    sets = sorted(((overlays.read_overlays(p), p) for p in paths), key=lambda s: (rank.get(s[0].model, len(rank)),
                                                                                    s[1].name))
    for ov, path in sets:
        keep(overlay_file(path.name.removesuffix(overlays.SUFFIX)), lambda ov=ov: overlays.draw(ov, name),
             f"{path} shows no image")
    if not paths:
        note(f"{name}: no segmentation overlays: no results/{name}/<model>{overlays.SUFFIX} (protocol seg)")
    return drawn


def failed(name: str, file: str, error: Exception) -> None:
    """A figure that raised: a warning naming the task and the figure (and the error), the run going on."""
    logging.getLogger("harness.figures").warning(f"warning: {name}: figure {file} not drawn: "
                                                 f"{type(error).__name__}: {error}")


def overlay_file(stem: str) -> str:
    return f"overlays_{stem}.png"


#: In ``figures/<name>/``: the digest of the inputs its figures were drawn from, then their file names, one a line.
STAMP = ".drawn-from"
#: The per-model files under ``results/<name>/`` that figures read.
_INPUT_SUFFIXES = (".predictions.parquet", ".demographics.parquet", overlays.SUFFIX)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def inputs_digest(out: Path, name: str) -> str:
    """sha256 of everything the figures of task `name` are drawn from: the tidy table, the run's settings, the
    per-image files, and the code that draws them (the harness's sources and matplotlib's version)."""
    from harness.results_cache import code_version

    results = out / "results"
    files = [results / f"{name}.parquet"]
    if (results / name).is_dir():
        files += sorted(f for f in (results / name).iterdir() if f.name.endswith(_INPUT_SUFFIXES))
    # matplotlib draws the PNGs but computes no result, so the results cache's code version leaves it out: its
    # version is added here, or an upgrade that changes how figures look would leave the old PNGs in place.
    chunks = [code_version().encode(), f"matplotlib=={_version('matplotlib')}".encode(),
              json.dumps(_settings(out, name), sort_keys=True).encode()]
    for f in files:
        if f.is_file():
            chunks += [b"\0" + f.name.encode() + b"\0", f.read_bytes()]
    return sha256_chunks(chunks)


def draw_task_figures(out: Path, name: str) -> list[Path]:
    """Draw every figure of task `name` of the run in `out` into ``out/figures/<name>/`` (each PNG written
    atomically; PNGs of an earlier drawing that this one did not write are removed, so none is stale) and return
    the paths written. When the figures there were drawn from the same inputs by the same code (a rerun with
    nothing changed), nothing is redrawn. A figure that fails to draw or save is logged with its name and left out
    (the others are drawn, and nothing is stamped, so a rerun tries it again). Raises FigureInputError when an input
    file is malformed."""
    out = Path(out)
    folder = out / FOLDER / name
    digest = inputs_digest(out, name)
    try:
        recorded = (folder / STAMP).read_text().splitlines()
    except OSError:
        recorded = []
    if recorded and recorded[0] == digest and all((folder / f).is_file() for f in recorded[1:]):
        return [folder / f for f in recorded[1:]]
    written: list[Path] = []
    failures: list[str] = []
    for file, fig, _ in task_figures(out, name, failures):
        try:
            atomic_write_bytes(folder / file, png_bytes(fig))
        except Exception as e:  # as in task_figures: log it, save the others
            failed(name, file, e)
            failures.append(file)
            continue
        written.append(folder / file)
    for old in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        if old not in written:
            old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    if not failures:
        atomic_write_text(folder / STAMP, "\n".join([digest, *(p.name for p in written)]) + "\n")
    else:  # a figure failed: the next run draws again (and says so again) instead of trusting the stamp
        (folder / STAMP).unlink(missing_ok=True)
    return written


def figure_links(name: str, paths: list[Path]) -> list[str]:
    """Markdown lines embedding the figures `paths` (as draw_task_figures returned them) in ``<out>/<name>.md``,
    one paragraph each, with their caption."""
    lines = []
    for p in paths:
        stem = p.name.removeprefix("overlays_").removesuffix(".png")
        caption = CAPTIONS.get(p.name, f"Segmentation overlays: {stem}")
        lines += [f"{caption}: [{p.name}]({FOLDER}/{name}/{p.name})", "", f"![{caption}]({FOLDER}/{name}/{p.name})",
                  ""]
    return lines
