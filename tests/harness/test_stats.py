"""harness/stats.py: metrics against scikit-learn, the patient bootstrap, paired deltas and Holm."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, r2_score, roc_auc_score
from statsmodels.stats.multitest import multipletests

from harness.stats import (
    align,
    binary_metrics,
    bootstrap_weights,
    class_requirements,
    classification_summary,
    compare_to_reference,
    evaluable_labels,
    holm,
    macro_mean,
    paired_delta,
    patients_per_class,
    summarise,
    weighted_mean,
    weighted_pearson,
    weighted_r2,
)


def _data(seed: int, n: int = 300, n_labels: int = 4, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, n_labels)) < [0.05, 0.2, 0.5, 0.8][:n_labels]).astype(np.int8)
    scores = labels * 0.7 + rng.normal(size=(n, n_labels))
    if decimals is not None:          # many tied scores, mixed positive/negative within a tie
        scores = np.round(scores, decimals)
    patients = np.array([f"p{i // 3}" for i in range(n)])
    return scores, labels, patients


def _sklearn(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    if labels.min() == labels.max():
        auroc = np.nan
    else:
        auroc = roc_auc_score(labels, scores)
    ap = average_precision_score(labels, scores) if labels.any() else np.nan
    return auroc, ap


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_point_metrics_equal_sklearn(decimals):
    scores, labels, _ = _data(1, decimals=decimals)
    if decimals is not None:
        assert len(np.unique(scores[:, 2])) < len(scores) / 5   # the tie case really has ties
    point = binary_metrics(scores, labels)
    for j in range(labels.shape[1]):
        auroc, ap = _sklearn(labels[:, j], scores[:, j])
        assert point["auroc"][0, j] == pytest.approx(auroc, abs=1e-12)
        assert point["auprc"][0, j] == pytest.approx(ap, abs=1e-12)


def test_every_resample_equals_sklearn_on_the_resampled_arrays():
    scores, labels, patients = _data(2, n=120, decimals=1)
    labels[:, 0] = 0
    labels[[5, 6], 0] = 1     # one rare label: one patient holds both positives, so some resamples have none
    weights = bootstrap_weights(patients, n_resamples=40, seed=3)
    boot = binary_metrics(scores, labels, weights)
    assert np.isnan(boot["auroc"][:, 0]).any()
    for b in range(len(weights)):
        idx = np.repeat(np.arange(len(scores)), weights[b])
        for j in range(labels.shape[1]):
            auroc, ap = _sklearn(labels[idx, j], scores[idx, j])
            np.testing.assert_allclose(boot["auroc"][b, j], auroc, atol=1e-12)
            np.testing.assert_allclose(boot["auprc"][b, j], ap, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_weighted_metrics_equal_sklearn_property(data):
    n = data.draw(st.integers(2, 25))
    scores = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=float)
    labels = np.array(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    weights = np.array([data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)) for _ in range(3)])
    boot = binary_metrics(scores, labels, weights)
    for b in range(3):
        idx = np.repeat(np.arange(n), weights[b])
        auroc, ap = _sklearn(labels[idx], scores[idx]) if idx.size else (np.nan, np.nan)
        np.testing.assert_allclose(boot["auroc"][b, 0], auroc, atol=1e-12)
        np.testing.assert_allclose(boot["auprc"][b, 0], ap, atol=1e-12)


def test_weights_resample_patients_and_ignore_image_order():
    _, _, patients = _data(0, n=90)
    weights = bootstrap_weights(patients, n_resamples=50, seed=7)
    assert weights.shape == (50, 90) and weights.dtype == np.int32
    # Images of one patient share a weight, and each resample draws exactly as many patients as there are.
    first_image = {p: i for i, p in reversed(list(enumerate(patients)))}
    for i, p in enumerate(patients):
        np.testing.assert_array_equal(weights[:, i], weights[:, first_image[p]])
    per_patient = weights[:, sorted(first_image.values())]
    np.testing.assert_array_equal(per_patient.sum(axis=1), len(first_image))
    # Another image order gives the same draw for every image (that is what lets models be paired).
    perm = np.random.default_rng(0).permutation(len(patients))
    np.testing.assert_array_equal(bootstrap_weights(patients[perm], 50, seed=7), weights[:, perm])
    assert not np.array_equal(bootstrap_weights(patients, 50, seed=8), weights)


def test_intervals_are_bit_identical_for_one_seed_and_differ_for_another():
    scores, labels, patients = _data(4)
    names = ["a", "b", "c", "d"]

    def run(seed):
        return classification_summary(scores, labels, names, bootstrap_weights(patients, 200, seed))

    (first, first_boot), (again, again_boot), (other, _) = run(0), run(0), run(1)
    np.testing.assert_array_equal(first_boot["auprc"], again_boot["auprc"])
    assert first["auroc"]["per_label"] == again["auroc"]["per_label"]
    assert first["auprc"]["macro"] == again["auprc"]["macro"]
    assert first["auprc"]["macro"]["lo"] != other["auprc"]["macro"]["lo"]
    assert first["auprc"]["macro"]["point"] == other["auprc"]["macro"]["point"]


def test_patient_clustering_widens_the_interval():
    # 60 patients x 8 near-identical images: the information is in 60 patients, not 480 images.
    rng = np.random.default_rng(5)
    patient_label = (np.arange(60) % 3 == 0).astype(np.int8)
    patient_score = patient_label * 0.8 + rng.normal(size=60)
    patients = np.repeat([f"p{i}" for i in range(60)], 8)
    labels = np.repeat(patient_label, 8)
    scores = np.repeat(patient_score, 8) + 0.01 * rng.normal(size=480)
    point = binary_metrics(scores, labels)["auroc"][0, 0]

    def width(groups):
        s = summarise(point, binary_metrics(scores, labels, bootstrap_weights(groups, 400, 0))["auroc"][:, 0])
        return s["hi"] - s["lo"]

    clustered, image_level = width(patients), width(np.arange(480).astype(str))
    assert clustered > 2.0 * image_level


def test_paired_delta_detects_a_better_model_and_not_equal_ones():
    rng = np.random.default_rng(6)
    n = 400
    labels = (rng.random(n) < 0.3).astype(np.int8)
    patients = np.array([f"p{i // 2}" for i in range(n)])
    weights = bootstrap_weights(patients, 500, seed=0)
    strong = labels * 2.0 + rng.normal(size=n)
    weak = labels * 0.3 + rng.normal(size=n)
    noise_a, noise_b = rng.normal(size=n), rng.normal(size=n)

    def auroc(scores):
        return binary_metrics(scores, labels)["auroc"][0, 0], binary_metrics(scores, labels, weights)["auroc"][:, 0]

    (ps, bs), (pw, bw), (pa, ba), (pb, bb) = auroc(strong), auroc(weak), auroc(noise_a), auroc(noise_b)
    better = paired_delta(bs, bw, ps, pw)
    assert better["delta"] == pytest.approx(ps - pw) and better["lo"] > 0
    assert better["p"] == pytest.approx(2 / 501)        # no resample favours the weak model: the add-one floor
    same = paired_delta(bs, bs, ps, ps)
    assert same == {"delta": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0, "n_valid": 500}
    chance = paired_delta(ba, bb, pa, pb)
    assert chance["lo"] < 0 < chance["hi"] and chance["p"] > 0.05


def test_paired_p_value_by_hand():
    ref = np.zeros(10)
    model = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, -1], dtype=float)
    assert paired_delta(model, ref, 1.0, 0.0)["p"] == pytest.approx(2 * (1 + 1) / 11)
    model = np.array([-1, 0, 1, 2, 3, np.nan, 1, 1, 1, 1])   # ties count in both tails; NaN is left out
    result = paired_delta(model, ref, 1.0, 0.0)
    assert result["n_valid"] == 9 and result["p"] == pytest.approx(min(1.0, 2 * (1 + 2) / 10))


def test_holm_by_hand_and_against_statsmodels():
    # ascending 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06 for the last
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2, None, 0.9]) == [pytest.approx(0.4), None, pytest.approx(0.9)]
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    p = np.random.default_rng(0).random(12) ** 3
    np.testing.assert_allclose(holm(list(p)), multipletests(p, method="holm")[1], rtol=0, atol=1e-15)


def test_compare_to_reference_defaults_to_first_model_and_adjusts():
    rng = np.random.default_rng(8)
    shared = rng.normal(0.7, 0.03, size=300)          # the resample-to-resample variation all models share
    resampled = {m: shared + shift + rng.normal(0, 0.005, size=300)
                 for m, shift in (("ref", 0.0), ("up", 0.04), ("same", 0.0))}
    points = {m: float(np.median(v)) for m, v in resampled.items()}
    out = compare_to_reference(resampled, points)
    assert set(out) == {"up", "same"}
    assert out["up"]["p"] < 0.01 < out["same"]["p"]
    raw = [out["up"]["p"], out["same"]["p"]]
    assert [out["up"]["p_holm"], out["same"]["p_holm"]] == holm(raw)
    assert set(compare_to_reference(resampled, points, reference="up")) == {"ref", "same"}
    with pytest.raises(ValueError, match="--reference 'nope'"):
        compare_to_reference(resampled, points, reference="nope")


def test_undefined_resamples_are_counted_not_propagated():
    scores, labels, patients = _data(9, n=150, n_labels=2)
    labels[:, 0] = 0
    labels[10, 0] = 1                                  # a single positive image
    weights = bootstrap_weights(patients, 300, seed=0)
    summary, macro_resampled = classification_summary(scores, labels, ["rare", "common"], weights)
    rare = summary["auroc"]["per_label"]["rare"]
    assert rare["n_valid"] == int((weights[:, 10] > 0).sum()) < 300
    assert rare["n_resamples"] == 300 and None not in (rare["point"], rare["lo"], rare["hi"])
    # the macro keeps its label set: a resample without the rare label is not a mean of the common one alone
    assert summary["auroc"]["macro"]["n_valid"] == rare["n_valid"]
    assert np.isnan(macro_resampled["auroc"][weights[:, 10] == 0]).all()


def test_conditioned_resamples_keep_every_macro_label_defined():
    """A label with 2 positive images from 1 patient: unconditioned, about a third of the resamples lack it and
    the macro interval mixes label sets; conditioned on a positive and a negative patient of every label, each
    resample averages the same labels as the point estimate."""
    scores, labels, patients = _data(9, n=150, n_labels=2)
    labels[:, 0] = 0
    labels[[10, 11], 0] = 1                            # both images of patient p3
    required = class_requirements(labels, [True, True])
    weights = bootstrap_weights(patients, 300, seed=0, required=required)
    assert weights.shape == (300, 150) and (weights[:, 10] > 0).all()
    summary, macro_resampled = classification_summary(scores, labels, ["rare", "common"], weights)
    assert summary["auroc"]["macro"]["n_valid"] == summary["auroc"]["per_label"]["rare"]["n_valid"] == 300
    assert np.isfinite(macro_resampled["auprc"]).all()
    # The conditioned draw is the unconditioned one with the failing rows skipped, in order (what docs/statistics.md's
    # reproduction script redraws).
    plain = bootstrap_weights(patients, 300, seed=0)
    kept = plain[plain[:, 10] > 0]
    np.testing.assert_array_equal(weights[:len(kept)], kept)
    with pytest.raises(ValueError, match="no resample can satisfy"):
        bootstrap_weights(patients, 10, required=np.zeros((150, 1), dtype=bool))


def test_evaluable_labels_count_patients_not_images():
    labels = np.array([[1, 1], [1, 0], [0, 1], [0, 0], [0, 1], [0, 0]])
    patients = ["a", "a", "b", "c", "d", "e"]
    pos, neg = patients_per_class(labels, patients)
    np.testing.assert_array_equal(pos, [1, 3])   # label 0: two positive images, one patient
    np.testing.assert_array_equal(neg, [4, 3])
    np.testing.assert_array_equal(evaluable_labels(labels, patients, min_patients=2), [False, True])
    np.testing.assert_array_equal(evaluable_labels(labels, patients, min_patients=4), [False, False])
    np.testing.assert_array_equal(evaluable_labels(labels), [True, True])


def test_macro_mean_keeps_its_label_set_and_skips_non_evaluable_labels():
    per_label = np.array([[0.5, np.nan, 0.9], [np.nan, np.nan, 0.1], [0.2, 0.4, 0.3]])
    evaluable = evaluable_labels(np.array([[0, 1, 1], [1, 0, 1]]))
    np.testing.assert_array_equal(evaluable, [True, True, False])
    np.testing.assert_allclose(macro_mean(per_label, evaluable), [np.nan, np.nan, (0.2 + 0.4) / 2], rtol=1e-15)
    assert summarise(np.nan, [np.nan, np.nan]) == {"point": None, "lo": None, "hi": None, "n_valid": 0,
                                                   "n_resamples": 2}


def test_per_image_and_regression_metrics_equal_the_resampled_arrays():
    rng = np.random.default_rng(10)
    n = 80
    age = 50 + 15 * rng.normal(size=n)
    predicted = age + 8 * rng.normal(size=n)
    dice = rng.random(n)
    weights = bootstrap_weights([f"p{i // 4}" for i in range(n)], 30, seed=2)
    mean_b, r_b, r2_b = weighted_mean(dice, weights), weighted_pearson(age, predicted, weights), \
        weighted_r2(age, predicted, weights)
    for b in range(30):
        idx = np.repeat(np.arange(n), weights[b])
        assert mean_b[b] == pytest.approx(dice[idx].mean(), abs=1e-12)
        assert r_b[b] == pytest.approx(np.corrcoef(age[idx], predicted[idx])[0, 1], abs=1e-10)
        assert r2_b[b] == pytest.approx(r2_score(age[idx], predicted[idx]), abs=1e-10)
    assert weighted_r2(age, predicted)[0] == pytest.approx(r2_score(age, predicted), abs=1e-12)
    assert np.isnan(weighted_pearson(np.ones(n), predicted)[0])


def test_align_puts_images_in_reference_order_and_refuses_other_sets():
    idx = align(["c", "a", "b"], ["a", "b", "c"])
    np.testing.assert_array_equal(np.array(["c", "a", "b"])[idx], ["a", "b", "c"])
    with pytest.raises(ValueError, match="1 reference images missing, 1 images not in the reference"):
        align(["a", "b", "x"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="0 reference images missing, 1 images not"):
        align(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="duplicates"):
        align(["a", "b"], ["a", "a"])


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        binary_metrics(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="must match"):
        binary_metrics(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="expected \\(n_resamples, 3\\)"):
        binary_metrics(np.zeros(3), np.array([0, 1, 1]), np.ones((5, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        binary_metrics(np.zeros(3), np.array([0, 1, 1]), -np.ones((5, 3)))
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_weights(["a"], n_resamples=0)
    with pytest.raises(ValueError, match="pair models on the same bootstrap weights"):
        paired_delta(np.zeros(5), np.zeros(4), 0.0, 0.0)
