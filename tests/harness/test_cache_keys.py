"""Issue 20, items 1-3: never a stale or lost number. Every input of a cached feature or result is in its key (the
code that computes it included), a one-protocol run keeps an earlier section only when it was computed from the
same content, and a damaged cache entry is recomputed, never a crash.

Code edits are simulated by changing the digest the keys read for one module (`harness.common.sources`), together
with the behaviour the edit would have where the numbers should change."""
import itertools
import json
import shutil
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from baselines.floors import PIXELS_PREPROCESS, PixelsEncoder, random_vit
from baselines.registry import EncoderSpec, build_encoder
from harness import features as features_module
from harness import tidy
from harness.common import sources
from harness.features import FeatureCache, cache_key, extract
from harness.probes import demographics, knn, linear, segmentation
from harness.results_cache import ResultsCache, store
from harness.run import main
from tests.harness.small_tasks import TinyTask, labelled_set

#: (module, function) pairs doing a protocol's per-model work, counted per call.
#: (module, function, protocol) of each function doing a protocol's per-model work.
WORK = [(linear, "linear_probe", "linear"), (knn, "knn_scores", "knn"), (demographics, "linear_probe", "demographics"),
        (demographics, "age_probe", "demographics"), (segmentation, "evaluate_encoder", "seg")]
CLASSIFICATION = {"linear", "knn", "demographics"}


def _count_work(monkeypatch) -> Counter:
    """Calls of each protocol's per-model work functions, by protocol."""
    calls: Counter = Counter()
    for module, name, protocol in WORK:
        original = getattr(module, name)

        def counted(*args, _original=original, _protocol=protocol, **kwargs):
            calls[_protocol] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def _flip_labels(csv, rows: int = 12) -> None:
    """Flip labels a and b of the first `rows` images of a `labelled_set` CSV."""
    lines = csv.read_text().splitlines()
    for i in range(1, rows + 1):
        cells = lines[i].split(",")
        cells[1:3] = [str(1 - int(c)) for c in cells[1:3]]
        lines[i] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")


_EDITS = itertools.count()


def _edited(monkeypatch, *edited: str) -> None:
    """Every module or object whose name starts with one of `edited` reads as edited: another source digest, new
    at each call (two calls are two different edits)."""
    real, edit = sources.source_digest, next(_EDITS)
    monkeypatch.setattr(sources, "source_digest",
                        lambda item: f"edit {edit} of " + real(item) if item.startswith(edited) else real(item))


def _max_pool_pixels(monkeypatch) -> None:
    """The review's edit of `PixelsEncoder.encode`: the thumbnail max-pooled instead of averaged."""
    original = PixelsEncoder.encode

    def encode(self, pixels):
        f = original(self, pixels)
        return f._replace(global_=F.adaptive_max_pool2d(pixels[:, :1].float(), self.thumbnail).flatten(1))

    monkeypatch.setattr(PixelsEncoder, "encode", encode)


def _squared_pixels(monkeypatch) -> None:
    """Another edit of `PixelsEncoder.encode` (other features than `_max_pool_pixels`'s)."""
    original = PixelsEncoder.encode
    monkeypatch.setattr(PixelsEncoder, "encode", lambda self, pixels: original(self, pixels ** 2))


# ------------------------------------------------------------------------------------------ item 1: feature keys

def test_feature_key_covers_the_encoder_and_extraction_code_and_nothing_else(monkeypatch, tmp_path):
    pixels = PixelsEncoder(PIXELS_PREPROCESS)
    vit = random_vit(EncoderSpec("random-vit"))
    base = {e.name: cache_key(e, "d", "cpu") for e in (pixels, vit)}

    def changed(*edited: str) -> set[str]:
        with monkeypatch.context() as m:
            _edited(m, *edited)
            return {e.name for e in (pixels, vit) if cache_key(e, "d", "cpu") != base[e.name]}

    assert changed("baselines.floors") == {"pixels", "random-vit"}  # the encoders' module
    assert changed("baselines.preprocess") == {"pixels", "random-vit"}  # the shared preprocessing
    assert changed("harness.common.imaging") == {"pixels", "random-vit"}  # decoding
    assert changed("harness.features:encode_batch") == {"pixels", "random-vit"}  # autocast, inference mode
    assert changed("trainer.vit") == {"pixels", "random-vit"}  # imported by baselines._common, which floors uses
    # Code that computes no feature: rendering, the registration table, the rest of the extraction module.
    assert changed("harness.figures", "harness.leaderboard", "baselines.registry", "harness.run",
                   "harness.features:extract", "harness.probes") == set()
    # The factory's module is part of a built encoder's code (it maps the weights into the model).
    assert "baselines.floors" in build_encoder("random-vit").code_modules


def test_a_forward_through_transformers_is_keyed_by_its_version(monkeypatch, tmp_path):
    from baselines._common import ModuleEncoder
    from baselines._hf import dinov2_features

    (tmp_path / "w.bin").write_bytes(b"weights")
    enc = ModuleEncoder("hf-model", torch.nn.Identity(), PIXELS_PREPROCESS, [tmp_path / "w.bin"], dinov2_features)
    before = cache_key(enc, "d", "cpu")
    real = sources.library_version
    monkeypatch.setattr(sources, "library_version", lambda p: "99" if p == "transformers" else real(p))
    assert cache_key(enc, "d", "cpu") != before
    # The pixels floor imports no transformers: its key does not move with it.
    pixels = PixelsEncoder(PIXELS_PREPROCESS)
    monkeypatch.undo()
    floor = cache_key(pixels, "d", "cpu")
    monkeypatch.setattr(sources, "library_version", lambda p: "99" if p == "transformers" else real(p))
    assert cache_key(pixels, "d", "cpu") == floor


def test_an_edited_source_file_is_read_again_after_a_restart(tmp_path, monkeypatch):
    """The digest is of the file's bytes (read once per process: `cache_clear` stands for a new process)."""
    module = tmp_path / "scratch_encoder.py"
    module.write_text("from baselines.floors import PixelsEncoder\n\n\nclass Scratch(PixelsEncoder):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from scratch_encoder import Scratch

    enc = Scratch(PIXELS_PREPROCESS)
    before = cache_key(enc, "d", "cpu")
    module.write_text(module.read_text() + "# max-pool now\n")
    assert cache_key(enc, "d", "cpu") == before  # same process: sources are not re-read
    sources.source_digest.cache_clear()
    sources.imports.cache_clear()
    assert cache_key(enc, "d", "cpu") != before


def test_edited_encoder_or_preprocessing_code_recomputes_features(tmp_path, monkeypatch):
    """The review's reproductions: avg- to max-pool in `PixelsEncoder.encode`, or another input scaling in
    `preprocess_batch`, left the cached features in use."""
    cache = FeatureCache(tmp_path)
    enc = PixelsEncoder(PIXELS_PREPROCESS)
    first = extract(TinyTask(), [enc], cache, workers=0)["pixels"]
    with monkeypatch.context() as m:
        _edited(m, "baselines.floors")
        _max_pool_pixels(m)
        pooled = extract(TinyTask(), [enc], cache, workers=0)["pixels"]
        assert not pooled.from_cache and not np.array_equal(pooled.global_, first.global_)
    real = features_module.preprocess_batch
    with monkeypatch.context() as m:
        _edited(m, "baselines.preprocess")
        m.setattr(features_module, "preprocess_batch", lambda images, pre: real(images, pre) * 0.5)
        scaled = extract(TinyTask(), [enc], cache, workers=0)["pixels"]
        assert not scaled.from_cache and not np.array_equal(scaled.global_, first.global_)
    again = extract(TinyTask(), [enc], cache, workers=0)["pixels"]  # the code as it was: its own entry again
    assert again.from_cache and np.array_equal(again.global_, first.global_)


# ----------------------------------------------------------------------------------------- item 1: results keys

def _code_digests_with(monkeypatch, tmp_path, files: list) -> dict[str, str]:
    """Every protocol's code digest (`harness.results_cache.code_digest` of the module its table line names) as it
    would be with a docstring edited in each of `files`: the edited copies are read in their place, from scratch
    (the sources are read once per process, so the memos are cleared before and after)."""
    from harness.probes import PROTOCOLS
    from harness.results_cache import code_digest

    real = sources.source_file
    copies = {}
    for f in files:
        copies[f] = tmp_path / f"{len(copies)}_{f.name}"
        copies[f].write_text(f.read_text().replace('"""', '"""Edited: ', 1))
    try:
        with monkeypatch.context() as m:
            m.setattr(sources, "source_file", lambda module: copies.get(real(module), real(module)))
            sources.source_digest.cache_clear()
            sources.imports.cache_clear()
            return {p: code_digest(e.target.partition(":")[0]) for p, e in PROTOCOLS.entries.items()}
    finally:
        sources.source_digest.cache_clear()
        sources.imports.cache_clear()


@pytest.mark.slow  # over 2 s alone on a quiet 2-core machine (measured 2026-12-07: 2.1-4.0 s)
def test_a_docstring_edit_in_the_figures_moves_no_results_key(monkeypatch, tmp_path):
    """Issue 21: each protocol is keyed on the code it runs. A figure computes no cached number, so a docstring
    edited in every file of harness/figures/ (the overlays module, which segmentation imports, included) leaves
    every protocol's key as it was; the same edit in a protocol's own module moves that protocol's key alone."""
    from tests.conftest import REPO

    before = _code_digests_with(monkeypatch, tmp_path, [])
    figures = sorted((REPO / "harness" / "figures").glob("*.py"))
    assert REPO / "harness" / "figures" / "overlays.py" in figures
    assert _code_digests_with(monkeypatch, tmp_path, figures) == before
    after = _code_digests_with(monkeypatch, tmp_path, [REPO / "harness" / "probes" / "knn.py"])
    assert {p for p in before if after[p] != before[p]} == {"knn"}


def _csv_run(tmp_path, csv, out, *extra, protocols="linear,knn,demographics"):
    return main(["--models", "pixels", "--tasks", f"csv:{csv}", "--protocols", protocols, "--out",
                 str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "100", "--workers", "0",
                 "--probe-jobs", "1", *extra])


@pytest.mark.slow
def test_every_input_of_a_result_is_in_its_key(tmp_path, monkeypatch):
    csv = labelled_set(tmp_path / "data")
    assert _csv_run(tmp_path, csv, "base") == 0
    text, image = csv.read_text(), (csv.parent / "img/0_0.png").read_bytes()

    def edit_image(m):
        Image.fromarray(np.full((32, 32), 7, np.uint8)).save(csv.parent / "img/0_0.png")

    def flip_sex(m):
        csv.write_text(text.replace(",PID000,M,", ",PID000,F,"))

    def delete_features_after_a_fix(m):  # the review: deleting <cache-dir>/features still served old results
        shutil.rmtree(tmp_path / "cache" / "features")
        _max_pool_pixels(m)

    def older_library(m):
        real = sources.library_version
        m.setattr(sources, "library_version", lambda p: "0.0" if p == "scikit-learn" else real(p))

    cases = [
        ("nothing", lambda m: None, [], set()),
        ("a figure, the leaderboard, the tidy table, the tasks", lambda m: _edited(
            m, "harness.figures", "harness.leaderboard", "harness.tidy", "harness.tasks", "harness.run"), [], set()),
        ("encoder code, same features", lambda m: _edited(m, "baselines.floors"), [], set()),
        ("encoder code", lambda m: (_edited(m, "baselines.floors"), _squared_pixels(m)), [], CLASSIFICATION),
        ("feature content", delete_features_after_a_fix, [], CLASSIFICATION),
        ("k-NN code", lambda m: _edited(m, "harness.probes.knn"), [], {"knn"}),
        ("the demographic probes' code", lambda m: _edited(m, "harness.probes.demographics"), [], {"demographics"}),
        ("bootstrap code", lambda m: _edited(m, "harness.stats"), [], CLASSIFICATION),
        ("labels", lambda m: _flip_labels(csv), [], CLASSIFICATION),
        ("an image", edit_image, [], CLASSIFICATION),
        ("sex", flip_sex, [], {"demographics"}),
        ("--knn-k", lambda m: None, ["--knn-k", "5"], {"knn"}),
        ("a library version", older_library, [], CLASSIFICATION),
    ]
    for what, mutate, flags, expected in cases:
        with monkeypatch.context() as m:
            mutate(m)
            calls = _count_work(m)
            assert _csv_run(tmp_path, csv, what.replace(" ", "_"), *flags) == 0
        csv.write_text(text)
        (csv.parent / "img/0_0.png").write_bytes(image)
        assert {k for k, n in calls.items() if n} == expected, what


DEMO = "demo:n_patients=24,size=64,p_effusion=0.4,p_nodule=0.4"


@pytest.mark.slow
def test_segmentation_results_are_keyed_by_the_geometry_code_and_the_masks(tmp_path, monkeypatch):
    """The review: an edit of the resize that maps predictions back (baselines/preprocess.py) reused the result."""
    def run(out):
        return main(["--models", "pixels", "--tasks", DEMO, "--protocols", "seg", "--out", str(tmp_path / out),
                     "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "50", "--workers", "0"])

    assert run("base") == 0
    from harness.tasks.demo import DemoTask

    real_mask = DemoTask.load_mask

    def inverted(self, i):
        m = real_mask(self, i)
        return None if m is None else ~m

    for what, mutate in [("geometry code", lambda m: _edited(m, "baselines.preprocess")),
                         ("the masks", lambda m: m.setattr(DemoTask, "load_mask", inverted))]:
        with monkeypatch.context() as m:
            mutate(m)
            calls = _count_work(m)
            assert run(what.replace(" ", "_")) == 0
        assert calls["seg"] == 1, what
    calls = _count_work(monkeypatch)
    assert run("again") == 0
    assert calls["seg"] == 0


# -------------------------------------------------------------------------------------------- item 2: merging

def _sections(out, stem):
    """protocol -> (its leaderboard section, its tidy rows, each model's record) as written in `out`."""
    from harness import tidy

    manifest = json.loads((out / "results" / f"{stem}.leaderboard.json").read_text())
    rows = tidy.read(out / "results" / f"{stem}.csv")
    record = json.loads((out / "results" / stem / "pixels.json").read_text())["protocols"]
    return {p: (v["section"], [r for r in rows if r.protocol == p], record.get(p))
            for p, v in manifest["protocols"].items()}


@pytest.mark.slow
def test_a_one_protocol_run_after_a_label_change_shows_no_old_number(tmp_path, caplog):
    """The review: with 12 labels flipped, a ``csv:...:knn`` run kept the linear section computed from the old
    labels. Every section must equal a full run on the new labels, or be absent."""
    csv = labelled_set(tmp_path / "data")
    assert _csv_run(tmp_path, csv, "lb") == 0
    _flip_labels(csv)
    caplog.set_level("WARNING", logger="harness.run")
    assert main(["--models", "pixels", "--tasks", f"csv:{csv}:knn", "--out", str(tmp_path / "lb"), "--cache-dir",
                 str(tmp_path / "cache"), "--bootstrap", "100", "--workers", "0", "--probe-jobs", "1"]) == 0
    assert _csv_run(tmp_path, csv, "fresh") == 0
    merged, fresh = _sections(tmp_path / "lb", "csv-data"), _sections(tmp_path / "fresh", "csv-data")
    assert list(merged) == ["knn"]
    for protocol, content in merged.items():
        assert content == fresh[protocol], protocol
    md = (tmp_path / "lb" / "csv-data.md").read_text()
    assert "## Linear probe" not in md and "## Demographics" not in md
    for text in (md, caplog.text):
        assert "linear" in text and "demographics" in text and "the label values differ" in text
        assert f"--tasks csv:{csv} --protocols linear,demographics" in text
    # The linear probe's files went with its section.
    assert {f.name for f in (tmp_path / "lb/results/csv-data").iterdir()} == {"pixels.json", "pixels.knn.parquet"}


@pytest.mark.slow
def test_a_section_is_dropped_when_the_task_data_it_reads_changed(tmp_path, caplog):
    """Ages edited, images and labels unchanged: a k-NN run keeps the linear section, not the demographic one."""
    csv = labelled_set(tmp_path / "data")
    assert _csv_run(tmp_path, csv, "lb") == 0
    csv.write_text(csv.read_text().replace(",PID000,M,30,", ",PID000,M,80,"))
    caplog.set_level("WARNING", logger="harness.run")
    assert _csv_run(tmp_path, csv, "lb", protocols="knn") == 0
    assert list(_sections(tmp_path / "lb", "csv-data")) == ["linear", "knn"]
    assert "demographics: the task data it depends on differ (sex, age)" in caplog.text


# ------------------------------------------------------------------------------------ item 3: damaged entries

DAMAGE = {"truncated": lambda b: b[: len(b) // 2], "zeroed": lambda b: bytes(len(b)), "empty": lambda b: b"",
          "foreign": None}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_results_entry_is_recomputed(tmp_path, caplog, damage):
    cache = ResultsCache(tmp_path / "results")
    parts, other = {"protocol": "linear", "features": "f"}, {"protocol": "linear", "features": "g"}
    store(cache, parts, {"x": np.arange(3)})
    store(cache, other, {"x": np.arange(5)})
    path = cache.path(cache.key(parts))
    blob = path.read_bytes()
    # foreign: another entry's file under this name (a valid .npz, but not this key's)
    path.write_bytes(cache.path(cache.key(other)).read_bytes() if damage == "foreign" else DAMAGE[damage](blob))
    assert cache.lookup(parts) is None and "unreadable" in caplog.text
    store(cache, parts, {"x": np.arange(3)})  # recomputed and stored again
    np.testing.assert_array_equal(cache.lookup(parts)["x"], np.arange(3))


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("file", ["global.safetensors", "manifest.json", "dense-00000.safetensors"])
def test_a_damaged_feature_entry_is_recomputed(tmp_path, caplog, damage, file):
    cache = FeatureCache(tmp_path)
    enc = PixelsEncoder(PIXELS_PREPROCESS)
    first = extract(TinyTask(), [enc], cache, dense=True, workers=0)["pixels"]
    other = FeatureCache(tmp_path / "other")
    extract(TinyTask(n=5), [enc], other, dense=True, workers=0)  # an entry of another task
    entry = cache.entry(first.key, dense=True)
    target = entry / file
    foreign = next((tmp_path / "other").rglob(file)).read_bytes()
    target.write_bytes(foreign if damage == "foreign" else DAMAGE[damage](target.read_bytes()))
    again = extract(TinyTask(), [enc], cache, dense=True, workers=0)["pixels"]
    assert not again.from_cache and "cannot be read" in caplog.text
    np.testing.assert_array_equal(again.global_, first.global_)
    np.testing.assert_array_equal(np.asarray(again.patch), np.asarray(first.patch))
    assert extract(TinyTask(), [enc], cache, dense=True, workers=0)["pixels"].from_cache  # whole again


@pytest.mark.slow
def test_a_damaged_entry_in_a_run_is_recomputed_not_a_crash(tmp_path, caplog):
    """End to end: every results entry and every feature file zeroed, the run still finishes with the same
    numbers."""
    csv = labelled_set(tmp_path / "data")
    assert _csv_run(tmp_path, csv, "a") == 0
    for f in (tmp_path / "cache").rglob("*"):
        if f.is_file() and f.suffix in (".npz", ".safetensors"):
            f.write_bytes(bytes(f.stat().st_size))
    assert _csv_run(tmp_path, csv, "b") == 0
    assert "cannot be read" in caplog.text and "unreadable" in caplog.text
    # The same numbers; the rate is measured again with the features, so it may differ (and is not a number of the
    # evaluation: harness.leaderboard check does not compare it either).
    measured = pl.col("metric") != tidy.RATE_METRIC
    first, second = (pl.read_csv(tmp_path / f"{run}/results/csv-data.csv").filter(measured) for run in "ab")
    assert first.equals(second) and first.height > 10
