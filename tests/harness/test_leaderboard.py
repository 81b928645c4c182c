import re

from harness import tidy
from harness.leaderboard import Cell, Section, check_dirs, main, render
from harness.tidy import TidyRow


def _md(auroc=0.8123, note=None):
    rows = {"pixels": {"AUROC": Cell(auroc, 0.7, 0.9), "AUPRC": Cell(None, note=note or "n/e")},
            "random-vit": {"AUROC": Cell(0.75, 0.6, 0.85, significant=True), "AUPRC": Cell(0.5, 0.4, 0.6)}}
    return render("Leaderboard: t", [("Generated", "2026-01-01")], [Section("Linear", ["AUROC", "AUPRC"], rows)])


def _rows(auroc=0.8123, extra=()):
    return [TidyRow("t", "pixels", "linear", "auroc", "macro", auroc, 0.7, 0.9, None, None, 1000),
            TidyRow("t", "random-vit", "linear", "auroc", "macro", 0.75, 0.6, 0.85, -0.06, 0.01, 1000), *extra]


def _lb(folder, rows, md=True):
    (folder / "results").mkdir(parents=True)
    if md:
        (folder / "t.md").write_text(_md())
    (folder / "results" / "t.csv").write_text(tidy.csv_text(rows))
    return folder


def test_render_bolds_best_and_marks_significance():
    md = _md()
    assert "| pixels" in md and "**0.812** [0.700, 0.900]" in md
    assert "0.750 [0.600, 0.850] †" in md


def test_check_tolerates_small_drift(tmp_path):
    assert check_dirs(_lb(tmp_path / "a", _rows(0.8123)), _lb(tmp_path / "b", _rows(0.8131))) == []


def test_check_names_the_stale_row_and_column(tmp_path, capsys):
    bad = check_dirs(_lb(tmp_path / "a", _rows(0.8123)), _lb(tmp_path / "b", _rows(0.8500)))
    assert len(bad) == 1
    assert "model='pixels' protocol='linear' metric='auroc' label='macro', point" in bad[0].where
    assert (bad[0].committed, bad[0].fresh) == ("0.8123", "0.85")
    assert main(["check", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "1 stale leaderboard number(s)" in capsys.readouterr().out


def test_check_catches_rows_nulls_counts_and_missing_files(tmp_path):
    extra = TidyRow("t", "pixels", "knn", "auprc", "nodule", 0.3, None, None, None, None, 990)
    committed = _lb(tmp_path / "a", _rows())
    fresh = _lb(tmp_path / "b", _rows(extra=[extra]))
    assert [(m.where.split(",")[0], m.committed, m.fresh) for m in check_dirs(committed, fresh)] == [
        ("task='t' model='pixels' protocol='knn' metric='auprc' label='nodule'", "absent", "present")]
    changed = [extra._replace(n_valid=989, lo=0.1)]
    assert {m.where.rsplit(", ", 1)[1] for m in check_dirs(_lb(tmp_path / "c", _rows(extra=[extra])),
                                                           _lb(tmp_path / "d", _rows(extra=changed)))} == {
        "lo", "n_valid"}
    (tmp_path / "e").mkdir()
    missing = check_dirs(tmp_path / "e", committed)
    assert {(m.file, m.committed) for m in missing} == {("t.md", "absent"), ("results/t.csv", "absent")}


def test_legend_says_holm_is_per_column_and_partial_resamples_are_shown():
    rows = {"a": {"AUROC": Cell(0.8, 0.7, 0.9, n_valid=812, n_resamples=1000)},
            "b": {"AUROC": Cell(0.7, 0.6, 0.8, n_valid=1000, n_resamples=1000)}}
    md = render("Leaderboard: t", [], [Section("S", ["AUROC"], rows)])
    assert "Holm correction per column" in md
    assert "**0.800** [0.700, 0.900] (n=812)" in md
    assert re.search(r"\| 0\.700 \[0\.600, 0\.800\] +\|", md)  # all resamples valid: no count shown


def test_a_fresh_folder_without_tables_is_an_error_not_up_to_date(tmp_path, capsys):
    committed = _lb(tmp_path / "a", _rows())
    (tmp_path / "empty").mkdir()
    assert main(["check", str(committed), str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    assert "holds no results table" in captured.err and "up to date" not in captured.out


def test_check_compares_the_significance_decision_exactly(tmp_path):
    """Issue 20: the tolerance applied to p_holm too, so a † could flip across 0.05 unnoticed."""
    def rows(p):
        return [TidyRow("t", "random-vit", "linear", "auroc", "macro", 0.75, 0.6, 0.85, -0.06, p, 1000)]

    assert check_dirs(_lb(tmp_path / "a", rows(0.0490)), _lb(tmp_path / "b", rows(0.0495))) == []
    flipped = check_dirs(_lb(tmp_path / "c", rows(0.0495)), _lb(tmp_path / "d", rows(0.0505)))
    assert [(m.where.rsplit(", ", 1)[1], m.committed, m.fresh) for m in flipped] == [("p_holm < 0.05", "True",
                                                                                      "False")]
    # Beyond the tolerance, the p value itself is reported as well.
    moved = check_dirs(_lb(tmp_path / "e", rows(0.01)), _lb(tmp_path / "f", rows(0.3)))
    assert [m.where.rsplit(", ", 1)[1] for m in moved] == ["p_holm", "p_holm < 0.05"]
