"""trainer.plot: the learning-curve PNG and the series it draws."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


from trainer.plot import figure_data, main, plot, read_metrics
from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

OLD_KEYS = ["loss", "dino", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp", "images_per_s", "memory_mb",
            "skipped_images"]
NEW_KEYS = ["ln_k", "target_entropy_cls", "target_entropy_patch", "student_entropy_cls", "kl_teacher_student_cls",
            "teacher_feature_std", "prototypes_used", "prototype_gain"]


def train_line(it: int, keys: list[str]) -> dict:
    # Distinct values per key and iteration, so a series mixed up with another one cannot pass the equality checks.
    row = {"iteration": it}
    for j, k in enumerate(keys):
        row[k] = round(0.5 + j + 0.01 * it, 6)
    if "ln_k" in row:
        row["ln_k"] = math.log(64)
    return row


def write_run(run: Path, rows: list[dict]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def full_rows() -> list[dict]:
    rows = [train_line(it, OLD_KEYS + NEW_KEYS) for it in (1, 10, 20, 30, 40)]
    # Probe lines are separate objects; the age metric has no interval (it must still be plotted, without a band).
    rows.insert(3, {"iteration": 20, "probe_macro_auroc": 0.61, "probe_macro_auroc_lo": 0.55,
                    "probe_macro_auroc_hi": 0.67, "probe_age_r": 0.2})
    rows.append({"iteration": 40, "probe_macro_auroc": 0.66, "probe_macro_auroc_lo": 0.6,
                 "probe_macro_auroc_hi": 0.71, "probe_age_r": 0.3})
    return rows


def by_key(panels) -> dict:
    return {s.key: s for p in panels for s in p.series}


def test_series_equal_the_json_lines(tmp_path):
    run = write_run(tmp_path / "run", full_rows())
    rows = read_metrics(run)
    series = by_key(figure_data(rows))
    train_rows = [r for r in rows if "loss" in r]
    for key in ["loss", "dino", "ibot", "koleo", "lr", "momentum", "teacher_temp"] + NEW_KEYS:
        assert series[key].x == [r["iteration"] for r in train_rows], key
        assert series[key].y == [r[key] for r in train_rows], key
    auroc, age = series["probe_macro_auroc"], series["probe_age_r"]
    assert auroc.x == [20, 40] and auroc.y == [0.61, 0.66]
    assert auroc.lo == [0.55, 0.6] and auroc.hi == [0.67, 0.71]
    assert age.y == [0.2, 0.3] and age.lo is None and age.hi is None
    panels = {p.title: p for p in figure_data(rows)}
    assert (0.0, "0 (one-hot)") in panels["entropies (nats)"].hlines
    assert panels["prototypes used"].hlines == [(64.0, "K")]
    assert series["ln_k"].dashed


@pytest.mark.slow  # over 2 s alone on a quiet 2-core machine (measured 2026-12-07: 2.1-4.0 s)
def test_writes_a_readable_png(tmp_path):
    from matplotlib.image import imread

    run = write_run(tmp_path / "run", full_rows())
    out = plot(run)
    assert out == run / "learning_curves.png"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 0  # something was drawn, not a blank canvas


@pytest.mark.slow  # over 2 s alone on a quiet 2-core machine (measured 2026-12-07: 2.1-4.0 s)
def test_the_png_is_the_same_bytes_for_the_same_run(tmp_path):
    """Drawn in the harness figures' style (harness.common.plotting): no date nor matplotlib version in the file,
    so drawing the same metrics twice gives the same bytes."""
    run = write_run(tmp_path / "run", full_rows())
    first = plot(run, tmp_path / "a.png").read_bytes()
    assert plot(run, tmp_path / "b.png").read_bytes() == first
    assert b"raddino-bench trainer.plot" in first and b"Matplotlib version" not in first and b"tIME" not in first


def test_old_runs_without_the_new_keys(tmp_path):
    rows = [train_line(it, OLD_KEYS) for it in (1, 10, 20)]
    run = write_run(tmp_path / "old", rows)
    panels = figure_data(read_metrics(run))
    assert [p.title for p in panels] == ["losses", "learning rate", "teacher temperature", "teacher momentum"]
    assert by_key(panels)["dino"].y == [r["dino"] for r in rows]
    assert plot(run, tmp_path / "figs" / "old.png").read_bytes()[:8] == PNG_SIGNATURE


def test_a_key_missing_from_some_lines_keeps_only_the_lines_that_have_it(tmp_path):
    rows = [train_line(1, OLD_KEYS), train_line(10, OLD_KEYS + NEW_KEYS), train_line(20, OLD_KEYS + NEW_KEYS)]
    rows[2]["prototypes_used"] = None  # a step that could not compute it
    series = by_key(figure_data(read_metrics(write_run(tmp_path / "mixed", rows))))
    assert series["loss"].x == [1, 10, 20]
    assert series["target_entropy_cls"].x == [10, 20]
    assert series["prototypes_used"].x == [10] and series["prototypes_used"].y == [rows[1]["prototypes_used"]]


def test_partial_interval_draws_no_band(tmp_path):
    rows = [{"iteration": 5, "probe_sex_auroc": 0.7, "probe_sex_auroc_lo": 0.6, "probe_sex_auroc_hi": 0.8},
            {"iteration": 9, "probe_sex_auroc": 0.75}]
    series = by_key(figure_data(read_metrics(write_run(tmp_path / "p", rows))))
    assert series["probe_sex_auroc"].y == [0.7, 0.75] and series["probe_sex_auroc"].lo is None


def test_missing_metrics_exits_2(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    assert main([str(tmp_path / "empty_run")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl not found" in err and "trainer run directory" in err and err.count("\n") == 1


def test_bad_line_names_file_and_line(tmp_path, capsys):
    run = write_run(tmp_path / "run", [train_line(1, OLD_KEYS)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 2, "loss": \n')
    assert main([str(run)]) == 2 and "metrics.jsonl:2" in capsys.readouterr().err


def test_a_partial_last_line_is_the_one_being_written_and_left_out(tmp_path):
    run = write_run(tmp_path / "run", [train_line(1, OLD_KEYS)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 2, "lo')  # no newline yet: a running (or killed) run's last line
    assert [r["iteration"] for r in read_metrics(run)] == [1]


@pytest.mark.slow
def test_command_line(tmp_path):
    run = write_run(tmp_path / "run", full_rows())
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "trainer.plot", str(run), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == PNG_SIGNATURE and not (run / "learning_curves.png").exists()
    missing = subprocess.run([sys.executable, "-m", "trainer.plot", str(tmp_path / "nowhere")], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "metrics.jsonl not found" in missing.stderr


@pytest.mark.slow
def test_plots_a_real_training_run(tmp_path, blob_images):
    import torch

    from trainer.config import load_config
    from trainer.train import train

    tiny = ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=32",
            "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "head.out_dim=32",
            "head.hidden_dim=16", "head.bottleneck_dim=8", "optim.batch_size_per_gpu=4", "data.num_workers=0",
            "run.log_every=1", f"data.sources=[{blob_images}]"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: two OpenMP threads can run 10x slower
    try:
        train(load_config("smoke", tiny, steps=3), tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    rows = read_metrics(tmp_path / "run")
    series = by_key(figure_data(rows))
    assert series["loss"].x == [1, 2, 3] and series["loss"].y == [r["loss"] for r in rows]
    assert plot(tmp_path / "run").read_bytes()[:8] == PNG_SIGNATURE
