"""The results cache (issue 14 item 5): a rerun with nothing changed recomputes no fit, head or bootstrap and writes
the same numbers; adding a model computes only that model's work; a corrupt entry is recomputed, a full disk is a
clear error, and nothing half-written is ever read."""
import errno
from collections import Counter

import numpy as np
import polars as pl
import pytest

from harness.probes import demographics, knn, label_efficiency, linear, segmentation
from harness.results_cache import ResultsCache, ResultsCacheFull, dump, load, store
from harness.run import main
from tests.harness.same_outputs import assert_same_but_the_rate_source
from tests.harness.small_tasks import labelled_set

TASK = "demo:n_patients=24,size=64,p_effusion=0.4,p_nodule=0.4"
STEM = "demo-n_patients_24-p_effusion_0.4-p_nodule_0.4-size_64"
ALL_PROTOCOLS = "linear,knn,seg,demographics,label-efficiency"

#: (module, function) pairs that do a protocol's per-model work: none may run when every result is cached.
WORK = [(linear, "linear_probe"), (label_efficiency, "linear_probe"), (demographics, "linear_probe"),
        (demographics, "age_probe"), (knn, "knn_scores"), (segmentation, "evaluate_encoder"),
        (segmentation, "placed_targets")]


def _run(tmp_path, out, models, protocols=ALL_PROTOCOLS, *extra):
    return main(["--models", models, "--tasks", TASK, "--protocols", protocols, "--out", str(tmp_path / out),
                 "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "200", "--workers", "0",
                 "--min-positive-patients", "2", "--label-fractions", "0.5,1", "--label-draws", "2",
                 "--probe-jobs", "1", *extra])


def _count_work(monkeypatch) -> Counter:
    """Wrap every per-model work function so that each call is counted, by 'module.function'."""
    calls: Counter = Counter()
    for module, name in WORK:
        original = getattr(module, name)

        def counted(*args, _original=original, _key=f"{module.__name__}.{name}", **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def _tidy(tmp_path, out):
    return pl.read_parquet(tmp_path / out / "results" / f"{STEM}.parquet")


@pytest.mark.slow
def test_a_rerun_recomputes_nothing_and_writes_the_same_numbers(tmp_path, monkeypatch, caplog):
    assert _run(tmp_path, "first", "pixels,random-vit") == 0
    calls = _count_work(monkeypatch)
    caplog.set_level("INFO", logger="harness.run")
    assert _run(tmp_path, "second", "pixels,random-vit") == 0
    assert calls == Counter(), f"a rerun with nothing changed recomputed {dict(calls)}"
    # 2 models x (linear, knn, seg, demographics, and label-efficiency once per fraction)
    assert "12 model result(s) reused, 0 computed" in caplog.text
    for rel in (f"{STEM}.md", f"results/{STEM}.csv", f"results/{STEM}/pixels.json",
                f"results/{STEM}/random-vit.seg.parquet", f"results/{STEM}/random-vit.predictions.parquet"):
        assert_same_but_the_rate_source(tmp_path / "first" / rel, tmp_path / "second" / rel)
    assert "; feature cache, " in (tmp_path / "second" / f"{STEM}.md").read_text()
    # --recompute ignores the entries: every piece of work runs again, and gives the same numbers.
    assert _run(tmp_path, "third", "pixels,random-vit", ALL_PROTOCOLS, "--recompute") == 0
    assert calls[f"{segmentation.__name__}.evaluate_encoder"] == 2 and calls[f"{knn.__name__}.knn_scores"] == 2
    assert _tidy(tmp_path, "third").equals(_tidy(tmp_path, "first"))


@pytest.mark.slow
def test_adding_a_model_computes_only_that_model(tmp_path, monkeypatch):
    calls = _count_work(monkeypatch)
    assert _run(tmp_path, "one", "pixels", "linear,knn,seg") == 0
    alone = Counter(calls)
    calls.clear()
    assert _run(tmp_path, "two", "pixels,random-vit", "linear,knn,seg") == 0
    assert calls == alone, "the second run should do exactly one model's work (random-vit's)"
    # The numbers of a model do not depend on which other models share the run, cached or not.
    both, one = _tidy(tmp_path, "two"), _tidy(tmp_path, "one")
    # Ranks and win probabilities compare the models of the run, so only they may differ with the company kept.
    own = ~pl.col("metric").str.contains("^(rank|p_best|win)_")
    assert both.filter((pl.col("model") == "pixels") & own).equals(one.filter(own))
    calls.clear()
    assert _run(tmp_path, "fresh", "pixels,random-vit", "linear,knn,seg", "--recompute") == 0
    assert _tidy(tmp_path, "fresh").equals(both)


@pytest.mark.slow
def test_a_changed_setting_is_a_different_entry(tmp_path, monkeypatch):
    assert _run(tmp_path, "a", "pixels", "linear") == 0
    calls = _count_work(monkeypatch)
    assert _run(tmp_path, "b", "pixels", "linear", "--bootstrap", "150") == 0  # other resamples: other results
    assert calls[f"{linear.__name__}.linear_probe"] == 1


def test_trees_round_trip_exactly():
    tree = {"scores": np.array([[0.1, np.nan], [1 / 3, 2.0]]), "flags": np.array([True, False]),
            "preds": [np.zeros((1, 3, 2), dtype=bool), np.ones((1, 2, 2), dtype=bool)],
            "summary": {"point": 0.8125, "lo": None, "nested": [1, "a", float("nan"), np.float64(1 / 7)]},
            "empty": [], "count": np.int64(3)}
    back = load(dump(tree))
    np.testing.assert_array_equal(back["scores"], tree["scores"])
    assert back["flags"].dtype == bool and back["preds"][1].shape == (1, 2, 2)
    assert back["summary"]["point"] == 0.8125 and back["summary"]["lo"] is None
    assert np.isnan(back["summary"]["nested"][2]) and back["summary"]["nested"][3] == 1 / 7
    assert back["empty"] == [] and back["count"] == 3
    with pytest.raises(TypeError, match="object array"):
        dump({"x": np.array([{}], dtype=object)})


def test_a_corrupt_entry_is_recomputed_and_a_full_disk_is_a_clear_error(tmp_path, monkeypatch, caplog):
    cache = ResultsCache(tmp_path / "results")
    parts = {"protocol": "linear", "features": "f", "settings": {}}
    store(cache, parts, {"x": np.arange(3)})
    np.testing.assert_array_equal(cache.lookup(parts)["x"], np.arange(3))
    path = cache.path(cache.key(parts))
    path.write_bytes(b"not an npz")
    assert cache.lookup(parts) is None and "unreadable" in caplog.text
    # An interrupted write leaves no entry under its name (atomic rename), so nothing half-written is read.
    path.unlink()

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_bytes", full)
    with pytest.raises(ResultsCacheFull, match=f"results cache {tmp_path / 'results'} ran out of disk space"):
        store(cache, parts, {"x": np.arange(3)})
    monkeypatch.undo()
    assert not path.exists() and not list(path.parent.glob("*.tmp"))
    # Not enough free space for the entry: refused before writing, naming the folder and the space needed.
    monkeypatch.setattr("harness.results_cache.disk_usage", lambda _p: type("U", (), {"free": 10})())
    with pytest.raises(ResultsCacheFull, match=r"needs 0\.\d MB for an entry and its disk has 0\.0 MB free"):
        store(cache, parts, {"x": np.arange(3)})
    assert not path.exists()


@pytest.mark.slow
def test_a_full_results_cache_stops_the_run_with_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("harness.results_cache.disk_usage", lambda _p: type("U", (), {"free": 10})())
    assert _run(tmp_path, "lb", "pixels", "linear") == 1
    err = capsys.readouterr().err
    assert "error: task" in err and f"results cache {tmp_path / 'cache' / 'results'} needs" in err


@pytest.mark.slow
def test_edited_ages_are_recomputed(tmp_path, monkeypatch):
    """The images (so the features) unchanged, one patient's age corrected in the CSV: the demographic probes are
    refitted (sex and age are part of every entry's key), the linear probe is not."""
    csv = labelled_set(tmp_path / "data")

    def run(out):
        return main(["--models", "pixels", "--tasks", f"csv:{csv}:demographics", "--out", str(tmp_path / out),
                     "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "200", "--workers", "0",
                     "--probe-jobs", "1"])

    assert run("before") == 0
    text = csv.read_text()
    csv.write_text(text.replace(",PID000,M,30,", ",PID000,M,80,"))  # patient 0's two images
    assert csv.read_text() != text
    calls = _count_work(monkeypatch)
    assert run("after") == 0
    assert calls[f"{demographics.__name__}.age_probe"] == 1 and calls[f"{demographics.__name__}.linear_probe"] == 1
    assert calls[f"{linear.__name__}.linear_probe"] == 0
