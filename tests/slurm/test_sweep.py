"""slurm.sweep against a real SLURM controller: a feature-extraction array, a dependent probe job, failures listed
with their logs, one-flag retry, and no job for features already cached. Skipped where no SLURM answers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.features import FeatureCache
from slurm.sweep import Pair, extract_features, main, make_plan, parse, sweep_settings
from tests.conftest import slurm_unreachable

WHY_NOT = slurm_unreachable()

# The two weight-free encoders on a small synthetic task; one protocol keeps the probe job short.
MODELS = "pixels,random-vit"
TASK = "demo:n_patients=20:linear"


def test_dry_run_plans_from_the_cache_and_prints_both_scripts(tmp_path, capsys):
    """No SLURM needed: what would be submitted, before and after the feature job's function ran here."""
    task = "demo:n_patients=6:demographics"
    argv = ["--models", "pixels", "--tasks", task, "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--folder", str(tmp_path / "slurm"), "--time", "5", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"1 feature job(s) to run, 0 cached:\n  submit  pixels x {task}" in out
    assert "#SBATCH --array=0-0%1" in out and "#SBATCH --dependency='afterok:<array job id>'" in out
    assert f"python -m harness.run --models pixels --tasks {task}" in out
    assert not (tmp_path / "slurm").exists(), "a dry run submits nothing and writes nothing"

    _, hargs, _ = parse(argv)
    keys = extract_features(Pair("pixels", task), sweep_settings(hargs))  # what the array task runs, run here
    assert len(keys) == 1 and (FeatureCache(tmp_path / "cache").entry(keys[0]) / "manifest.json").is_file()
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"0 feature job(s) to run, 1 cached:\n  cached  pixels x {task}" in out
    assert "--array" not in out and "--dependency" not in out


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.skipif(WHY_NOT is not None, reason=f"no SLURM: {WHY_NOT}")
def test_sweep_lists_failures_retries_them_and_writes_the_leaderboard(tmp_path, capsys):
    folder, cache, out = tmp_path / "slurm", tmp_path / "cache", tmp_path / "lb"
    argv = ["--models", MODELS, "--tasks", TASK, "--cache-dir", str(cache), "--out", str(out), "--bootstrap", "50",
            "--time", "10", "--cpus-per-task", "1", "--mem", "2G", "--folder", str(folder), "--poll-seconds", "1"]

    # 1. A device the feature jobs cannot use: both fail, the dependent probe job never runs.
    assert main(argv + ["--device", "cuda:99"]) == 1
    report = capsys.readouterr().out
    assert "3 job(s) failed" in report, report
    for model in MODELS.split(","):
        line = re.search(rf"features {model} x {re.escape(TASK)}: job (\d+_\d+): (.+)", report)
        # torch's wording depends on its build: "not compiled with CUDA" (CPU) or "no NVIDIA driver" (CUDA build).
        assert line and re.search("CUDA|NVIDIA", line.group(2)), report
        log = re.search(rf"job {line.group(1)}: .+\n    log: (\S+)\n    err: (\S+)", report)
        assert Path(log.group(2)).is_file() and re.search("CUDA|NVIDIA", Path(log.group(2)).read_text())
    assert re.search(r"probes and leaderboards: job \d+: .*CANCELLED", report), report
    assert f"--retry-failed --folder {folder}" in report
    assert not list(out.glob("*.md"))

    # 2. One flag replays the recorded sweep (here with the cause fixed): the array, then the leaderboards.
    assert main(["--retry-failed", "--folder", str(folder), "--device", "cpu"]) == 0, capsys.readouterr().out
    report = capsys.readouterr().out
    assert "2 feature job(s) to run, 0 cached" in report
    boards = list(out.glob("*.md"))
    name = "demo-n_patients_20"  # the task's options that change its numbers are part of its output name
    assert [b.name for b in boards] == [f"{name}.md"]
    text = boards[0].read_text()
    for model in MODELS.split(","):
        assert f"`{model}`" in text or f"| {model} " in text, text
        assert (out / "results" / name / f"{model}.json").is_file()
    record = json.loads((folder / "sweep.json").read_text())
    assert len(record["features"]) == 2 and record["probe"]["job_id"]

    # 3. Everything is cached now: a new sweep would submit no feature job, only the probes.
    plan = make_plan(parse(argv + ["--device", "cpu"])[1])
    assert plan.pending == [] and len(plan.cached) == 2, plan


def test_auto_device_is_pinned_for_every_job(tmp_path, capsys):
    """The device is in the feature-cache key: GPU feature jobs and the CPU leaderboard job must use one."""
    argv = ["--models", "pixels", "--tasks", "demo:n_patients=6:demographics", "--cache-dir", str(tmp_path / "c"),
            "--folder", str(tmp_path / "slurm"), "--time", "5", "--dry-run"]
    assert main(argv + ["--gpus-per-node", "1"]) == 0
    assert "--device cuda" in capsys.readouterr().out
    assert main(argv) == 0
    assert "--device cpu" in capsys.readouterr().out
