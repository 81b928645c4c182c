import numpy as np
import pytest
import torch

from baselines.floors import PIXELS_PREPROCESS, PixelsEncoder
from harness.features import FeatureCache, extract
from harness.tasks.base import Task, TaskError, TaskTable


class TinyTask(Task):
    def __init__(self, n=10, bad=None):
        self.name = "tiny"
        self.bad = bad
        self.reads = 0
        self.table = TaskTable([f"i{k}" for k in range(n)], [f"p{k // 2}" for k in range(n)], ["a"],
                               np.array([[k % 2] for k in range(n)], np.int8), [None] * n, np.full(n, np.nan))
        self.skipped = []

    def load_image(self, i):
        if i == self.bad:
            raise TaskError(f"file i{i}.png: cannot decode")
        rng = np.random.default_rng(i)
        return rng.random((30 + i, 40)).astype(np.float32)

    def content_digest(self):
        return f"tiny-{len(self)}"


def test_second_run_recomputes_nothing(tmp_path, capsys):
    enc = PixelsEncoder(PIXELS_PREPROCESS)
    cache = FeatureCache(tmp_path)
    first = extract(TinyTask(), [enc], cache, dense=True, batch_size=4, workers=0)["pixels"]
    assert not first.from_cache and first.global_.shape == (10, 256) and first.patch.dtype == np.float16
    again = extract(TinyTask(), [enc], cache, dense=True, batch_size=4, workers=0)
    assert again["pixels"].from_cache
    assert "nothing to compute" in capsys.readouterr().out
    np.testing.assert_array_equal(first.global_, again["pixels"].global_)
    np.testing.assert_array_equal(first.patch, again["pixels"].patch)


def test_features_equal_direct_encoding(tmp_path):
    enc = PixelsEncoder(PIXELS_PREPROCESS)
    fs = extract(TinyTask(), [enc], FeatureCache(tmp_path), batch_size=3, workers=0)["pixels"]
    from baselines.preprocess import preprocess_batch

    t = TinyTask()
    direct = enc.encode(preprocess_batch([torch.from_numpy(t.load_image(7))[None]], enc.preprocess)).global_
    np.testing.assert_allclose(fs.global_[7], direct[0].numpy(), atol=1e-6)


def test_key_depends_on_content_and_preprocessing(tmp_path):
    from harness.features import cache_key
    from baselines.preprocess import Preprocess

    a = PixelsEncoder(PIXELS_PREPROCESS)
    b = PixelsEncoder(Preprocess(size=112, channels=1))
    assert cache_key(a, "d1") != cache_key(b, "d1")
    assert cache_key(a, "d1") != cache_key(a, "d2")


def test_dense_entry_serves_global_requests(tmp_path):
    enc = PixelsEncoder(PIXELS_PREPROCESS)
    cache = FeatureCache(tmp_path)
    glob = extract(TinyTask(), [enc], cache, dense=False, workers=0)["pixels"]
    dense = extract(TinyTask(), [enc], cache, dense=True, workers=0)["pixels"]  # extends the global-only entry
    assert not dense.from_cache and dense.patch is not None
    again = extract(TinyTask(), [enc], cache, dense=False, workers=0)["pixels"]
    assert again.from_cache and again.key == glob.key
    np.testing.assert_array_equal(again.global_, glob.global_)


def test_unreadable_image_leaves_no_cache_entry(tmp_path):
    cache = FeatureCache(tmp_path)
    with pytest.raises(TaskError, match="i3"):
        extract(TinyTask(bad=3), [PixelsEncoder(PIXELS_PREPROCESS)], cache, batch_size=2, workers=1)
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.rglob("*.safetensors"))


def test_incomplete_entry_is_recomputed(tmp_path):
    enc = PixelsEncoder(PIXELS_PREPROCESS)
    cache = FeatureCache(tmp_path)
    fs = extract(TinyTask(), [enc], cache, workers=0)["pixels"]
    (cache.entry(fs.key) / "manifest.json").unlink()  # as if killed before the manifest was written
    again = extract(TinyTask(), [enc], cache, workers=0)["pixels"]
    assert not again.from_cache
