"""``python -m harness.ablate``: a pretraining ablation as one command (train every variant, evaluate, tabulate, plot).

    python -m harness.ablate --config small --data /data/cxr/train.csv --eval-task csv:/data/eval/labels.csv \\
        --output ablations/mim-res --axes mim=on,off resolution=112,224 data=0.25,0.5,1.0

Axes are named shortcuts for trainer settings; the first value of every axis is the base variant's:
- ``mim=on,off``: iBOT masked-image modelling on, or off (loss.ibot_weight=0 and no masks sampled at all, so the
  student sees the same unmasked crops as the teacher);
- ``resolution=N,...``: crops.global_size = model.img_size = N, the local crops scaled with it (a multiple of the
  patch size);
- ``data=F,...``: a seeded fraction F of every source's images, written as a ``.txt`` manifest under
  ``OUTPUT/data/``; smaller fractions are subsets of larger ones, so the axis varies the amount of data only;
- ``sources=NAME,...``: a named mix of manifests given by ``--mix NAME=PATH@W,PATH@W`` (data diversity);
- ``KEY=V1,V2``: any dotted trainer key (``loss.koleo_weight=0.1,0``).
Variants change one axis at a time from the base, as ablation tables do (``--grid``: every combination). Every
variant's config is built and validated before anything trains; a value the trainer rejects exits 2, naming the
axis, the value and what it accepts.

Layout of OUTPUT: ``plan.json`` (the variants and their trainer arguments), ``variants/<name>/`` (one trainer run
each, ``--resume auto``: a finished variant is skipped and an interrupted one continues from its checkpoint),
``eval/`` (`harness.evaluate` over every variant's teacher and the base's step-0 weights, reference = the base,
written by `harness.outputs` as ``raddino-bench eval`` writes), then
``ablation.md`` (a leaderboard section), ``ablation.parquet``/``.csv`` (one row per variant and metric) and
``ablation.png`` (each metric with its CI per variant, grouped by axis; † = paired difference to the base
significant after Holm; `harness.figures.ablation`). ``--slurm`` runs the training as a job array and the
evaluation as a job that depends on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.common.atomic import atomic_path, atomic_write_json, atomic_write_text
from harness.common.errors import (AT_LEAST_0, AT_LEAST_1, EXIT_INTERRUPTED, UsageError, add_verbose_flag,
                                   check_flag, command)
from harness.common.paths import check_writable_folder, safe_name
from harness.figures.ablation import BASE, INIT
from trainer.config import TrainConfig, load_config

if typing.TYPE_CHECKING:
    from harness.evaluate import EvalOptions
    from harness.tasks.base import TaskContext

SHORTCUTS = ("mim", "resolution", "data", "sources")
PLAN = "plan.json"
TABLE_COLUMNS = ("task", "axis", "value", "variant", "metric", "point", "lo", "hi", "delta", "delta_lo",
                 "delta_hi", "p_holm", "significant")


class AblationError(UsageError):
    """A usage error found before anything trains (exit status 2)."""


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple[str, ...]


@dataclass
class Variant:
    name: str                        # folder under OUTPUT/variants/ (also how the table names it)
    axis: str                        # the axis it changes ("base"; "a+b" for a grid cell changing two)
    value: str                       # its value(s) on that axis
    settings: dict[str, str]         # every axis -> this variant's value
    overrides: list[str]             # trainer key=value overrides (the ablation's own ones included)
    sources: list[str]               # trainer --data
    subsets: dict[str, list[str]] = field(default_factory=dict)  # data-fraction manifests to write: path -> lines


# ----------------------------------------------------------------------------------------------------------------
# Axes -> trainer settings


def parse_axes(items: list[str]) -> list[Axis]:
    axes: list[Axis] = []
    for item in items:
        name, sep, raw = item.partition("=")
        values = tuple(v.strip() for v in raw.split(",") if v.strip())
        if not sep or not name or not values:
            raise AblationError(f"--axes {item!r}: expected NAME=V1,V2 (e.g. mim=on,off)")
        if len(set(values)) != len(values):
            raise AblationError(f"axis {name!r}: a value is repeated in {raw!r}")
        if name in (a.name for a in axes):
            raise AblationError(f"axis {name!r} is given twice")
        if name not in SHORTCUTS and "." not in name:
            raise AblationError(f"axis {name!r}: unknown; use {', '.join(SHORTCUTS)} or a dotted trainer key "
                                "(e.g. loss.koleo_weight)")
        axes.append(Axis(name, values))
    if not axes:
        raise AblationError("--axes: give at least one axis, e.g. mim=on,off")
    return axes


def parse_mixes(items: list[str]) -> dict[str, list[str]]:
    """``--mix NAME=PATH@W,PATH@W`` -> {NAME: [PATH@W, ...]} (commas separate the sources of one mix)."""
    mixes: dict[str, list[str]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        sources = [s.strip() for s in raw.split(",") if s.strip()]
        if not sep or not name or not sources:
            raise AblationError(f"--mix {item!r}: expected NAME=PATH[@WEIGHT],PATH[@WEIGHT]")
        mixes[name] = sources
    return mixes


def key_type(dotted: str) -> str:
    """The type a dotted trainer key takes, for error messages (``float``, ``int | None``); '' if unknown."""
    obj: Any = TrainConfig
    for part in dotted.split("."):
        if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
            return ""
        hints = typing.get_type_hints(obj)
        if part not in hints:
            return ""
        obj = hints[part]
    return getattr(obj, "__name__", str(obj).replace("typing.", ""))


def rejected(axis: str, value: str, accepted: str, why: str = "") -> AblationError:
    return AblationError(f"axis {axis!r}: value {value!r} is not accepted{f' ({why})' if why else ''}; "
                         f"accepted: {accepted}")


def axis_overrides(axis: str, value: str, base: TrainConfig) -> list[str]:
    """The trainer overrides one axis value stands for (``data`` and ``sources`` act on --data instead)."""
    if axis == "mim":
        if value not in ("on", "off"):
            raise rejected(axis, value, "on, off")
        if value == "off":
            return ["loss.ibot_weight=0", "loss.mask_sample_probability=0"]
        # "on" must mean on even when the base config turned it off: the trainer's defaults then.
        loss = base.loss if base.loss.ibot_weight > 0 and base.loss.mask_sample_probability > 0 else type(base.loss)()
        return [f"loss.ibot_weight={loss.ibot_weight}", f"loss.mask_sample_probability={loss.mask_sample_probability}"]
    if axis == "resolution":
        patch = base.model.patch_size
        accepted = f"a multiple of model.patch_size={patch} that is at least {2 * patch}, e.g. {8 * patch}, {16 * patch}"
        try:
            size = int(value)
        except ValueError:
            raise rejected(axis, value, accepted) from None
        if size % patch or size < 2 * patch:
            raise rejected(axis, value, accepted)
        # Locals keep their share of the global crop, on the patch grid (112/56 in small -> 224/112).
        local = max(patch, round(size * base.crops.local_size / base.crops.global_size / patch) * patch)
        return [f"crops.global_size={size}", f"model.img_size={size}", f"crops.local_size={local}"]
    if axis in ("data", "sources"):
        return []
    return [f"{axis}={value}"]


def fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        f = math.nan
    if not 0 < f <= 1:
        raise rejected("data", value, "a fraction of the images in (0, 1], e.g. 0.25, 0.5, 1.0")
    return f


def subset_sources(sources: list[str], f: float, seed: int, folder: Path) -> tuple[list[str], dict[str, list[str]]]:
    """A seeded fraction ``f`` of every source's images as ``.txt`` manifests (weights kept); nested: the images of
    a smaller fraction are among those of a larger one (one permutation per source, cut at different lengths)."""
    from trainer.data import parse_source, read_manifest

    if f == 1.0:
        return list(sources), {}
    out, files = [], {}
    for i, spec in enumerate(sources):
        src = parse_source(spec)
        paths = read_manifest(src.path)
        order = np.random.default_rng([seed, i]).permutation(len(paths))
        keep = sorted(order[:max(1, round(f * len(paths)))])
        path = folder / f"data-{f:g}" / f"source{i}.txt"
        files[str(path)] = [str(paths[j].resolve()) for j in keep]
        out.append(str(path) if src.weight is None else f"{path}@{src.weight:g}")
    return out, files


def variant_settings(axes: list[Axis], grid: bool) -> list[dict[str, str]]:
    """The base (first value of every axis), then one axis at a time from it, or every combination."""
    base = {a.name: a.values[0] for a in axes}
    if grid:
        return [dict(zip(base, combo)) for combo in itertools.product(*(a.values for a in axes))]
    out = [base]
    for a in axes:
        out += [{**base, a.name: v} for v in a.values[1:]]
    return out


def build_plan(args: argparse.Namespace) -> tuple[list[Variant], list[TrainConfig]]:
    """Every variant with its trainer arguments and validated config; nothing is written or trained here."""
    axes = parse_axes(args.axes)
    mixes = parse_mixes(args.mix)
    common = list(args.override)
    try:
        base_cfg = load_config(args.config, common, steps=args.steps)
    except ValueError as e:
        raise AblationError(str(e)) from e
    names = {a.name for a in axes}
    if "sources" in names:
        for v in next(a for a in axes if a.name == "sources").values:
            if v not in mixes:
                raise rejected("sources", v, ", ".join(mixes) or "none: define mixes with --mix NAME=PATH@W,PATH@W")
        if args.data:
            raise AblationError("--data and a sources axis both name the data: put the --data manifests in a --mix")
    elif not args.data:
        raise AblationError("--data is required (or a sources axis with --mix)")
    # Each value alone first, so that an error names the axis and value rather than a variant.
    for a in axes:
        for v in a.values:
            if a.name == "data":
                fraction(v)
                continue
            try:
                load_config(args.config, common + axis_overrides(a.name, v, base_cfg), steps=args.steps)
            except ValueError as e:
                accepted = f"values of type {key_type(a.name)}" if key_type(a.name) else "a known trainer key"
                raise rejected(a.name, v, accepted, str(e)) from e
    variants, cfgs = [], []
    out = Path(args.output)
    first = {a.name: a.values[0] for a in axes}
    for settings in variant_settings(axes, args.grid):
        changed = [n for n in settings if settings[n] != first[n]]
        name = safe_name("_".join(f"{n}-{settings[n]}" for n in changed)) or BASE
        overrides = common + [o for n, v in settings.items() for o in axis_overrides(n, v, base_cfg)]
        sources = mixes[settings["sources"]] if "sources" in settings else list(args.data)
        subsets: dict[str, list[str]] = {}
        if "data" in settings:
            sources, subsets = subset_sources(sources, fraction(settings["data"]), args.seed, out / "data"
                                              / safe_name(settings.get("sources", "data")))
        try:
            cfg = load_config(args.config, overrides, steps=args.steps)
        except ValueError as e:
            raise AblationError(f"variant {name}: {e}") from e
        cfg.data.sources = sources
        value = ",".join(settings[n] for n in changed) or ", ".join(f"{n}={x}" for n, x in settings.items())
        variants.append(Variant(name, "+".join(changed) or BASE, value,
                                settings, overrides, sources, subsets))
        cfgs.append(cfg)
    return variants, cfgs


# ----------------------------------------------------------------------------------------------------------------
# Training


def variant_dir(output: Path, v: Variant) -> Path:
    return output / "variants" / v.name


def finished(run: Path, cfg: TrainConfig) -> bool:
    """The run's newest intact checkpoint (the one it would resume from) is at this variant's last iteration."""
    from trainer.checkpoint import newest_intact, read_state

    ckpt = newest_intact(run)
    return ckpt is not None and read_state(ckpt)["iteration"] >= cfg.optim.total_iters


def check_existing(output: Path, variants: list[Variant], cfgs: list[TrainConfig]) -> None:
    """A variant folder trained with other settings belongs to another ablation: refuse rather than mix them."""
    from trainer.checkpoint import newest_intact
    from trainer.config import config_changes

    for v, cfg in zip(variants, cfgs):
        ckpt = newest_intact(variant_dir(output, v))
        changes = config_changes(ckpt / "config.yaml", cfg) if ckpt is not None else []
        if changes:
            raise AblationError(f"{variant_dir(output, v)} was trained with other settings ({'; '.join(changes)}): "
                                "use another --output for a different ablation")


def write_plan(output: Path, variants: list[Variant], args: argparse.Namespace) -> None:
    for v in variants:
        for path, lines in v.subsets.items():
            atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    atomic_write_json(output / PLAN, {
        "config": args.config, "steps": args.steps, "eval_tasks": args.eval_task,
        "figure_metrics": split_patterns(args.figure_metrics),
        "variants": [{k: val for k, val in dataclasses.asdict(v).items() if k != "subsets"} for v in variants]})


def train_all(output: Path, variants: list[Variant], cfgs: list[TrainConfig]) -> int:
    """Train the unfinished variants one after the other: 0, or the exit status when a signal stopped one (130
    for Ctrl-C, else 1; rerun to resume)."""
    from trainer.train import train

    for v, cfg in zip(variants, cfgs):
        run = variant_dir(output, v)
        if finished(run, cfg):
            print(f"variant {v.name}: finished, skipped ({run})", flush=True)
            continue
        print(f"variant {v.name}: training {cfg.optim.total_iters} iterations in {run}", flush=True)
        state = train(cfg, run, resume="auto")
        if state.stopped_by is not None:
            print(f"variant {v.name} stopped by {state.stopped_by} at iteration {state.iteration}; rerun the same "
                  "command to resume it", file=sys.stderr)
            return EXIT_INTERRUPTED if state.stopped_by == "SIGINT" else 1
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: harness.evaluate and harness.outputs, then the tidy table, the leaderboard section and the figure


def model_names(output: Path, variants: list[Variant]) -> dict[str, tuple[str, str, str]]:
    """``ckpt:`` encoder name -> (variant, axis, value), the base first (the reference), then its step-0 weights
    unless the config turned them off (run.save_initial=false)."""
    from trainer.checkpoint import latest_checkpoint

    names = {f"ckpt:{variant_dir(output, v)}": (v.name, v.axis, v.value) for v in variants}
    init = variant_dir(output, next(v for v in variants if v.name == BASE)) / INIT
    if latest_checkpoint(init) is not None:
        names[f"ckpt:{init}"] = (INIT, INIT, "step 0")
    return names


def summary_at(node: dict, metric: str) -> dict | None:
    """The summary (point, lo, hi) a ``paired_to_reference`` entry refers to, beside it in a protocol's results:
    ``metric`` itself (seg), ``metrics/<metric>/macro`` (linear) or ``<a>/<b>`` for ``a_b`` (demographics)."""
    a, _, b = metric.partition("_")
    for path in ([metric], ["metrics", metric, "macro"], [a, b]):
        cur: Any = node
        for part in path:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if isinstance(cur, dict) and "point" in cur:
            return cur
    return None


def paired_paths(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """(path, metric) of every paired comparison in a model's protocol results."""
    if not isinstance(node, dict):
        return []
    found = [(path, m) for m in (node.get("paired_to_reference") or {})]
    for k, v in node.items():
        if k != "paired_to_reference":
            found += paired_paths(v, (*path, k))
    return found


def node_at(node: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def tidy_rows(eval_dir: Path, names: dict[str, tuple[str, str, str]]) -> list[dict]:
    """One row per (task, variant, metric) from the results JSON of the leaderboards made for exactly these models."""
    from harness.tidy import ALPHA

    rows = []
    for manifest in sorted((eval_dir / "results").glob("*.leaderboard.json")):
        settings = json.loads(manifest.read_text())["settings"]
        if list(settings["models"]) != list(names):
            continue  # a leaderboard of an earlier evaluation with other variants
        folder = manifest.parent / manifest.name.removesuffix(".leaderboard.json")
        results = {m: json.loads((folder / f"{safe_name(m)}.json").read_text())["protocols"] for m in names}
        metrics = list(dict.fromkeys(pm for m in names for pm in paired_paths(results[m])))
        for path, metric in metrics:
            for model, (variant, axis, value) in names.items():
                s = summary_at(node_at(results[model], path) or {}, metric)
                d = (node_at(results[model], (*path, "paired_to_reference")) or {}).get(metric) or {}
                if s is None:
                    continue
                rows.append({"task": settings["task"], "axis": axis, "value": value, "variant": variant,
                             "metric": "/".join((*path, metric)), "point": s.get("point"), "lo": s.get("lo"),
                             "hi": s.get("hi"), "delta": d.get("delta"), "delta_lo": d.get("lo"),
                             "delta_hi": d.get("hi"), "p_holm": d.get("p_holm"),
                             "significant": d.get("p_holm") is not None and d["p_holm"] < ALPHA})
    return rows


def write_table(output: Path, rows: list[dict]) -> None:
    import polars as pl

    schema = {c: pl.Float64 for c in ("point", "lo", "hi", "delta", "delta_lo", "delta_hi", "p_holm")}
    df = pl.DataFrame(rows, schema={**{c: pl.Utf8 for c in TABLE_COLUMNS}, **schema, "significant": pl.Boolean})
    with atomic_path(output / "ablation.parquet") as tmp:
        df.write_parquet(tmp)
    with atomic_path(output / "ablation.csv") as tmp:
        df.write_csv(tmp)


def write_section(output: Path, rows: list[dict], variants: list[Variant]) -> None:
    from harness.leaderboard import Cell, Section, render

    columns = list(dict.fromkeys(f"{r['task']}: {r['metric']}" for r in rows))
    labels = {v.name: f"{v.name} ({', '.join(f'{k}={x}' for k, x in v.settings.items())})" for v in variants}
    labels[INIT] = f"{INIT} (base, step 0)"
    table: dict[str, dict[str, Cell]] = {}
    for r in rows:
        table.setdefault(labels[r["variant"]], {})[f"{r['task']}: {r['metric']}"] = Cell(
            r["point"], r["lo"], r["hi"], r["significant"])
    section = Section("Ablation", columns, table, notes=[
        "Reference: the base variant; every variant differs from it in the axes its name gives. Full leaderboards "
        "(per label, notes) in `eval/`."])
    header = [("Variants", f"{len(variants)} trained in `variants/`, plus the base's step-0 weights"),
              ("Table", "`ablation.parquet` / `ablation.csv`; figure `ablation.png`")]
    atomic_write_text(output / "ablation.md", render("Ablation", header, [section]))


def split_patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def select_metrics(rows: list[dict], patterns: list[str]) -> list[dict]:
    """The rows whose ``task: metric`` contains one of `patterns` (all rows without patterns), for a figure of the
    headline metrics only; AblationError when a pattern matches nothing, naming the metrics there are."""
    if not patterns:
        return rows
    names = list(dict.fromkeys(f"{r['task']}: {r['metric']}" for r in rows))
    missing = [p for p in patterns if not any(p in n for n in names)]
    if missing:
        raise AblationError(f"--figure-metrics {','.join(missing)}: matches no metric; there are: {', '.join(names)}")
    return [r for r in rows if any(p in f"{r['task']}: {r['metric']}" for p in patterns)]


def draw(output: Path, rows: list[dict], variants: list[Variant], patterns: list[str]) -> Path:
    """ablation.png from the table's rows (only the metrics matching `patterns`, when given)."""
    from harness.figures.ablation import FILE, figure
    from harness.figures.common import png_bytes

    fig = figure(select_metrics(rows, patterns), next(v for v in variants if v.name == BASE).settings)
    with atomic_path(output / FILE) as tmp:
        tmp.write_bytes(png_bytes(fig))
    return output / FILE


def replot(output: Path, patterns: list[str]) -> int:
    """Redraw ablation.png from OUTPUT/ablation.parquet and plan.json: nothing is trained or evaluated."""
    import polars as pl

    table, plan = output / "ablation.parquet", output / PLAN
    if not table.is_file() or not plan.is_file():
        print(f"error: --replot: {output} has no ablation.parquet and plan.json (run the ablation first)",
              file=sys.stderr)
        return 2
    rows = pl.read_parquet(table).to_dicts()
    variants = [Variant(**v) for v in json.loads(plan.read_text())["variants"]]
    try:
        path = draw(output, rows, variants, patterns)
    except AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def eval_options(args: argparse.Namespace) -> tuple[EvalOptions, TaskContext]:
    """What the variants are evaluated with: the evaluation flags, the evaluation's defaults for those not given."""
    from harness.common.paths import cache_dir
    from harness.evaluate import EvalOptions
    from harness.tasks.base import TaskContext
    from harness.taskspec import parse_data_roots

    defaults = EvalOptions()
    options = EvalOptions(seed=args.seed, split=args.eval_split, global_pool=args.global_pool or defaults.global_pool,
                          bootstrap=defaults.bootstrap if args.bootstrap is None else args.bootstrap,
                          min_positive_patients=(defaults.min_positive_patients if args.min_positive_patients is None
                                                 else args.min_positive_patients),
                          cache_dir=Path(args.cache_dir) if args.cache_dir else cache_dir(),
                          device=args.eval_device or defaults.device)
    root, named = parse_data_roots(args.data_root)
    return options, TaskContext(data_root=root, data_roots=named, seed=args.seed)


def evaluate(output: Path, options: EvalOptions, ctx: TaskContext) -> int:
    """Every variant of OUTPUT/plan.json evaluated on the plan's tasks (leaderboards in OUTPUT/eval/, the base the
    reference), then the table, the section and the figure."""
    import dataclasses

    from baselines.registry import WeightsMissing
    from harness.evaluate import load_encoders
    from harness.listing import status_table
    from harness.log import setup_logging
    from harness.outputs import evaluate_and_write
    from harness.taskspec import read_tasks

    setup_logging()
    plan = json.loads((output / PLAN).read_text())
    variants = [Variant(**v) for v in plan["variants"]]
    names = model_names(output, variants)
    try:
        encoders, _ = load_encoders(list(names), None, options, explicit=set(names))
    except (WeightsMissing, KeyError, ValueError, FileNotFoundError) as e:  # a checkpoint that cannot be loaded
        raise AblationError(str(e)) from e
    print(status_table(encoders, [], None))
    specs = [spec for text in plan["eval_tasks"] for spec in read_tasks(text)]
    for path in evaluate_and_write(specs, encoders, dataclasses.replace(options, reference=encoders[0].name), ctx,
                                   output / "eval"):
        print(f"wrote {path}")
    rows = tidy_rows(output / "eval", names)
    if not rows:
        print("error: the evaluation wrote no paired comparison to tabulate", file=sys.stderr)
        return 1
    write_table(output, rows)
    write_section(output, rows, variants)
    try:
        draw(output, rows, variants, plan.get("figure_metrics", []))
    except AblationError as e:  # a pattern matching nothing: the table and section are written; say so
        print(f"error: {e} (the table and ablation.md are written; redraw with --replot)", file=sys.stderr)
        return 2
    print(f"wrote {output / 'ablation.md'}, {output / 'ablation.parquet'}, {output / 'ablation.csv'}, "
          f"{output / 'ablation.png'}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# SLURM: the training jobs as one array, the evaluation as a job that depends on it


def evaluate_job(output: Path, options: EvalOptions, ctx: TaskContext) -> str:
    """The dependent job: `evaluate` (its linear probes on the job's own CPUs), failing the job (so SLURM and
    submitit report it) on a non-zero status."""
    import dataclasses

    from harness.protocols import usable_cores

    code = evaluate(output, dataclasses.replace(options, probe=dataclasses.replace(options.probe,
                                                                                   n_jobs=usable_cores())), ctx)
    if code != 0:
        raise RuntimeError(f"the ablation's evaluation exited with {code} (see the log)")
    return str(output / "ablation.png")


def submit_slurm(args: argparse.Namespace, variants: list[Variant], cfgs: list[TrainConfig]) -> int:
    from slurm.cluster import executor_parameters, make_executor, resolve_options, sbatch_script
    from slurm.pretrain import PretrainJob

    opts = resolve_options(args)
    folder = (args.folder or args.output / "slurm").resolve() / "%j"
    pending = [v for v, cfg in zip(variants, cfgs) if not finished(variant_dir(args.output, v), cfg)]
    train_params = executor_parameters(opts, job_name="raddino-ablate-train", tasks_per_node=max(opts.gpus_per_node, 1),
                                       array_parallelism=args.array_parallelism)

    def eval_params(array_id: str | None) -> dict:
        params = executor_parameters(opts, job_name="raddino-ablate-eval", gpus_per_node=args.eval_gpus)
        if array_id is not None:
            # afterok: evaluate complete runs only; kill-on-invalid-dep ends the job when a training job fails
            # instead of leaving it pending forever.
            params["dependency"] = f"afterok:{array_id}"
            params["additional_parameters"] = {**params["additional_parameters"], "kill-on-invalid-dep": "yes"}
        return params

    if args.dry_run:
        if pending:
            print(f"\n# training array ({len(pending)} variants: {', '.join(v.name for v in pending)})\n"
                  + sbatch_script(folder, train_params, array_size=len(pending)))
        print("\n# evaluation (leaderboards, table, figure)\n"
              + sbatch_script(folder, eval_params("<array job id>" if pending else None)))
        return 0
    write_plan(args.output, variants, args)
    array_id = None
    if pending:
        executor = make_executor(folder, train_params, args.max_requeues)
        with executor.batch():  # one sbatch array for all of them
            jobs = [executor.submit(PretrainJob(args.config, variant_dir(args.output, v), v.sources, args.steps,
                                                v.overrides)) for v in pending]
        array_id = jobs[0].job_id.split("_")[0]
        for v, job in zip(pending, jobs):
            print(f"submitted training of {v.name}: job {job.job_id}, log {job.paths.stdout}")
    eval_job = make_executor(folder, eval_params(array_id)).submit(evaluate_job, args.output, *eval_options(args))
    print(f"submitted evaluation: job {eval_job.job_id}, log {eval_job.paths.stdout}", flush=True)
    if not args.wait:
        return 0
    try:
        print(f"wrote {eval_job.result()}")
    except Exception as e:  # submitit re-raises the job's error (or its cancellation) here
        print(f"error: evaluation job {eval_job.job_id} failed: {str(e).strip().splitlines()[-1]}\n"
              f"  log: {eval_job.paths.stderr}; a rerun of the same command resumes the unfinished variants",
              file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Command line


PROG = "python -m harness.ablate"
EXAMPLES = """\
examples:
  %(prog)s --config smoke --data /data/cxr/train.csv --eval-task demo --output ablations/mim --axes mim=on,off
  %(prog)s --config small --data /data/cxr/train.csv --eval-task csv:/data/eval/labels.csv \\
      --output ablations/res --axes resolution=112,224 data=0.25,1.0 --dry-run
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from slurm.cluster import add_cluster_args

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2] + "\n" + EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # --config, --axes and --eval-task are required except with --replot (checked in main, exit 2).
    p.add_argument("--config", help="trainer preset (smoke, small, rad-dino) or YAML file (required)")
    p.add_argument("--data", action="append", default=[],
                   help="image manifest of every variant (repeatable, PATH@WEIGHT to mix); a data axis subsets it")
    p.add_argument("--mix", action="append", default=[], metavar="NAME=PATH@W,PATH@W",
                   help="a named mix of manifests, a value of the sources axis (repeatable)")
    p.add_argument("--axes", nargs="+", metavar="NAME=V1,V2",
                   help="mim=on,off resolution=N,.. data=F,.. sources=MIX,.. or KEY=V1,V2 for any dotted trainer "
                        "key; the first value of each is the base's")
    p.add_argument("--grid", action="store_true", help="every combination instead of one axis at a time")
    p.add_argument("--output", required=True, type=Path, help="the ablation's folder (a rerun resumes it)")
    p.add_argument("--steps", type=int, help="iterations of every variant (the warm-ups keep their share)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer setting of every variant (repeatable)")
    p.add_argument("--eval-task", action="append",
                   help="harness task the variants are evaluated on (demo, csv:PATH, vindr, ...; repeatable; "
                        "required)")
    p.add_argument("--figure-metrics", default="", metavar="PAT,PAT",
                   help="draw only the metrics whose 'task: metric' name contains one of these (e.g. "
                        "'linear/auroc,multi-level/mask/dice'); the table keeps every metric")
    p.add_argument("--replot", action="store_true",
                   help="only redraw ablation.png of --output from its ablation.parquet (with --figure-metrics): "
                        "nothing is trained or evaluated")
    p.add_argument("--seed", type=int, default=0, help="seed of the data fractions and of the evaluation's split "
                                                       "and bootstrap")
    p.add_argument("--eval-split", choices=("test", "validation"), default="test",
                   help="evaluation: harness.run --split; validation scores a split of the eval task's training "
                        "patients, for choosing among variants without touching the test patients")
    p.add_argument("--global-pool", choices=("cls", "avg", "cls+avg"),
                   help="evaluation: harness.run --global-pool (harness default)")
    p.add_argument("--bootstrap", type=int, help="evaluation: patient-level bootstrap resamples (harness default)")
    p.add_argument("--min-positive-patients", type=int,
                   help="evaluation: positive (and negative) test patients a label needs (harness default)")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR|NAME=DIR",
                   help="evaluation: folder of the registered datasets (as harness.run)")
    p.add_argument("--cache-dir", help="evaluation: feature cache (as harness.run)")
    p.add_argument("--eval-device", help="evaluation: device (as harness.run --device)")
    s = p.add_argument_group("SLURM")
    s.add_argument("--slurm", action="store_true", help="submit the training as a job array and the evaluation as "
                                                        "a dependent job (the cluster options below)")
    s.add_argument("--array-parallelism", type=int, default=16, help="training jobs running at once")
    s.add_argument("--max-requeues", type=int, default=20, help="time-out requeues of a training job")
    s.add_argument("--eval-gpus", type=int, default=0, help="GPUs of the evaluation job")
    s.add_argument("--wait", action="store_true", help="wait for the evaluation job and report its result")
    add_cluster_args(p)
    add_verbose_flag(p)
    return p


def check_flags(args: argparse.Namespace) -> None:
    """The numeric flags, --output, and the evaluation's --cache-dir and --eval-device (UsageError)."""
    from harness.checks import check_device
    from harness.common.devices import check_here, pick_device

    for flag, value, allowed in (("--steps", args.steps, AT_LEAST_1), ("--seed", args.seed, AT_LEAST_0),
                                 ("--bootstrap", args.bootstrap, AT_LEAST_1),
                                 ("--min-positive-patients", args.min_positive_patients, AT_LEAST_1),
                                 ("--array-parallelism", args.array_parallelism, AT_LEAST_1),
                                 ("--max-requeues", args.max_requeues, AT_LEAST_0),
                                 ("--eval-gpus", args.eval_gpus, AT_LEAST_0)):
        check_flag(flag, value, allowed)
    if "," in str(args.output):
        raise AblationError(f"--output {args.output}: no commas, please (the harness's --models is a comma list)")
    check_writable_folder(args.output, "--output")
    if args.cache_dir:
        check_writable_folder(Path(args.cache_dir), "--cache-dir")
    if args.eval_device:
        check_device(args.eval_device)
        if not args.slurm:  # evaluated here, so its device must be here; a SLURM job runs where the device is
            check_here(pick_device(args.eval_device), f"--eval-device {args.eval_device}")


def check_inputs(args: argparse.Namespace, variants: list[Variant], cfgs: list[TrainConfig]) -> None:
    """Every manifest is read as the trainer will read it (present, listing images that exist, its first sample
    decoded) and the evaluation tasks are built, so that neither fails after hours of training and a failed
    ablation leaves no plan.json behind. The data-fraction manifests (under --output) are cut from these."""
    from harness.tasks.base import TaskError, build_task
    from harness.taskspec import read_tasks
    from trainer.train import open_data

    paths = []  # every image the manifests list, read once here for the test-overlap warning too
    for spec in dict.fromkeys(s for v in variants for s in v.sources if not s.startswith(str(args.output))):
        one = dataclasses.replace(cfgs[0], data=dataclasses.replace(cfgs[0].data, sources=[spec]))
        paths += open_data(one).paths
    _, ctx = eval_options(args)
    tasks = []
    for spec in (s for text in args.eval_task for s in read_tasks(text)):
        try:
            tasks.append(build_task(spec.name, spec.arg, ctx))
        except (TaskError, KeyError, ValueError, OSError) as e:
            raise AblationError(f"--eval-task {spec.text!r}: {e}") from e
    warn_test_overlap(args, list(dict.fromkeys(paths)), tasks)


def warn_test_overlap(args: argparse.Namespace, paths: list[Path], tasks: list) -> None:
    """A warning naming the count when the pretraining images include test-split images of an evaluation task:
    the harness's numbers on that split would be optimistic (docs/pretraining.md, "Pretrain on the training
    patients only")."""
    from harness.splits import count_identical_files, test_split_digests

    for task in tasks:
        overlap = count_identical_files(paths, test_split_digests(task, args.seed))
        if overlap:
            print(f"warning: {overlap} of the {len(paths)} pretraining image(s) in --data are byte-identical to "
                  f"test-split images of {task.name} (seed {args.seed}); its leaderboard would be optimistic. "
                  "Pretrain on the training patients only (docs/pretraining.md#pretrain-on-the-training-patients-only)",
                  file=sys.stderr)


def print_plan(output: Path, variants: list[Variant], cfgs: list[TrainConfig]) -> None:
    from trainer.checkpoint import newest_intact, read_state

    print(f"ablation {output}: {len(variants)} variants")
    for v, cfg in zip(variants, cfgs):
        run = variant_dir(output, v)
        ckpt = newest_intact(run)
        status = ("finished" if finished(run, cfg) else
                  f"resumes at {read_state(ckpt)['iteration']}" if ckpt else "to train")
        what = "base" if v.axis == BASE else ", ".join(f"{a}={x}" for a, x in zip(v.axis.split("+"),
                                                                             v.value.split(",")))
        print(f"  {v.name:<28} {what:<28} {cfg.optim.total_iters} it, {status}")


@command
def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    args.output = args.output.resolve()
    if args.replot:
        return replot(args.output, split_patterns(args.figure_metrics))
    missing = [flag for flag, value in (("--config", args.config), ("--axes", args.axes),
                                        ("--eval-task", args.eval_task)) if not value]
    if missing:
        raise AblationError(f"{', '.join(missing)} required (only --replot goes without them)")
    # Everything is checked before anything is written (plan.json) or trained; the trainer's own errors (a key,
    # a value, a manifest) are UsageErrors too, and a first image that cannot be decoded a DataError.
    check_flags(args)
    try:
        variants, cfgs = build_plan(args)
    except UsageError:
        raise
    except (ValueError, OSError) as e:  # a manifest read to cut a data fraction from it
        raise AblationError(str(e)) from e
    check_inputs(args, variants, cfgs)
    check_existing(args.output, variants, cfgs)
    if args.slurm:
        from slurm.cluster import resolve_options

        try:
            resolve_options(args)  # a bad --time or cluster file fails here, before the plan is printed
        except (ValueError, FileNotFoundError) as e:
            raise AblationError(str(e)) from e
    print_plan(args.output, variants, cfgs)
    if args.slurm:
        return submit_slurm(args, variants, cfgs)
    if args.dry_run:
        return 0
    write_plan(args.output, variants, args)
    code = train_all(args.output, variants, cfgs)
    return code or evaluate(args.output, *eval_options(args))


if __name__ == "__main__":
    sys.exit(main())
