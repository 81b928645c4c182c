"""Where the harness keeps its caches by default, file names made from task and model names, and the check that an
output folder can be written."""
from __future__ import annotations

import os
import re
from pathlib import Path

from harness.common.errors import UsageError

#: The environment variable that moves every cache of the harness (features, file digests).
CACHE_ENV = "RADDINO_BENCH_CACHE"
#: Relative to the working directory, as a project's other build outputs are: a feature cache can reach hundreds of
#: GB (dense ViT grids over a whole dataset), too much for the small home quotas of clusters.
DEFAULT_CACHE = Path(".cache/raddino-bench")


def cache_dir() -> Path:
    """``$RADDINO_BENCH_CACHE`` when set and not empty, else DEFAULT_CACHE. Read at each call, not at import, so a
    test or a launcher that sets the variable later is obeyed."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def safe_name(s: str) -> str:
    """A file-name-safe version of a task or model name (``ckpt:/runs/a`` -> ``ckpt_runs_a``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


def check_writable_folder(path: Path, flag: str) -> None:
    """UsageError naming `flag` unless `path` is a folder this process may write in, or one it may create (its
    nearest existing ancestor is such a folder). Nothing is created: a command that fails later leaves no empty
    folder behind, and one that fails here has written nothing at all."""
    path = Path(path).expanduser()
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path.absolute() else f"lies under {existing}, which is a file"
        raise UsageError(f"{flag} {path}: {where}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path.absolute() else f" ({existing}, where it would be made)"
        raise UsageError(f"{flag} {path}: not writable{where}; choose a folder you can write, or fix its permissions")
