"""Rank intervals, probability of being best and win probabilities (harness.ranks) against a brute-force oracle
written with plain Python loops and sorting, on resamples with ties and undefined values."""
import math

import numpy as np
import pytest

from harness.ranks import competition_ranks, format_rank, rank_summary, win_probabilities


def oracle_rank(row: list[float], i: int, higher_is_better: bool) -> int:
    better = [v for v in row if (v > row[i] if higher_is_better else v < row[i])]
    return 1 + len(better)


def oracle_quantile(sorted_values: list[int], q: float, lower: bool) -> int:
    # numpy's "lower"/"higher" methods: the order statistic just below / above the (n-1)q position.
    pos = (len(sorted_values) - 1) * q
    return sorted_values[math.floor(pos + 1e-12) if lower else math.ceil(pos - 1e-12)]


def oracle(resampled: dict, points: dict, higher_is_better: bool):
    names = list(resampled)
    rows = [[float(resampled[m][b]) for m in names] for b in range(len(resampled[names[0]]))]
    rows = [r for r in rows if all(math.isfinite(v) for v in r)]
    ranks = {m: [] for m in names}
    best = {m: 0.0 for m in names}
    for r in rows:
        rk = [oracle_rank(r, i, higher_is_better) for i in range(len(names))]
        firsts = [names[i] for i in range(len(names)) if rk[i] == 1]
        for i, m in enumerate(names):
            ranks[m].append(rk[i])
        for m in firsts:
            best[m] += 1.0 / len(firsts)
    point_row = [points[m] for m in names]
    out = {}
    for i, m in enumerate(names):
        s = sorted(ranks[m])
        out[m] = {"rank": oracle_rank(point_row, i, higher_is_better), "lo": oracle_quantile(s, 0.025, True),
                  "hi": oracle_quantile(s, 0.975, False), "p_best": best[m] / len(rows), "n_valid": len(rows)}
    wins = {}
    for a in names:
        wins[a] = {}
        for b in names:
            if a == b:
                continue
            pairs = [(x, y) for x, y in zip(resampled[a], resampled[b]) if math.isfinite(x) and math.isfinite(y)]
            score = sum(1.0 if (x > y if higher_is_better else x < y) else 0.5 if x == y else 0.0 for x, y in pairs)
            wins[a][b] = score / len(pairs)
    return out, wins


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_ranks_equal_a_brute_force_oracle(higher_is_better):
    rng = np.random.default_rng(3)
    n = 400
    resampled = {
        "a": rng.normal(0.80, 0.02, n).round(2),      # rounding makes ties common
        "b": rng.normal(0.79, 0.02, n).round(2),
        "c": rng.normal(0.70, 0.02, n).round(2),
        "d": rng.normal(0.795, 0.03, n).round(2),
    }
    resampled["b"][[5, 17, 300]] = np.nan               # undefined in a few resamples
    points = {"a": 0.80, "b": 0.79, "c": 0.70, "d": 0.79}  # b and d tie on the point estimates
    want, want_wins = oracle(resampled, points, higher_is_better)
    got = rank_summary(resampled, points, higher_is_better)
    for m in resampled:
        assert got[m]["rank"] == want[m]["rank"]
        assert (got[m]["lo"], got[m]["hi"]) == (want[m]["lo"], want[m]["hi"])
        assert got[m]["p_best"] == pytest.approx(want[m]["p_best"], abs=1e-12)
        assert got[m]["n_valid"] == want[m]["n_valid"] == n - 3
    assert sum(got[m]["p_best"] for m in got) == pytest.approx(1.0)
    got_wins = win_probabilities(resampled, higher_is_better)
    for a in resampled:
        for b in resampled:
            if a != b:
                assert got_wins[a][b] == pytest.approx(want_wins[a][b], abs=1e-12)
                assert got_wins[a][b] + got_wins[b][a] == pytest.approx(1.0)


def test_ties_share_the_best_rank_and_the_win():
    ranks = competition_ranks(np.array([[0.9, 0.9, 0.5], [0.1, 0.2, 0.3]]))
    assert ranks.tolist() == [[1, 1, 3], [3, 2, 1]]
    same = {"x": np.full(50, 0.7), "y": np.full(50, 0.7)}
    summary = rank_summary(same, {"x": 0.7, "y": 0.7})
    assert summary["x"] == summary["y"] == {"rank": 1, "lo": 1, "hi": 1, "p_best": 0.5, "n_valid": 50}
    assert win_probabilities(same)["x"]["y"] == 0.5


def test_a_clearly_best_model_has_a_tight_interval_and_a_clear_order():
    rng = np.random.default_rng(0)
    resampled = {"strong": 0.9 + 0.01 * rng.standard_normal(200), "weak": 0.6 + 0.01 * rng.standard_normal(200)}
    summary = rank_summary(resampled, {"strong": 0.9, "weak": 0.6})
    assert summary["strong"] == {"rank": 1, "lo": 1, "hi": 1, "p_best": 1.0, "n_valid": 200}
    assert format_rank(summary["weak"]) == "2 [2, 2]"
    assert win_probabilities(resampled)["weak"]["strong"] == 0.0


def test_undefined_values_are_reported_not_guessed():
    resampled = {"a": np.array([np.nan, np.nan]), "b": np.array([0.5, 0.6])}
    summary = rank_summary(resampled, {"a": None, "b": 0.55})
    assert summary["a"] == {"rank": None, "lo": None, "hi": None, "p_best": None, "n_valid": 0}
    assert summary["b"]["rank"] == 1 and format_rank(summary["a"]) == "n/a"
    assert format_rank(summary["b"]) == "1"
    assert win_probabilities(resampled)["a"]["b"] is None


def test_models_must_share_their_resamples():
    with pytest.raises(ValueError, match="same bootstrap weights"):
        rank_summary({"a": np.zeros(3), "b": np.zeros(4)}, {"a": 0.0, "b": 0.0})
