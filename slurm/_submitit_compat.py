"""The one place that uses submitit's private API, checked before use.

``--dry-run`` prints the exact sbatch file submitit would submit. submitit has no public function for that text:
``SlurmExecutor`` writes it with ``submitit.slurm.slurm._make_sbatch_string`` and runs the job as
``python -u -m submitit.core._submit FOLDER``. Both names were read from submitit 1.5 (1.5.4); a release that
renames them must fail here with a message that says so, not with an ImportError deep in a launcher.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

#: The oldest submitit these names are known in (pyproject's lower bound).
MIN_VERSION = (1, 5)
#: The module submitit's sbatch files run (``python -u -m <it> FOLDER``), as SlurmExecutor writes it.
SUBMIT_MODULE = "submitit.core._submit"
_WRITER_MODULE, _WRITER = "submitit.slurm.slurm", "_make_sbatch_string"


class SubmititIncompatible(RuntimeError):
    """The installed submitit lacks a private name the dry run relies on."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def sbatch_writer() -> Callable[..., str]:
    """submitit's own sbatch writer, after checking the version and that the private names still exist."""
    import submitit

    version = getattr(submitit, "__version__", "unknown")
    if _version(version)[:2] < MIN_VERSION:
        raise SubmititIncompatible(f"submitit {version} is older than {'.'.join(map(str, MIN_VERSION))}, which "
                                   "raddino-bench needs; pip install -U 'submitit>=1.5'")
    try:
        writer = getattr(importlib.import_module(_WRITER_MODULE), _WRITER, None)
    except ImportError:
        writer = None
    missing = [f"{_WRITER_MODULE}.{_WRITER}"] if not callable(writer) else []
    if importlib.util.find_spec(SUBMIT_MODULE) is None:
        missing.append(SUBMIT_MODULE)
    if missing:
        raise SubmititIncompatible(
            f"submitit {version} has no {' or '.join(missing)}, the private names the sbatch dry run uses (read from "
            "submitit 1.5.4); install submitit 1.5.x (pip install 'submitit>=1.5,<1.6') or update "
            "slurm/_submitit_compat.py")
    return writer


def sbatch_text(folder: Path, params: dict[str, Any], array_size: int | None = None) -> str:
    """The sbatch file submitit writes for a job (an array of `array_size` tasks when given) with
    `SlurmExecutor.update_parameters(**params)` and logs in `folder`. Submits nothing; needs no SLURM."""
    writer = sbatch_writer()
    command = " ".join([shlex.quote(sys.executable), "-u -m", SUBMIT_MODULE, shlex.quote(str(folder))])
    return writer(command=command, folder=folder, map_count=array_size, **params)
