"""Usage errors of the evaluation command: exit 2 with one `error:` line (a did-you-mean for a misspelt name)
before any encoder or task is built; --task-arg, --protocols, the default --out and -q/-v on real runs."""
from __future__ import annotations

import logging
import sys

import pytest

from harness.flags import build_parser
from harness.run import main
from tests.harness.same_outputs import assert_same_leaderboard
from tests.harness.small_tasks import csv_set




def _usage_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("extra, words", [
    (["--models", "pixel"], ["unknown encoder 'pixel' (did you mean 'pixels'?)", "registered:"]),
    (["--models", "pixels,no-such-model"], ["unknown encoder 'no-such-model'"]),
    (["--tasks", "dmeo"], ["unknown task 'dmeo' (did you mean 'demo'?)"]),
    (["--tasks", "demo:lineer"], ["unknown protocol 'lineer' (did you mean 'linear'?)"]),
    (["--tasks", "demo:n_patients=8:demographic"], ["unknown protocol 'demographic' (did you mean 'demographics'?)"]),
    (["--tasks", "demo:foo"], ["'foo' is neither a protocol", "nor a KEY=VALUE option"]),
    (["--tasks", "demo:linear,size=64"], ["comes after the protocol"]),
    (["--tasks", "csv"], ["task 'csv' needs its file", "--task-arg csv.path=PATH"]),
    (["--protocols", "linear,knnn"], ["unknown protocol 'knnn' (did you mean 'knn'?)"]),
    (["--task-arg", "demo"], ["--task-arg 'demo': expected NAME.KEY=VALUE"]),
    (["--task-arg", "vindr.agg=any"], ["task 'vindr' is not in --tasks"]),
    (["--task-arg", "demo.n_patients=5,6"], ["cannot hold a comma"]),
    (["--label-fractions", "0,2"], ["--label-fractions must be in (0, 1]"]),
    (["--label-fractions", "half"], ["--label-fractions must be a comma list of numbers"]),
    (["--bootstrap", "0"], ["--bootstrap must be at least 1"]),
    (["--test-fraction", "1"], ["--test-fraction 1 must be between 0 and 1"]),
    (["--device", "gpu"], ["--device 'gpu' is not a device"]),
    (["--reference", "pixel"], ["--reference 'pixel' is not among --models (did you mean 'pixels'?)"]),
])
def test_misuse_exits_2_with_one_line_before_anything_is_built(extra, words, nothing_built, tmp_path, capsys):
    line = _usage_error(["--models", "pixels", "--tasks", "demo", "--out", str(tmp_path / "lb"), *extra], capsys)
    for w in words:
        assert w in line, line
    assert not (tmp_path / "lb").exists()


def test_missing_paths_are_usage_errors(nothing_built, tmp_path, capsys):
    gone = tmp_path / "gone"
    common = ["--models", "pixels", "--out", str(tmp_path / "lb")]
    line = _usage_error([*common, "--tasks", "demo", "--data-root", str(gone)], capsys)
    assert f"--data-root {gone}: {gone} is not a directory" in line
    line = _usage_error([*common, "--tasks", "demo", "--data-root", f"vindrr={tmp_path}"], capsys)
    assert "no task 'vindrr' (did you mean 'vindr'?)" in line
    line = _usage_error([*common, "--tasks", "demo", "--data-root", f"vindr={gone}"], capsys)
    assert f"{gone} is not a directory" in line
    line = _usage_error([*common, "--tasks", f"csv:{gone / 'labels.csv'}"], capsys)
    assert f"{gone / 'labels.csv'} is not a file" in line
    line = _usage_error(["--models", f"ckpt:{gone}", "--tasks", "demo"], capsys)
    assert f"--models ckpt:{gone}: {gone} does not exist" in line
    line = _usage_error(["--models", "ckpt", "--tasks", "demo"], capsys)
    assert "encoder 'ckpt' needs an argument: spell it ckpt:DIR" in line
    line = _usage_error(["--models", "pixels", "--tasks", "demo", "--weights-dir", str(gone)], capsys)
    assert f"--weights-dir {gone} is not a directory" in line


def test_an_explicit_model_without_weights_is_refused_before_loading(nothing_built, tmp_path, capsys):
    empty = tmp_path / "weights"
    empty.mkdir()
    line = _usage_error(["--models", "pixels,rad-dino", "--tasks", "demo", "--weights-dir", str(empty)], capsys)
    assert f"rad-dino: weights not found in {empty / 'rad-dino'}" in line


@pytest.mark.slow
def test_task_arg_path_with_a_comma_protocols_default_out_and_streams(tmp_path, monkeypatch, capsys):
    """A csv in a folder named 'a,b' given through --task-arg; --protocols linear only; no --out: runs/<name>/;
    stdout holds the encoder table and the 'wrote' line, stderr the progress messages (and bars with -v)."""
    csv = csv_set(tmp_path / "a,b")
    monkeypatch.chdir(tmp_path)
    argv = ["--models", "pixels", "--tasks", "csv", "--task-arg", f"csv.path={csv}", "--protocols", "linear",
            "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "50", "--workers", "0",
            "--min-positive-patients", "2"]
    assert main([*argv, "-v"]) == 0
    out, err = capsys.readouterr()
    run = tmp_path / "runs" / "csv-a_b"
    md = (run / "csv-a_b.md").read_text()
    assert "## Linear probe" in md and "## k-NN" not in md  # --protocols linear replaced the defaults
    assert (run / "results" / "csv-a_b" / "pixels.json").is_file() and (run / "splits" / "csv-a_b.csv").is_file()
    assert out.splitlines()[-1] == f"wrote {run.relative_to(tmp_path) / 'csv-a_b.md'}"
    assert "| pixels" not in out and "protocol linear" not in out and "task csv-a,b" not in out
    assert "protocol linear ..." in err and "task csv-a,b: 48 images" in err
    assert f"task 'csv --task-arg csv.path={csv}': csv, argument '{csv}', protocols linear" in err  # -v
    assert "linear probe: fits and bootstrap" in err  # -v: bars although not a terminal

    assert main([*argv, "-q"]) == 0  # cached features now; -q: nothing on stderr, the same stdout
    quiet_out, quiet_err = capsys.readouterr()
    assert quiet_err == "" and quiet_out == out
    assert_same_leaderboard(md, (run / "csv-a_b.md").read_text())


def test_protocols_apply_to_the_tasks_that_name_none():
    from harness.checks import task_specs

    args = build_parser().parse_args(
        ["--tasks", "demo,demo:n_patients=8:seg", "--protocols", "knn,linear", "--task-arg", "demo.size=32"])
    assert [(s.arg, s.protocols) for s in task_specs(args)] == [("size=32", ("linear", "knn")),
                                                                 ("n_patients=8,size=32", ("seg",))]


def test_setup_logging_levels_streams_and_bars(monkeypatch, capsys):
    from harness.log import progress, progress_enabled, setup_logging

    log = logging.getLogger("harness.some.module")
    setup_logging(0)
    setup_logging(0)  # a second command in the same process: still one handler
    log.info("shown")
    log.debug("hidden")
    assert capsys.readouterr() == ("", "shown\n")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not progress_enabled()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress_enabled()  # a terminal watches
    setup_logging(-1)
    log.info("hidden")
    log.warning("warned")
    assert capsys.readouterr().err == "warned\n" and not progress_enabled()
    setup_logging(1)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    log.debug("detail")
    assert capsys.readouterr().err == "detail\n" and progress_enabled()
    assert list(progress(range(3), "counting")) == [0, 1, 2]
    assert "counting" in capsys.readouterr().err
    setup_logging(0)
