"""Where the harness keeps its caches by default, and file names made from task and model names."""
from __future__ import annotations

import os
import re
from pathlib import Path

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
