"""``python -m slurm.pretrain``: one DDP pretraining job across SLURM nodes, requeued until it finishes.

    python -m slurm.pretrain --config rad-dino --data /data/cxr/train.csv --output /runs/rd \\
        --nodes 2 --gpus-per-node 4 --partition gpu --time 24:00:00 --cluster slurm/clusters/mycluster.yaml

One task per GPU (``--tasks-per-node``, default: ``--gpus-per-node``, or 1 on CPU nodes). Each task takes its
rank, the world size and the master address from SLURM's environment (submitit's TorchDistributedEnvironment)
and runs ``trainer.train`` with ``--resume auto``, so every start continues from the run's latest checkpoint.

Interruptions:
- time-out: SLURM sends USR2 ``--signal-delay-s`` before the limit; the trainer finishes its step, writes a
  checkpoint and stops, then submitit's handler requeues the job (``checkpoint()`` below), at most
  ``--max-requeues`` times;
- preemption: a USR2 (e.g. ``scancel --signal=USR2 JOB``) is handled the same way; a SIGTERM from SLURM's own
  preemption makes the trainer checkpoint and stop, and SLURM requeues the job itself.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import submitit
import torch

from harness.common.errors import AT_LEAST_0, AT_LEAST_1, UsageError, add_verbose_flag, check_flag, command
from harness.common.paths import check_writable_folder
from slurm.cluster import add_cluster_args, executor_parameters, make_executor, resolve_options, sbatch_script
from trainer.checkpoint import newest_intact, read_config, read_state
from trainer.config import load_config
from trainer.train import main as train_main


def run_finished(output: Path) -> bool:
    """The run's newest intact checkpoint (the one it resumes from) is at its last iteration."""
    ckpt = newest_intact(output)
    return ckpt is not None and read_state(ckpt)["iteration"] >= read_config(ckpt).optim.total_iters


class PretrainJob:
    """The callable submitit runs in every task of a pretraining job (``slurm.pretrain``, and each variant of
    ``harness.ablate --slurm``). Picklable: it holds only the run's settings.

    Every task runs ``trainer.train``'s command line (`argv`, the one place a SLURM pretraining job's command line
    is built): its ``main`` joins the process group SLURM describes and leaves it, around the training itself.
    submitit calls ``checkpoint()`` from its USR2 handler; the trainer must write its checkpoint *before* that,
    at a step boundary, so ``__call__`` holds USR2 back: it turns it into the trainer's USR1 ("checkpoint and
    stop"), and hands it to submitit's handler (checkpoint + ``scontrol requeue``) once the trainer has stopped.
    """

    def __init__(self, config: str, output: Path, data: Sequence[str], steps: int | None = None,
                 overrides: Sequence[str] = (), skip_bad: bool = False):
        self.config, self.output, self.data = config, Path(output), list(data)
        self.steps, self.overrides, self.skip_bad = steps, list(overrides), skip_bad

    def argv(self) -> list[str]:
        """``trainer.train``'s arguments for this run (every start resumes it: ``--resume auto``)."""
        argv = ["--config", self.config, "--output", str(self.output)]
        for d in self.data:
            argv += ["--data", d]
        if self.steps is not None:
            argv += ["--steps", str(self.steps)]
        if self.skip_bad:
            argv.append("--skip-bad")
        return [*argv, *self.overrides, "--resume", "auto"]

    def __call__(self) -> dict:
        # Rank, world size and master address from SLURM; the trainer picks its GPU by LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # As many threads as CPUs given to the task: without CPU binding torch would use every core of the node
        # in every task.
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        usr2_seen = []
        submitit_handler = signal.getsignal(signal.SIGUSR2)

        def hold_usr2(signum, frame):
            usr2_seen.append(signum)
            os.kill(os.getpid(), signal.SIGUSR1)  # the trainer's "checkpoint after this step and stop"

        signal.signal(signal.SIGUSR2, hold_usr2)
        # A USR1 that lands before the trainer installs its own handler must not kill the process.
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        code = train_main(self.argv())
        if code != 0:  # the trainer said why on stderr (this job's log); fail the job so that SLURM shows it
            raise RuntimeError(f"the trainer exited with status {code}: see this job's stderr and "
                               f"{self.output / 'train.log'}")
        finished = run_finished(self.output)
        if usr2_seen and not finished and callable(submitit_handler):
            submitit_handler(usr2_seen[0], None)  # checkpoint() + requeue + exit on rank 0; returns elsewhere
        env = submitit.JobEnvironment()
        return {"finished": finished, "rank": env.global_rank, "world_size": env.num_tasks,
                "output": str(self.output)}

    def checkpoint(self, *args, **kwargs):
        """Requeue the same call: the trainer has written its checkpoint and resumes from it (--resume auto)."""
        return submitit.helpers.DelayedSubmission(PretrainJob(self.config, self.output, self.data, self.steps,
                                                              self.overrides, self.skip_bad))


PROG = "python -m slurm.pretrain"
EXAMPLES = """\
examples:
  %(prog)s --config smoke --data /data/cxr/train.csv --output /runs/smoke --time 00:20:00 --dry-run
  %(prog)s --config rad-dino --data /data/cxr/train.csv --output /runs/rd --nodes 2 --gpus-per-node 4 \\
      --partition gpu --time 24:00:00 --cluster slurm/clusters/mycluster.yaml --wait
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="trainer preset (smoke, rad-dino) or YAML file")
    p.add_argument("--data", action="append", required=True, help="image manifest (repeatable, PATH@WEIGHT)")
    p.add_argument("--output", required=True, type=Path, help="run directory (shared by all nodes)")
    p.add_argument("--steps", type=int, help="number of iterations")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--tasks-per-node", type=int, help="processes per node (default: --gpus-per-node, or 1)")
    p.add_argument("--max-requeues", type=int, default=20, help="time-out requeues before giving up")
    p.add_argument("--job-name", default="raddino-pretrain")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish and report its result")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="trainer config overrides")
    add_cluster_args(p)
    add_verbose_flag(p)
    return p


def prepare(argv: list[str] | None = None, prog: str = PROG):
    """Parse and check everything (including the trainer config) before anything is submitted.

    Returns (args, executor parameters, submitit folder, the job callable)."""
    args = build_parser(prog).parse_intermixed_args(argv)  # key=value overrides may sit anywhere
    args.output = args.output.resolve()  # the job may start in another directory
    check_flag("--nodes", args.nodes, AT_LEAST_1)
    check_flag("--tasks-per-node", args.tasks_per_node, AT_LEAST_1)
    check_flag("--max-requeues", args.max_requeues, AT_LEAST_0)
    check_writable_folder(args.output, "--output")
    opts = resolve_options(args)
    tasks = args.tasks_per_node or max(opts.gpus_per_node, 1)
    cfg = load_config(args.config, args.overrides, steps=args.steps)  # a bad key fails here, not on the cluster
    world = args.nodes * tasks
    print(f"{args.nodes} node(s) x {tasks} task(s) = world size {world}: {cfg.optim.batch_size_per_gpu * world} "
          f"images per step, peak lr {cfg.optim.scaled_lr(world):.3g}, {cfg.optim.total_iters} iterations")
    params = executor_parameters(opts, job_name=args.job_name, nodes=args.nodes, tasks_per_node=tasks)
    folder = (args.folder or args.output / "slurm").resolve() / "%j"  # one sub-folder per job id
    return args, params, folder, PretrainJob(args.config, args.output, args.data, args.steps, args.overrides,
                                             args.skip_bad)


@command
def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    try:
        args, params, folder, job_fn = prepare(argv, prog)
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as e:  # the trainer's config, the cluster file, a time
        raise UsageError(str(e)) from e
    if args.dry_run:
        print(sbatch_script(folder, params))
        return 0
    executor = make_executor(folder, params, args.max_requeues)
    job = executor.submit(job_fn)
    print(f"submitted job {job.job_id}: logs {job.paths.stdout} and {job.paths.stderr}; run {args.output}")
    if args.wait:
        result = job.results()[0]
        if result["finished"]:
            print(f"job {job.job_id} finished the run: {args.output}")
            return 0
        print(f"job {job.job_id} stopped before the last iteration (cancelled or preempted; a requeued job goes on "
              f"from its checkpoint): see {args.output / 'train.log'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
