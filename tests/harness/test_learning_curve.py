"""harness.figures.learning_curve: what the figure draws equals the run's and the evaluation's files."""
from __future__ import annotations

import json

import polars as pl
import pytest

from harness import tidy
from harness.figures.learning_curve import checkpoint_iteration, curve_data, draw, main

TASK = "csv-toy"


def _row(model: str, protocol: str, point: float, lo: float, hi: float) -> dict:
    return {"task": TASK, "model": model, "protocol": protocol, "metric": "auroc", "label": "macro", "point": point,
            "lo": lo, "hi": hi, "delta": None, "p_holm": None, "n_valid": 1000, "global_pool": "avg"}


@pytest.fixture
def run_and_eval(tmp_path):
    run, ev = tmp_path / "runs/k04", tmp_path / "eval"
    run.mkdir(parents=True)
    (ev / "results").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "loss": 1.0, "cpu_s": 1800.0}) + "\n"
                                               for i in (100, 200, 300, 400)))
    (run / "validation.jsonl").write_text("".join(
        json.dumps({"iteration": i, "probe_linear_auroc_avg": 0.7 + i / 4000, "probe_knn_auroc_avg": 0.6 + i / 4000,
                    "probe_linear_auroc_cls": 0.1}) + "\n" for i in (400, 0, 200)))
    rows = [_row("ckpt:runs/k04/checkpoints/ckpt_0000400", "linear", 0.80, 0.78, 0.82),
            _row("pixels", "linear", 0.86, 0.84, 0.88),
            _row("ckpt:runs/k04/init", "linear", 0.75, 0.73, 0.77),
            _row("ckpt:runs/k04/checkpoints/ckpt_0000200", "knn", 0.70, 0.68, 0.72),
            _row("ckpt:runs/k04/init", "knn", 0.65, 0.62, 0.67),
            {**_row("ckpt:runs/k04/init", "linear", 0.5, 0.4, 0.6), "metric": "auprc"}]
    pl.DataFrame(rows, schema=tidy.SCHEMA).write_parquet(ev / "results" / f"{TASK}.parquet")
    return run, ev


def test_checkpoint_names_give_their_iterations():
    assert checkpoint_iteration("ckpt:runs/x/init") == 0
    assert checkpoint_iteration("ckpt:/a/b/checkpoints/ckpt_0001200") == 1200
    assert checkpoint_iteration("ckpt:runs/x") is None  # the latest checkpoint: which one is not in the name
    assert checkpoint_iteration("pixels") is None


def test_the_curve_holds_exactly_the_files_numbers(run_and_eval):
    run, ev = run_and_eval
    d = curve_data(run, ev, TASK)
    assert d.pool == "avg"
    assert (d.test["linear"].iterations, d.test["linear"].point, d.test["linear"].lo) == ([0, 400], [0.75, 0.80],
                                                                                            [0.73, 0.78])
    assert (d.test["knn"].iterations, d.test["knn"].hi) == ([0, 200], [0.67, 0.72])
    assert [(f.model, f.point) for f in d.floors["linear"]] == [("pixels", 0.86)] and d.floors["knn"] == []
    assert d.validation["linear"].iterations == [0, 200, 400]  # sorted, the table's pooling only
    assert d.validation["knn"].point == pytest.approx([0.6, 0.65, 0.7])
    assert d.cpu_hours == ([0, 100, 200, 300, 400], [0.0, 0.5, 1.0, 1.5, 2.0])
    assert draw(d).axes  # draws without error


def test_the_command_writes_the_png_and_a_bad_folder_exits_2(run_and_eval, tmp_path, capsys):
    run, ev = run_and_eval
    assert main([str(run), str(ev), "--task", TASK, "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert main([str(run), str(tmp_path / "nowhere"), "--task", TASK]) == 2
    assert "harness.run --out folder" in capsys.readouterr().err
