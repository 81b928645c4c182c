import numpy as np

from harness.probes import linear
from harness.probes.linear import choose_C, grid_edge, linear_probe


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
