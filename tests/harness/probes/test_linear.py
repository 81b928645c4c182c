import numpy as np
import pytest

from harness.probe_fits import fold_scores
from harness.probes import linear
from harness.protocols import ProbeOptions
from harness.probes.linear import grid_edge, linear_probe
from tests.harness.probes.synthetic import synthetic_run


def choose_C(x: np.ndarray, y: np.ndarray, groups: np.ndarray, Cs: tuple[float, ...], seed: int
             ) -> tuple[float, float]:
    """One label's (C, CV AUROC) chosen serially in this process, from the probe's own folds and choice rule: the
    reference that `linear_probe`'s parallel (label, fold) fits must equal."""
    per_fold = [fold_scores(x, y, tr, va, Cs, seed, linear.MAX_ITER)[0]
                for tr, va in linear._cv_folds(x, y, groups, seed, max_folds=5)]
    return linear._best_C(Cs, linear._grid_by_fold(Cs, per_fold))


def _data(n=200, d=10, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n // 2), 2)
    x = rng.normal(size=(n, d))
    y = np.stack([(x[:, 0] + 0.5 * rng.normal(size=n) > 0), np.zeros(n, bool)], 1).astype(int)
    return x, y, groups


def test_probe_learns_signal_and_reports_single_class_label():
    x, y, g = _data()
    res = linear_probe(x[:140], y[:140], g[:140], x[140:], y[140:], ["signal", "empty"], seed=0)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[140:, 0], res.scores[:, 0]) > 0.85
    assert res.labels[0].evaluable and res.labels[0].C is not None
    assert not res.labels[1].evaluable and "one class" in res.labels[1].reason
    assert res.labels[1].counts == {"train_pos": 0, "train_neg": 140, "test_pos": 0, "test_neg": 60}
    assert np.isnan(res.scores[:, 1]).all()


def test_cv_folds_respect_patients():
    """With duplicated images per patient, image-level CV would reward memorisation (large C); grouped CV
    must not: every duplicate pair sits in one fold."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=(60, 40))
    x = np.repeat(base, 2, axis=0) + 1e-3 * rng.normal(size=(120, 40))
    y = np.repeat((rng.random(60) < 0.5).astype(int), 2)
    C, cv_auc = choose_C(x, y, np.repeat(np.arange(60), 2), (1e-4, 1e-2, 1.0, 100.0), seed=0)
    assert cv_auc < 0.75  # no leakage between folds: labels are noise


def test_non_converged_fits_are_counted_not_silenced(monkeypatch):
    x, y, g = _data()
    done = linear_probe(x[:140], y[:140], g[:140], x[140:], y[140:], ["signal", "empty"], seed=0).labels[0]
    assert done.fits == 5 * len(linear.DEFAULT_CS) + 1 and done.not_converged == 0
    monkeypatch.setattr(linear, "MAX_ITER", 1)
    cut = linear_probe(x[:140], y[:140], g[:140], x[140:], y[140:], ["signal", "empty"], seed=0).labels[0]
    assert cut.fits == done.fits and cut.not_converged == cut.fits


def test_penalty_at_the_edge_of_its_grid_is_flagged():
    assert grid_edge((0.1, 1.0, 10.0), 0.1) == "low" and grid_edge((0.1, 1.0, 10.0), 10.0) == "high"
    assert grid_edge((0.1, 1.0, 10.0), 1.0) == "" and grid_edge((1.0,), 1.0) == ""
    x, y, g = _data()
    fit = {"x_train": x[:140], "y_train": y[:140], "groups_train": g[:140], "x_test": x[140:], "y_test": y[140:],
           "label_names": ["signal", "empty"], "seed": 0}
    two = linear_probe(**fit, Cs=(0.01, 0.1)).labels[0]      # any choice from two values is at an edge
    assert two.C_at_edge == ("low" if two.C == 0.01 else "high")
    inner = linear_probe(**fit, Cs=(two.C / 100, two.C / 10, two.C, two.C * 10, two.C * 100)).labels[0]
    assert inner.C_at_edge == grid_edge((two.C / 100, two.C / 10, two.C, two.C * 10, two.C * 100), inner.C)


@pytest.mark.slow
def test_results_are_bit_identical_for_any_number_of_jobs():
    """Workers fit (label, fold) pairs in any order and on one BLAS thread each: every number must match the
    in-process run exactly, label by label (a result filed under the wrong label would differ)."""
    rng = np.random.default_rng(3)
    n = 240
    x = rng.normal(size=(n, 12)).astype(np.float32)
    groups = np.repeat(np.arange(n // 2), 2)
    logits = x[:, :4] * np.array([2.0, 1.0, 0.5, 0.2]) + rng.normal(size=(n, 4))
    y = (logits > np.quantile(logits, [0.7, 0.8, 0.9, 0.95], axis=0).diagonal()).astype(int)
    y = np.concatenate([y, np.zeros((n, 1), int)], axis=1)     # a label with one class: not fitted
    names = ["a", "b", "c", "d", "empty"]
    fit = {"x_train": x[:168], "y_train": y[:168], "groups_train": groups[:168], "x_test": x[168:],
           "y_test": y[168:], "label_names": names, "seed": 0, "skip": {2: "skipped on purpose"}}
    one, two = linear_probe(**fit, n_jobs=1), linear_probe(**fit, n_jobs=2)
    assert np.array_equal(one.scores, two.scores, equal_nan=True)
    assert [vars(lab) for lab in one.labels] == [vars(lab) for lab in two.labels]
    fitted = [lab for lab in one.labels if lab.evaluable]
    assert [lab.name for lab in fitted] == ["a", "b", "d"]
    assert all(lab.fits == 5 * len(linear.DEFAULT_CS) + 1 for lab in fitted)
    assert len({lab.cv_auroc for lab in fitted}) == 3        # distinct labels, distinct CV scores
    # and the same as the single-label path, choose_C in this process
    for j, lab in enumerate(one.labels):
        if lab.evaluable:
            assert choose_C(x[:168], y[:168, j], groups[:168], linear.DEFAULT_CS, seed=0) == (lab.C, lab.cv_auroc)


def test_probe_jobs_below_one_is_a_usage_error(capsys):
    from harness.run import main

    assert main(["--models", "pixels", "--tasks", "demo", "--probe-jobs", "0"]) == 2
    assert "error: --probe-jobs must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_a_label_with_one_positive_training_patient_says_its_C_fell_back():
    """Issue 20: with one positive training patient no CV fold can hold one out, and C silently became 0.1."""
    rng = np.random.default_rng(0)
    pid = np.repeat(np.arange(60), 2)
    common = (rng.random(120) < 0.4).astype(np.int8)
    # Patients 0, 3, 6, 9, 12 are in the test split (pid % 3 == 0), patient 1 is the only training positive.
    rare = np.isin(pid, [0, 3, 6, 9, 12, 1]).astype(np.int8)
    x = rng.normal(size=(120, 6))
    x[:, 0] += 2.0 * common
    tr, encs = synthetic_run(pid, ["common", "rare"], np.stack([common, rare], 1), {"a": x, "b": -x}, "a",
                             ProbeOptions(n_jobs=1), 50, 0)
    result = linear.fit_and_score(tr, encs)
    labels = {lab["name"]: lab for lab in result.to_record("a")["labels"]}
    assert labels["rare"]["C"] == linear.fallback_C() == 0.1 and labels["rare"]["C_fallback"]
    assert not labels["common"]["C_fallback"]
    assert ("`C` not cross-validated, fixed at C = 0.1 (the grid's middle), since a fold needs two training patients "
            "of each class: rare (1 positive / 39 negative training patients).") in result.section.notes
