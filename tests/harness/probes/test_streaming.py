"""Bounded memory at any dataset size: dense features live in cache shards read a batch at a time, or are
re-encoded every batch when the entry would exceed the disk budget, and the segmentation numbers do not move."""
import io
import re

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.numpy import load_file

from baselines.floors import PIXELS_PREPROCESS, PixelsEncoder
from baselines.registry import build_encoder
from harness import stats
from harness.features import FeatureCache, FeatureSet, FeatureStore, ShardedGrid, ShardWriter, extract, extract_store
from harness.probes.segmentation import (SegBudget, fit_and_score, mask_placement_key, mask_to_input, masked_rows,
                                         placed_targets)
from harness.protocols import TaskRun
from harness.tasks.demo import DemoTask, PhantomConfig
from tests.harness.small_tasks import MaskedTask, TinyTask, pixels_encoders

BUDGET = SegBudget(epochs=2, batch_size=8, loss_size=32)


def _shards(tmp_path, array: np.ndarray, shard_bytes: int) -> ShardedGrid:
    w = ShardWriter(tmp_path, "g", shard_bytes)
    for s in range(0, len(array), 3):
        w.add({"g": array[s:s + 3]})
    return w.grids()["g"]


def test_sharded_grid_reads_any_rows_across_shards(tmp_path):
    a = np.random.default_rng(0).normal(size=(20, 2, 3, 3)).astype(np.float16)
    grid = _shards(tmp_path, a, shard_bytes=100)  # 36 bytes a row: 2 rows per shard, across the batches of 3
    assert len(grid.parts) == 10 and grid.shape == a.shape and grid.dtype == np.float16
    # Valid safetensors files, as the library itself reads them.
    np.testing.assert_array_equal(load_file(tmp_path / "g-00004.safetensors")["g"], a[8:10])
    for rows in ([19, 0, 7, 7, 3], np.arange(20)[::-1], slice(4, 17, 5), np.array([], dtype=int), [-1]):
        np.testing.assert_array_equal(grid[rows], a[rows])
    with pytest.raises(IndexError, match="out of range"):
        grid[[20]]


def test_a_read_leaves_no_shard_mapped(tmp_path):
    """Pages of a mapping kept open count in the process' resident memory: streaming a 100 GB entry through open
    mappings would grow the RSS with every epoch. Every read must unmap what it mapped."""
    grid = _shards(tmp_path, np.ones((12, 4, 8, 8), np.float16), shard_bytes=1)
    assert grid[[0, 5, 11]].shape == (3, 4, 8, 8)
    with open("/proc/self/maps") as f:
        mapped = f.read()
    assert not re.search(r"g-\d{5}\.safetensors", mapped), "a shard file is still mapped after the read"


class _Watched(TinyTask):
    """Records, when its last image is decoded, which dense shard files extraction has already written."""

    def __init__(self, root, n=10):
        super().__init__(n)
        self.root = root
        self.seen_shards: list[str] = []

    def load_image(self, i):
        if i == len(self) - 1:
            self.seen_shards = [p.name for p in self.root.rglob("dense-*.safetensors")]
        return super().load_image(i)


def test_extraction_writes_shards_as_it_goes(tmp_path):
    enc = PixelsEncoder(PIXELS_PREPROCESS)
    task = _Watched(tmp_path)
    # 64 x 28 x 28 fp16 per image: about 100 kB, so a 210 kB shard holds 2 images.
    fs = extract(task, [enc], FeatureCache(tmp_path), dense=True, batch_size=2, workers=0, shard_bytes=210_000,
                 log=lambda *_: None)["pixels"]
    assert len(task.seen_shards) >= 4  # written before the pass ended, not all at once at the end
    assert isinstance(fs.patch, ShardedGrid) and len(fs.patch.parts) == 5 and fs.dense_mode == "cache"
    whole = extract(TinyTask(), [enc], FeatureCache(tmp_path / "one"), dense=True, batch_size=10, workers=0,
                    log=lambda *_: None)["pixels"]
    assert len(whole.patch.parts) == 1
    np.testing.assert_array_equal(np.asarray(fs.patch), np.asarray(whole.patch))


def _demo():
    return DemoTask(PhantomConfig(n_patients=14, size=96, max_images_per_patient=2))


def _run(task, encoders, tmp_path, *, in_memory=False, **extract_kw):
    t = task.table
    split = np.array(["test" if int(p[1:]) % 3 == 0 else "train" for p in t.patient_ids])
    weights = stats.bootstrap_weights([t.patient_ids[i] for i in np.flatnonzero(split == "test")], 100, 0)
    logs: list[str] = []
    rows = masked_rows(task)
    store = extract_store(task, encoders, FeatureCache(tmp_path), [rows], batch_size=8, workers=0, log=logs.append,
                          **extract_kw)
    if in_memory:  # the path before streaming: every dense grid an array in RAM
        dense = {k: FeatureSet(fs.global_, np.asarray(fs.patch), tuple(np.asarray(lv) for lv in fs.layers))
                 for k, fs in store.dense(rows).items()}
        store = FeatureStore({k: store[k] for k in store}, [(rows, dense)])
    tr = TaskRun(task, split, weights, store, seed=0, reference=encoders[0].name)
    return fit_and_score(tr, encoders, BUDGET), logs


@pytest.mark.slow
def test_streaming_gives_the_in_memory_numbers_on_the_demo_task(tmp_path):
    """Bit-identical, not just close: the streamed path reads the same fp16 rows into the same batches, sums the
    channel statistics over the same chunks in the same order and trains on the same targets, so every float
    operation is the one the in-memory path makes."""
    task = _demo()
    encoders = [PixelsEncoder(PIXELS_PREPROCESS), build_encoder("random-vit")]
    memory, _ = _run(task, encoders, tmp_path / "a", in_memory=True)
    streamed, _ = _run(task, encoders, tmp_path / "b", shard_bytes=200_000)  # several shards per grid
    entries = list((tmp_path / "b").rglob("*.dense"))
    assert len(entries) == 2 and all(len(list(e.glob("dense-*.safetensors"))) > 1 for e in entries)
    assert streamed.records == memory.records and streamed.tidy == memory.tidy
    assert streamed.section.rows == memory.section.rows
    for name, data in memory.files.items():
        assert streamed.files[name] == data, name
    dice = pl.read_parquet(io.BytesIO(streamed.files["results/demo/random-vit.seg.parquet"]))["dice"]
    assert dice.drop_nulls().len() > 0  # something was scored


def test_targets_on_disk_equal_the_stacked_targets(tmp_path):
    task = MaskedTask()
    rows = np.flatnonzero(task.table.has_mask)
    from harness.tasks.base import Subset

    subset = Subset(task, rows, "m")
    masks = [subset.load_mask(i).astype(bool) for i in range(len(subset))]
    pre = pixels_encoders()[1].preprocess
    key = mask_placement_key(pre, [m.shape[-2:] for m in masks])
    on_disk = placed_targets(subset, [key], 32, tmp_path)[key]
    stacked = torch.stack([mask_to_input(m, g, 32) for m, g in zip(masks, key)]).to(torch.float16)
    np.testing.assert_array_equal(np.asarray(on_disk), stacked.numpy())


@pytest.mark.slow
def test_reencode_fallback_gives_the_cached_results(tmp_path):
    """Over the disk budget the dense entry is not written and the heads re-encode every batch: the log says so
    and why, and every number is the one the cached path gives. Exact here: the pixels encoder computes each image
    on its own; a transformer's batched matmuls may round differently with the batch's composition, which the fp16
    cache format mostly (not always) absorbs, so for those the results agree to float tolerance."""
    task = MaskedTask()
    cached, _ = _run(task, pixels_encoders(), tmp_path / "cached")
    again, logs = _run(task, pixels_encoders(), tmp_path / "reencode", dense_budget_gb=0.0)
    assert not list((tmp_path / "reencode").rglob("*.dense"))  # nothing dense cached
    assert list((tmp_path / "reencode").rglob("global.safetensors"))  # the global features still are
    said = [m for m in logs if "re-encode" in m]
    assert said and "dense-cache budget of 0 GB (--dense-cache-gb)" in said[0]
    assert again.records == cached.records and again.section.rows == cached.section.rows
    assert again.files == cached.files


def test_entries_of_one_pass_share_the_free_disk(tmp_path, monkeypatch):
    """Two dense entries that each fit the free disk but not together: the first is cached, the second re-encoded,
    and the log names the free space, not the budget, as the reason."""
    import shutil
    from collections import namedtuple

    entry = 10 * 64 * 28 * 28 * 2  # TinyTask: 10 images of pixels' 64 x 28 x 28 fp16 grid
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**12, 0, int(1.5 * entry)))
    second = PixelsEncoder(PIXELS_PREPROCESS, block=8)
    second.name, second.weights_digest = "pixels-b", "other"
    logs: list[str] = []
    out = extract(TinyTask(), [PixelsEncoder(PIXELS_PREPROCESS), second], FeatureCache(tmp_path), dense=True,
                  workers=0, log=logs.append)
    assert out["pixels"].dense_mode == "cache" and out["pixels-b"].dense_mode == "re-encode"
    assert any("pixels-b" in m and "free on the disk of the cache" in m for m in logs)
    np.testing.assert_array_equal(out["pixels-b"].patch[[3, 1]], np.asarray(out["pixels"].patch)[[3, 1]])
