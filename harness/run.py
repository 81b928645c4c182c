"""``python -m harness.run`` (= ``raddino-bench eval``): evaluate frozen encoders on tasks and write leaderboards.

    python -m harness.run --models all --tasks demo
    python -m harness.run --models pixels,random-vit --tasks csv:../shared/data/ieee8023-covid-cxr/labels.csv

Every name on the command line is checked first (`harness.checks`): a usage error exits 2 before any weights are
loaded. Then the encoders are built and, task by task, `harness.evaluate.evaluate` computes everything (split,
features, protocols, bootstrap) and `harness.outputs.write` writes ``<out>/<name>.md`` (``--out`` unset:
``runs/<name>/<name>.md``) with ``<out>/results/<name>/<model>.json`` and per-image predictions (``<name>``: the
task's name plus the options that change its numbers, `harness.evaluate.output_name`). The flags are
`harness.flags`'s. Everything for one task is computed before anything of it is written, and every file is
written atomically.
"""
from __future__ import annotations

import logging
import sys

from baselines.registry import WeightsMissing
from harness.checks import check_eval_args
from harness.common.devices import check_here, pick_device
from harness.common.errors import UsageError, command
from harness.evaluate import load_encoders
from harness.flags import PROG, build_parser, eval_options, explicit_models, task_context
from harness.listing import list_registered, status_table
from harness.log import setup_logging
from harness.outputs import DEFAULT_RUNS, evaluate_and_write

#: Named, not __name__: run as ``python -m harness.run`` this module is __main__, outside the harness logger.
log = logging.getLogger("harness.run")


@command
def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    if args.list:
        list_registered(args.weights_dir)
        return 0
    names, specs = check_eval_args(args)
    device = pick_device(args.device)
    check_here(device, f"--device {args.device}")  # the sweep plans GPU jobs on machines without one; here the work runs here
    for spec in specs:
        log.debug(f"task {spec.text!r}: {spec.name}, argument {spec.arg!r}, protocols {', '.join(spec.protocols)}; "
                  f"output in {args.out if args.out is not None else DEFAULT_RUNS / '<output name>'}")
    options = eval_options(args)
    try:
        encoders, skipped = load_encoders(names, args.weights_dir, options, explicit_models(args))
    except (WeightsMissing, KeyError, ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    print(status_table(encoders, [n for n, _ in skipped], args.weights_dir))
    if not encoders:
        raise UsageError("no encoder could be loaded")
    reference = args.reference or encoders[0].name
    if reference not in {e.name for e in encoders}:
        raise UsageError(f"--reference {reference!r} is not among the loaded models")
    for path in evaluate_and_write(specs, encoders, options, task_context(args), args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
