import re

from harness.leaderboard import Cell, Section, check_dirs, compare, render


def _md(auroc=0.8123, note=None):
    rows = {"pixels": {"AUROC": Cell(auroc, 0.7, 0.9), "AUPRC": Cell(None, note=note or "n/e")},
            "random-vit": {"AUROC": Cell(0.75, 0.6, 0.85, significant=True), "AUPRC": Cell(0.5, 0.4, 0.6)}}
    return render("Leaderboard: t", [("Generated", "2026-01-01")], [Section("Linear", ["AUROC", "AUPRC"], rows)])


def test_render_bolds_best_and_marks_significance():
    md = _md()
    assert "| pixels" in md and "**0.812** [0.700, 0.900]" in md
    assert "0.750 [0.600, 0.850] †" in md


def test_compare_tolerates_small_drift_and_dates():
    assert compare(_md(0.8123), _md(0.8131).replace("2026-01-01", "2027-02-02"), "t.md") == []


def test_compare_names_the_stale_cell():
    bad = compare(_md(0.8123), _md(0.8500), "t.md")
    assert len(bad) == 1 and "row 'pixels'" in bad[0].where and "column 'AUROC'" in bad[0].where
    assert "0.812" in bad[0].committed and "0.850" in bad[0].fresh


def test_compare_catches_text_and_missing_rows(tmp_path):
    assert compare(_md(note="n/e"), _md(note="n/e: 0 positives"), "t.md")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "t.md").write_text(_md())
    assert check_dirs(tmp_path / "a", tmp_path / "b")[0].committed == "absent"


def test_legend_says_holm_is_per_column_and_partial_resamples_are_shown():
    rows = {"a": {"AUROC": Cell(0.8, 0.7, 0.9, n_valid=812, n_resamples=1000)},
            "b": {"AUROC": Cell(0.7, 0.6, 0.8, n_valid=1000, n_resamples=1000)}}
    md = render("Leaderboard: t", [], [Section("S", ["AUROC"], rows)])
    assert "Holm correction per column" in md
    assert "**0.800** [0.700, 0.900] (n=812)" in md
    assert re.search(r"\| 0\.700 \[0\.600, 0\.800\] +\|", md)  # all resamples valid: no count shown
