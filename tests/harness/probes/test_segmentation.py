"""Segmentation protocol: the metric against its formula, the mask geometry the protocol actually uses (including
honest scoring of cropped-away pixels), and a tiny end-to-end run with the pixels encoder."""
import io
import json

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from baselines.floors import PixelsEncoder
from baselines.preprocess import Preprocess, geometry
from harness import stats
from harness.features import FeatureCache, extract_store
from harness.figures.overlays import read_overlays
from harness.probes.segmentation import (
    SegBudget,
    build_head,
    channel_stats,
    dice_iou,
    fit_head,
    mask_to_input,
    masked_rows,
    prediction_to_mask,
    read_levels,
    read_targets,
    fit_and_score,
)
from harness.protocols import TaskRun
from harness.splits import pseudonym
from harness.tasks.base import TaskError
from tests.harness.small_tasks import MaskedTask, lung_mask, pixels_encoders


def test_dice_iou_match_the_formula():
    rng = np.random.default_rng(0)
    pred, truth = rng.random((3, 20, 17)) < 0.4, rng.random((3, 20, 17)) < 0.3
    truth[2] = False  # an empty truth
    dice, iou = dice_iou(pred, truth)
    for k in range(2):
        p = {tuple(c) for c in np.argwhere(pred[k])}
        t = {tuple(c) for c in np.argwhere(truth[k])}
        assert dice[k] == pytest.approx(2 * len(p & t) / (len(p) + len(t)))
        assert iou[k] == pytest.approx(len(p & t) / len(p | t))
    assert np.isnan(dice[2]) and np.isnan(iou[2])
    d, i = dice_iou(truth[:1], truth[:1])
    assert d[0] == 1.0 and i[0] == 1.0


@pytest.mark.parametrize("policy", ["resize_stretch", "resize_longest_pad", "resize_shortest_crop"])
@pytest.mark.parametrize("hw", [(60, 60), (120, 60)])
@pytest.mark.parametrize("loss_size", [None, 24])
def test_mask_round_trip_through_the_protocol_geometry(policy, hw, loss_size):
    """Target placement (mask_to_input, optionally at the loss size) and scoring (prediction_to_mask) invert each
    other up to resampling error, inside what the encoder sees."""
    pre = Preprocess(size=48, policy=policy)
    geo = geometry(*hw, pre)
    mask = lung_mask(hw)
    target = mask_to_input(mask, geo, loss_size)
    if loss_size is not None:  # the head's logits are upsampled from the loss grid the same way at scoring
        target = F.interpolate(target[None], size=(48, 48), mode="bilinear", align_corners=False)[0]
    back = prediction_to_mask(target, geo)
    assert back.shape == mask.shape
    seen = np.zeros(hw, dtype=bool)
    rows = slice(max(0, round(geo.top * hw[0] / geo.resized_h)), round((geo.top + 48) * hw[0] / geo.resized_h))
    seen[rows] = True  # the only policy that crops here is the portrait shortest-edge crop (rows)
    assert (back[0][seen] == mask[0][seen]).mean() > 0.97
    assert not back[0][~seen].any()  # cropped-away rows come back as background
    # What a perfect head can score: 1 unless the crop cut lung away, which then counts as missed.
    reachable = dice_iou(mask & seen[None], mask)[0][0]
    assert reachable < 0.95 if policy == "resize_shortest_crop" and hw[0] != hw[1] else reachable == 1.0
    assert dice_iou(back, mask)[0][0] == pytest.approx(reachable, abs=0.03)


def test_cropped_away_pixels_are_scored_as_background():
    """A portrait radiograph under resize_shortest_crop loses its top and bottom: even a head predicting
    'lung' everywhere the encoder sees gets nothing there, so a crop that cuts the lung costs Dice."""
    pre = Preprocess(size=40, policy="resize_shortest_crop")
    hw = (100, 40)
    geo = geometry(*hw, pre)
    pred = prediction_to_mask(torch.ones(1, 40, 40), geo)
    assert not pred[0, :29].any() and not pred[0, 71:].any() and pred[0, 31:69].all()
    truth = np.ones((1, *hw), dtype=bool)
    dice, _ = dice_iou(pred, truth)
    assert dice[0] == pytest.approx(2 * pred.sum() / (pred.sum() + truth.sum()))  # penalised, not excused
    assert dice[0] < 0.6


def test_head_training_is_seeded():
    rng = np.random.default_rng(0)
    levels = [rng.normal(size=(12, 8, 6, 6)).astype(np.float16)]
    targets = torch.from_numpy(rng.random((12, 1, 24, 24)) < 0.5).float()
    budget = SegBudget(epochs=2, batch_size=4, loss_size=24)
    st = channel_stats(levels)
    heads = [fit_head(build_head("multi-level", st, 1, budget, 0), read_levels(levels), read_targets(targets), 12,
                      budget, 0) for _ in range(2)]
    for a, b in zip(heads[0].state_dict().values(), heads[1].state_dict().values()):
        assert torch.equal(a, b)


def _task_run(task, tmp_path, encoders, reference="pixels"):
    """The protocol's shared state, with the features of `encoders` extracted as the evaluation extracts them (the
    rows segmentation declares, dense)."""
    t = task.table
    pid = np.array([int(p[1:]) for p in t.patient_ids])
    split = np.where(pid % 3 == 0, "test", "train")
    test = np.flatnonzero(split == "test")
    weights = stats.bootstrap_weights([t.patient_ids[i] for i in test], 200, 0)
    store = extract_store(task, encoders, FeatureCache(tmp_path), [masked_rows(task)], batch_size=8, workers=0,
                          log=lambda *_: None)
    return TaskRun(task, split, weights, store, seed=0, reference=reference)


def test_protocol_end_to_end(tmp_path):
    task = MaskedTask()
    tr = _task_run(task, tmp_path, pixels_encoders())
    result = fit_and_score(tr, pixels_encoders(), SegBudget(epochs=15, batch_size=8, loss_size=32))
    section = result.to_section()
    assert section.columns == ["rank (Dice, multi-level)", "lungs Dice (linear)", "lungs IoU (linear)",
                               "lungs Dice (multi-level)", "lungs IoU (multi-level)"]
    res = result.to_record("pixels")
    n_masked_test = int((task.table.has_mask & (tr.split == "test")).sum())
    assert res["test_images"] == n_masked_test and res["heads"]["linear"]["lungs"]["n_scored"] == n_masked_test
    ml = res["heads"]["multi-level"]["lungs"]["dice"]
    assert ml["point"] > 0.85 and ml["lo"] <= ml["point"] <= ml["hi"]
    # The crop model loses the top and bottom of the portrait images' lungs, and is scored for it.
    crop = result.to_record("pixels-crop")["heads"]["multi-level"]["lungs"]
    assert crop["dice"]["point"] < ml["point"]
    assert crop["paired_to_reference"]["dice"]["delta"] == pytest.approx(crop["dice"]["point"] - ml["point"])
    json.dumps(dict(result.records))  # JSON-ready
    # The tidy rows: one per cell, metric <metric>_<head>, label the structure, the paired delta of the crop model.
    rows = {(r.model, r.metric, r.label): r for r in result.tidy}
    cells = {"dice_linear", "iou_linear", "dice_multi-level", "iou_multi-level"}
    assert {m for _, m, _ in rows} == cells | {f"{kind}_{c}" for kind in ("rank", "p_best") for c in cells} | {
        "win_dice_linear", "win_dice_multi-level"}
    assert rows["pixels-crop", "dice_multi-level", "lungs"].point == crop["dice"]["point"]
    assert rows["pixels-crop", "dice_multi-level", "lungs"].delta == crop["paired_to_reference"]["dice"]["delta"]
    assert rows["pixels", "iou_linear", "lungs"].n_valid == res["heads"]["linear"]["lungs"]["iou"]["n_valid"]
    # The overlays' inputs: the first 4 masked test images, named by patient pseudonym and test position only.
    blob = result.files["results/tiny-seg/pixels.overlays.npz"]
    (tmp_path / "o.npz").write_bytes(blob)
    ov = read_overlays(tmp_path / "o.npz")
    test = np.flatnonzero(task.table.has_mask & (tr.split == "test"))
    assert ov.model == "pixels" and ov.test_index == [0, 1, 2, 3] and len(ov.images) == 4
    assert ov.patient_keys == [pseudonym(task.table.patient_ids[i], task.name) for i in test[:4]]
    per_image = pl.read_parquet(io.BytesIO(result.files["results/tiny-seg/pixels.seg.parquet"]))
    ml = per_image.filter(pl.col("head") == "multi-level")["dice"].to_numpy()[:4]
    np.testing.assert_allclose(ov.dice[:, 0], ml)
    np.testing.assert_array_equal(ov.truths[0], lung_mask(task.shapes[test[0]])[0])  # small images: kept at full size
    with np.load(tmp_path / "o.npz") as z:
        texts = {str(v) for k in z.files if z[k].dtype.kind == "U" for v in z[k].ravel()}
    assert texts and not texts & set(task.table.image_ids)
    assert "tiny-seg_seg/pixels.png" not in result.files
    assert any("results/tiny-seg/<model>.overlays.npz" in n for n in section.notes)


class _TwoStructures(MaskedTask):
    """CANDID-like: a second structure (a 'tube') present on some images only; empty truths are not scored."""

    mask_names = ("lungs", "tube")

    def load_mask(self, i):
        lungs = lung_mask(self.shapes[i])
        tube = np.zeros_like(lungs)
        if i % 4 == 0:
            tube[0, 5:-5, 18:22] = True
        return np.concatenate([lungs, tube])


def test_several_structures_and_empty_truths(tmp_path):
    task = _TwoStructures()
    tr = _task_run(task, tmp_path, pixels_encoders()[:1])
    result = fit_and_score(tr, pixels_encoders()[:1], SegBudget(epochs=3, batch_size=8, loss_size=32))
    section = result.to_section()
    # A rank column (mean Dice over the structures) + Dice, IoU per structure and head + the tube's FP rate per head
    assert len(section.columns) == 11 and "tube Dice (multi-level)" in section.columns
    assert section.columns[0] == "rank (mean Dice, multi-level)"
    # A row per cell, then a rank and a P(best) row per column and for the mean Dice (one model: no win rows).
    assert len(result.tidy) == 10 + 2 * 11
    tube = result.to_record("pixels")["heads"]["linear"]["tube"]
    test = np.flatnonzero(task.table.has_mask & (tr.split == "test"))
    assert tube["n_scored"] == sum(i % 4 == 0 for i in test) > 0
    assert tube["n_empty_truth"] == len(test) - tube["n_scored"] > 0
    assert any("tube: " in n and "empty truth left out" in n for n in section.notes)


def test_task_without_masks_says_why(tmp_path):
    task = MaskedTask(n=12, with_masks=False)
    result = fit_and_score(_task_run(task, tmp_path, pixels_encoders()), pixels_encoders())
    assert result.section.rows == {} and "has no masks" in result.section.notes[0]
    assert not result.records and not result.files and not result.tidy


def _crop(name, resize=None):
    """A centre-cropping pixels encoder; `resize` sets the shortest edge before the crop (Resize + CenterCrop)."""
    enc = PixelsEncoder(Preprocess(size=32, policy="resize_shortest_crop", resize=resize, interpolation="area",
                                   mean=(0.5,), std=(0.25,), channels=1), block=4)
    enc.name = name
    return enc


def test_a_models_scores_do_not_depend_on_the_other_models_in_the_run(tmp_path):
    """Two encoders with the same input size and policy but a different resize before the crop (CLIP-style crop
    224 vs DINOv2-style Resize 256 + CenterCrop 224) must each train on their own placed masks: every number of
    a model is the same alone and beside the other, in either order."""
    budget = SegBudget(epochs=3, batch_size=8, loss_size=32)

    def scores(*names):
        encoders = [_crop(n, resize=40 if n == "zoom" else None) for n in names]
        tr = _task_run(MaskedTask(), tmp_path, encoders, reference=names[0])
        result = fit_and_score(tr, encoders, budget)
        return {m: {kind: {metric: result.to_record(m)["heads"][kind]["lungs"][metric]
                           for metric in ("dice", "iou")} for kind in ("linear", "multi-level")} for m in names}

    alone = {**scores("crop"), **scores("zoom")}
    assert alone["crop"] != alone["zoom"]  # the geometries really differ
    for order in (("crop", "zoom"), ("zoom", "crop")):
        assert scores(*order) == alone, order


class _OneBright(MaskedTask):
    """Every image dimmed to at most ~0.45 except image 4, whose background stays around 0.65."""

    def load_image(self, i):
        img = super().load_image(i)
        return img if i == 4 else 0.5 * img


def test_non_finite_dense_features_name_the_model_task_and_images(tmp_path):
    """A real fp16 overflow: with std 0.55/65504 every normalised pixel above 0.55 exceeds float16's range when
    the dense grid is cached, which only image 4 reaches. Training on it would silently give Dice 0."""
    task = _OneBright()
    overflow = PixelsEncoder(Preprocess(size=32, policy="resize_stretch", interpolation="area", mean=(0.0,),
                                        std=(0.55 / 65504,), channels=1), block=4)
    with pytest.raises(TaskError) as err:
        tr = _task_run(task, tmp_path, [overflow])
        fit_and_score(tr, [overflow], SegBudget(epochs=1, batch_size=8, loss_size=32))
    msg = str(err.value)
    assert "pixels" in msg and "tiny-seg" in msg and "'im4'" in msg
    assert not any(f"'im{i}'" in msg for i in range(len(task)) if i != 4)
    assert "float16" in msg  # says why, and what to do


def test_empty_truth_false_positives_are_a_column_with_an_interval(tmp_path):
    """Dice over non-empty truths never sees a head painting a tube on a negative image: the fraction of
    empty-truth test images with any predicted pixel is its own column (lower is better), with a bootstrap CI."""
    task = _TwoStructures()
    tr = _task_run(task, tmp_path, pixels_encoders()[:1])
    result = fit_and_score(tr, pixels_encoders()[:1], SegBudget(epochs=3, batch_size=8, loss_size=32))
    section = result.to_section()
    for kind in ("linear", "multi-level"):
        col = f"tube empty-truth FP rate ({kind})"
        assert col in section.columns and section.higher_is_better[col] is False
        assert f"lungs empty-truth FP rate ({kind})" not in section.columns  # every test image has lungs
        cell = section.rows["pixels"][col]
        fp = result.to_record("pixels")["heads"][kind]["tube"]["empty_truth_fp_rate"]
        assert cell.point == fp["point"] and cell.lo == fp["lo"] and cell.hi == fp["hi"]
        assert 0.0 <= fp["lo"] <= fp["point"] <= fp["hi"] <= 1.0
    assert any("empty-truth FP rate" in n and "any predicted pixel" in n for n in section.notes)


def test_per_image_scores_are_published_and_reproduce_the_intervals(tmp_path):
    """results/<task>/<model>.seg.parquet holds Dice, IoU and 'predicted anything' per test image, head and
    structure, keyed by the pseudonymous patient_key: enough to recompute every segmentation interval exactly."""
    task = _TwoStructures()
    tr = _task_run(task, tmp_path, pixels_encoders()[:1])
    result = fit_and_score(tr, pixels_encoders()[:1], SegBudget(epochs=3, batch_size=8, loss_size=32))
    df = pl.read_parquet(io.BytesIO(result.files["results/tiny-seg/pixels.seg.parquet"]))
    assert set(df.columns) == {"image_id", "patient_key", "head", "structure", "truth_empty", "predicted_any",
                               "dice", "iou"}
    test = np.flatnonzero(task.table.has_mask & (tr.split == "test"))
    assert len(df) == 2 * 2 * len(test)
    raw = set(task.table.patient_ids)
    assert not raw & set(df["patient_key"])
    expected_keys = {pseudonym(task.table.patient_ids[i], task.name) for i in test}
    assert set(df["patient_key"]) == expected_keys
    res = result.to_record("pixels")["heads"]
    for (kind, structure), part in df.group_by(["head", "structure"]):
        w = stats.bootstrap_weights(part["patient_key"].to_list(), tr.weights.shape[0], tr.seed)
        scored = ~part["truth_empty"].to_numpy()
        published = res[kind][structure]
        for metric in ("dice", "iou"):
            values = part[metric].to_numpy()[scored]
            with np.errstate(invalid="ignore"):  # resamples without a tube image: NaN, as in the protocol
                again = stats.summarise(float(values.mean()), stats.weighted_mean(values, w[:, scored]))
            assert again == published[metric], (kind, structure, metric)
        if (~scored).any():
            fp = part["predicted_any"].to_numpy()[~scored].astype(float)
            again = stats.summarise(float(fp.mean()), stats.weighted_mean(fp, w[:, ~scored]))
            assert again == published["empty_truth_fp_rate"], (kind, structure)


@pytest.mark.slow
def test_ranks_equal_a_brute_force_recount_from_the_published_scores(tmp_path):
    """The rank column, the results JSON's ranks and the tidy rank rows, recounted one resample at a time from the
    per-image Dice the run publishes: each resample's mean Dice per model and structure, their mean over the
    structures, then ranks, P(best) and P(a beats b)."""
    task = _TwoStructures()
    encoders = pixels_encoders()
    tr = _task_run(task, tmp_path, encoders)
    result = fit_and_score(tr, encoders, SegBudget(epochs=3, batch_size=8, loss_size=32))
    names = [e.name for e in encoders]
    a, b = names
    resampled = {}
    for model in names:
        df = pl.read_parquet(io.BytesIO(result.files[f"results/tiny-seg/{model}.seg.parquet"]))
        part = df.filter(pl.col("head") == "multi-level")
        per_structure = []
        for structure in ("lungs", "tube"):
            one = part.filter(pl.col("structure") == structure)
            w = stats.bootstrap_weights(one["patient_key"].to_list(), tr.weights.shape[0], tr.seed)
            scored = ~one["truth_empty"].to_numpy()
            dice = one["dice"].to_numpy()[scored]
            per_structure.append([(w[r, scored] * dice).sum() / w[r, scored].sum() if w[r, scored].sum() else np.nan
                                  for r in range(w.shape[0])])
        resampled[model] = np.mean(per_structure, axis=0)
    valid = np.isfinite(resampled[a]) & np.isfinite(resampled[b])
    x, y = resampled[a][valid], resampled[b][valid]
    p_a_wins = float(((x > y).sum() + 0.5 * (x == y).sum()) / valid.sum())
    best_a = float(((x > y) + 0.5 * (x == y)).mean())  # a tie for first shares the win
    rank_a = np.where(x >= y, 1, 2)
    record = result.to_record(a)["ranks"]["dice_multi-level"]["macro"]
    assert record["n_valid"] == valid.sum()
    assert record["p_best"] == pytest.approx(best_a)
    assert record["win_probability"][b] == pytest.approx(p_a_wins)
    assert (record["lo"], record["hi"]) == (int(np.percentile(rank_a, 2.5, method="lower")),
                                            int(np.percentile(rank_a, 97.5, method="higher")))
    ml = {m: result.to_record(m)["heads"]["multi-level"] for m in names}
    point = {m: np.mean([ml[m][s]["dice"]["point"] for s in ("lungs", "tube")]) for m in names}
    assert record["rank"] == (1 if point[a] >= point[b] else 2)
    cell = result.to_section().rows[a]["rank (mean Dice, multi-level)"]
    assert (cell.point, cell.lo, cell.hi) == (record["rank"], record["lo"], record["hi"])
    tidy = {(r.model, r.metric, r.label): r for r in result.tidy}
    assert tidy[(b, "win_dice_multi-level", f"macro vs {a}")].point == pytest.approx(1 - p_a_wins)
    assert tidy[(a, "p_best_dice_multi-level", "macro")].point == pytest.approx(best_a)
    # The FP rate ranks the lowest first, and a per-column rank is in the JSON too.
    fp = {m: result.to_record(m)["heads"]["linear"]["tube"]["empty_truth_fp_rate"]["point"] for m in names}
    fp_rank = result.to_record(a)["ranks"]["empty_truth_fp_rate_linear"]["tube"]["rank"]
    assert fp_rank == (1 if fp[a] <= fp[b] else 2)
