"""harness.figures and `python -m harness.plot`: every figure is a valid PNG, and what each one plots is the tidy
table's numbers (or the saved per-image files'), on a synthetic run folder."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

import harness.figures as figures_module
from harness.figures import STAMP, FigureInputError, draw_task_figures, figure_links, inputs_digest, task_figures
from harness.figures import age, curves, forest, label_efficiency, overlays, subgroups, wins
from harness.figures.common import HOLLOW_NOTE, TIDY_COLUMNS, error_bar, png_bytes, point_outside, read_tidy
from harness.common.paths import safe_name
from harness.plot import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAME = "synth-task"
REF, OTHER = "ref-model", "ckpt:/runs/a"  # the second one's files are named by safe_name
MODELS = [REF, OTHER]
LABELS = ["effusion", "nodule"]


def tidy_table(seed: int = 0) -> pl.DataFrame:
    """Rows of every kind the harness writes, with distinct values (a point mixed up with another cannot pass)."""
    rng = np.random.default_rng(seed)
    keys = [("linear", m, lab) for m in ("auroc", "auprc") for lab in ["macro", *LABELS]]
    keys += [("knn", "auroc", "macro"), ("seg", "dice_linear", "lungs"), ("seg", "dice_linear", "heart"),
             ("seg", "iou_linear", "lungs"), ("seg", "dice_multi-level", "lungs"),
             ("demographics", "sex_auroc", ""), ("demographics", "age_mae", ""), ("demographics", "age_r2", ""),
             ("demographics", "age_r", ""), ("demographics", "subgroup_auroc", "men"),
             ("demographics", "subgroup_auroc", "women"), ("demographics", "subgroup_auroc", "age <50"),
             ("demographics", "subgroup_gap", "men-women"), ("label-efficiency", "auroc", "macro@0.1"),
             ("label-efficiency", "auroc", "macro@1"),
             ("linear", "rank_auroc", "macro"), ("linear", "p_best_auroc", "macro"),  # not the forest's: ranks
             ("cost", "parameters", ""), ("cost", "feature_dim", "")]  # nor counts
    rows = []
    for model in MODELS:
        for j, (protocol, metric, label) in enumerate(keys):
            point = round(float(rng.uniform(0.2, 0.9)), 4)
            ref = model == REF
            rows.append({"task": "synth", "model": model, "protocol": protocol, "metric": metric, "label": label,
                         "point": point, "lo": round(point - 0.05 - 0.001 * j, 4),
                         "hi": round(point + 0.04 + 0.001 * j, 4), "delta": None if ref else round(point - 0.5, 4),
                         "p_holm": None if ref else (0.01 if j % 2 else 0.3), "n_valid": 1000, "global_pool": "cls"})
    table = pl.DataFrame(rows)
    # A metric without an interval, and one not evaluable (no point): drawn as a point, and not drawn.
    table = table.with_columns(
        pl.when((pl.col("model") == OTHER) & (pl.col("metric") == "age_r")).then(None).otherwise(pl.col(c)).alias(c)
        for c in ("lo", "hi"))
    return table.with_columns(pl.when((pl.col("model") == OTHER) & (pl.col("metric") == "sex_auroc")).then(None)
                              .otherwise(pl.col("point")).alias("point"))


def predictions(seed: int) -> pl.DataFrame:
    """Every model scores the same test images (the same targets), each with its own scores."""
    rng, truth_rng = np.random.default_rng(seed), np.random.default_rng(100)
    n = 40
    rows = []
    for j, lab in enumerate(LABELS):
        target = (truth_rng.random(n) < 0.3 + 0.1 * j).astype(int)
        target[:2] = [0, 1]
        score = np.clip(0.3 * target + rng.random(n), 0, 1)
        rows += [{"image_id": f"img{i}", "patient_key": f"k{i // 2}", "label": lab, "target": int(t),
                  "score": float(s)} for i, (t, s) in enumerate(zip(target, score))]
    return pl.DataFrame(rows)


def demographics(seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ages = rng.integers(20, 90, 30).astype(float)
    pred = ages + rng.normal(0, 8, 30)
    return pl.DataFrame({"image_id": [f"img{i}" for i in range(30)], "patient_key": [f"k{i}" for i in range(30)],
                         "sex": ["F", "M"] * 15, "sex_score": rng.random(30),
                         "age": [None if i % 7 == 0 else a for i, a in enumerate(ages)],
                         "age_pred": [None if i % 7 == 0 else p for i, p in enumerate(pred)]})


def seg_inputs(seed: int):
    """Two images (one taller than MAX_HEIGHT, so it is downsampled), two structures, predictions that overlap
    the truth only partly (all of TP, FP, FN present)."""
    rng = np.random.default_rng(seed)
    images, truths, preds = [], [], []
    for h, w in [(300, 240), (64, 80)]:
        images.append(rng.random((h, w)).astype(np.float32))
        truth = np.zeros((2, h, w), bool)
        truth[0, h // 4:3 * h // 4, w // 8:w // 2] = True
        truth[1, h // 2:h // 2 + 6, w // 2:w - 4] = True
        pred = np.roll(truth, (h // 10, w // 10), axis=(1, 2))
        truths.append(truth)
        preds.append(pred)
    return images, truths, preds


def write_run(out: Path, table: pl.DataFrame | None = None) -> Path:
    folder = out / "results" / NAME
    folder.mkdir(parents=True)
    (table if table is not None else tidy_table()).write_parquet(out / "results" / f"{NAME}.parquet")
    (out / "results" / f"{NAME}.leaderboard.json").write_text(json.dumps(
        {"settings": {"reference": REF, "models": [[m, "digest"] for m in MODELS]}, "protocols": {}}))
    for j, m in enumerate(MODELS):
        predictions(j).write_parquet(folder / f"{safe_name(m)}.predictions.parquet")
        demographics(j).write_parquet(folder / f"{safe_name(m)}.demographics.parquet")
        images, truths, preds = seg_inputs(j)
        (folder / f"{safe_name(m)}{overlays.SUFFIX}").write_bytes(overlays.overlay_npz(
            m, "multi-level", images, truths, preds, np.array([[0.81, 0.52], [0.9, np.nan]]), ["lungs", "heart"],
            ["abc123", "def456"], [3, 7]))
    return out


def key(r: dict) -> tuple:
    return r["model"], r["protocol"], r["metric"], r["label"]


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 150
        assert np.asarray(im.convert("L")).std() > 0  # something drawn


# ---------------------------------------------------------------------------------------------------------- forest

def test_forest_plots_the_headline_rows_of_the_table():
    table = tidy_table()
    fig, data = forest.draw(table, REF, "t")
    headline = {("linear", "auroc", "macro"), ("linear", "auprc", "macro"), ("knn", "auroc", "macro"),
                ("seg", "dice_linear", "lungs"), ("seg", "dice_linear", "heart"), ("seg", "dice_multi-level", "lungs"),
                ("demographics", "sex_auroc", ""), ("demographics", "age_mae", ""), ("demographics", "age_r2", ""),
                ("demographics", "age_r", "")}
    expected = {key(r): r for r in table.iter_rows(named=True)
                if (r["protocol"], r["metric"], r["label"]) in headline and r["point"] is not None}
    got = {key(r): r for r in data.iter_rows(named=True)}
    assert set(got) == set(expected) and len(data) == len(expected)
    assert (OTHER, "demographics", "sex_auroc", "") not in got  # no point: nothing to draw
    for k, r in got.items():
        e = expected[k]
        assert (r["point"], r["lo"], r["hi"]) == (e["point"], e["lo"], e["hi"]), k
        assert r["significant"] == (e["p_holm"] is not None and e["p_holm"] < 0.05), k
        assert r["reference"] == (k[0] == REF)
    # What the axes hold: one marker per point at its value, panels per (protocol, metric), the reference marked.
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert {ax.get_title() for ax in axes} == {f"{p}: {m}" + (" (macro)" if lab == "macro" else "")
                                               for p, m, lab in headline}
    markers = sorted(line.get_xdata()[0] for ax in axes for line in ax.lines if line.get_marker() in ("o", "s"))
    assert markers == sorted(e["point"] for e in expected.values())
    daggers = sum(t.get_text() == "†" for ax in axes for t in ax.texts)
    assert daggers == int(data["significant"].sum()) > 0
    assert any(t.get_text() == f"{REF} (ref)" for ax in axes for t in ax.get_yticklabels())
    assert any(t.get_text() == f"heart: {OTHER}" for ax in axes for t in ax.get_yticklabels())


def test_forest_panels_follow_the_protocol_table_whatever_the_row_order(monkeypatch):
    """The panels come in the leaderboard's protocol order, which is the protocol table's run order (dependencies
    first, then table order): with the table reordered and a protocol added to it, the panels follow, whatever the
    order of the rows; a protocol the table does not know comes last. Within a protocol, metrics keep the rows'
    order."""
    from harness.probes import PROTOCOLS

    entries = dict(PROTOCOLS.entries)
    reordered = {name: entries[name] for name in ("demographics", "seg", "linear", "knn", "label-efficiency")}
    monkeypatch.setattr(PROTOCOLS, "entries", {**reordered, **entries})  # the table as it was, after the test
    PROTOCOLS.register("added", "harness.probes.linear:fit_and_score", after=("linear",))
    extra = pl.DataFrame([{**tidy_table().row(0, named=True), "protocol": p, "metric": "auroc", "label": "macro"}
                          for p in ("added", "unknown")])
    pairs = forest.panels(forest.headline_rows(pl.concat([tidy_table(), extra]).reverse()))
    # demographics runs after linear; label-efficiency's rows are per fraction, never headline rows
    assert list(dict.fromkeys(p for p, _ in pairs)) == ["seg", "linear", "demographics", "knn", "added", "unknown"]
    assert [m for p, m in pairs if p == "linear"] == ["auprc", "auroc"]


def _win_rows(protocol: str, p: dict[tuple[str, str], float]) -> list[dict]:
    return [{"task": "t", "model": a, "protocol": protocol, "metric": "win_auroc", "label": f"macro vs {b}",
             "point": v, "lo": None, "hi": None, "delta": None, "p_holm": None, "n_valid": None, "global_pool": "cls"}
            for (a, b), v in p.items()]


def test_win_heatmap_cells_are_the_tables_win_probabilities_in_run_order():
    p = {("a", "b"): 0.9, ("b", "a"): 0.1, ("a", "c"): 0.55, ("c", "a"): 0.45, ("b", "c"): 0.3, ("c", "b"): 0.7}
    table = pl.concat([tidy_table(), pl.DataFrame(_win_rows("linear", p) + _win_rows("knn", {("a", "b"): 0.5,
                                                                                                ("b", "a"): 0.5}),
                                                   schema=tidy_table().schema)])
    table = table.filter(~((pl.col("metric") == "win_auroc") & ~pl.col("model").is_in(["a", "b", "c"])))
    fig, data = wins.draw(table, ["c", "a", "b"], "t")
    cells = {(r["protocol"], r["model"], r["other"]): r["p"] for r in data.iter_rows(named=True)}
    assert cells == {**{("linear", a, b): v for (a, b), v in p.items()}, ("knn", "a", "b"): 0.5, ("knn", "b", "a"): 0.5}
    order, matrix = wins.matrices(table, ["c", "a", "b"])["linear"]
    assert order == ["c", "a", "b"] and matrix[1][2] == 0.9 and matrix[0][0] is None
    texts = sorted(t.get_text() for ax in fig.axes for t in ax.texts)
    assert texts == sorted(f"{v:.2f}" for v in cells.values())


def test_win_heatmap_needs_two_ranked_models():
    assert wins.draw(tidy_table().filter(pl.col("metric") != "win_auroc"), [REF, OTHER], "t") is None


def test_forest_without_headline_rows_is_not_drawn():
    table = tidy_table().filter(pl.col("metric") == "subgroup_gap")
    assert forest.draw(table, REF, "t") is None


def test_forest_panels_of_one_metric_family_share_their_x_range():
    """Issue 20: each panel had its own x range, so 0.002 between two k-NN AUROCs could fill a panel."""
    assert [forest.family(m) for m in ("auroc", "sex_auroc", "auprc", "dice_linear", "dice_multi-level",
                                       "iou_linear", "age_mae", "age_r")] == \
        ["auroc", "auroc", "auprc", "dice", "dice", "iou", "age_mae", "age_r"]
    fig, data = forest.draw(tidy_table(), REF, "t")
    xlim = {ax.get_title(): ax.get_xlim() for ax in fig.axes if ax.get_visible()}
    aurocs = [xlim["linear: auroc (macro)"], xlim["knn: auroc (macro)"], xlim["demographics: sex_auroc"]]
    assert aurocs[0] == aurocs[1] == aurocs[2]
    assert xlim["seg: dice_linear"] == xlim["seg: dice_multi-level"] != aurocs[0]
    # The shared range holds every interval of the family.
    family = data.filter(pl.col("metric").str.ends_with("auroc"))
    assert aurocs[0][0] < family["lo"].min() and family["hi"].max() < aurocs[0][1]


def test_error_bars_are_clamped_and_a_point_outside_its_interval_is_hollow():
    """Issue 20: a CANDID run died with "'xerr' must not contain negative values": its age R^2 point was
    -1.7414973210880866 against lo = hi = -1.7414973210880875 (the same value summed in another order)."""
    assert not point_outside(-1.7414973210880866, -1.7414973210880875, -1.7414973210880875)
    assert error_bar(-1.7414973210880866, -1.7414973210880875, -1.7414973210880875) == \
        [[pytest.approx(0.0, abs=1e-14)], [0.0]]
    assert point_outside(0.9, 0.5, 0.8) and point_outside(0.4, 0.5, 0.8) and not point_outside(0.5, 0.5, 0.8)
    assert error_bar(0.9, 0.5, 0.8) == [[pytest.approx(0.4)], [0.0]]
    table = tidy_table()
    table = table.with_columns(
        pl.when(pl.col("metric") == "age_r2").then(-1.7414973210880866).otherwise(pl.col("point")).alias("point"),
        pl.when(pl.col("metric") == "age_r2").then(-1.7414973210880875).otherwise(pl.col("lo")).alias("lo"),
        pl.when(pl.col("metric") == "age_r2").then(-1.7414973210880875).otherwise(pl.col("hi")).alias("hi"))
    # A percentile interval that does not hold its point (a skewed bootstrap): the point is drawn hollow.
    table = table.with_columns(pl.when((pl.col("metric") == "age_mae") & (pl.col("model") == OTHER))
                               .then(pl.col("hi") + 1.0).otherwise(pl.col("point")).alias("point"))
    fig, data = forest.draw(table, REF, "t")
    assert data.filter(pl.col("outside"))[["model", "metric"]].rows() == [(OTHER, "age_mae")]
    panel = next(ax for ax in fig.axes if ax.get_title() == "demographics: age_mae")
    fills = {ln.get_xdata()[0]: ln.get_fillstyle() for ln in panel.lines if ln.get_marker() in ("o", "s")}
    outside = data.filter(pl.col("outside"))["point"][0]
    assert fills.pop(outside) == "none" and set(fills.values()) == {"full"}
    assert HOLLOW_NOTE in fig.get_suptitle()
    png_bytes(fig)  # draws without an error
    assert HOLLOW_NOTE not in forest.draw(tidy_table(), REF, "t")[0].get_suptitle()


@pytest.mark.slow
def test_a_figure_that_raises_is_logged_by_name_and_the_others_are_drawn(tmp_path, monkeypatch, caplog):
    out = write_run(tmp_path / "run")

    def broken(*args, **kwargs):
        raise ValueError("'xerr' must not contain negative values")

    monkeypatch.setattr(forest, "draw", broken)
    with caplog.at_level("WARNING", logger="harness.figures"):
        paths = draw_task_figures(out, NAME)
    assert [p.name for p in paths] == EXPECTED_FILES[1:]
    assert (f"{NAME}: figure forest.png not drawn: ValueError: 'xerr' must not contain negative values"
            in caplog.text)
    # Nothing is stamped: the next drawing tries the failed figure again (and warns again).
    assert not (out / "figures" / NAME / STAMP).exists()
    monkeypatch.undo()
    assert [p.name for p in draw_task_figures(out, NAME)] == EXPECTED_FILES


def test_the_figure_stamp_holds_matplotlibs_version(tmp_path, monkeypatch):
    """The stamp decides whether figures are redrawn; matplotlib draws them but is not in the code version."""
    out = write_run(tmp_path / "run")
    before = inputs_digest(out, NAME)
    real = figures_module.metadata.version
    monkeypatch.setattr(figures_module.metadata, "version",
                        lambda name: "0.0.1" if name == "matplotlib" else real(name))
    assert inputs_digest(out, NAME) != before


@pytest.mark.slow
def test_a_candid_run_with_two_test_patients_writes_its_results_and_figures(tmp_path, monkeypatch, caplog):
    """Issue 20 item 5: on a CANDID-PTX layout with 2 test patients the run wrote results/, then died (exit 1, no
    candid.md) drawing the forest plot, whose age R^2 point lay 1e-15 outside its interval. And any figure that
    fails is logged by name while the Markdown, JSON and tidy table are written and the exit code stays 0."""
    import pydicom
    from tests.harness.tasks.dicom_fixtures import make_candid

    from harness.run import main as run

    monkeypatch.setenv("RADDINO_BENCH_CACHE", str(tmp_path / "digests"))
    root = tmp_path / "data" / "candid-ptx"
    make_candid(root, extra=30)
    # Its 30 extra images under 3 patients (patient = filename prefix), so that 2 of the 6 patients are tested
    # (one with 10 images), and one age per patient.
    reports = root / "Pneumothorax_reports.csv"
    reports.write_text(re.sub(r"P20(\d\d)_", lambda m: f"P{2000 + int(m.group(1)) % 3}_", reports.read_text()))
    ages = {"P1001": 79, "P1002": 64, "P1003": 55, "P2000": 38, "P2001": 41, "P2002": 22}
    files = {f.name.removesuffix(".dcm"): f for f in (root / "dataset").iterdir()}
    for line in reports.read_text().splitlines()[1:]:
        if line.startswith("P"):
            patient, uid = line.split("_")[0], line.split(",")[1]
            ds = pydicom.dcmread(files[uid])
            ds.PatientAge = f"{ages[patient]:03d}Y"
            ds.save_as(files[uid])
    args = ["--models", "pixels", "--tasks", "candid:demographics", "--data-root", str(tmp_path / "data"),
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "200",
            "--workers", "0"]
    assert run(args) == 0
    out = tmp_path / "out"
    r2 = read_tidy(out / "results" / "candid.parquet").filter(pl.col("metric") == "age_r2").row(0, named=True)
    assert r2["point"] > r2["hi"] and point_outside(r2["point"], r2["lo"], r2["hi"]) is False  # the case
    assert "## Figures" in (out / "candid.md").read_text() and (out / "figures" / "candid" / "forest.png").is_file()

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(forest, "draw", broken)
    shutil.rmtree(out)
    with caplog.at_level("WARNING", logger="harness.figures"):
        assert run(args) == 0
    assert "candid: figure forest.png not drawn: RuntimeError: boom" in caplog.text
    for f in (out / "candid.md", out / "results" / "candid.csv", out / "results" / "candid" / "pixels.json"):
        assert f.is_file(), f
    assert "forest.png" not in (out / "candid.md").read_text()


# ---------------------------------------------------------------------------------------------------------- curves

@pytest.mark.parametrize("kind", ["roc", "pr"])
def test_curves_legend_from_the_table_and_sane_endpoints(kind):
    table = tidy_table()
    # One model lacks a label's row: its legend says so instead of computing a number.
    table = table.filter(~((pl.col("model") == OTHER) & (pl.col("label") == "nodule")))
    preds = {m: predictions(j) for j, m in enumerate(MODELS)}
    fig, data = curves.draw(preds, table, kind, "t")
    metric = curves.KINDS[kind][1]
    assert len(data) == len(MODELS) * len(LABELS)
    for r in data.iter_rows(named=True):
        row = table.filter((pl.col("model") == r["model"]) & (pl.col("protocol") == "linear")
                           & (pl.col("metric") == metric) & (pl.col("label") == r["label"]))
        p = preds[r["model"]].filter(pl.col("label") == r["label"])
        y_true, score = p["target"].to_numpy(), p["score"].to_numpy()
        x, y = np.array(r["x"]), np.array(r["y"])
        if row.is_empty():
            assert r["value"] is None
        else:
            assert (r["value"], r["lo"], r["hi"]) == (row["point"][0], row["lo"][0], row["hi"][0])
            if kind == "roc":  # the synthetic table's value is not the curve's area: it was read, not recomputed
                assert r["value"] != pytest.approx(roc_auc_score(y_true, score))
        if kind == "roc":
            assert (x[0], y[0], x[-1], y[-1]) == (0.0, 0.0, 1.0, 1.0)
            assert (np.diff(x) >= 0).all() and (np.diff(y) >= 0).all()
            assert np.trapezoid(y, x) == pytest.approx(roc_auc_score(y_true, score))
            assert r["chance"] is None
        else:
            prevalence = y_true.mean()
            assert x[0] == 1.0 and y[0] == pytest.approx(prevalence) and (x[-1], y[-1]) == (0.0, 1.0)
            assert (np.diff(x) <= 0).all() and ((y >= 0) & (y <= 1)).all()
            assert r["chance"] == pytest.approx(prevalence)
    # The legends show exactly the table's numbers.
    by_label = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(by_label) == set(LABELS)
    for r in data.iter_rows(named=True):
        texts = [t.get_text() for t in by_label[r["label"]].get_legend().get_texts()]
        if r["value"] is None:
            assert f"{r['model']}: not in the results table" in texts
        else:
            assert f"{r['model']}: {r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]" in texts
        line = next(ln for ln in by_label[r["label"]].lines if ln.get_label().startswith(r["model"] + ":"))
        np.testing.assert_array_equal(line.get_xdata(), r["x"])
        np.testing.assert_array_equal(line.get_ydata(), r["y"])


def test_a_label_with_one_class_has_no_panel():
    preds = predictions(0).with_columns(pl.when(pl.col("label") == "nodule").then(0).otherwise(pl.col("target"))
                                        .alias("target"))
    _, data = curves.draw({REF: preds}, tidy_table(), "roc", "t")
    assert data["label"].to_list() == ["effusion"]


# ------------------------------------------------------------------------------------------------ subgroups and age

def test_subgroup_points_equal_the_table():
    table = tidy_table()
    fig, data = subgroups.draw(table, REF, "t")
    expected = {key(r): r for r in table.iter_rows(named=True) if r["metric"] in ("subgroup_auroc", "subgroup_gap")}
    got = {key(r): r for r in data.iter_rows(named=True)}
    assert set(got) == set(expected)
    for k, r in got.items():
        assert (r["point"], r["lo"], r["hi"]) == tuple(expected[k][c] for c in ("point", "lo", "hi"))
    gap_panel = next(ax for ax in fig.axes if ax.get_title().startswith("gap"))
    assert any(list(ln.get_xdata()) == [0.0, 0.0] for ln in gap_panel.lines)  # the line of no difference


def test_age_scatter_is_the_files_points_and_titles_the_table():
    table = tidy_table()
    demo = {m: demographics(j) for j, m in enumerate(MODELS)}
    fig, data = age.draw(demo, table, "t")
    for ax, r in zip(fig.axes, data.iter_rows(named=True)):
        known = demo[r["model"]].drop_nulls(["age", "age_pred"])
        assert r["age"] == known["age"].to_list() and r["age_pred"] == known["age_pred"].to_list()
        np.testing.assert_array_equal(ax.collections[0].get_offsets(), known.select("age", "age_pred").to_numpy())
        mae = table.filter((pl.col("model") == r["model"]) & (pl.col("metric") == "age_mae"))["point"][0]
        rr = table.filter((pl.col("model") == r["model"]) & (pl.col("metric") == "age_r"))["point"][0]
        assert r["age_mae"] == mae and r["age_r"] == rr
        assert ax.get_title() == f"{r['model']}\nMAE {mae:.2f} years, r {rr:.3f}"
        identity = ax.lines[0]
        assert list(identity.get_xdata()) == list(identity.get_ydata())
    no_age = {m: df.with_columns(pl.lit(None, dtype=pl.Float64).alias("age")) for m, df in demo.items()}
    assert age.draw(no_age, table, "t") is None


# ------------------------------------------------------------------------------------------------------- overlays

def test_overlay_file_round_trip_and_drawn_colours(tmp_path):
    images, truths, preds = seg_inputs(0)
    dice = np.array([[0.81, 0.52], [0.9, np.nan]])
    blob = overlays.overlay_npz("m", "multi-level", images, truths, preds, dice, ["lungs", "heart"], ["abc", "def"],
                                [3, 7])
    assert blob == overlays.overlay_npz("m", "multi-level", images, truths, preds, dice, ["lungs", "heart"],
                                        ["abc", "def"], [3, 7])  # deterministic bytes (no zip timestamps)
    (tmp_path / "m.overlays.npz").write_bytes(blob)
    ov = overlays.read_overlays(tmp_path / "m.overlays.npz")
    assert [im.shape for im in ov.images] == [(256, 205), (64, 80)]  # the tall one downsampled, aspect kept
    assert ov.patient_keys == ["abc", "def"] and ov.test_index == [3, 7] and ov.structures == ["lungs", "heart"]
    np.testing.assert_array_equal(ov.dice, dice)
    np.testing.assert_array_equal(ov.truths[1], truths[1].any(0))  # small enough: the masks as they were
    np.testing.assert_array_equal(ov.preds[1], preds[1].any(0))
    # Downsampled masks keep the structure's extent (area averaging), within a pixel of the scaled box.
    rows = np.flatnonzero(ov.truths[0].any(1))
    assert abs(rows[0] - 75 * 256 / 300) <= 1 and ov.truths[0].shape == ov.images[0].shape

    fig, data = overlays.draw(ov, "t")
    colours = {tuple(c) for c in overlays.COLOURS.values()}
    assert len(colours) == 3
    for ax, r, truth, pred in zip(fig.axes, data.iter_rows(named=True), ov.truths, ov.preds):
        drawn = ax.images[1].get_array()
        counts = overlays.colour_counts(np.asarray(drawn))
        expected = {"true positive": (truth & pred).sum(), "false positive": (pred & ~truth).sum(),
                    "false negative": (truth & ~pred).sum()}
        assert counts == {k: int(v) for k, v in expected.items()} and min(counts.values()) > 0
        assert (r["tp"], r["fp"], r["fn"]) == tuple(expected.values())
        assert (np.asarray(drawn)[~(truth | pred)][:, 3] == 0).all()  # true negatives: the radiograph alone
        assert f"patient {r['patient_key']}" in ax.get_title()
    assert "Dice: lungs 0.810, heart 0.520" in fig.axes[0].get_title()
    assert "heart no truth" in fig.axes[1].get_title()
    assert "m, multi-level head" in fig.get_suptitle()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(overlays.COLOURS)


def test_a_broken_overlay_file_is_named(tmp_path):
    path = tmp_path / "x.overlays.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(FigureInputError, match="x.overlays.npz"):
        overlays.read_overlays(path)


# --------------------------------------------------------------------------------------------- the task and the CLI

EXPECTED_FILES = ["forest.png", "roc.png", "pr.png", "subgroups.png", "age_calibration.png",
                  f"overlays_{safe_name(REF)}.png", f"overlays_{safe_name(OTHER)}.png"]


@pytest.mark.slow
def test_draw_task_figures_writes_every_figure_deterministically(tmp_path):
    out = write_run(tmp_path / "run")
    stale = out / "figures" / NAME / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    paths = draw_task_figures(out, NAME)
    assert [p.name for p in paths] == EXPECTED_FILES
    assert all(p.parent == out / "figures" / NAME for p in paths) and not stale.exists()
    for p in paths:
        assert_valid_png(p)
    first = {p.name: p.read_bytes() for p in paths}
    assert {p.name: p.read_bytes() for p in draw_task_figures(out, NAME)} == first
    links = figure_links(NAME, paths)
    assert f"![Headline metrics (forest plot)](figures/{NAME}/forest.png)" in links
    assert f"![Segmentation overlays: {safe_name(OTHER)}](figures/{NAME}/overlays_{safe_name(OTHER)}.png)" in links


def test_task_figures_data_come_from_the_saved_files(tmp_path):
    out = write_run(tmp_path / "run")
    drawn = {file: data for file, _, data in task_figures(out, NAME)}
    table = read_tidy(out / "results" / f"{NAME}.parquet")
    forest_rows = drawn["forest.png"].join(table, on=["model", "protocol", "metric", "label"], how="left")
    assert (forest_rows["point"] == forest_rows["point_right"]).all()
    assert set(drawn["roc.png"]["model"]) == set(MODELS)  # the ckpt: model found through its file-safe name


def test_missing_inputs_skip_their_figures_with_a_note(tmp_path, caplog):
    out = write_run(tmp_path / "run")
    (out / "results" / f"{NAME}.parquet").unlink()
    for f in (out / "results" / NAME).glob("*.predictions.parquet"):
        f.unlink()
    with caplog.at_level("INFO", logger="harness.figures"):
        paths = draw_task_figures(out, NAME)
    assert [p.name for p in paths] == EXPECTED_FILES[-2:]  # the overlays need no table
    assert (f"note: {NAME}: the forest, ROC, precision-recall, subgroup and age-calibration figures are not drawn: "
            f"they read their numbers from the tidy table {out / 'results' / NAME}.parquet") in caplog.text


def test_a_table_without_a_column_is_an_error_naming_it(tmp_path, capsys):
    out = write_run(tmp_path / "run", tidy_table().drop("p_holm"))
    with pytest.raises(FigureInputError, match=r"synth-task\.parquet: the tidy results table lacks column\(s\) p_holm"):
        draw_task_figures(out, NAME)
    assert main([str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "p_holm" in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_prints_the_written_paths(tmp_path, capsys):
    out = write_run(tmp_path / "run")
    assert main([str(out), "--task", NAME]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "figures" / NAME / f) for f in EXPECTED_FILES]


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "has no results" in capsys.readouterr().err
    out = write_run(tmp_path / "run")
    assert main([str(out), "--task", "other"]) == 2
    assert f"it has {NAME}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- label efficiency

def test_label_efficiency_marks_and_does_not_join_fractions_over_another_label_set():
    def row(f, labels, point):
        return {"fraction": f, "labels": labels, "macro_auroc": {"point": point, "lo": point - 0.1, "hi": point + 0.1}}

    by_model = {"m": [row(0.01, ["x"], 0.6), row(0.1, ["x", "y"], 0.7), row(1.0, ["x", "y"], 0.8)]}
    fig = label_efficiency.draw(by_model, "t")
    ax = fig.axes[0]
    joined = [ln for ln in ax.get_lines() if ln.get_linestyle() != "None"]
    hollow = [ln for ln in ax.get_lines() if ln.get_fillstyle() == "none"]
    assert len(joined) == 1 and list(joined[0].get_xdata()) == [0.1, 1.0]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [0.01] and hollow[0].get_linestyle() == "None"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["m"]
    assert any(label_efficiency.OTHER_LABELS_NOTE == t.get_text() for t in ax.texts)
    # One label set throughout: one line, no note.
    fig = label_efficiency.draw({"m": [row(0.1, ["x"], 0.7), row(1.0, ["x"], 0.8)]}, "t")
    assert len(fig.axes[0].get_lines()) == 1 and not fig.axes[0].texts


def test_schema_is_the_tidy_table_s():
    assert list(tidy_table().columns) == list(TIDY_COLUMNS)


def test_png_bytes_carry_no_date():
    fig, _ = subgroups.draw(tidy_table(), REF, "t")
    blob = png_bytes(fig)
    assert b"raddino-bench harness.figures" in blob and b"Matplotlib version" not in blob
    assert b"Creation Time" not in blob and b"tIME" not in blob


@pytest.mark.slow
def test_a_real_run_draws_every_figure_from_its_own_table(tmp_path):
    """harness.run on a small demo task: the figures are written beside the leaderboard, linked from it, and the
    forest plot's points are the tidy table's."""
    from harness.run import main as run

    stem = "demo-n_patients_24-p_effusion_0.4-p_nodule_0.4-size_64"
    assert run(["--models", "pixels,random-vit", "--tasks", "demo:n_patients=24,size=64,p_effusion=0.4,p_nodule=0.4",
                "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "200",
                "--workers", "0", "--min-positive-patients", "2", "--protocols", "linear,seg,demographics"]) == 0
    drawn = {file: data for file, _, data in task_figures(tmp_path, stem)}
    assert {"forest.png", "roc.png", "pr.png", "age_calibration.png", "overlays_pixels.png",
            "overlays_random-vit.png"} <= set(drawn)
    board = (tmp_path / f"{stem}.md").read_text()
    for file in drawn:
        assert_valid_png(tmp_path / "figures" / stem / file)
        assert f"(figures/{stem}/{file})" in board
    table = read_tidy(tmp_path / "results" / f"{stem}.parquet")
    forest_rows = drawn["forest.png"].join(table, on=["model", "protocol", "metric", "label"], how="left")
    assert len(forest_rows) and forest_rows["point"].equals(forest_rows["point_right"].alias("point"))
    assert set(forest_rows["protocol"]) == {"linear", "seg", "demographics"}
