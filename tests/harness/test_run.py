"""The CLI end to end: leaderboard, results, predictions, split; cache reuse; clear errors on bad input."""
import json
import subprocess
import sys

import polars as pl
import pytest

from harness.run import main
from harness.taskspec import read_task, read_tasks
from tests.conftest import REPO
from tests.harness.same_outputs import assert_same_leaderboard
from tests.harness.small_tasks import csv_set


def test_task_list_keeps_key_value_arguments_together():
    assert [s.text for s in read_tasks("demo:n_patients=50,size=128,csv:/a.csv,vindr")] == [
        "demo:n_patients=50,size=128", "csv:/a.csv", "vindr"]
    assert [s.text for s in read_tasks("demo:n_patients=8,size=64:linear,rsna")] == [
        "demo:n_patients=8,size=64:linear", "rsna"]


def test_read_task():
    assert read_task("demo") == read_task("demo")
    s = read_task("csv:/a/b/labels.csv:linear")
    assert (s.name, s.arg, s.protocols) == ("csv", "/a/b/labels.csv", ("linear",))
    assert read_task("csv:/a/b.csv").arg == "/a/b.csv"
    assert read_task("demo:demographics").protocols == ("linear", "demographics")  # with what it runs after


@pytest.mark.slow
def test_cli_end_to_end_on_csv(tmp_path, capsys):
    csv = csv_set(tmp_path / "data")
    out, cache = tmp_path / "lb", tmp_path / "cache"
    argv = ["--models", "pixels", "--tasks", f"csv:{csv}", "--out", str(out), "--cache-dir", str(cache),
            "--bootstrap", "100", "--workers", "0", "--min-positive-patients", "2"]
    assert main(argv) == 0
    md = (out / "csv-data.md").read_text()
    assert "| pixels" in md and "macro AUROC" in md
    assert "never (only one class in the training split: train 0+/" in md  # reported, not NaN, not dropped
    res = json.loads((out / "results/csv-data/pixels.json").read_text())
    auroc = res["protocols"]["linear"]["metrics"]["auroc"]["per_label"]["signal"]
    assert auroc["point"] > 0.9 and auroc["lo"] <= auroc["point"] <= auroc["hi"]
    assert res["bootstrap"]["n_resamples"] == 100 and len(res["split"]["hash"]) == 16
    assert res["provenance"]["packages"]["torch"]
    preds = pl.read_parquet(out / "results/csv-data/pixels.predictions.parquet")
    assert set(preds.columns) == {"image_id", "patient_key", "label", "target", "score"}
    assert preds.height == res["dataset"]["test_images"]  # one row per test image for the one evaluable label
    everything = md + (out / "results/csv-data/pixels.json").read_text() + (out / "splits/csv-data.csv").read_text()
    assert "PID0" not in everything and "PID0" not in str(preds["patient_key"].to_list())
    capsys.readouterr()
    assert main(argv) == 0  # second run: cache hit, same numbers
    assert "nothing to compute" in capsys.readouterr().err  # progress messages go to stderr
    assert_same_leaderboard(md, (out / "csv-data.md").read_text())


@pytest.mark.slow
def test_cli_knn_and_label_efficiency_sit_beside_the_linear_probe(tmp_path):
    """k-NN runs by default and publishes its scores; label efficiency runs on request, is merged into the same
    leaderboard after the k-NN section, and its figure is written beside the leaderboard."""
    csv = csv_set(tmp_path / "data")
    out = tmp_path / "lb"
    common = ["--models", "pixels", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "50",
              "--workers", "0", "--min-positive-patients", "2"]
    assert main([*common, "--tasks", f"csv:{csv}", "--knn-k", "3", "--knn-temperature", "0.2"]) == 0
    preds = pl.read_parquet(out / "results/csv-data/pixels.knn.parquet")
    assert set(preds.columns) == {"image_id", "patient_key", "label", "target", "score"}
    assert "PID0" not in str(preds["patient_key"].to_list())
    res = json.loads((out / "results/csv-data/pixels.json").read_text())
    assert (res["protocols"]["knn"]["k"], res["protocols"]["knn"]["temperature"]) == (3, 0.2)
    assert main([*common, "--tasks", f"csv:{csv}:label-efficiency", "--label-fractions", "0.5,1",
                 "--label-draws", "2"]) == 0
    md = (out / "csv-data.md").read_text()
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert titles[:3] == ["## Linear probe (classification)", "## k-NN probe (classification)",
                          "## Label efficiency (linear probe on a fraction of the training patients)"]
    assert "k = 3, temperature 0.2" in md  # the kept k-NN section still says how it was computed
    assert "](csv-data_label_efficiency.png)" in md
    assert (out / "csv-data_label_efficiency.png").read_bytes().startswith(b"\x89PNG")
    curve = json.loads((out / "results/csv-data/pixels.json").read_text())["protocols"]["label-efficiency"]["curve"]
    assert [r["fraction"] for r in curve] == [0.5, 1.0] and [r["draws"] for r in curve] == [2, 1]


def test_cli_bad_label_exits_nonzero_and_writes_nothing(tmp_path, capsys):
    csv = csv_set(tmp_path / "data")
    csv.write_text(csv.read_text().replace("img/3_1.png,0,", "img/3_1.png,yes,").replace("img/3_1.png,1,", "img/3_1.png,yes,"))
    out = tmp_path / "lb"
    code = main(["--models", "pixels", "--tasks", f"csv:{csv}", "--out", str(out), "--cache-dir",
                 str(tmp_path / "c"), "--workers", "0"])
    assert code == 1
    assert "label_signal is 'yes'" in capsys.readouterr().err
    assert not out.exists()


def test_cli_on_duplicate_error_names_both_images(tmp_path, capsys):
    csv = csv_set(tmp_path / "data")
    (tmp_path / "data/img/5_1.png").write_bytes((tmp_path / "data/img/2_0.png").read_bytes())
    out = tmp_path / "lb"
    code = main(["--models", "pixels", "--tasks", f"csv:{csv}", "--out", str(out), "--cache-dir",
                 str(tmp_path / "c"), "--workers", "0", "--on-duplicate", "error"])
    assert code == 1
    assert "images 'img/2_0.png' and 'img/5_1.png' are identical" in capsys.readouterr().err
    assert not out.exists()


def test_cli_unknown_model_is_a_clear_error(capsys):
    assert main(["--models", "no-such-model", "--tasks", "demo"]) == 2
    assert "unknown encoder 'no-such-model'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_shared_data(shared_cxr, tmp_path):
    out = tmp_path / "lb"
    proc = subprocess.run([sys.executable, "-m", "harness.run", "--models", "pixels", "--tasks",
                           f"csv:{shared_cxr / 'labels.csv'}", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                           "--bootstrap", "200"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "csv-ieee8023-covid-cxr.md").read_text()
    # 158 patient ids, 2 of which share byte-identical images with another: merged, so 156 split units.
    assert "| pixels" in md and "286 images, 156 patients" in md
    assert "2 patient id(s) merged into others" in proc.stderr
    assert "not found" not in proc.stderr


@pytest.mark.slow
def test_cli_end_to_end_on_demo_runs_every_default_protocol(tmp_path):
    out = tmp_path / "lb"
    assert main(["--models", "pixels", "--tasks", "demo:n_patients=30,size=64", "--out", str(out),
                 "--cache-dir", str(tmp_path / "c"), "--bootstrap", "50", "--workers", "0"]) == 0
    # Options change the numbers, so they are in the output name: the default `demo` files are not touched.
    name = "demo-n_patients_30-size_64"
    assert not (out / "demo.md").exists()
    md = (out / f"{name}.md").read_text()
    for section in ("## Linear probe", "## k-NN probe", "## Segmentation", "## Demographics"):
        assert section in md
    res = json.loads((out / f"results/{name}/pixels.json").read_text())
    assert set(res["protocols"]) == {"linear", "knn", "seg", "demographics"}
    assert (out / f"results/{name}/pixels.overlays.npz").stat().st_size > 0  # drawn by harness.figures


def test_no_module_imports_the_command_lines():
    """Issue 21: the command line is the top layer. The ablation, the sweep and the trainer's monitor call the
    evaluation and the writer with typed options, never `harness.run` (nor the console script `harness.cli`, which
    runs each command by its module's name)."""
    import ast

    commands = {"harness.run", "harness.cli"}
    found = []
    for package in ("baselines", "bench", "harness", "slurm", "trainer"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                else:
                    continue
                found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n in commands]
    assert found == []
