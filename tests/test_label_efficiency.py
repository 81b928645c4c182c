"""Label efficiency: 100% is the linear probe exactly, a fraction without a positive training patient reports the
label as not evaluable with its counts, the draws are seeded and nested, the figure plots the section's numbers,
and a fraction outside (0, 1] is a usage error before any model is built."""
import numpy as np
import pytest

import harness.run as run
from harness.probes import PROTOCOLS
from harness.probes import label_efficiency, linear
from harness.probes.label_efficiency import NAME, draw_patients, figure_png
from _synthetic_task import synthetic_run
from harness.protocols import ProbeOptions




def _run(fractions=(0.1, 0.3, 1.0), draws=3, n_patients=90, seed=0):
    """Two images per patient. "common" is visible in feature 0 for model "a"; "scarce" has 8 positive patients,
    5 of them in the test split, so 3 among the 60 training patients."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_patients), 2)
    n = len(pid)
    common = (rng.random(n) < 0.4).astype(np.int8)
    scarce = np.isin(pid, [0, 3, 6, 9, 12, 1, 2, 4]).astype(np.int8)
    x = rng.normal(size=(n, 8))
    x[:, 0] += 2.0 * common
    x[:, 1] += 2.0 * scarce
    features = {"a": x, "b": rng.normal(size=(n, 8))}
    return synthetic_run(pid, ["common", "scarce"], np.stack([common, scarce], 1), features, "a",
                         ProbeOptions(label_fractions=fractions, label_draws=draws), 100, seed)


@pytest.fixture(scope="module")
def ran():
    tr, encs = _run()
    result = label_efficiency.fit_and_score(tr, encs)
    return tr, encs, result


def test_the_whole_training_split_is_the_linear_probe_exactly(ran):
    tr, encs, result = ran
    lin, lencs = _run()
    lin_result = linear.fit_and_score(lin, lencs)
    for enc in encs:
        full = result.to_record(enc.name)["curve"][-1]
        assert full["fraction"] == 1.0 and full["draws"] == 1 and full["patients"] == 60
        assert full["macro_auroc"] == lin_result.to_record(enc.name)["metrics"]["auroc"]["macro"]
    assert result.section.rows["b"]["100% (60 patients)"].point == \
        lin_result.to_record("b")["metrics"]["auroc"]["macro"]["point"]
    # The tidy rows of the curve: one per model and fraction, labelled macro@<fraction>.
    rows = {(r.model, r.label): r for r in result.tidy}
    assert {label for _, label in rows} == {"macro@0.1", "macro@0.3", "macro@1"}
    assert {r.metric for r in result.tidy} == {"auroc"} and {r.protocol for r in result.tidy} == {NAME}
    full = result.to_record("b")["curve"][-1]
    assert (rows["b", "macro@1"].point, rows["b", "macro@1"].lo) == (full["macro_auroc"]["point"],
                                                                    full["macro_auroc"]["lo"])
    assert rows["b", "macro@1"].p_holm == full["paired_to_reference"]["p_holm"] and rows["a", "macro@1"].delta is None


def test_a_fraction_without_a_positive_patient_reports_the_label_with_its_counts(ran):
    tr, _, result = ran
    section = result.section
    curve = result.to_record("a")["curve"]
    assert [r["fraction"] for r in curve] == [0.1, 0.3, 1.0]
    assert [r["patients"] for r in curve] == [6, 18, 60]
    # 6 of 60 training patients drawn: not every draw holds one of the 3 positive "scarce" patients.
    assert curve[0]["labels"] == ["common"] and curve[-1]["labels"] == ["common", "scarce"]
    note = next(n for n in section.notes if n.startswith("Not evaluable at 10%"))
    per_draw = note.split("scarce (positive/negative training patients per draw: ")[1].split(")")[0].split(", ")
    assert len(per_draw) == 3 and "0/6" in per_draw and "common" not in note
    assert not any(n.startswith("Not evaluable at 100%") for n in section.notes)
    assert len(curve[0]["draw_points"]) == 3
    # The point is the mean over the draws.
    assert curve[0]["macro_auroc"]["point"] == pytest.approx(np.mean(curve[0]["draw_points"]), abs=1e-12)


def test_draws_are_seeded_nested_and_subsets_of_the_patients():
    patients = np.array(sorted(f"k{i:03d}" for i in range(50)))
    a = draw_patients(patients, (0.1, 0.5, 1.0), 3, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a[0.1], draw_patients(patients, (0.1,), 3, seed=4)[0.1]))
    assert [len(d) for d in a[0.1]] == [5, 5, 5] and len(a[1.0]) == 1 and len(a[1.0][0]) == 50
    assert all(set(small) <= set(big) for small, big in zip(a[0.1], a[0.5]))
    assert len({tuple(d) for d in a[0.5]}) == 3  # different draws
    assert not np.array_equal(a[0.5][0], draw_patients(patients, (0.5,), 1, seed=5)[0.5][0])
    assert [len(d) for d in draw_patients(patients, (0.001,), 2, seed=0)[0.001]] == [1, 1]  # never empty


def test_figure_plots_the_sections_numbers(ran):
    tr, encs, result = ran
    section = result.section
    curves = {e.name: result.to_record(e.name)["curve"] for e in encs}
    png, fig = figure_png(curves, "synthetic: label efficiency")
    assert result.files["synthetic_label_efficiency.png"] == png and png.startswith(b"\x89PNG")
    ax = fig.axes[0]
    for line, enc in zip(ax.get_lines(), encs):
        assert line.get_label() == enc.name
        np.testing.assert_array_equal(line.get_xdata(), [0.1, 0.3, 1.0])
        np.testing.assert_array_equal(line.get_ydata(), [section.rows[enc.name][c].point for c in section.columns])
    for band, enc in zip(ax.collections, encs):
        # The band's outline holds the section's interval ends at each fraction.
        ys = band.get_paths()[0].vertices[:, 1]
        for c in section.columns:
            cell = section.rows[enc.name][c]
            assert np.isclose(ys, cell.lo).any() and np.isclose(ys, cell.hi).any()
    assert any("(synthetic_label_efficiency.png)" in n for n in section.notes)


def test_no_evaluable_label_gives_n_e_cells_and_a_figure_that_says_so():
    tr, encs = _run(fractions=(0.5, 1.0), draws=2)
    tr.min_positive_patients = 50  # no label has that many test patients of each class
    result = label_efficiency.fit_and_score(tr, encs)
    assert {c.note for row in result.section.rows.values() for c in row.values()} == {"n/e: no evaluable label"}
    assert result.files["synthetic_label_efficiency.png"].startswith(b"\x89PNG")
    assert result.to_record("a")["curve"][0]["draw_points"] == []
    assert result.tidy == ()  # nothing evaluable: no number to tabulate


def test_label_efficiency_is_not_a_default_protocol():
    assert not PROTOCOLS.get(NAME).default
    assert NAME in run.parse_task_spec("demo:label-efficiency").protocols


@pytest.mark.parametrize("fractions", ["0", "0.1,1.5", "-0.2", "nan", "x", ""])
def test_a_fraction_outside_0_1_exits_2_before_any_model_is_built(fractions, monkeypatch, capsys):
    def no_build(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(run, "build_encoder", no_build)
    assert run.main(["--models", "pixels", "--tasks", "demo:label-efficiency", "--label-fractions", fractions]) == 2
    assert "--label-fractions" in capsys.readouterr().err


def test_fractions_are_parsed_sorted_and_distinct():
    assert run.parse_fractions("1,0.01,0.1,0.1") == (0.01, 0.1, 1.0)
