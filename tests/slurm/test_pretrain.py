"""slurm.pretrain against a real SLURM controller: a preempted job is requeued once and ends with exactly the
losses of an uninterrupted run. Skipped where no SLURM answers (CI starts slurm/local-cluster/start.sh first)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm.cluster import make_executor
from slurm.pretrain import prepare
from tests.conftest import REPO, slurm_unreachable
from tests.trainer.tiny_run import TINY as TINY_RUN

WHY_NOT = slurm_unreachable()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(WHY_NOT is not None, reason=f"no SLURM: {WHY_NOT}")]

STEPS = 40
# The tiny run with no periodic checkpoint before the end, so it can only resume from the checkpoint written on the
# signal.
TINY = [*TINY_RUN, "run.checkpoint_every=1000"]


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_preempted_job_is_requeued_and_repeats_the_uninterrupted_losses(blob_images, tmp_path):
    common = ["--config", "smoke", "--data", str(blob_images), "--steps", str(STEPS), *TINY]
    # The reference, in plain Python beside the job, with the same single thread as the job's one CPU.
    ref_dir = tmp_path / "reference"
    reference = subprocess.Popen([sys.executable, "-m", "trainer.train", *common, "--output", str(ref_dir)],
                                 cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    args, params, folder, job_fn = prepare([*common, "--output", str(run), "--time", "10", "--cpus-per-task", "1",
                                            "--folder", str(tmp_path / "slurm")])
    job = make_executor(folder, params).submit(job_fn)
    try:
        wait(lambda: len(metrics(run)) >= 2 or job.done(), 240, "the job's second step")
        assert not job.done(), f"the job ended before it was preempted:\n{job.stderr()}"
        # A preemption notice as SLURM sends it before a time limit: USR2 to the job's tasks.
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)
        wait(job.done, 300, f"job {job.job_id} to finish after its requeue")
    finally:
        if not job.done():
            job.cancel()
    result = job.result()
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]

    assert result["finished"] and result["world_size"] == 1
    log = (run / "train.log").read_text()
    stopped = re.search(r"stopped by SIGUSR1 at iteration (\d+)", log)
    assert stopped, log[-2000:]
    assert int(stopped.group(1)) < STEPS, "the run finished before the signal: nothing was tested"
    assert f"resumed from {run / 'checkpoints' / f'ckpt_{int(stopped.group(1)):07d}'}" in log
    history = subprocess.run(["sacct", "-j", job.job_id, "--duplicates", "-X", "-n", "-P", "-o", "State"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    assert history.count("REQUEUED") == 1, history  # one requeue; the second run may still be wrapping up

    mine, ref = metrics(run), metrics(ref_dir)
    assert [r["iteration"] for r in mine] == list(range(1, STEPS + 1))
    keys = ("iteration", "loss", "dino", "ibot", "koleo", "lr")
    assert [tuple(r[k] for k in keys) for r in mine] == [tuple(r[k] for k in keys) for r in ref]


def test_two_tasks_form_one_ddp_run_from_slurms_environment(blob_images, tmp_path):
    run = tmp_path / "run"
    args, params, folder, job_fn = prepare(["--config", "smoke", "--data", str(blob_images), "--steps", "3", *TINY,
                                            "loss.centering=sinkhorn_knopp", "--output", str(run),
                                            "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10",
                                            "--folder", str(tmp_path / "slurm")])
    job = make_executor(folder, params).submit(job_fn)
    try:
        wait(job.done, 300, f"job {job.job_id}")
    finally:
        if not job.done():
            job.cancel()
    results = job.results()
    assert [(r["rank"], r["world_size"], r["finished"]) for r in results] == [(0, 2, True), (1, 2, True)]
    # One run of world size 2 (8 images a step), not two runs of one process each.
    assert "world size 2, 8 images per step" in (run / "train.log").read_text()
    assert [r["iteration"] for r in metrics(run)] == [1, 2, 3]
