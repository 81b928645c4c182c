"""Cluster options shared by the launchers: command-line flags, a small per-cluster YAML file, sbatch scripts.

    python -m slurm.sweep --cluster slurm/clusters/mycluster.yaml --time 2:00:00 ...

The YAML file holds what is the same for every job on one cluster (partition, account, qos, constraint, the
set-up lines that load modules and activate the environment); flags given on the command line win over it.
Jobs are written by submitit's ``SlurmExecutor``: ``--dry-run`` prints the exact sbatch file it would submit.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import submitit
import yaml

from slurm._submitit_compat import sbatch_text


@dataclass
class ClusterOptions:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int = 60                      # minutes (submitit requeues on time-out from this number too)
    mem: str | None = None              # per node, sbatch syntax: 64G, 500M
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    constraint: str | None = None
    sbatch: list[str] = field(default_factory=list)   # extra #SBATCH lines: "--exclusive", "--mail-type=END"
    setup: list[str] = field(default_factory=list)    # shell lines run before the job (modules, venv)
    signal_delay_s: int = 120           # SLURM sends USR2 this long before the time limit (checkpoint, requeue)


OPTION_HELP = {
    "partition": "SLURM partition (-p)",
    "account": "account to charge (-A)",
    "qos": "quality of service",
    "time": "time limit per job: minutes, HH:MM:SS or D-HH:MM:SS",
    "mem": "memory per node, e.g. 64G",
    "gpus_per_node": "GPUs per node",
    "cpus_per_task": "CPUs per task (data-loading workers + 1 is a good start)",
    "constraint": "node features, e.g. a100",
    "sbatch": "an extra #SBATCH option, e.g. --exclusive or --mail-type=END (repeatable)",
    "setup": "a shell line run before the job, e.g. 'module load cuda' (repeatable)",
    "signal_delay_s": "seconds before the time limit at which SLURM signals the job to checkpoint",
}


def parse_time(value: Any, where: str = "--time") -> int:
    """SLURM time formats -> whole minutes: ``90``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM[:SS]``."""
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    else:
        text = str(value).strip()
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if not m:
            raise ValueError(f"{where}={value!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
        days, a, b, c = (int(g) if g is not None else None for g in m.groups())
        if days is not None:  # D-HH[:MM[:SS]]
            seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        elif c is not None:   # HH:MM:SS
            seconds = a * 3600 + b * 60 + c
        elif b is not None:   # MM:SS
            seconds = a * 60 + b
        else:                 # MM
            seconds = a * 60
        minutes = math.ceil(seconds / 60)
    if minutes < 1:
        raise ValueError(f"{where}={value!r}: the time limit must be at least one minute")
    return minutes


def sbatch_option(line: str, where: str) -> tuple[str, Any]:
    """``#SBATCH --mail-type=END`` / ``--mail-type END`` / ``--exclusive`` -> (key, value or True)."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    m = re.fullmatch(r"--([A-Za-z][\w-]*)(?:[= ]\s*(.+))?", text)
    if not m:
        raise ValueError(f"{where}: {line!r} is not a long sbatch option; write it as --name=value "
                         "(e.g. --constraint=a100, not -C a100)")
    key, value = m.group(1), m.group(2)
    return key, True if value is None else value.strip()


def load_cluster_file(path: Path) -> dict[str, Any]:
    """The options of a per-cluster YAML file, checked; unknown keys are an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"--cluster {path}: no such file (see slurm/clusters/example.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of options, got {type(raw).__name__}")
    known = {f.name for f in fields(ClusterOptions)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return raw


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """The flags every launcher shares; each default is None so that the YAML file can supply it."""
    g = parser.add_argument_group("cluster (flags win over --cluster FILE)")
    g.add_argument("--cluster", type=Path, help="per-cluster YAML file with any of the options below")
    for name, text in OPTION_HELP.items():
        flag = "--" + name.replace("_", "-")
        if name in ("sbatch", "setup"):
            g.add_argument(flag, action="append", default=None, metavar="LINE", help=text)
        elif name in ("gpus_per_node", "cpus_per_task", "signal_delay_s"):
            g.add_argument(flag, type=int, default=None, help=text)
        else:
            g.add_argument(flag, default=None, help=text)
    g.add_argument("--folder", type=Path, help="where job scripts and logs go, one sub-folder per job (on a file "
                                                "system the compute nodes see)")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch scripts and submit nothing")


def resolve_options(args: argparse.Namespace) -> ClusterOptions:
    """Defaults <- the --cluster file <- flags; times and extra lines are checked here, before anything runs."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if args.cluster is not None:
        for key, value in load_cluster_file(args.cluster).items():
            values[key], where[key] = value, str(args.cluster)
    for f in fields(ClusterOptions):
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name], where[f.name] = flag_value, "--" + f.name.replace("_", "-")
    opts = ClusterOptions()
    for key, value in values.items():
        if key == "time":
            value = parse_time(value, where[key])
        elif key in ("sbatch", "setup"):
            value = [value] if isinstance(value, str) else list(value)
            if key == "sbatch":
                for line in value:
                    sbatch_option(line, where[key])
        elif key in ("gpus_per_node", "cpus_per_task", "signal_delay_s"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where[key]}: {key}={value!r} must be a whole number >= 0")
        elif value is not None:
            value = str(value)
        setattr(opts, key, value)
    return opts


def executor_parameters(opts: ClusterOptions, *, job_name: str, nodes: int = 1, tasks_per_node: int = 1,
                        gpus_per_node: int | None = None, **extra: Any) -> dict[str, Any]:
    """submitit ``SlurmExecutor.update_parameters`` keywords for one job (or one array) with these options."""
    gpus = opts.gpus_per_node if gpus_per_node is None else gpus_per_node
    params: dict[str, Any] = {
        "job_name": job_name, "time": opts.time, "nodes": nodes, "ntasks_per_node": tasks_per_node,
        "signal_delay_s": opts.signal_delay_s, "setup": list(opts.setup),
        "additional_parameters": dict(sbatch_option(line, "sbatch") for line in opts.sbatch),
    }
    for key in ("partition", "account", "qos", "mem", "cpus_per_task", "constraint"):
        if getattr(opts, key) is not None:
            params[key] = getattr(opts, key)
    if gpus:
        params["gpus_per_node"] = gpus
    params.update(extra)
    return params


def sbatch_script(folder: Path, params: dict[str, Any], array_size: int | None = None) -> str:
    """The sbatch file submitit writes for these parameters (what --dry-run prints), by submitit's own writer.
    Needs no SLURM."""
    return sbatch_text(folder, params, array_size)


def make_executor(folder: Path, params: dict[str, Any], max_requeues: int = 3) -> submitit.SlurmExecutor:
    """A submitit SlurmExecutor with these parameters; ``max_requeues`` bounds time-out requeues."""
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
    executor.update_parameters(**params)
    return executor
