"""Messages and progress bars of the harness: both go to stderr, so stdout holds only results (tables, `wrote`
lines) and can be piped or saved as they are.

`setup_logging(verbosity)` configures the ``harness`` logger once per command (``-q`` = -1: warnings and errors;
0: progress messages; ``-v`` = 1: debug messages too). `progress(iterable, desc)` wraps a long loop in a bar that
shows only where someone watches: never with ``-q``, on a terminal by default, and with ``-v`` even when stderr is
redirected (a log file then shows where a long run is). Without `setup_logging` (the harness used as a library)
the logger is Python's default: warnings only, no bars.
"""
from __future__ import annotations

import logging
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

LOGGER = "harness"

T = TypeVar("T")


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message is emitted, not when the handler was made: the same
    process may run several commands (tests, the ablation's evaluation) under changing streams."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass  # always sys.stderr (see the class docstring)


def setup_logging(verbosity: int = 0) -> logging.Logger:
    """Route the ``harness`` loggers to stderr at the level `verbosity` asks for (replacing the handler of an
    earlier call in this process) and return the ``harness`` logger."""
    log = logging.getLogger(LOGGER)
    for old in [h for h in log.handlers if isinstance(h, _Stderr)]:
        log.removeHandler(old)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))  # as the prints were: the messages are for people
    log.addHandler(handler)
    log.setLevel(logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG)
    return log


def progress_enabled() -> bool:
    """Whether bars are shown: at debug level (``-v``) always, at info level when stderr is a terminal."""
    level = logging.getLogger(LOGGER).getEffectiveLevel()
    if level <= logging.DEBUG:
        return True
    return level <= logging.INFO and sys.stderr.isatty()


def progress(iterable: Iterable[T] | None, desc: str, *, total: int | None = None, unit: str = "it") -> tqdm:
    """`iterable` wrapped in a progress bar on stderr (see the module docstring for when it shows). The bar goes
    away when the loop ends (the log line that follows says what was done); ``progress(None, desc, total=n)``
    is a bar to ``update`` by hand."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=not progress_enabled())
