"""Ranks that carry their uncertainty: rank intervals, the probability of being best, and pairwise win
probabilities, all read off the patient resamples every model of a run shares (harness.stats.bootstrap_weights).

A leaderboard sorted by point estimates says "A is first"; with a few hundred test patients the next two models are
often inside A's interval. Ranking the models again in each resample turns that into numbers a reader can act on:
A's rank is 1 [1, 3] (95% of the resamples put it between first and third), it is best in 62% of them, and it beats B
in 81%. Nothing here refits anything: the inputs are the [B] resampled values of one metric per model that the
protocols already compute for their paired deltas.

Conventions, so that an independent recomputation gets the same numbers:
- Rank 1 is the best; `higher_is_better=False` ranks the lowest value first (e.g. an error).
- Ties share the best of their ranks (competition ranking: 1, 1, 3).
- Only resamples in which every model's value is finite are used (a model whose metric is undefined in a resample
  cannot be ranked in it); their count is reported as `n_valid`.
- The rank interval is the (1 - level)/2 and (1 + level)/2 quantiles of the resampled ranks, taken as the
  nearest lower and higher observed ranks, so it is a pair of integers.
- A tie for first shares the win: each of k tied models gets 1/k of that resample, so the probabilities of being best
  sum to 1 over the models. A tie in a pair counts 1/2 for each side, so P(A > B) + P(B > A) = 1.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def _stacked(resampled: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    names = list(resampled)
    if not names:
        raise ValueError("no models to rank")
    values = [np.asarray(resampled[m], dtype=np.float64).ravel() for m in names]
    sizes = {v.size for v in values}
    if len(sizes) != 1:
        raise ValueError(f"models have {sorted(sizes)} resamples: rank them on the same bootstrap weights")
    return names, np.stack(values, axis=1)                           # [B, M]


def competition_ranks(values: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Ranks (1 = best, ties share the best rank) of each row's entries. `values` [B, M] -> int [B, M]."""
    values = np.asarray(values, dtype=np.float64)
    keyed = -values if higher_is_better else values
    # A model's rank is one plus the number of models strictly better than it in the same row.
    return 1 + (keyed[:, None, :] < keyed[:, :, None]).sum(axis=2)


def rank_summary(resampled: Mapping[str, np.ndarray], points: Mapping[str, float], higher_is_better: bool = True,
                 level: float = 0.95) -> dict[str, dict]:
    """Per model: {"rank", "lo", "hi", "p_best", "n_valid"}. `rank` is the point estimates' rank (None when the
    model's point is undefined); lo/hi the rank interval and p_best the probability of being best over the valid
    resamples (None when no resample is valid)."""
    names, values = _stacked(resampled)
    point = np.array([np.nan if points.get(m) is None else float(points[m]) for m in names])
    point_ranks = [None] * len(names)
    defined = np.flatnonzero(np.isfinite(point))
    if defined.size:
        ranks = competition_ranks(point[None, defined], higher_is_better)[0]
        for i, r in zip(defined, ranks):
            point_ranks[i] = int(r)
    valid = np.isfinite(values).all(axis=1)
    n_valid = int(valid.sum())
    out = {}
    if not n_valid:
        return {m: {"rank": point_ranks[i], "lo": None, "hi": None, "p_best": None, "n_valid": 0}
                for i, m in enumerate(names)}
    ranks = competition_ranks(values[valid], higher_is_better)      # [n_valid, M]
    first = ranks == 1
    share_of_win = first / first.sum(axis=1, keepdims=True)
    tail = round(100.0 * (1.0 - level) / 2.0, 9)
    for i, m in enumerate(names):
        lo = np.percentile(ranks[:, i], tail, method="lower")
        hi = np.percentile(ranks[:, i], 100.0 - tail, method="higher")
        out[m] = {"rank": point_ranks[i], "lo": int(lo), "hi": int(hi),
                  "p_best": float(share_of_win[:, i].mean()), "n_valid": n_valid}
    return out


def win_probabilities(resampled: Mapping[str, np.ndarray], higher_is_better: bool = True) -> dict[str, dict]:
    """P(row model beats column model) over the resamples where both are finite: {a: {b: p or None}}, with the
    diagonal left out. Ties count one half."""
    names, values = _stacked(resampled)
    keyed = values if higher_is_better else -values
    out: dict[str, dict] = {a: {} for a in names}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            both = np.isfinite(keyed[:, i]) & np.isfinite(keyed[:, j])
            if not both.any():
                out[a][b] = None
                continue
            x, y = keyed[both, i], keyed[both, j]
            out[a][b] = float(((x > y).sum() + 0.5 * (x == y).sum()) / both.sum())
    return out


def rank_record(summary: Mapping[str, dict], wins: Mapping[str, dict] | None, model: str) -> dict:
    """One model's entry of a ranked number for its results JSON: rank, interval, P(best), n_valid and, for a
    headline metric, its probability of beating each other model."""
    return {**summary[model], **({"win_probability": wins[model]} if wins is not None else {})}


def format_rank(summary: dict, bold: bool = False) -> str:
    """The Markdown cell: ``2 [1, 4]`` (the rank in bold when `bold`); ``n/a`` when the rank is undefined."""
    if summary.get("rank") is None:
        return "n/a"
    rank = f"**{summary['rank']}**" if bold else str(summary["rank"])
    if summary.get("lo") is None:
        return rank
    return f"{rank} [{summary['lo']}, {summary['hi']}]"


def ranked_rows(task: str, protocol: str, metric: str, label: str, summary: Mapping[str, dict],
                wins: Mapping[str, dict] | None = None) -> list:
    """The tidy rows of one compared leaderboard number's `rank_summary` and `win_probabilities`, per model in the
    summary's order: ``rank_<metric>`` (point = the point estimates' rank, lo/hi its interval, n_valid),
    ``p_best_<metric>``, and, when `wins` is given (headline metrics only), ``win_<metric>`` for every other model,
    labelled ``<label> vs <other>`` (``vs <other>`` for an unlabelled number), point = P(this model beats the other) over the resamples where both are
    finite."""
    from harness.tidy import TidyRow  # the table's row type; ranks stay importable without polars

    rows = []
    for model, s in summary.items():
        if s["rank"] is None:
            continue
        n = s["n_valid"] or None
        rows.append(TidyRow(task, model, protocol, f"rank_{metric}", label, float(s["rank"]),
                            None if s["lo"] is None else float(s["lo"]), None if s["hi"] is None else float(s["hi"]),
                            None, None, n))
        if s["p_best"] is not None:
            rows.append(TidyRow(task, model, protocol, f"p_best_{metric}", label, s["p_best"], None, None, None,
                                None, n))
        rows += [TidyRow(task, model, protocol, f"win_{metric}", f"{label} vs {other}".lstrip(), p, None, None,
                         None, None, None) for other, p in (wins or {}).get(model, {}).items() if p is not None]
    return rows
