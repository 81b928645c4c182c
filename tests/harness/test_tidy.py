"""The tidy results table a run writes beside its leaderboard: exactly its columns, one row per number the
leaderboard shows with an interval (and per-label AUROC), every number the one in the per-model results JSON, and
a one-protocol run merged into it as into the leaderboard."""
import json
import shutil

import polars as pl
import pytest

from baselines.registry import DEFAULT_GLOBAL_POOL
from harness import tidy
from harness.run import main

# Every test reads one whole run of the command (the module fixture `board`).
pytestmark = pytest.mark.slow

TASK = "demo:n_patients=30,size=64"
NAME = "demo-n_patients_30-size_64"


def _run(out, cache, suffix=""):
    return main(["--models", "pixels,random-vit", "--tasks", TASK + suffix, "--out", str(out), "--cache-dir",
                 str(cache), "--bootstrap", "50", "--workers", "0", "--min-positive-patients", "2"])


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    root = tmp_path_factory.mktemp("tidy")
    assert _run(root / "lb", root / "cache") == 0
    return root


def _record(out, model):
    return json.loads((out / "results" / NAME / f"{model}.json").read_text())["protocols"]


def _ranks_entry(rec: dict, protocol: str, metric: str, label: str) -> dict:
    """Where each protocol's results JSON keeps the ranks of one ranked number."""
    if protocol in ("linear", "knn"):
        return rec["ranks"][metric]
    if protocol == "label-efficiency":
        return next(r for r in rec["curve"] if f"macro@{r['fraction']:g}" == label)["ranks"]
    return rec["ranks"][metric][label] if label else rec["ranks"][metric]


def _cost(out, model, row: tidy.TidyRow) -> float | None:
    """The number the per-model JSON's cost holds for one cost row."""
    c = json.loads((out / "results" / NAME / f"{model}.json").read_text())["cost"]
    if row.metric == tidy.RATE_METRIC:
        rate = c["throughput"]
        assert row.label == f"{rate['device']}: {rate['processor']}, {rate['threads']} threads"
        return rate["images_per_s"]
    return c[row.metric]


def _expected(protocols: dict, row: tidy.TidyRow) -> tuple[dict, dict | None]:
    """The summary and paired comparison the per-model JSON holds for one tidy row."""
    rec = protocols[row.protocol]
    kind = next((k for k in ("rank", "p_best", "win") if row.metric.startswith(f"{k}_")), None)
    if kind:
        metric = row.metric.removeprefix(f"{kind}_")
        label, other = (row.label.rsplit("vs ", 1) if kind == "win" else (row.label, None))
        r = _ranks_entry(rec, row.protocol, metric, label.strip())
        if kind == "rank":
            return {"point": r["rank"], "lo": r["lo"], "hi": r["hi"], "n_valid": r["n_valid"]}, None
        if kind == "p_best":
            return {"point": r["p_best"], "lo": None, "hi": None, "n_valid": r["n_valid"]}, None
        return {"point": r["win_probability"][other], "lo": None, "hi": None, "n_valid": None}, None
    if row.protocol in ("linear", "knn"):
        m = rec["metrics"][row.metric]
        summary = m["macro"] if row.label == "macro" else m["per_label"][row.label]
        return summary, (rec["paired_to_reference"] or {}).get(row.metric) if row.label == "macro" else None
    if row.protocol == "seg":
        metric, _, head = row.metric.rpartition("_")
        s = rec["heads"][head][row.label]
        return s[metric], (s["paired_to_reference"] or {}).get(metric)
    if row.protocol == "demographics":
        sub = rec["subgroups"]
        if row.metric == "subgroup_auroc":
            view, group = ("sex", {"men": "M", "women": "F"}[row.label]) if row.label in ("men", "women") else \
                ("age", row.label.removeprefix("age "))
            return sub[view]["groups"][group]["macro_auroc"], None
        if row.metric == "subgroup_gap":
            return sub["sex" if row.label == "men-women" else "age"]["gap"], None
        part, _, name = row.metric.partition("_")
        return rec[part][name], (rec["paired_to_reference"] or {}).get(row.metric)
    curve = next(r for r in rec["curve"] if f"macro@{r['fraction']:g}" == row.label)
    return curve["macro_auroc"], curve["paired_to_reference"]


def test_the_table_has_exactly_its_columns_in_both_formats(board):
    results = board / "lb" / "results"
    csv = pl.read_csv(results / f"{NAME}.csv")
    assert tuple(csv.columns) == tidy.COLUMNS == ("task", "model", "protocol", "metric", "label", "point", "lo",
                                                  "hi", "delta", "p_holm", "n_valid", "global_pool")
    rows = tidy.read(results / f"{NAME}.csv")
    assert rows == tidy.read(results / f"{NAME}.parquet") and len(rows) > 20
    assert {r.task for r in rows} == {NAME} and {r.global_pool for r in rows} == {DEFAULT_GLOBAL_POOL}
    # Leaderboard order: the protocols' sections, each model, each column; the cost section last.
    assert list(dict.fromkeys(r.protocol for r in rows)) == ["linear", "knn", "seg", "demographics", "cost"]
    assert list(dict.fromkeys(r.model for r in rows if r.protocol == "linear")) == ["pixels", "random-vit"]
    assert len({tuple(r)[:5] for r in rows}) == len(rows)  # each (task, model, protocol, metric, label) once
    metrics = {(r.protocol, r.metric) for r in rows}
    # (The subgroup rows, which this small task has no label for, are checked in test_demographics.)
    assert {("linear", "auroc"), ("knn", "auprc"), ("seg", "dice_linear"), ("seg", "iou_multi-level"),
            ("demographics", "sex_auroc"), ("demographics", "age_r2"), ("cost", "forward_images_per_s"),
            ("cost", "parameters"), ("cost", "tokens")} <= metrics


def test_every_number_is_the_per_model_json_value(board):
    out = board / "lb"
    rows = tidy.read(out / "results" / f"{NAME}.csv")
    for model in ("pixels", "random-vit"):
        protocols = _record(out, model)
        for row in (r for r in rows if r.model == model):
            if row.protocol == "cost":
                assert (row.point, row.lo, row.hi, row.delta, row.n_valid) == (_cost(out, model, row), None, None,
                                                                               None, None), row
                continue
            summary, paired = _expected(protocols, row)
            assert (row.point, row.lo, row.hi, row.n_valid) == (summary["point"], summary["lo"], summary["hi"],
                                                                summary["n_valid"]), row
            if model == "pixels":  # the reference
                assert row.delta is None and row.p_holm is None, row
            else:
                assert (row.delta, row.p_holm) == ((paired["delta"], paired["p_holm"]) if paired else (None, None))
    # Every leaderboard cell with an interval is a row (the manifest keeps the sections as data).
    manifest = json.loads((out / "results" / f"{NAME}.leaderboard.json").read_text())
    points = {(r.protocol, r.model, r.point) for r in rows}
    for protocol, entry in manifest["protocols"].items():
        for model, cells in entry["section"]["rows"].items():
            for col, cell in cells.items():
                if cell["point"] is not None:
                    assert (protocol, model, cell["point"]) in points, (protocol, model, col)


def test_a_one_protocol_run_is_merged_into_the_table(board, tmp_path):
    out = tmp_path / "lb"
    shutil.copytree(board / "lb", out)
    before = tidy.read(out / "results" / f"{NAME}.csv")
    assert _run(out, board / "cache", ":label-efficiency") == 0
    after = tidy.read(out / "results" / f"{NAME}.csv")
    # Kept as they were; the cost rows are this run's, whose features (and their rates) the first run cached.
    assert [r for r in after if r.protocol != "label-efficiency"] == before
    added = [r for r in after if r.protocol == "label-efficiency"]
    curve = _record(out, "random-vit")["label-efficiency"]["curve"]
    shown = {f"macro@{r['fraction']:g}" for r in curve if r["macro_auroc"]["point"] is not None}
    assert {r.label for r in added if r.model == "random-vit" and r.metric == "auroc"} == shown and "macro@1" in shown
    assert {r.metric for r in added} == {"auroc", "rank_auroc", "p_best_auroc", "win_auroc"}
    for row in added:
        summary, paired = _expected(_record(out, row.model), row)
        assert (row.point, row.lo, row.hi, row.delta) == (summary["point"], summary["lo"], summary["hi"],
                                                          (paired or {}).get("delta"))
    assert list(dict.fromkeys(r.protocol for r in after)) == ["linear", "knn", "label-efficiency", "seg",
                                                              "demographics", "cost"]
    assert tidy.read(out / "results" / f"{NAME}.parquet") == after
    # Demographics alone runs the linear probe it depends on; both are replaced by identical numbers.
    assert _run(out, board / "cache", ":demographics") == 0
    assert tidy.read(out / "results" / f"{NAME}.csv") == after
    assert "kept from an earlier run" in (out / f"{NAME}.md").read_text()
