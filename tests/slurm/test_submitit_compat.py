"""slurm._submitit_compat: submitit's private sbatch writer, used with the installed submitit, and the clear error
a submitit without it gives. Nothing is submitted: the writer only returns text."""
import importlib.util
import shlex
import sys

import pytest
import submitit
import submitit.slurm.slurm

from slurm import _submitit_compat as compat
from slurm.cluster import sbatch_script


def test_installed_submitit_writes_a_tiny_job(tmp_path):
    folder = tmp_path / "logs" / "%j"
    text = compat.sbatch_text(folder, {"job_name": "tiny", "time": 3, "nodes": 1, "ntasks_per_node": 1})
    lines = text.splitlines()
    assert lines[0].startswith("#!/bin/bash")
    for line in ["#SBATCH --job-name=tiny", "#SBATCH --time=3", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 f"#SBATCH --output={folder}/%j_0_log.out"]:
        assert line in lines, (line, text)
    run = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    assert any(line.endswith(run) for line in lines), text  # the job runs submitit's own entry point
    assert "--array" not in text
    assert "#SBATCH --array=0-3%2" in compat.sbatch_text(folder, {"array_parallelism": 2}, array_size=4)
    assert sbatch_script(folder, {"job_name": "tiny"}) == compat.sbatch_text(folder, {"job_name": "tiny"})


def test_unknown_parameter_is_submitits_own_error(tmp_path):
    with pytest.raises(TypeError, match="no_such_option"):
        compat.sbatch_text(tmp_path, {"no_such_option": 1})


def test_a_submitit_without_the_private_writer_is_explained(tmp_path, monkeypatch):
    monkeypatch.delattr(submitit.slurm.slurm, "_make_sbatch_string")
    with pytest.raises(compat.SubmititIncompatible,
                       match=r"submitit \S+ has no submitit\.slurm\.slurm\._make_sbatch_string, .*"
                             r"install submitit 1\.5\.x .*slurm/_submitit_compat\.py"):
        sbatch_script(tmp_path, {"job_name": "tiny"})


def test_a_submitit_without_the_job_entry_point_is_explained(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == compat.SUBMIT_MODULE else real(name, *a))
    with pytest.raises(compat.SubmititIncompatible, match=r"has no submitit\.core\._submit,"):
        compat.sbatch_text(tmp_path, {})


def test_an_old_submitit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(submitit, "__version__", "1.4.6")
    with pytest.raises(compat.SubmititIncompatible, match=r"submitit 1\.4\.6 is older than 1\.5.*submitit>=1\.5"):
        compat.sbatch_text(tmp_path, {})
