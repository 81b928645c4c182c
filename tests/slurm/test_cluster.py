"""slurm.cluster: options from flags and a per-cluster YAML file, and the sbatch scripts --dry-run prints.

These need no SLURM: the scripts are written by submitit's own writer without submitting anything."""
from __future__ import annotations

import argparse

import pytest
import yaml

from slurm import pretrain
from slurm.cluster import (add_cluster_args, executor_parameters, parse_time, resolve_options, sbatch_option,
                           sbatch_script)
from tests.conftest import REPO


def options(*argv: str):
    p = argparse.ArgumentParser()
    add_cluster_args(p)
    return resolve_options(p.parse_args(list(argv)))


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("02:00:00", 120), ("1-00", 1440),
                                           ("1-02:30", 1590), ("0:00:30", 1), ("1-00:00:01", 1441)])
def test_slurm_time_formats_become_whole_minutes(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("bad", ["", "2h", "1:2:3:4", "0"])
def test_bad_times_name_the_flag(bad):
    with pytest.raises(ValueError, match="--time"):
        parse_time(bad)


def test_flags_win_over_the_cluster_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"partition": "gpu", "account": "proj", "time": "2:00:00", "mem": "64G",
                                 "gpus_per_node": 4, "sbatch": ["--exclusive"], "setup": ["module load cuda"]}))
    opts = options("--cluster", str(f), "--partition", "debug", "--time", "30", "--sbatch=--mail-type=END")
    assert (opts.partition, opts.account, opts.time, opts.mem, opts.gpus_per_node) == ("debug", "proj", 30, "64G", 4)
    assert opts.sbatch == ["--mail-type=END"] and opts.setup == ["module load cuda"]


def test_the_example_cluster_file_is_valid():
    opts = options("--cluster", str(REPO / "slurm" / "clusters" / "example.yaml"))
    assert opts.partition and opts.time > 60 and opts.gpus_per_node >= 1


def test_unknown_keys_and_short_sbatch_options_are_explained(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("partiton: gpu\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown option\(s\) partiton; known: .*partition"):
        options("--cluster", str(f))
    with pytest.raises(ValueError, match="--constraint=a100"):
        options("--sbatch=-C a100")
    with pytest.raises(FileNotFoundError, match="example.yaml"):
        options("--cluster", str(tmp_path / "missing.yaml"))


def test_extra_lines_become_sbatch_options():
    assert sbatch_option("#SBATCH --mail-type=END", "x") == ("mail-type", "END")
    assert sbatch_option("--exclusive", "x") == ("exclusive", True)
    assert sbatch_option("--gres gpu:2", "x") == ("gres", "gpu:2")


def test_sbatch_script_holds_every_option(tmp_path):
    opts = options("--partition", "gpu", "--account", "proj", "--qos", "high", "--time", "1-00:00:00", "--mem", "64G",
                   "--gpus-per-node", "4", "--cpus-per-task", "8", "--constraint", "a100",
                   "--sbatch=--exclusive", "--setup", "source /venv/bin/activate")
    text = sbatch_script(tmp_path / "%j", executor_parameters(opts, job_name="j", nodes=2, tasks_per_node=4))
    for line in ["#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --time=1440",
                 "#SBATCH --mem=64G", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --constraint=a100", "#SBATCH --exclusive", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --signal=USR2@120", "source /venv/bin/activate"]:
        assert line in text.splitlines(), line
    array = sbatch_script(tmp_path / "%j", executor_parameters(opts, job_name="j", array_parallelism=3), array_size=5)
    assert "#SBATCH --array=0-4%3" in array


def test_pretrain_dry_run_prints_the_script_and_checks_the_trainer_config(tmp_path, capsys):
    argv = ["--config", "smoke", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "--nodes", "2",
            "--gpus-per-node", "4", "--partition", "gpu", "--time", "24:00:00", "--dry-run"]
    assert pretrain.main(argv) == 0
    out = capsys.readouterr().out
    assert "world size 8" in out and "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=4" in out
    assert "#SBATCH --gpus-per-node=4" in out and "#SBATCH --time=1440" in out
    assert not (tmp_path / "run").exists(), "a dry run must not create anything"
    assert pretrain.main(argv + ["optim.no_such_key=1"]) == 2
    assert "optim.no_such_key" in capsys.readouterr().err
