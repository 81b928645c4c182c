"""One error path for every command: what a failure prints, and the exit status it ends with.

Every ``python -m`` tool's ``main`` and the ``raddino-bench`` console script are wrapped by `command`, so whatever
stops them ends the same way (docs/cli.md#exit-status holds the contract and its cases):

- `UsageError`: the command line cannot run (a flag, a config value, a path it names), found before anything is
  built or written: exit 2;
- any other exception (`DataError`: what a file holds is bad, a damaged checkpoint, a failed step): exit 1;
- KeyboardInterrupt (Ctrl-C): exit 130;

each as one line on stderr (``error: ...`` or ``interrupted``). ``-v`` adds the traceback. argparse's own errors
(an unknown flag, a missing argument) keep their usage line and exit 2.

`Interval` and `check_flag` are the range checks of numeric flags and config values: one spelling of "must be
>= 1" everywhere, and NaN or infinity never passes.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, TypeVar

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A command line that cannot run; the message is one line naming the flag (or key), the value and the fix."""


class DataError(RuntimeError):
    """The work failed on what a file holds (an image that cannot be decoded, a damaged checkpoint); the message
    names the file and the fix."""


Main = TypeVar("Main", bound=Callable[..., int])


def command(main: Main) -> Main:
    """Wrap a tool's ``main(argv, ...) -> int`` so that an exception becomes its exit status and one line on
    stderr. Nested calls (``raddino-bench eval`` runs ``harness.run``'s wrapped main) report once: the inner one
    returns a status, which the outer one passes on."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None, *args: object, **kwargs: object) -> int:
        verbose = wants_traceback(sys.argv[1:] if argv is None else argv)
        try:
            return main(argv, *args, **kwargs)
        except KeyboardInterrupt:
            _report("interrupted", verbose)
            return EXIT_INTERRUPTED
        except UsageError as e:
            _report(f"error: {one_line(e)}", verbose)
            return EXIT_USAGE
        except Exception as e:  # everything else failed the work; one line, the traceback only when asked
            _report(f"error: {one_line(e)}", verbose)
            return EXIT_FAILED

    return run  # type: ignore[return-value]  (same signature: functools.wraps)


def wants_traceback(argv: list[str]) -> bool:
    """``-v``, ``-vv`` or ``--verbose`` among the arguments (before a ``--``): read before the tool's own parser
    runs, so that an error raised while parsing shows its traceback too."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--verbose" or (arg.startswith("-v") and set(arg[1:]) == {"v"}):
            return True
    return False


def one_line(e: BaseException) -> str:
    """The exception as one line. Our own errors are one sentence (joined if wrapped); another library's message
    may hold a traceback of its own (a DataLoader worker's), so only its first line is kept, after its type."""
    if isinstance(e, (UsageError, DataError)):
        return " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if type(e).__module__ == "builtins" and str(e).strip():
        return first_line(e)
    return f"{type(e).__name__}: {first_line(e)} (an unexpected error; -v prints its traceback)"


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (its type's name when it has none)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _report(line: str, verbose: bool) -> None:
    if verbose:
        traceback.print_exc(file=sys.stderr)
    print(line, file=sys.stderr, flush=True)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``-v``: the traceback of an error (for the tools whose parser has no ``-v`` of its own)."""
    parser.add_argument("-v", "--verbose", action="count", default=0, help="on an error, print its traceback too")


@dataclass(frozen=True)
class Interval:
    """The values a number may take: finite, between `low` and `high` (each end included unless open)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def problem(self, x: float) -> str | None:
        """None when `x` is allowed, else what it must be."""
        if x in self:
            return None
        return f"must be {'a finite number ' if not math.isfinite(x) else ''}{self}"


AT_LEAST_0 = Interval(0)
AT_LEAST_1 = Interval(1)
POSITIVE = Interval(0, low_open=True)
UNIT = Interval(0, 1)
OPEN_UNIT = Interval(0, 1, low_open=True, high_open=True)


def check_flag(flag: str, value: float | None, allowed: Interval) -> None:
    """UsageError naming `flag` when its `value` (None: not given) lies outside `allowed`."""
    if value is not None and (why := allowed.problem(value)):
        raise UsageError(f"{flag} {value:g}: {why}")
