"""The output folder of an evaluation: what `harness.evaluate` returned, written as leaderboards and files.

    write(results, out)     ->  out/<name>.md, out/results/<name>/<model>.json, out/results/<name>.{csv,parquet},
                                out/results/<name>.leaderboard.json, out/splits/<name>.csv, out/figures/<name>/

(``<name>``: the task's name plus the options that change its numbers, `harness.evaluate.output_name`.) Every file
is written atomically, the leaderboard last. A run of some protocols into a folder that holds a leaderboard of the
same task replaces those protocols' sections, results, files and tidy rows, and keeps each other section only when
it was computed from the same content with the same settings (`run_settings`: images, label values, split, each
model's features and precision, the shared options) and the task data it depends on are unchanged
(`section_inputs`: sex and age, masks). Any other section is dropped, with its files; the log and the
leaderboard's header say which, why, and the command that computes it again. Either way, files of the old
leaderboard that the new one does not list are deleted, so nothing stale stays beside the new files. The cost
section (`harness.cost`), its tidy rows and each model's ``cost`` record are always this run's, never kept.

`evaluate_and_write` is the loop of a whole command: build each task, check its folders can be written, evaluate
it, write it.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from baselines.registry import Encoder
from harness import stats, tidy
from harness.cost import cost_rows, cost_section
from harness.common.atomic import atomic_path, atomic_write_text
from harness.common.errors import DataError, UsageError
from harness.common.hashing import array_digest
from harness.common.paths import check_writable_folder, safe_name
from harness.evaluate import EvalOptions, TaskResults, evaluate, output_name, results_name
from harness.figures import FigureInputError, draw_task_figures, figure_links
from harness.leaderboard import Section, render, section_from_json, section_to_json
from harness.probes import PROTOCOLS
from harness.protocols import label_status
from harness.registry import resolve
from harness.results_cache import ResultsCacheFull
from harness.splits import write_split
from harness.taskspec import TaskSpec
from harness.tasks.base import Subset, Task, TaskContext, TaskError, build_task

log = logging.getLogger(__name__)

#: Where each task's outputs go when no folder is given: runs/<output name>/, never the committed leaderboards/.
DEFAULT_RUNS = Path("runs")
#: ``results/<name><MANIFEST>``, beside the task's results folder (whose *.json are one per model): the settings
#: of the run and every section as data, so that a run of one protocol can be merged into the leaderboard, and
#: the files each protocol published, so that none is left stale.
MANIFEST = ".leaderboard.json"
#: The command that makes these outputs, as the leaderboards name it.
COMMAND = "python -m harness.run"


def task_out_dir(out: Path | None, name: str) -> Path:
    """The folder a task's leaderboard, results/ and splits/ go in: `out` when given, else runs/<name>/."""
    return DEFAULT_RUNS / name if out is None else out


def check_folders(out: Path, name: str) -> None:
    """UsageError (naming --out) unless every folder the outputs of `name` go in can be written, or made: checked
    before any feature is computed, not after."""
    for folder in (out, out / "splits", out / "results" / name, out / "figures" / name):
        check_writable_folder(folder, "--out")


def evaluate_and_write(specs: Sequence[TaskSpec], encoders: Sequence[Encoder], options: EvalOptions,
                       ctx: TaskContext, out: Path | None) -> list[Path]:
    """Each task of `specs` built, evaluated with its protocols and written into `task_out_dir(out, name)`, one
    after the other; the leaderboards written. Bad data in a task (its files, its features) is a DataError naming
    the task; a folder that cannot be written a UsageError."""
    written = []
    for spec in specs:
        try:
            task = build_task(spec.name, spec.arg, ctx)
            name = results_name(output_name(spec, task), options)
            folder = task_out_dir(out, name)
            check_folders(folder, name)
            written.append(write(evaluate(task, encoders, spec.protocols, options, name=name), folder, spec))
        except UsageError:
            raise
        except (TaskError, ValueError, FloatingPointError, ResultsCacheFull) as e:
            raise DataError(f"task {spec.text!r}: {e}") from e
    return written


# ------------------------------------------------------------------------------------- merging with an earlier run

def run_settings(results: TaskResults) -> dict:
    """What every section of one leaderboard must share to be shown together (the date aside), one field each: the
    task's content (images, label values, split), the shared settings, and each model's features (their
    feature-cache key covers the encoder, its weights and code, the extraction code, the precision and the
    images). A protocol's own options (k, fractions) are not here: each section states those it was computed
    with."""
    t, o = results.task.table, results.options
    return {"task": results.task.name, "images": results.task.content_digest(), "labels": list(t.label_names),
            "label_values": array_digest(np.asarray(t.labels)), "split_hash": results.split_hash,
            "seed": o.seed, "test_fraction": o.test_fraction, "n_resamples": o.bootstrap,
            "min_positive_patients": o.min_positive_patients, "input_policy": o.input_policy,
            "global_pool": o.global_pool, "reference": results.reference,
            "models": {e.name: {"weights": e.weights_digest, "features": results.feature_keys[e.name],
                                "precision": results.precision} for e in results.encoders}}


#: Why the sections of an earlier run cannot stand beside this one's, by the run setting that differs (any other
#: setting: its name).
_DIFFERS = {"task": "another task", "images": "the task's images differ", "labels": "the label names differ",
            "label_values": "the label values differ", "split_hash": "the split differs", "seed": "--seed differs",
            "test_fraction": "--test-fraction differs", "n_resamples": "--bootstrap differs",
            "min_positive_patients": "--min-positive-patients differs", "input_policy": "--input-policy differs",
            "global_pool": "--global-pool differs", "reference": "--reference differs"}


def settings_differences(old: dict | None, new: dict) -> list[str]:
    """Why sections computed under `old` run settings are not comparable with `new` ones (empty: they are)."""
    if not isinstance(old, dict):
        return ["it was written by an older version"]
    why = [_DIFFERS.get(k, f"{k} differs") for k in sorted(set(old) | set(new))
           if k != "models" and old.get(k) != new.get(k)]
    old_models = old.get("models") if isinstance(old.get("models"), dict) else {}
    changed = [m for m in new["models"] if m in old_models and old_models[m] != new["models"][m]]
    if changed:
        why.append(f"the features of {', '.join(changed)} differ (encoder weights or code, extraction code, "
                   "precision or images)")
    if set(old_models) != set(new["models"]):
        why.append(f"the models differ ({', '.join(old_models) or 'none'} then, {', '.join(new['models'])} now)")
    return why


def section_inputs(task: Task, protocol: str) -> dict:
    """Digests of the task data `protocol` depends on besides the run settings (sex and age, masks)."""
    target = PROTOCOLS.get(protocol).inputs
    return resolve(target)(task) if target else {}


def recompute_command(spec: TaskSpec | None, encoders: Sequence[Encoder], protocols: list[str]) -> str:
    """The command that computes `protocols` again and merges them into this run's leaderboard (the run's other
    options to be repeated); TASK stands for the task when the run was not given its spec."""
    if spec is None:
        task = "TASK"
    elif spec.arg and "," in spec.arg:  # a comma cannot be written in --tasks
        task = f"{spec.name} --task-arg {spec.name}.path={spec.arg}"
    else:
        task = f"{spec.name}:{spec.arg}" if spec.arg else spec.name
    return (f"{COMMAND} --models {','.join(e.name for e in encoders)} --tasks {task} --protocols "
            f"{','.join(protocols)} (with this run's other options)")


def _read_json(path: Path) -> dict | None:
    """The object in a JSON file written by an earlier run; None when absent or unreadable (then nothing of that
    run is merged)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _read_tidy(path: Path) -> list[tidy.TidyRow] | None:
    """The rows of a tidy table written by an earlier run; None when absent or unreadable."""
    try:
        return tidy.read(path)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Merge:
    """What of an earlier run in the folder stands beside this one's sections: its manifest and tidy rows (None
    when absent), the manifest entries of the sections `kept`, the sections `dropped` (protocol, or "every section",
    -> why), the protocols of the new leaderboard in table run order, and the digests of the task data each
    computed section read (`section_inputs`)."""

    old: dict | None
    old_tidy: list[tidy.TidyRow] | None
    kept: dict[str, dict]
    dropped: dict[str, list[str]]
    order: list[str]
    inputs: dict[str, dict]

    def files(self, results: TaskResults, protocol: str) -> list[str]:
        """The files a protocol of the new leaderboard published (relative to the output folder)."""
        if protocol in results.protocols:
            return sorted(results.protocols[protocol].files)
        return self.kept[protocol]["files"]


def merge_with_earlier(results: TaskResults, out: Path, settings: dict) -> Merge:
    """Which sections of the leaderboard already in `out` are kept beside the new ones, and which are dropped."""
    name, computed = results.name, results.protocols
    inputs = {p: section_inputs(results.task, p) for p in computed}
    old = _read_json(out / "results" / f"{name}{MANIFEST}")
    old_tidy = _read_tidy(out / "results" / f"{name}.parquet") if old is not None else None
    kept: dict[str, dict] = {}
    dropped: dict[str, list[str]] = {}
    if old is not None:
        shared = settings_differences(old.get("settings") if old_tidy is not None else None, settings)
        for p, entry in old.get("protocols", {}).items():
            if p in computed or p not in PROTOCOLS.entries:
                continue
            now = {} if shared else section_inputs(results.task, p)  # not read (masks: a pass) when dropped anyway
            why = shared or ([] if entry.get("inputs", {}) == now else
                             [f"the task data it depends on differ ({', '.join(now)})"])
            if why:
                dropped[p] = why
            else:
                kept[p] = entry
    elif (out / f"{name}.md").exists():
        dropped["every section"] = ["it was written by an older version (no manifest)"]
    # Leaderboard order: the whole table's run order, whichever protocols this run computed.
    order = [p for p in PROTOCOLS.ordered(PROTOCOLS) if p in kept or p in computed]
    return Merge(old, old_tidy, kept, dropped, order, inputs)


def dropped_note(merge: Merge, results: TaskResults, out: Path, spec: TaskSpec | None) -> str:
    """The header's "Dropped" line (empty when nothing was): which sections, why, and the command that computes
    them again; logged as a warning too."""
    if not merge.dropped:
        return ""
    reasons = "; ".join(f"{p}: {', '.join(why)}" for p, why in merge.dropped.items())
    redo = [p for p in PROTOCOLS.ordered(PROTOCOLS) if p in merge.dropped]
    note = f"{', '.join(merge.dropped)} of an earlier run ({reasons})" + (
        f"; to compute them again: `{recompute_command(spec, results.encoders, redo)}`" if redo else "")
    log.warning(f"note: {out / (results.name + '.md')}: sections dropped, not merged: {note}")
    return note


# ------------------------------------------------------------------------------------------------------- writing

def provenance() -> dict:
    """What produced the files: the code's git commit (and whether it had uncommitted changes), Python and the
    versions of the packages that compute or read the numbers."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    pkgs = ("raddino-bench", "torch", "numpy", "scikit-learn", "polars", "pydicom", "safetensors", "transformers")
    return {"git_commit": commit, "git_dirty": dirty, "python": sys.version.split()[0],
            "packages": {p: version(p) for p in pkgs}}


def write_json(path: Path, obj: object) -> None:
    """Strict JSON: NaN is written as null, and allow_nan=False makes any that slips through an error."""
    atomic_write_text(path, json.dumps(stats.json_ready(obj), indent=2, allow_nan=False, default=str) + "\n")


def split_description(task: Task, split: np.ndarray, seed: int) -> str:
    """How the split was made: an official split where the task gives one for every image (the seed played no
    part), else seeded by patient (around the official rows when some have one); for ``--split validation``, the
    training patients of that split divided again."""
    if isinstance(task, Subset) and task.name.endswith("/validation"):
        return (f"validation split (--split validation): the training patients of the "
                f"{split_description(task.parent, split, seed)} split only, divided again by patient "
                f"(harness.splits.validation_split, seed {seed} + 7919); its 'test' rows are the validation "
                f"patients, and the task's test patients are not read")
    t = task.table
    given = [s for s in (t.split or []) if s]
    if t.split is not None and len(given) == len(t):
        return "official test split (the seed played no part)"
    if given:
        return f"official split where the task gives one ({len(given)} images), the other patients by seed {seed}"
    return f"patient-level, seed {seed}"


def write_model_results(results: TaskResults, out: Path, merge: Merge, date: str) -> list[str]:
    """``results/<name>/<model>.json`` of every model: the run's settings and each section's record (the kept
    sections' as the earlier run wrote them). Returns their paths relative to `out`."""
    task, o, name = results.task, results.options, results.name
    prov = provenance()
    paths = []
    for enc in results.encoders:
        rel = f"results/{name}/{safe_name(enc.name)}.json"
        earlier = (_read_json(out / rel) or {}).get("protocols", {}) if merge.kept else {}
        records = {p: earlier[p] for p in merge.kept if p in earlier}
        records.update({p: r.to_record(enc.name) for p, r in results.protocols.items() if enc.name in r.records})
        write_json(out / rel, {
            "task": task.name, "model": enc.name, "encoder": enc.identity(), "input_policy": o.input_policy,
            "global_pool": o.global_pool,
            "split": {"hash": results.split_hash, "seed": o.seed, "file": f"splits/{name}.csv",
                      "test_fraction": o.test_fraction, "how": split_description(task, results.split, o.seed)},
            "bootstrap": {"n_resamples": o.bootstrap, "seed": o.seed, "unit": "patient", "ci": "percentile 95%",
                          "drawn_over": "sorted patient_key",
                          "conditioned_on": "a positive and a negative patient of every evaluable label",
                          "min_positive_patients": o.min_positive_patients},
            "reference": results.reference, "dataset": results.summary,
            "protocols": {p: records[p] for p in merge.order if p in records},
            "cost": results.cost.get(enc.name),
            "provenance": prov, "date": date,
        })
        paths.append(rel)
    return paths


def write_protocol_files(results: TaskResults, out: Path) -> None:
    """The files each protocol computed (per-image parquet, overlays, figures), as their bytes."""
    for result in results.protocols.values():
        for rel, blob in result.files.items():
            with atomic_path(out / rel) as tmp:
                tmp.write_bytes(blob)


def write_tidy(results: TaskResults, out: Path, merge: Merge) -> None:
    """``results/<name>.parquet`` and ``.csv``: the new sections' rows and the kept sections' earlier ones, in
    leaderboard order, then this run's cost rows (never an earlier run's)."""
    pool = results.options.global_pool
    rows = [r for p in merge.order for r in (tidy.with_pool(results.protocols[p].tidy, pool)
                                             if p in results.protocols else
                                             [r for r in merge.old_tidy or [] if r.protocol == p])]
    rows += tidy.with_pool(cost_rows(results.name, results.cost), pool)
    with atomic_path(out / "results" / f"{results.name}.parquet") as tmp:
        tmp.write_bytes(tidy.parquet_bytes(rows))
    atomic_write_text(out / "results" / f"{results.name}.csv", tidy.csv_text(rows))


def write_manifest(results: TaskResults, out: Path, merge: Merge, settings: dict, sections: dict[str, Section],
                   date: str) -> None:
    """``results/<name>.leaderboard.json``: the run's settings and, per section, its content, files, the digests
    of the task data it read and its date (a kept section keeps its own)."""
    def entry(p: str) -> dict:
        new = p in results.protocols
        return {"section": section_to_json(sections[p]), "files": merge.files(results, p),
                "inputs": merge.inputs[p] if new else merge.kept[p].get("inputs", {}),
                "date": date if new else merge.kept[p]["date"]}

    write_json(out / "results" / f"{results.name}{MANIFEST}",
               {"settings": settings, "protocols": {p: entry(p) for p in merge.order}})


def label_header(results: TaskResults) -> str:
    """The task's labels, which enter the tables and macro means, and why the others do not."""
    t, k = results.task.table, results.options.min_positive_patients
    ok, reasons = label_status(results.task, results.split, k)
    used = ", ".join(n for n, e in zip(t.label_names, ok) if e) or "none"
    left = "; ".join(f"{n} ({why})" for n, e, why in zip(t.label_names, ok, reasons) if not e)
    return (f"{used} (evaluable: at least {k} positive and {k} negative test patients, both classes in training)"
            + (f"; not evaluable: {left}" if left else ""))


def pooling_header(pool: str, encoders: Sequence[Encoder]) -> str:
    """The leaderboard's pooling line: the one pooling every model's global feature went through, and what it means
    for the models whose tokens are not a ViT's."""
    what = {"cls": "each model's global embedding (a ViT's final-normed CLS token)",
            "avg": "the mean of each model's last-layer patch tokens (final-normed for a ViT)",
            "cls+avg": "each model's global embedding and the mean of its last-layer patch tokens, concatenated"}[pool]
    notes = "; ".join(dict.fromkeys(e.pooling_note for e in encoders if e.pooling_note))
    return f"`{pool}`: {what}; the segmentation heads read the patch tokens and do not depend on it" + (
        f" ({notes})" if notes else "")


def header(results: TaskResults, merge: Merge, date: str, dropped: str) -> list[tuple[str, str]]:
    """The leaderboard's header lines: the task, its labels and split, the bootstrap and the shared options, when
    and how it was made (and which sections an earlier run gave), and what was dropped."""
    task, s, o, name = results.task, results.summary, results.options, results.name
    aggregation = s.get("reader_aggregation")
    lines = [
        ("Task", f"`{task.name}`: {s['images']} images, {s['patients']} patients"
                 + (f" (outputs named `{name}`)" if name != safe_name(task.name) else "")
                 + (f"; {task.header_note}" if task.header_note else "")),
        ("Labels", label_header(results)),
        ("Label rule", f"readers aggregated per image by `{aggregation}`" if aggregation else
                       "one 0/1 value per image as the task gives it (no aggregation)"),
        ("Split", f"{split_description(task, results.split, o.seed)}: train {s['train_images']} images / "
                  f"{s['train_patients']} patients, test {s['test_images']} images / "
                  f"{s['test_patients']} patients; hash `{results.split_hash}` (`splits/{name}.csv`)"),
        ("Bootstrap", f"{o.bootstrap} patient-level resamples, seed {o.seed}, percentile 95% CI; drawn over the "
                      "sorted `patient_key`s, each with a positive and a negative patient of every evaluable label; "
                      f"--min-positive-patients {o.min_positive_patients}"),
        ("Input policy", o.input_policy),
        ("Global pooling", pooling_header(o.global_pool, results.encoders)),
        ("Reference", f"`{results.reference}`"),
        ("Generated", f"{date} by `{COMMAND}` (results in `results/{name}/`)"
                      + ("" if not merge.kept else "; sections " + ", ".join(
                          f"{p} of {merge.kept[p]['date']}" for p in merge.order if p in merge.kept)
                         + " kept from an earlier run")),
    ]
    return lines + ([("Dropped", dropped)] if dropped else [])


def write_leaderboard(results: TaskResults, out: Path, lines: list[tuple[str, str]], sections: list[Section]
                      ) -> Path:
    """``<name>.md``, with the figures drawn from the files just written (what `python -m harness.plot` reads
    too, so a figure shows the table's own numbers) linked at its end."""
    name = results.name
    md = render(f"Leaderboard: {results.task.name}", lines, sections)
    try:
        figures = draw_task_figures(out, name)
    except FigureInputError as e:  # the numbers are written; a figure that cannot be drawn does not lose them
        log.warning(f"figures of {name} not drawn: {e}")
        figures = []
    if figures:
        md = md.rstrip("\n") + "\n\n## Figures\n\n" + "\n".join(figure_links(name, figures)).rstrip("\n") + "\n"
    path = out / f"{name}.md"
    atomic_write_text(path, md)
    return path


def prune(out: Path, name: str, merge: Merge, listed: set[str]) -> None:
    """Delete the files of the old leaderboard (and any other file in ``results/<name>/``, of older versions too)
    that the new one does not list: nothing stale stays beside it."""
    stale = {f for p in (merge.old or {}).get("protocols", {}).values() for f in p.get("files", [])}
    stale |= {str(f.relative_to(out)) for f in (out / "results" / name).glob("*") if f.is_file()}
    for rel in sorted(stale - listed):
        (out / rel).unlink(missing_ok=True)


def write(results: TaskResults, out: Path, spec: TaskSpec | None = None) -> Path:
    """Write `results` into the folder `out`, merged with the leaderboard of an earlier run there (module
    docstring): the split, each model's results, the protocols' files, the tidy table, the manifest, then the
    figures and the leaderboard, each atomically; then stale files are deleted. `spec`, the task as the command
    line named it, spells the command that recomputes a dropped section. Returns the leaderboard's path."""
    out = Path(out)
    task, name = results.task, results.name
    settings = run_settings(results)
    merge = merge_with_earlier(results, out, settings)
    dropped = dropped_note(merge, results, out, spec)
    write_split(out / "splits" / f"{name}.csv", task.name, task.table.image_ids, task.table.patient_ids,
                list(results.split))
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    model_files = write_model_results(results, out, merge, date)
    write_protocol_files(results, out)
    write_tidy(results, out, merge)
    sections = {p: results.protocols[p].to_section() if p in results.protocols else
                section_from_json(merge.kept[p]["section"]) for p in merge.order}
    write_manifest(results, out, merge, settings, sections, date)
    path = write_leaderboard(results, out, header(results, merge, date, dropped),
                             [*(sections[p] for p in merge.order), cost_section(results.cost)])
    prune(out, name, merge, {f for p in merge.order for f in merge.files(results, p)} | set(model_files))
    return path
