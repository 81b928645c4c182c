"""What `python -m harness.run` publishes: strict JSON, names that carry the task's options, one-protocol runs
merged into the leaderboard without stale files, a header that says what was evaluable, and intervals a reader
can recompute from the published files alone (the script in docs/statistics.md, run here)."""
import contextlib
import io
import json
import re
import sys

import polars as pl
import pytest

from harness.run import main
from harness.taskspec import TaskSpec
from tests.conftest import REPO
from tests.harness.small_tasks import labelled_set


def _run(tmp_path, csv, *extra, task_suffix=""):
    return main(["--models", "pixels", "--tasks", f"csv:{csv}{task_suffix}", "--out", str(tmp_path / "lb"),
                 "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "200", "--workers", "0", *extra])


def _strict(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def labelled(tmp_path):
    return labelled_set(tmp_path / "data")


@pytest.mark.slow
def test_results_json_has_null_not_nan(tmp_path, labelled):
    # With one positive training patient, the rare label's penalty cannot be cross-validated: cv_auroc is NaN.
    assert _run(tmp_path, labelled, "--min-positive-patients", "1") == 0
    res = _strict((tmp_path / "lb/results/csv-data/pixels.json").read_text())
    rare = [lab for lab in res["protocols"]["linear"]["labels"] if lab["name"] == "rare"][0]
    assert rare["evaluable"] and rare["cv_auroc"] is None
    _strict((tmp_path / "lb/results/csv-data.leaderboard.json").read_text())


@pytest.mark.slow
def test_rare_labels_leave_the_macro_and_the_header_says_why(tmp_path, labelled, capsys):
    assert _run(tmp_path, labelled) == 0
    md = (tmp_path / "lb/csv-data.md").read_text()
    header = md.split("## ")[0]
    assert "a, b (evaluable: at least 5 positive and 5 negative test patients" in header
    assert "rare (1 positive and 19 negative test patients, fewer than --min-positive-patients 5)" in header
    assert "--min-positive-patients 5" in header.split("**Bootstrap**")[1]
    assert "official test split (the seed played no part)" in header and "no aggregation" in header
    assert "rare AUPRC" not in md and "| b AUPRC" in md.replace("  ", " ")
    res = _strict((tmp_path / "lb/results/csv-data/pixels.json").read_text())
    macro = res["protocols"]["linear"]["metrics"]["auprc"]["macro"]
    assert macro["n_valid"] == macro["n_resamples"] == 200  # every resample averages a and b
    capsys.readouterr()
    assert _run(tmp_path, labelled, "--min-positive-patients", "0") == 2
    assert "--min-positive-patients must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_one_protocol_run_is_merged_and_leaves_nothing_stale(tmp_path, labelled, capsys):
    lb = tmp_path / "lb"
    assert _run(tmp_path, labelled) == 0
    full = (lb / "csv-data.md").read_text()
    linear_table = full[full.index("## Linear probe"):full.index("## Segmentation")]
    (lb / "results/csv-data/gone-model.json").write_text("{}")  # a file of an older run
    assert _run(tmp_path, labelled, task_suffix=":demographics") == 0
    merged = (lb / "csv-data.md").read_text()
    assert linear_table in merged and "## Demographics" in merged and "## Segmentation" in merged
    assert merged.index("## Linear probe") < merged.index("## Segmentation") < merged.index("## Demographics")
    assert "kept from an earlier run" in merged
    res = _strict((lb / "results/csv-data/pixels.json").read_text())
    assert list(res["protocols"]) == ["linear", "knn", "demographics"]  # seg records nothing without masks
    files = {f.name for f in (lb / "results/csv-data").iterdir()}
    assert files == {"pixels.json", "pixels.predictions.parquet", "pixels.knn.parquet", "pixels.demographics.parquet"}
    # Other settings: the old sections are not comparable, so they go, with their files.
    capsys.readouterr()
    assert _run(tmp_path, labelled, "--bootstrap", "100", task_suffix=":linear") == 0
    assert "sections dropped, not merged" in capsys.readouterr().err
    alone = (lb / "csv-data.md").read_text()
    assert "## Linear probe" in alone and "## Demographics" not in alone and "## Segmentation" not in alone
    assert not (lb / "results/csv-data/pixels.demographics.parquet").exists()
    assert not (lb / "results/csv-data/pixels.knn.parquet").exists()
    assert list(_strict((lb / "results/csv-data/pixels.json").read_text())["protocols"]) == ["linear"]


class _Named:
    def __init__(self, name):
        self.name = name


def test_output_names_carry_the_options_that_change_the_numbers():
    from harness.evaluate import output_name

    assert output_name(TaskSpec("demo", None, ()), _Named("demo")) == "demo"
    assert output_name(TaskSpec("csv", "/d/ieee8023-covid-cxr/labels.csv", ()), _Named("csv-ieee8023-covid-cxr")) \
        == "csv-ieee8023-covid-cxr"
    assert output_name(TaskSpec("csv", "/d/x/other.csv", ()), _Named("csv-x")) == "csv-x-other"
    assert output_name(TaskSpec("vindr", "agg=any", ()), _Named("vindr")) == "vindr-agg_any"
    assert output_name(TaskSpec("vindr", "labels=all,agg=any", ()), _Named("vindr")) == "vindr-agg_any-labels_all"
    assert output_name(TaskSpec("rsna", "splits=/data/lists/RSNA/", ()), _Named("rsna")) == "rsna-splits_RSNA"
    assert output_name(TaskSpec("demo", "n_patients=50,size=128", ()), _Named("demo")) \
        == "demo-n_patients_50-size_128"


def _docs_block(marker: str) -> str:
    text = (REPO / "docs" / "statistics.md").read_text()
    after = text[text.index(marker):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


@pytest.mark.slow
def test_readme_script_reproduces_every_interval_from_the_published_files(tmp_path, labelled, monkeypatch):
    assert _run(tmp_path, labelled) == 0
    folder = tmp_path / "lb/results/csv-data"
    monkeypatch.setattr(sys, "argv", ["reproduce", str(folder), "pixels"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_docs_block("<!-- reproduce-ci -->"), "docs/statistics.md", "exec"), {"__name__": "__main__"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 * 3  # AUROC and AUPRC of a, b and their macro
    widths = []
    for line in lines:
        metric, name, lo, hi, _, json_lo, json_hi = line.split()
        widths.append(float(hi) - float(lo))
        assert abs(float(lo) - float(json_lo)) < 1e-12 and abs(float(hi) - float(json_hi)) < 1e-12, line
    assert min(widths) > 0.05  # real intervals, not a degenerate [1, 1]


@pytest.mark.slow
def test_demographic_predictions_are_published_per_image(tmp_path, labelled):
    assert _run(tmp_path, labelled) == 0
    demo = pl.read_parquet(tmp_path / "lb/results/csv-data/pixels.demographics.parquet")
    assert demo.columns == ["image_id", "patient_key", "sex", "sex_score", "age", "age_pred"]
    assert demo.height == 40 and demo["sex_score"].null_count() == 0 and demo["age_pred"].null_count() == 0
    assert "PID" not in str(demo["patient_key"].to_list())
    split = pl.read_csv(tmp_path / "lb/splits/csv-data.csv", comment_prefix="#")
    assert set(demo["patient_key"]) == set(split.filter(pl.col("split") == "test")["patient_key"])


@pytest.mark.slow
@pytest.mark.shared
def test_real_data_macro_keeps_its_labels_and_reproduces(shared_cxr, tmp_path, monkeypatch):
    """The review's case: on the shared set, fungal and no_finding have too few positive test patients. They are
    named in the header and left out, every resample averages the same labels, and the docs/statistics.md script
    recomputes every interval from the published parquet."""
    out = tmp_path / "lb"
    assert main(["--models", "pixels", "--tasks", f"csv:{shared_cxr / 'labels.csv'}:linear", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "200", "--workers", "0"]) == 0
    header = (out / "csv-ieee8023-covid-cxr.md").read_text().split("## ")[0]
    assert re.search(r"not evaluable: fungal \(\d positive and \d+ negative test patients", header)
    assert re.search(r"no_finding \(\d positive and \d+ negative test patients", header)
    linear = _strict((out / "results/csv-ieee8023-covid-cxr/pixels.json").read_text())["protocols"]["linear"]
    assert linear["metrics"]["auprc"]["macro"]["n_valid"] == 200
    monkeypatch.setattr(sys, "argv", ["reproduce", str(out / "results/csv-ieee8023-covid-cxr"), "pixels"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_docs_block("<!-- reproduce-ci -->"), "docs/statistics.md", "exec"), {"__name__": "__main__"})
    for line in printed.getvalue().splitlines():
        _, _, lo, hi, _, json_lo, json_hi = line.split()
        assert abs(float(lo) - float(json_lo)) < 1e-12 and abs(float(hi) - float(json_hi)) < 1e-12, line
