"""``raddino-bench``: one console script for every tool of the project.

    raddino-bench eval --models pixels,random-vit --tasks demo      # = python -m harness.run
    raddino-bench ls [PATTERN]                                      # encoders, tasks, protocols
    raddino-bench COMMAND --help

Each command is an existing ``python -m`` tool, run with its own parser (its flags, help and examples), so both
spellings accept exactly the same arguments. Nothing heavy is imported before a command is chosen:
``raddino-bench --help`` loads neither torch nor any encoder. Exit codes (harness.common.errors, the same for
every tool): 0 done, 1 the work failed (bad data in a task's files, stale leaderboards, a failed job), 2 a usage
error (reported before anything is built), 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from harness.common.errors import UsageError, command
from harness.taskspec import suggest

PROG = "raddino-bench"


@dataclass(frozen=True)
class Command:
    summary: str
    #: module whose ``main(argv, prog=...)`` runs the command; empty for the commands defined here (ls, plot)
    module: str = ""
    #: arguments put before the user's (``harness.leaderboard``'s own sub-command)
    fixed: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {
    "eval": Command("evaluate frozen encoders on tasks and write leaderboards (python -m harness.run)",
                    "harness.run"),
    "ls": Command("list the encoders (are their weights present, and where), the tasks and the protocols"),
    "check": Command("compare fresh leaderboards with the committed ones (python -m harness.leaderboard check)",
                     "harness.leaderboard", ("check",)),
    "plot": Command("figures of a harness output folder (python -m harness.plot), or a training run's learning "
                    "curves (python -m trainer.plot)"),
    "train": Command("pretrain an encoder: DINOv2 + iBOT + KoLeo (python -m trainer.train)", "trainer.train"),
    "export": Command("export a training run's teacher backbone (python -m trainer.export)", "trainer.export"),
    "ablate": Command("a pretraining ablation: train every variant, evaluate, tabulate, plot "
                      "(python -m harness.ablate)", "harness.ablate"),
    "slurm-pretrain": Command("one DDP pretraining job across SLURM nodes (python -m slurm.pretrain)",
                              "slurm.pretrain"),
    "slurm-sweep": Command("a leaderboard sweep as SLURM jobs (python -m slurm.sweep)", "slurm.sweep"),
}

EXAMPLES = """\
examples:
  %(prog)s eval --models pixels,random-vit --tasks demo            # writes runs/demo/demo.md
  %(prog)s eval --models all --tasks csv --task-arg csv.path=/data/a,b/labels.csv --protocols linear,knn
  %(prog)s ls --weights-dir /data/weights
"""


def _version() -> str:
    try:
        return importlib.metadata.version("raddino-bench")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS)) + 2
    listing = "\n".join(f"  {name:<{width}}{c.summary}" for name, c in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Pretrain chest X-ray encoders (RAD-DINO recipe) and evaluate frozen encoders with identical "
                    f"protocols.\n\ncommands:\n{listing}\n\n'{PROG} COMMAND --help' shows a command's flags.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("command", metavar="COMMAND", help="one of the commands above")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="...", help="the command's own arguments")
    return p


def _call(main: Callable[..., int], argv: list[str], prog: str) -> int:
    """A tool's ``main(argv)``, told the name it was called by when it accepts one (for its usage lines)."""
    if "prog" in inspect.signature(main).parameters:
        return main(argv, prog=prog)
    return main(argv)


def _ls(argv: list[str], prog: str) -> int:
    p = argparse.ArgumentParser(prog=prog, description=COMMANDS["ls"].summary + " (= python -m harness.run --list)",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""\
examples:
  %(prog)s
  %(prog)s dino                             # names holding 'dino': rad-dino, dinov2-base
  %(prog)s 'bio*'                           # shell wildcards, as timm's list_models(pattern)
  %(prog)s --weights-dir /data/weights      # where 'eval --weights-dir /data/weights' would look
""")
    p.add_argument("pattern", nargs="?", default=None, metavar="PATTERN",
                   help="list only the encoders, tasks and protocols whose names match: shell wildcards (* ? [..]), "
                        "case-insensitive; without a wildcard, the names that contain it")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="folder with one sub-folder of weights per model (default: $RADDINO_BENCH_WEIGHTS, else "
                        "$HF_HOME/raddino-bench)")
    args = p.parse_args(argv)
    if args.weights_dir is not None and not args.weights_dir.is_dir():
        raise UsageError(f"--weights-dir {args.weights_dir} is not a directory")
    from harness.listing import list_registered

    if not list_registered(args.weights_dir, args.pattern):
        # grep's convention: the listing ran, and found nothing
        print(f"no encoder, task or protocol name matches {args.pattern!r}", file=sys.stderr)
        return 1
    return 0


#: A trainer run directory holds this file; any other folder is a harness output folder.
TRAINER_METRICS = "metrics.jsonl"

PLOT_HELP = f"""\
usage: {PROG} plot FOLDER [options of the tool that draws it]

{COMMANDS["plot"].summary}.
The folder decides: one holding {TRAINER_METRICS} is a training run (python -m trainer.plot RUN_DIR), any other a
harness output folder (python -m harness.plot RUN_OUT). '{PROG} plot FOLDER --help' shows that tool's options.

examples:
  {PROG} plot runs/demo                  # the figures of an evaluation run
  {PROG} plot runs/exp1                  # runs/exp1/learning_curves.png (runs/exp1 holds {TRAINER_METRICS})
  {PROG} plot runs/exp1 --out exp1.png
"""


def _plot(argv: list[str], prog: str) -> int:
    folders = [a for a in argv if not a.startswith("-")]
    if not folders:
        if {"-h", "--help"} & set(argv):
            print(PLOT_HELP, end="")
            return 0
        raise UsageError(f"{prog}: give a folder: a harness output folder or a training run directory "
                         f"(see {prog} --help)")
    folder = next((Path(a) for a in folders if Path(a).is_dir()), None)
    if folder is None:
        raise UsageError(f"{prog}: {folders[0]} is not a folder (give a harness output folder or a training run "
                         "directory)")
    if (folder / TRAINER_METRICS).is_file():
        from trainer.plot import main as trainer_plot

        return _call(trainer_plot, argv, prog)
    try:
        module = importlib.import_module("harness.plot")
    except ModuleNotFoundError as e:
        if e.name != "harness.plot":  # a dependency of it is missing: that is its own error
            raise
        raise UsageError(f"{prog} {folder}: plotting a harness output folder needs harness.plot, which this "
                         f"installation lacks (update raddino-bench); a training run directory holds "
                         f"{TRAINER_METRICS}") from None
    return _call(module.main, argv, prog)


def run_command(name: str, argv: list[str]) -> int:
    """Run command `name` with the arguments after it."""
    if name == "ls":
        return _ls(argv, f"{PROG} ls")
    if name == "plot":
        return _plot(argv, f"{PROG} plot")
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    # A tool with sub-commands of its own (harness.leaderboard) names them itself after our name.
    prog = PROG if command.fixed else f"{PROG} {name}"
    return _call(module.main, [*command.fixed, *argv], prog)


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command not in COMMANDS:
        raise UsageError(f"unknown command {args.command!r}{suggest(args.command, COMMANDS)}; commands: "
                         f"{', '.join(COMMANDS)}")
    return run_command(args.command, args.args)


if __name__ == "__main__":
    sys.exit(main())
