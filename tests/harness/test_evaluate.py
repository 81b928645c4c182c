"""The typed evaluation (issue 21, item 1): `evaluate` computes every number of a task and writes nothing but its
caches, extracts every feature the protocols read once, before they run, and `harness.outputs.write` then writes
exactly the files the command line writes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from baselines.registry import DEFAULT_GLOBAL_POOL

from harness import features
from harness.evaluate import EvalOptions, evaluate, output_name, results_name
from harness.outputs import write
from harness.protocols import ProbeOptions
from harness.run import main
from harness.taskspec import TaskSpec
from harness.tasks.base import TaskContext, build_task
from tests.harness.same_outputs import assert_same_but_the_rate_source
from tests.harness.small_tasks import MaskedTask, pixels_encoders

DEMO = "n_patients=24,size=64,p_effusion=0.4,p_nodule=0.4"


def _options(tmp_path, **kw) -> EvalOptions:
    return EvalOptions(bootstrap=50, workers=0, min_positive_patients=2, cache_dir=tmp_path / "cache",
                       probe=ProbeOptions(n_jobs=1), **kw)


def _count_extractions(monkeypatch) -> list[tuple[str, bool]]:
    """(content digest of the images, dense) of every extraction call, cache hits included."""
    calls = []
    real = features.extract

    def counted(task, encoders, cache, *, dense=False, **kwargs):
        calls.append((task.content_digest(), dense))
        return real(task, encoders, cache, dense=dense, **kwargs)

    monkeypatch.setattr(features, "extract", counted)
    return calls


@pytest.mark.slow
def test_evaluate_writes_nothing_and_extracts_every_feature_once(tmp_path, monkeypatch):
    """The segmentation heads read the dense grids of the masked images, the rest the global features of all: two
    passes, each once (the protocols used to ask for them again, through a callback), and no file but the
    caches'."""
    monkeypatch.chdir(tmp_path)
    calls = _count_extractions(monkeypatch)
    task = MaskedTask()
    results = evaluate(task, pixels_encoders(), ["seg"], _options(tmp_path))
    masked = features.dense_view(task, np.flatnonzero(task.table.has_mask))
    assert len(masked) < len(task)
    assert calls == [(masked.content_digest(), True), (task.content_digest(), False)]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    assert list(results.protocols) == ["seg"] and results.name == "tiny-seg" and results.reference == "pixels"
    assert [r.protocol for r in results.tidy][-1] == "cost"  # every run says what each model cost, after its sections
    assert {r.protocol for r in results.tidy} == {"seg", "cost"}
    assert all(r.global_pool == DEFAULT_GLOBAL_POOL for r in results.tidy)
    assert set(results.feature_keys) == {"pixels", "pixels-crop"}


@pytest.mark.slow
def test_the_writer_writes_what_the_command_writes(tmp_path):
    """evaluate + write under the command's name give the command's files, byte for byte (the date and the
    provenance are the same within one test)."""
    argv = ["--models", "pixels", "--tasks", f"demo:{DEMO}", "--protocols", "linear,knn", "--out",
            str(tmp_path / "cli"), "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "50", "--workers", "0",
            "--min-positive-patients", "2", "--probe-jobs", "1"]
    assert main(argv) == 0
    spec = TaskSpec("demo", DEMO, ("linear", "knn"))
    task = build_task("demo", DEMO, TaskContext())
    options = _options(tmp_path)
    from baselines.registry import build_encoder

    name = results_name(output_name(spec, task), options)
    results = evaluate(task, [build_encoder("pixels")], spec.protocols, options, name=name)
    board = write(results, tmp_path / "api", spec)
    assert board == tmp_path / "api" / f"{name}.md"
    cli = sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*") if p.is_file())
    assert cli == sorted(p.relative_to(tmp_path / "api") for p in (tmp_path / "api").rglob("*") if p.is_file())
    for rel in cli:  # the second run read the features the first computed, and their rate
        assert_same_but_the_rate_source(tmp_path / "cli" / rel, tmp_path / "api" / rel)
    assert list(json.loads((tmp_path / "api" / "results" / name / "pixels.json").read_text())["protocols"]) == \
        list(results.protocols) == ["linear", "knn"]


def test_a_reference_or_a_pooling_the_encoders_do_not_have_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reference 'nobody' is not among the encoders"):
        evaluate(MaskedTask(), pixels_encoders(), ["seg"], _options(tmp_path, reference="nobody"))
    with pytest.raises(ValueError, match="otherwise than the options' 'cls\\+avg'"):
        evaluate(MaskedTask(), pixels_encoders(), ["seg"], _options(tmp_path, global_pool="cls+avg"))
    with pytest.raises(ValueError, match="split 'val'"):
        EvalOptions(split="val")
    assert not (tmp_path / "cache").exists()  # refused before anything was computed


def test_output_names_add_the_split_and_the_pooling():
    assert results_name("demo", EvalOptions()) == "demo"
    assert results_name("demo", EvalOptions(split="validation", global_pool="cls+avg")) == \
        "demo-validation-pool_cls_avg"


def test_the_store_serves_what_was_extracted_and_names_what_was_not(tmp_path, monkeypatch):
    calls = _count_extractions(monkeypatch)
    task, encoders = MaskedTask(n=9), pixels_encoders()[:1]
    masked = np.flatnonzero(task.table.has_mask)
    store = features.extract_store(task, encoders, features.FeatureCache(tmp_path), [masked, masked],
                                   workers=0, log=lambda *_: None)
    assert len(calls) == 2 and len(set(calls)) == 2  # the same rows declared twice: one pass
    assert store["pixels"].patch is None and store["pixels"].global_.shape[0] == len(task)
    assert store.dense(masked)["pixels"].patch.shape[0] == len(masked)
    with pytest.raises(KeyError, match="declares its rows"):
        store.dense(np.arange(len(task)))
    # Every image dense: one pass gives both, the global features without their grids.
    calls.clear()
    every = np.arange(len(task))
    store = features.extract_store(task, encoders, features.FeatureCache(tmp_path), [every], workers=0,
                                   log=lambda *_: None)
    assert calls == [(task.content_digest(), True)]
    assert store["pixels"].patch is None and store.dense(every)["pixels"].patch is not None
    np.testing.assert_array_equal(store["pixels"].global_, store.dense(every)["pixels"].global_)
