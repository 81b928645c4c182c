"""bench/gpu_check.py: the CPU dry run end to end, and the verdict logic that CUDA runs depend on."""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from trainer.plot import figure_data, read_metrics
from tests.conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module (it imports its sibling bench/trainer_step.py, as when run from bench/)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module("gpu_check")


def table_rows(stdout: str) -> dict[str, list[str]]:
    """{check: [result, ratio/value, verdict]} from the github-format table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and not set(cells[0]) <= {"-"} and cells[0] != "check":
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
@pytest.mark.gloo
def test_cpu_dry_run_end_to_end(tmp_path):
    # CUDA hidden, so the dry run is what runs on any machine; one thread, as on the shared CI box.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run-dir", str(tmp_path / "check")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("no CUDA device") and "CPU dry run" in proc.stdout
    rows = table_rows(proc.stdout)
    by_prefix = {prefix: [v for k, v in rows.items() if k.startswith(prefix)] for prefix in
                 ("attention: SDPA vs math reference", "student pass: packed vs separate", "training: 3 steps",
                  "peak memory", "DDP: 2 processes on one CPU, gloo")}
    assert all(len(v) == 1 for v in by_prefix.values()), rows
    (attention,), (packing,), (training,), (memory,), (ddp,) = by_prefix.values()
    assert attention[2] == "ok" and "max abs diff packed" in attention[0]
    assert packing[1].startswith("x") and packing[2].startswith("n/a on CPU")
    assert training[2] == "ok" and training[1].startswith("3/3 steps")
    assert memory[2] == "n/a on CPU"
    assert ddp[2] == "ok" and ddp[1] == "max abs diff 0.0e+00"
    assert proc.stdout.rstrip().splitlines()[-1].startswith("passed")
    # --run-dir keeps the runs: the training check's metrics are the trainer's and plot as usual.
    metrics = read_metrics(tmp_path / "check" / "train")
    assert [r["iteration"] for r in metrics if "loss" in r] == [1, 2, 3]
    assert figure_data(metrics)[0].title == "losses"
    assert (tmp_path / "check" / "ddp" / "config.yaml").exists()


def test_usage_errors_exit_2(gpu_check, tmp_path, capsys):
    for argv, message in [(["--steps", "0"], "--steps 0"), (["--data", str(tmp_path / "nowhere")], "--data")]:
        with pytest.raises(SystemExit) as e:
            gpu_check.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "used" / "train").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--run-dir", str(tmp_path / "used")])
    assert e.value.code == 2 and "already holds" in capsys.readouterr().err


def test_attention_check_fails_when_the_paths_disagree(gpu_check, monkeypatch):
    profile = gpu_check.cpu_profile()
    report = gpu_check.Report()
    gpu_check.check_attention(profile, report)
    assert report.rows[-1].verdict == "ok"
    # The reference is off by a tiny amount more than the tolerance: the check must notice.
    exact = gpu_check.reference_attention
    monkeypatch.setattr(gpu_check, "reference_attention",
                        lambda q, k, v, layout: exact(q, k, v, layout) + 3 * profile.attn_tol)
    gpu_check.check_attention(profile, report)
    assert report.rows[-1].verdict.startswith("FAIL") and report.failed


def test_reference_attention_keeps_packed_images_apart(gpu_check):
    # Two images packed in one sequence must give what each gives alone.
    from trainer.vit import BlockDiagonal

    q, k, v = torch.randn(3, 1, 7, 2, 4).unbind(0)
    layout = BlockDiagonal(((1, 3), (1, 4)))
    packed = gpu_check.reference_attention(q, k, v, layout)
    alone = torch.cat([gpu_check.reference_attention(q[:, s], k[:, s], v[:, s], None)
                       for s in (slice(0, 3), slice(3, 7))], dim=1)
    torch.testing.assert_close(packed, alone)


def test_ddp_verdicts(gpu_check):
    check = "DDP"
    nccl_refusal = ("DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage, NCCL version 2.21.5\n"
                    "ncclInvalidUsage: This usually reflects invalid usage of NCCL library.\n"
                    "Last error:\nDuplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000")
    row = gpu_check.ddp_row(check, "nccl", 2, [(1, "error", nccl_refusal, math.nan)])
    assert row.verdict == "skipped: Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000"
    row = gpu_check.ddp_row(check, "gloo", 2, [(0, "error", "RuntimeError: Connection refused", math.nan)])
    assert row.verdict == "FAIL: RuntimeError: Connection refused"
    assert gpu_check.ddp_row(check, "gloo", 2, [(0, "ok", "2 steps, gloo", 0.0)]).verdict.startswith("FAIL")
    ok = [(0, "ok", "2 steps, gloo", 0.0), (1, "ok", "2 steps, gloo", 0.0)]
    assert gpu_check.ddp_row(check, "gloo", 2, ok).verdict == "ok"
    diverged = [(0, "ok", "2 steps, gloo", 0.0), (1, "ok", "2 steps, gloo", 1e-3)]
    assert gpu_check.ddp_row(check, "gloo", 2, diverged).verdict.startswith("FAIL")


def test_diagnostics_rows_report_whatever_was_logged(gpu_check):
    ln_k = math.log(65536)
    base = {"iteration": 300, "loss": 9.0, "dino": 5.0, "ibot": 4.0, "koleo": -1.0}
    rows = [{**base, "iteration": 290},
            {**base, "ln_k": ln_k, "target_entropy_cls": 0.999 * ln_k, "target_entropy_patch": 0.5 * ln_k,
             "teacher_feature_std": 0.0, "prototypes_used": 1, "kl_teacher_student_cls": 0.2},
            {"iteration": 300, "probe_macro_auroc": 0.71, "probe_macro_auroc_lo": 0.65,
             "probe_macro_auroc_hi": 0.77, "probe_age_r": 0.3}]
    report = gpu_check.Report()
    gpu_check.report_diagnostics(rows, report)
    got = {r.check.strip(): r for r in report.rows}
    assert set(got) == {"diagnostic target_entropy_cls", "diagnostic target_entropy_patch",
                        "diagnostic kl_teacher_student_cls", "diagnostic teacher_feature_std",
                        "diagnostic prototypes_used", "probe_macro_auroc", "probe_age_r"}
    assert got["diagnostic target_entropy_cls"].verdict == "warn: near ln K (uniform targets)"
    assert got["diagnostic target_entropy_patch"].verdict == "ok"
    assert got["diagnostic teacher_feature_std"].verdict.startswith("warn")
    assert got["diagnostic prototypes_used"].verdict.startswith("warn") and got["diagnostic prototypes_used"].value == "1"
    assert got["probe_macro_auroc"].value == "0.71 [0.65, 0.77]" and got["probe_age_r"].value == "0.3"
    one_hot = gpu_check.diagnostic_verdict("target_entropy_cls", {"ln_k": ln_k, "target_entropy_cls": 0.001})
    assert one_hot == "warn: near 0 (one prototype)"
    # An old run (no diagnostics, no probe) adds nothing.
    report = gpu_check.Report()
    gpu_check.report_diagnostics([base], report)
    assert report.rows == []


def test_profiles_build_valid_configs(gpu_check, tmp_path):
    # The GPU profile cannot run here, but its config must resolve (a typo would only show on the GPU machine).
    gpu = replace(gpu_check.gpu_profile(300), device=torch.device("cpu"))
    cfg = gpu.train_config(300, str(tmp_path), gpu.batch)
    assert (cfg.model.arch, cfg.model.patch_size, cfg.crops.global_size, cfg.optim.total_iters) == \
        ("vit_small", 14, 224, 300)
    assert cfg.run.bf16 and cfg.data.sources == [str(tmp_path)]
