"""Collapse diagnostics, the in-training probe, and the review's trainer fixes (issue: the trainer must learn)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from trainer.diagnostics import CollapseMonitor, feature_std, mean_entropy, prototypes_used, step_diagnostics
from trainer.heads import DINOHead
from trainer.losses import DINOLoss
from trainer.train import main, train
from tests.trainer.tiny_run import TINY, read_metrics, tiny_cfg


# In-process training on one thread (the `one_thread` fixture of conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# Diagnostics on constructed inputs


def test_uniform_targets_have_entropy_ln_k_and_one_hot_targets_zero():
    k = 1024
    assert mean_entropy(torch.full((6, k), 1.0 / k)) == pytest.approx(math.log(k), abs=1e-5)
    one_hot = torch.zeros(6, k)
    one_hot[:, 3] = 1.0
    assert mean_entropy(one_hot) == 0.0
    assert prototypes_used(one_hot) == 1
    assert prototypes_used(torch.eye(k)[:6]) == 6


def test_identical_features_have_std_zero_and_spread_features_do_not():
    same = torch.randn(1, 32).expand(8, 32)
    assert feature_std(same) == pytest.approx(0.0, abs=1e-7)
    spread = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    # Spread evenly over the sphere, each unit-norm coordinate has std ~1/sqrt(D).
    assert feature_std(spread) == pytest.approx(1 / math.sqrt(32), rel=0.2)


def test_step_diagnostics_kl_is_zero_when_the_student_copies_the_teacher_across_views():
    g = torch.Generator().manual_seed(1)
    teacher = torch.softmax(torch.randn(8, 16, generator=g), dim=-1)
    # The DINO term pairs student crop 1 with teacher crop 2: a student equal to the swapped teacher has KL 0.
    student_logits = torch.cat(teacher.chunk(2)[::-1]).log() * 0.1
    d = step_diagnostics(teacher, teacher[:3], student_logits, 0.1, torch.randn(8, 4, generator=g),
                         torch.ones(16, 1))
    assert d["kl_teacher_student_cls"] == pytest.approx(0.0, abs=1e-5)
    assert d["ln_k"] == pytest.approx(math.log(16))
    assert d["target_entropy_cls"] < math.log(16) and d["prototype_gain"] == 1.0


def test_collapse_monitor_needs_a_whole_window_and_names_the_kind():
    ln_k = math.log(1024)
    monitor = CollapseMonitor(window=3, margin=0.01)
    row = {"target_entropy_cls": ln_k - 1e-4, "ln_k": ln_k}
    assert monitor.update(10, row) is None and monitor.update(20, row) is None
    verdict = monitor.update(30, row)
    assert verdict.kind == "uniform" and verdict.since == 10
    assert "optim.teacher_temp" in verdict.message() and "head.freeze_prototype_gain" in verdict.message()
    assert monitor.update(40, {"target_entropy_cls": 3.0, "ln_k": ln_k}) is None  # healthy step breaks it
    low = CollapseMonitor(window=2)
    low.update(1, {"target_entropy_cls": 0.01, "ln_k": ln_k})
    assert low.update(2, {"target_entropy_cls": 0.0, "ln_k": ln_k}).kind == "one-prototype"
    with pytest.raises(ValueError, match="window"):
        CollapseMonitor(window=0)


def test_training_logs_the_diagnostics(blob_images, tmp_path):
    cfg = tiny_cfg(steps=3)
    cfg.data.sources = [str(blob_images)]
    train(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    for key in ("ln_k", "target_entropy_cls", "target_entropy_patch", "student_entropy_cls",
                "kl_teacher_student_cls", "teacher_feature_std", "prototypes_used", "prototype_gain"):
        assert all(key in r for r in rows), key
    assert rows[0]["ln_k"] == pytest.approx(math.log(64))
    assert all(0 <= r["target_entropy_cls"] <= r["ln_k"] + 1e-5 for r in rows)
    assert "H(t)" in (tmp_path / "train.log").read_text()


def test_collapse_warns_and_only_stops_when_asked(blob_images, tmp_path, monkeypatch, caplog):
    from trainer import diagnostics

    def always_uniform(self, iteration, d):
        return diagnostics.CollapseVerdict("uniform", 1, d["ln_k"], d["ln_k"])

    monkeypatch.setattr(diagnostics.CollapseMonitor, "update", always_uniform)
    cfg = tiny_cfg(steps=4)
    cfg.data.sources = [str(blob_images)]
    with caplog.at_level(logging.WARNING, logger="trainer"):
        state = train(cfg, tmp_path / "warn")
    assert state.iteration == 4 and state.stopped_by is None  # a warning never stops a run by itself
    assert sum("collapse: teacher targets are uniform" in r.message for r in caplog.records) == 1  # said once
    cfg = tiny_cfg("run.stop_on_collapse=true", steps=4)
    cfg.data.sources = [str(blob_images)]
    state = train(cfg, tmp_path / "stop")
    assert state.iteration == 1 and state.stopped_by == "collapse"
    assert (tmp_path / "stop" / "checkpoints" / "ckpt_0000001").is_dir()


# ----------------------------------------------------------------------------------------------------------------
# The review's fixes


def test_clip_grad_zero_means_no_clipping(blob_images, tmp_path, monkeypatch):
    """With optim.clip_grad=0 the gradients reach AdamW unchanged (clip_grad_norm_(..., 0) would zero them)."""
    seen = {}
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.setdefault(self, [p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                               if p.grad is not None])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    grads = {}
    for clip in ("0", "1e12"):
        seen.clear()
        cfg = tiny_cfg(f"optim.clip_grad={clip}", steps=2)
        cfg.data.sources = [str(blob_images)]
        train(cfg, tmp_path / clip)
        (grads[clip],) = seen.values()
    assert sum(float(g.abs().sum()) for g in grads["0"]) > 0
    for a, b in zip(grads["0"], grads["1e12"]):
        torch.testing.assert_close(a, b)


def test_resume_applies_changed_multipliers_and_says_what_changed(blob_images, tmp_path, caplog):
    cfg = tiny_cfg(steps=2)
    cfg.data.sources = [str(blob_images)]
    train(cfg, tmp_path)
    changed = tiny_cfg("optim.layerwise_decay=0.8", "optim.patch_embed_lr_mult=0.5", steps=4)
    changed.data.sources = [str(blob_images)]
    with caplog.at_level(logging.WARNING, logger="trainer"):
        state = train(changed, tmp_path, resume="auto")
    from trainer.meta_arch import SSLMetaArch

    expected = SSLMetaArch(changed).param_groups()  # layer-wise decay 0.8, patch embedding x0.5
    assert [g["lr_multiplier"] for g in state.optimizer.param_groups] == [g["lr_multiplier"] for g in expected]
    said = " ".join(r.message for r in caplog.records)
    assert "optim.layerwise_decay: 0.9 -> 0.8" in said and "optim.total_iters: 2 -> 4" in said


def test_resume_refuses_when_the_parameter_groups_no_longer_fit(blob_images, tmp_path):
    cfg = tiny_cfg(steps=2)
    cfg.data.sources = [str(blob_images)]
    train(cfg, tmp_path)
    merged = tiny_cfg("optim.layerwise_decay=1.0", "optim.patch_embed_lr_mult=1.0", steps=4)  # fewer groups
    merged.data.sources = [str(blob_images)]
    with pytest.raises(ValueError, match=r"cannot resume .*optim.layerwise_decay: 0.9 -> 1.0"):
        train(merged, tmp_path, resume="auto")


def test_prototype_layer_starts_like_upstream_nn_linear():
    torch.manual_seed(0)
    v = DINOHead(32, out_dim=4096, hidden_dim=32, bottleneck_dim=256).last_layer.weight_v
    bound = 1 / math.sqrt(256)  # nn.Linear's default: uniform in +-1/sqrt(in_features)
    assert float(v.detach().abs().max()) <= bound
    assert float(v.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_freeze_prototype_gain_keeps_g_at_one(blob_images, tmp_path):
    cfg = tiny_cfg("head.freeze_prototype_gain=true", "optim.freeze_last_layer_iters=0", steps=3)
    cfg.data.sources = [str(blob_images)]
    state = train(cfg, tmp_path)
    assert torch.all(state.model.student.dino_head.last_layer.weight_g == 1.0)
    assert torch.all(state.model.teacher.dino_head.last_layer.weight_g == 1.0)


def test_dino_term_without_local_crops_divides_like_upstream():
    loss = DINOLoss(8)
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(4, 8, generator=g) for _ in range(2)]
    t = [torch.softmax(torch.randn(4, 8, generator=g), dim=-1) for _ in range(2)]

    def h(tp, sl):
        return float(-(tp * torch.log_softmax(sl / 0.1, dim=-1)).sum(-1).mean())

    # Upstream: 2 global pairs / (2 + max(0 local pairs, 1)).
    assert float(loss(s, t)) == pytest.approx((h(t[1], s[0]) + h(t[0], s[1])) / 3, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The in-training probe


@pytest.mark.slow
def test_probe_runs_at_start_every_n_and_at_the_end(blob_images, tmp_path):
    cfg = tiny_cfg("eval.task=demo:n_patients=150,size=64", "eval.every=2", steps=3)
    cfg.data.sources = [str(blob_images)]
    train(cfg, tmp_path)
    probes = [r for r in read_metrics(tmp_path) if "probe_linear_auroc_cls" in r]
    assert [r["iteration"] for r in probes] == [0, 2, 3]
    for r in probes:
        for pool in ("cls", "avg", "cls+avg"):
            assert 0 <= r[f"probe_linear_auroc_{pool}"] <= 1 and 0 <= r[f"probe_knn_auroc_{pool}"] <= 1
        assert 0 <= r["probe_sex_auroc"] <= 1 and math.isfinite(r["probe_age_mae"])


@pytest.mark.slow
def test_probe_equals_the_harness_probes_on_the_validation_split(blob_images, tmp_path):
    """The probe is the harness's code on the inner split of the training patients: recompute its k-NN and linear
    macro AUROC for each pooling from harness functions on a saved checkpoint."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from baselines.ckpt import checkpoint_preprocess
    from harness.probes.knn import knn_scores
    from harness.probes.linear import linear_probe
    from trainer.checkpoint import load_backbone
    from trainer.monitor import load_probe_data, teacher_features

    cfg = tiny_cfg("eval.task=demo:n_patients=150,size=64", steps=2)
    cfg.data.sources = [str(blob_images)]
    train(cfg, tmp_path)
    last = [r for r in read_metrics(tmp_path) if "probe_linear_auroc_cls" in r][-1]
    teacher, cfg_dict = load_backbone(tmp_path)
    data = load_probe_data("demo:n_patients=150,size=64", cfg_dict, None, 0, 0.3)
    assert data.pixels.shape[-1] == checkpoint_preprocess(cfg_dict).size
    assert set(data.split) == {"train", "val"}
    feats = teacher_features(teacher, data.pixels, torch.device("cpu"), ("cls", "avg", "cls+avg"))
    tr, va = data.split == "train", data.split == "val"
    for pool, x in feats.items():
        probe = linear_probe(x[tr], data.labels[tr], data.patients[tr], x[va], data.labels[va], data.label_names,
                             skip=data.skip)
        knn = knn_scores(x[tr], data.labels[tr], x[va], 20, 0.07)
        ok = [j for j, lab in enumerate(probe.labels) if lab.evaluable]
        assert ok
        linear = np.mean([roc_auc_score(data.labels[va][:, j], probe.scores[:, j]) for j in ok])
        assert last[f"probe_linear_auroc_{pool}"] == pytest.approx(float(linear), abs=1e-12)
        assert last[f"probe_knn_auroc_{pool}"] == pytest.approx(
            float(np.mean([roc_auc_score(data.labels[va][:, j], knn[:, j]) for j in ok])), abs=1e-12)


def test_probe_never_reads_a_test_split_image(monkeypatch):
    """Every image the probe decodes is a training-split image of harness.run's split (same seed and fraction);
    the test patients are neither fitted nor scored."""
    import numpy as np

    from harness.splits import make_split
    from harness.tasks.base import TaskContext, build_task
    from harness.tasks.demo import DemoTask
    from trainer.config import load_config
    from trainer.monitor import load_probe_data

    read: list[int] = []
    original = DemoTask.load_image
    monkeypatch.setattr(DemoTask, "load_image", lambda self, i: (read.append(int(i)), original(self, i))[1])
    spec = "demo:n_patients=150,size=64"
    data = load_probe_data(spec, load_config("smoke").to_dict(), None, 0, 0.3)
    task = build_task("demo", "n_patients=150,size=64", TaskContext(seed=0))
    split = np.array(make_split(task.table.patient_ids, 0, 0.3, task.table.split))
    test_rows = set(np.flatnonzero(split == "test").tolist())
    assert test_rows and read and not test_rows & set(read)
    assert sorted(set(read)) == sorted(data.rows.tolist()) == np.flatnonzero(split == "train").tolist()
    val_patients, fit_patients = set(data.patients[data.split == "val"]), set(data.patients[data.split == "train"])
    assert val_patients and fit_patients and not val_patients & fit_patients


def _write_csv_task(root: Path, n_patients: int) -> Path:
    """A csv: task of 2 distinct random 32 px PNGs per patient, one label."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["image,patient_id,label_a"]
    for p in range(n_patients):
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / "images" / f"{p}_{k}.png")
            rows.append(f"images/{p}_{k}.png,P{p},{p % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_probe_warns_when_the_pretraining_images_include_test_images(tmp_path, caplog):
    """A manifest overlapping the probe task's test split is named with its count before training starts."""
    import polars as pl

    from harness.splits import make_split
    from harness.tasks.base import TaskContext, build_task
    labels = _write_csv_task(tmp_path / "task", n_patients=40)
    task = build_task("csv", str(labels), TaskContext(seed=0))
    split = make_split(task.table.patient_ids, 0, 0.3, task.table.split)
    test_files = [labels.parent / i for i, s in zip(task.table.image_ids, split) if s == "test"]
    manifest = tmp_path / "pretrain.txt"
    manifest.write_text("\n".join(str(p) for p in test_files[:3]) + "\n")
    from trainer.data import SampleStream
    from trainer.train import build_probe

    cfg = tiny_cfg(f"eval.task=csv:{labels}")
    with caplog.at_level(logging.WARNING):
        build_probe(cfg, SampleStream([str(manifest)], 0), torch.device("cpu"))
    assert any("3 pretraining image(s) are byte-identical to test-split images" in r.getMessage()
               for r in caplog.records)
    assert pl.read_csv(labels).height == 80


@pytest.mark.parametrize("task, message", [("csv:/nonexistent/labels.csv", "labels.csv"),
                                           ("no-such-task", "unknown task")])
def test_bad_eval_task_stops_before_any_model_is_built(blob_images, tmp_path, monkeypatch, capsys, task, message):
    import trainer.train as tt

    def never(cfg):
        raise AssertionError("a model was built before eval.task was checked")

    monkeypatch.setattr(tt, "SSLMetaArch", never)
    argv = ["--config", "smoke", "--data", str(blob_images), "--output", str(tmp_path / "run"), "--steps", "2",
            *TINY, f"eval.task={task}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: eval.task=") and message in err


def test_config_error_exits_2_with_a_one_line_message(blob_images, tmp_path, capsys):
    argv = ["--config", "smoke", "--data", str(blob_images), "--output", str(tmp_path), "optim.lr=1"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: override 'optim.lr=1': unknown key")


def test_metrics_rows_are_json_lines(blob_images, tmp_path):
    cfg = tiny_cfg(steps=2)
    cfg.data.sources = [str(blob_images)]
    train(cfg, tmp_path)
    for line in Path(tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_initial_weights_are_kept_beside_the_run_for_the_comparison(blob_images, tmp_path):
    from trainer.checkpoint import load_backbone

    cfg = tiny_cfg("run.keep_last=1", "run.checkpoint_every=1", steps=3)
    cfg.data.sources = [str(blob_images)]
    state = train(cfg, tmp_path)
    init, _ = load_backbone(tmp_path / "init")
    final, _ = load_backbone(tmp_path)
    assert [p.name for p in (tmp_path / "init" / "checkpoints").iterdir()] == ["ckpt_0000000"]
    built = tiny_cfg(steps=3)
    torch.manual_seed(built.run.seed)
    from trainer.meta_arch import SSLMetaArch

    fresh = SSLMetaArch(built).student  # the same seed rebuilds exactly the step-0 weights
    for (name, a), b in zip(init.state_dict().items(), fresh.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(init.state_dict().values(), final.state_dict().values()))
    assert state.iteration == 3


@pytest.mark.slow
def test_probing_a_finished_run_writes_one_validation_line_per_checkpoint(blob_images, tmp_path, capsys):
    """python -m trainer.monitor RUN --task TASK: the step-0 weights and every kept checkpoint, on the validation
    split, the same numbers the in-training probe logged for the last one."""
    from trainer import monitor

    cfg = tiny_cfg("eval.task=demo:n_patients=150,size=64", "run.checkpoint_every=1", "run.keep_last=5", steps=2)
    cfg.data.sources = [str(blob_images)]
    train(cfg, tmp_path)
    assert monitor.main([str(tmp_path), "--task", "demo:n_patients=150,size=64"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    # Probing as checkpoints appear: a later call keeps the other iterations' rows and replaces its own.
    (tmp_path / "validation.jsonl").unlink()
    for its in ("2", "0,2"):
        assert monitor.main([str(tmp_path), "--task", "demo:n_patients=150,size=64", "--iterations", its]) == 0
    again = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in again] == [0, 2]
    assert again[1]["probe_knn_auroc_avg"] == pytest.approx(rows[2]["probe_knn_auroc_avg"])
    assert monitor.main([str(tmp_path), "--task", "demo", "--iterations", "x"]) == 2
    logged = [r for r in read_metrics(tmp_path) if "probe_linear_auroc_cls" in r]
    for pool in ("cls", "avg", "cls+avg"):
        assert rows[0][f"probe_linear_auroc_{pool}"] == pytest.approx(logged[0][f"probe_linear_auroc_{pool}"])
        assert rows[-1][f"probe_knn_auroc_{pool}"] == pytest.approx(logged[-1][f"probe_knn_auroc_{pool}"])


@pytest.mark.parametrize("argv, message", [(["--pools", "max"], "--pools 'max'"), ([], "no init/ or checkpoints"),
                                           (["--iterations", "x"], "--iterations 'x'")])
def test_probing_a_run_with_bad_arguments_exits_2(tmp_path, capsys, argv, message):
    from trainer import monitor

    assert monitor.main([str(tmp_path), "--task", "demo", *argv]) == 2
    assert message in capsys.readouterr().err
