"""Every check an evaluation command line can fail, made before any weights are loaded or any task is read.

`check_eval_args` validates the numeric flags, the device, every model name (registered, its argument, a
``ckpt:DIR`` directory that exists, weights present for a model named explicitly), ``--reference``, every task
and protocol name (with ``--task-arg`` and ``--protocols``), a task's file, the ``--data-root`` folders, and that
``--out`` and ``--cache-dir`` can be written. A
failure is a `UsageError` with one line and, for a misspelt name, a did-you-mean: the command exits 2 having built
nothing. What only a task's own reader can judge (the contents of its files, the values of its options) is
checked when the task is built.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from baselines.registry import ENCODERS, resolve_names, weights_status
from harness.common.errors import AT_LEAST_0, POSITIVE, UsageError, check_flag
from harness.common.paths import check_writable_folder
from harness.probes import PROTOCOLS
from harness.taskspec import ROOT_NAME, TaskSpec, is_word, parse_fractions, read_tasks, suggest
from harness.tasks.base import TASKS


def task_specs(args: argparse.Namespace) -> list[TaskSpec]:
    """``--tasks`` with ``--protocols`` and every ``--task-arg`` applied (UsageError when malformed)."""
    return read_tasks(args.tasks, args.protocols, args.task_arg)


def check_numbers(args: argparse.Namespace) -> None:
    """The numeric flags' ranges (argparse has checked their types)."""
    if args.bootstrap < 1:
        raise UsageError("--bootstrap must be at least 1")
    if args.min_positive_patients < 1:
        raise UsageError("--min-positive-patients must be at least 1 (a label needs a positive patient to be "
                         "scored)")
    if args.knn_k < 1:
        raise UsageError("--knn-k must be at least 1")
    check_flag("--knn-temperature", args.knn_temperature, POSITIVE)
    check_flag("--seed", args.seed, AT_LEAST_0)
    check_flag("--dense-cache-gb", args.dense_cache_gb, AT_LEAST_0)
    if args.label_draws < 1:
        raise UsageError("--label-draws must be at least 1")
    if args.probe_jobs < 1:
        from harness.protocols import usable_cores

        raise UsageError(f"--probe-jobs must be at least 1 (got {args.probe_jobs}); this machine allows up to "
                         f"{usable_cores()} usefully")
    if not 0.0 < args.test_fraction < 1.0:
        raise UsageError(f"--test-fraction {args.test_fraction:g} must be between 0 and 1 (exclusive)")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be at least 1 and --workers at least 0")
    try:
        parse_fractions(args.label_fractions)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def check_models(args: argparse.Namespace) -> list[str]:
    """The model names to load (``all`` expanded); each registered and spelt with its argument as it needs, a
    ``name:DIR`` directory present, and the weights of a model named explicitly found on disk (looked up, not
    loaded: under ``all`` a model without weights is a listed skip instead)."""
    if args.weights_dir is not None and not args.weights_dir.is_dir():
        raise UsageError(f"--weights-dir {args.weights_dir} is not a directory")
    names = resolve_names(args.models)
    if not names:
        raise UsageError(f"--models {args.models!r} names no encoder (see: raddino-bench ls)")
    entries = ENCODERS.entries
    explicit = {m.strip() for m in args.models.split(",")} - {"all"}
    for name in names:
        base, _, arg = name.partition(":")
        entry = entries.get(base)
        if entry is None:
            raise UsageError(ENCODERS.unknown(base))
        if entry.takes_arg and not arg:
            raise UsageError(f"encoder {base!r} needs an argument: spell it {base}:DIR")
        if arg and not entry.takes_arg:
            raise UsageError(f"encoder {base!r} takes no argument (got {name!r})")
        # The one family with an argument, ckpt:DIR, takes a training run's directory.
        if arg and not Path(arg).expanduser().exists():
            raise UsageError(f"--models {name}: {arg} does not exist (give a training run directory or one of "
                             "its checkpoints/ckpt_* directories)")
        if name in explicit and not entry.takes_arg:
            status = weights_status(base, args.weights_dir)
            if status.startswith("missing: "):
                raise UsageError(status.removeprefix("missing: "))
    if args.reference is not None and args.reference not in names:
        raise UsageError(f"--reference {args.reference!r} is not among --models{suggest(args.reference, names)}; "
                         f"the models are {', '.join(names)}")
    return names


def check_task(spec: TaskSpec) -> None:
    """A registered task, with an argument when it takes one (its file, present), and an argument that can be
    options when it does not: a bare word there is a misspelt protocol, whatever the task."""
    tasks = TASKS.entries
    entry = tasks.get(spec.name)
    if entry is None:
        raise UsageError(f"--tasks: {TASKS.unknown(spec.name)}")
    if spec.arg is None:
        if entry.takes_arg:
            raise UsageError(f"--tasks: task {spec.name!r} needs its file: {spec.name}:PATH or "
                             f"--task-arg {spec.name}.path=PATH")
        return
    # `parse_task_list` keeps a last ':WORD' that is no protocol in the argument; a near miss is a typo.
    word = spec.arg.rpartition(":")[2]
    if word != spec.arg or not entry.takes_arg:
        hint = suggest(word, PROTOCOLS) if is_word(word) else ""
        if hint:
            raise UsageError(f"--tasks {spec.text!r}: unknown protocol {word!r}{hint}; protocols: "
                             f"{', '.join(PROTOCOLS)}")
    if entry.takes_arg:
        path = Path(spec.arg).expanduser()
        if not path.is_file():
            raise UsageError(f"task {spec.text!r}: {path} is not a file")
        return
    for piece in filter(None, (p.strip() for p in spec.arg.split(","))):
        if "=" not in piece:
            raise UsageError(f"--tasks {spec.text!r}: {piece!r} is neither a protocol ({', '.join(PROTOCOLS)}) nor "
                             "a KEY=VALUE option")


def check_data_roots(values: list[str]) -> None:
    """Every ``--data-root DIR`` a directory; every ``NAME=DIR`` a registered task's name and a directory."""
    tasks = TASKS.entries
    for v in values:
        key, sep, path = v.partition("=")
        if sep and ROOT_NAME.fullmatch(key):
            if key not in tasks:
                raise UsageError(f"--data-root {v}: no task {key!r}{suggest(key, tasks)}; NAME=DIR names one of "
                                 f"{', '.join(sorted(tasks))}")
        else:
            path = v
        if not Path(path).expanduser().is_dir():
            raise UsageError(f"--data-root {v}: {path} is not a directory")


def check_eval_args(args: argparse.Namespace) -> tuple[list[str], list[TaskSpec]]:
    """Everything the evaluation command will need, checked in the order of its flags; returns the model names to load
    and the task specs to evaluate. Raises UsageError on the first problem."""
    check_numbers(args)
    check_device(args.device)
    names = check_models(args)
    specs = task_specs(args)
    for spec in specs:
        check_task(spec)
    check_data_roots(args.data_root)
    check_outputs(args)
    return names, specs


def check_outputs(args: argparse.Namespace) -> None:
    """--out (or the default runs/), the folders it will hold, and --cache-dir: each a folder that can be written,
    or made, so that nothing fails to be written after the features and the probes have been computed."""
    from harness.outputs import DEFAULT_RUNS

    if args.out is None:  # each task in its own runs/<name>/
        check_writable_folder(DEFAULT_RUNS, "--out (default runs/)")
    else:
        for folder in (args.out, args.out / "splits", args.out / "results", args.out / "figures"):
            check_writable_folder(folder, "--out")
    check_writable_folder(args.cache_dir, "--cache-dir")
