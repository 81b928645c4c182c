"""The k-NN probe: DINO's weighted vote equals a brute-force scikit-learn neighbour search, k beyond the training
split is clamped (and said), ties go to the earlier training image, and the protocol scores, pairs and publishes
like the linear probe."""
import io

import numpy as np
import polars as pl
import pytest
from sklearn.neighbors import KNeighborsClassifier

from harness import stats
from harness.probes import PROTOCOLS
from harness.probes.knn import TITLE, fit_and_score, knn_scores
from harness.protocols import ProbeOptions
from tests.harness.probes.synthetic import synthetic_run


def _sklearn_votes(x_train, y_train, x_test, k, temperature):
    """The same vote from scikit-learn's brute-force cosine neighbours: weights exp(cos / T), cos = 1 - distance."""
    nn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x_train, y_train[:, 0])
    dist, idx = nn.kneighbors(x_test)
    w = np.exp((1.0 - dist) / temperature)
    return np.einsum("nk,nkl->nl", w, y_train[idx].astype(float)) / w.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (7, 0.5)])
def test_votes_equal_a_brute_force_sklearn_search(k, temperature):
    rng = np.random.default_rng(k)
    x_train, x_test = rng.normal(size=(60, 8)) + 0.3, rng.normal(size=(17, 8)) + 0.3
    y_train = (rng.random((60, 3)) < [0.2, 0.5, 0.8]).astype(int)
    ours = knn_scores(x_train, y_train, x_test, k, temperature)
    np.testing.assert_allclose(ours, _sklearn_votes(x_train, y_train, x_test, k, temperature), rtol=1e-10, atol=1e-12)
    assert ((ours >= 0) & (ours <= 1)).all()


def test_features_are_compared_by_angle_not_length():
    x_train = np.array([[1.0, 0.0], [0.0, 1.0]])
    y_train = np.array([[1], [0]])
    np.testing.assert_array_equal(knn_scores(x_train, y_train, np.array([[100.0, 1.0]]), 1, 0.07), [[1.0]])
    np.testing.assert_array_equal(knn_scores(x_train, y_train, np.array([[0.01, 2.0]]), 1, 0.07), [[0.0]])


def test_ties_go_to_the_earlier_training_image():
    """Three training images at the same angle to the query, k = 2: the first two (not the positive third) vote."""
    x_train = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    y_train = np.array([[0], [0], [1], [1]])
    query = np.array([[1.0, 0.0]])
    assert knn_scores(x_train, y_train, query, 2, 0.07)[0, 0] == 0.0
    # Move the positive first: now it is among the two that vote, with the same weight as the other.
    order = [2, 0, 1, 3]
    assert knn_scores(x_train[order], y_train[order], query, 2, 0.07)[0, 0] == 0.5


def test_k_beyond_the_training_split_is_an_error_for_the_function():
    with pytest.raises(ValueError, match="k = 5 neighbours, but the training split has 4 images"):
        knn_scores(np.eye(4), np.ones((4, 1)), np.eye(4)[:1], 5, 0.07)
    with pytest.raises(ValueError, match="temperature must be positive"):
        knn_scores(np.eye(4), np.ones((4, 1)), np.eye(4)[:1], 2, 0.0)


def _run(k=20, temperature=0.07, n_patients=60, seed=0):
    """Two images per patient; model "a" sees the label in feature 0, model "b" is noise; "rare" is not evaluable."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_patients), 2)
    n = len(pid)
    label = (rng.random(n) < 0.4).astype(np.int8)
    rare = np.zeros(n, np.int8)
    rare[:2] = 1
    x = rng.normal(size=(n, 6))
    x[:, 0] += 3.0 * label
    features = {"a": x, "b": rng.normal(size=(n, 6))}
    return synthetic_run(pid, ["finding", "rare"], np.stack([label, rare], 1), features, "b",
                         ProbeOptions(knn_k=k, knn_temperature=temperature), 200, seed)


def test_protocol_scores_pairs_and_publishes_like_the_linear_probe():
    tr, encs = _run(k=7, temperature=0.1)
    result = fit_and_score(tr, encs)
    section = result.to_section()
    assert section.title == TITLE
    assert section.columns == ["rank (macro AUROC)", "macro AUROC", "macro AUPRC", "finding AUPRC"]
    a, b = result.to_record("a"), result.to_record("b")
    assert (a["k"], a["k_requested"], a["temperature"]) == (7, 7, 0.1)
    assert a["metrics"]["auroc"]["macro"]["point"] > 0.9 > 0.7 > b["metrics"]["auroc"]["macro"]["point"]
    assert section.rows["a"]["macro AUROC"].significant and b["paired_to_reference"] is None
    assert any("k = 7, temperature 0.1" in n for n in section.notes)
    # Not evaluable (its two positive images are one test patient's), reported with its counts.
    assert any("rare (only one class in the training split: train 0+/80-, test 2+/38-)" in n for n in section.notes)
    # The published scores are the function's, per test image, with pseudonyms and no patient ids.
    t = tr.task.table
    train, test = tr.split == "train", tr.split == "test"
    x = tr.features["a"].global_
    expected = knn_scores(x[train], t.labels[train][:, :1], x[test], 7, 0.1)[:, 0]
    df = pl.read_parquet(io.BytesIO(result.files["results/synthetic/a.knn.parquet"]))
    np.testing.assert_array_equal(df["score"].to_numpy(), expected)
    assert set(df["label"]) == {"finding"}
    assert set(df["patient_key"]) == set(tr.patient_keys(np.flatnonzero(test)))
    assert not any(v.startswith("P") for v in df["patient_key"])
    # The macro is the bootstrap statistics' on exactly these scores and the shared resamples.
    summary, _ = stats.classification_summary(expected[:, None], t.labels[test][:, :1], ["finding"], tr.weights)
    assert a["metrics"]["auroc"]["macro"] == summary["auroc"]["macro"]


def test_protocol_clamps_k_to_the_training_split_and_says_so():
    tr, encs = _run(k=500, n_patients=30)
    n_train = int((tr.split == "train").sum())
    result = fit_and_score(tr, encs)
    section = result.to_section()
    assert result.to_record("a")["k"] == n_train and result.to_record("a")["k_requested"] == 500
    assert any(f"--knn-k 500 is more than the {n_train} training images: clamped" in n for n in section.notes)


def test_knn_is_a_default_protocol_right_after_the_linear_probe():
    names = PROTOCOLS.ordered(PROTOCOLS)
    assert PROTOCOLS.get("knn").default
    assert names.index("knn") == names.index("linear") + 1


def test_ranks_equal_a_brute_force_recount_from_the_published_scores():
    """Rank cells, results-JSON ranks and tidy rank rows, recomputed from the per-image scores the run publishes: each
    resample's macro AUROC per model, then ranks, P(best) and P(a beats b) counted one resample at a time."""
    tr, encs = _run(k=7, temperature=0.1, n_patients=24, seed=3)
    result = fit_and_score(tr, encs)
    t = tr.task.table
    test = tr.split == "test"
    resampled = {}
    for m in ("a", "b"):
        df = pl.read_parquet(io.BytesIO(result.files[f"results/synthetic/{m}.knn.parquet"]))
        _, boot = stats.classification_summary(df["score"].to_numpy()[:, None], t.labels[test][:, :1], ["finding"],
                                               tr.weights)
        resampled[m] = boot["auroc"]
    wins_a = ties = 0
    best = {"a": 0.0, "b": 0.0}
    ranks_a = []
    for va, vb in zip(resampled["a"], resampled["b"]):
        if va > vb:
            wins_a, best["a"] = wins_a + 1, best["a"] + 1
            ranks_a.append(1)
        elif va < vb:
            best["b"] += 1
            ranks_a.append(2)
        else:
            ties, best["a"], best["b"] = ties + 1, best["a"] + 0.5, best["b"] + 0.5
            ranks_a.append(1)
    n = len(resampled["a"])
    record = result.to_record("a")["ranks"]["auroc"]
    assert record["p_best"] == pytest.approx(best["a"] / n)
    assert record["win_probability"]["b"] == pytest.approx((wins_a + 0.5 * ties) / n)
    assert (record["lo"], record["hi"]) == (int(np.percentile(ranks_a, 2.5, method="lower")),
                                            int(np.percentile(ranks_a, 97.5, method="higher")))
    cell = result.to_section().rows["a"]["rank (macro AUROC)"]
    assert (cell.point, cell.lo, cell.hi) == (record["rank"], record["lo"], record["hi"])
    tidy = {(r.model, r.metric, r.label): r for r in result.tidy}
    assert tidy[("a", "p_best_auroc", "macro")].point == pytest.approx(best["a"] / n)
    assert tidy[("b", "win_auroc", "macro vs a")].point == pytest.approx(1 - (wins_a + 0.5 * ties) / n)
    assert tidy[("a", "rank_auroc", "macro")].point == record["rank"]
