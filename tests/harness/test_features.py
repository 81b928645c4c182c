import logging

import numpy as np
import pytest
import torch

from baselines.floors import PIXELS_PREPROCESS, PixelsEncoder
from harness.features import FeatureCache, extract
from harness.tasks.base import TaskError
from tests.harness.small_tasks import TinyTask


def test_second_run_recomputes_nothing(tmp_path, caplog):
    enc = PixelsEncoder(PIXELS_PREPROCESS)
    cache = FeatureCache(tmp_path)
    first = extract(TinyTask(), [enc], cache, dense=True, batch_size=4, workers=0)["pixels"]
    assert not first.from_cache and first.global_.shape == (10, 256) and first.patch.dtype == np.float16
    with caplog.at_level(logging.INFO, logger="harness"):
        again = extract(TinyTask(), [enc], cache, dense=True, batch_size=4, workers=0)
    assert again["pixels"].from_cache
    assert "nothing to compute" in caplog.text
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
    assert cache_key(a, "d1", "cpu") != cache_key(b, "d1", "cpu")
    assert cache_key(a, "d1", "cpu") != cache_key(a, "d2", "cpu")


def test_key_depends_on_precision_torch_and_encoder_code(monkeypatch):
    """GPU bf16 and CPU fp32 features differ, and so may those of another torch or a changed `encode`."""
    from harness.features import cache_key

    enc = PixelsEncoder(PIXELS_PREPROCESS)
    cpu = cache_key(enc, "d1", "cpu")
    assert cache_key(enc, "d1", "cuda") != cpu
    assert cache_key(enc, "d1", "cuda:1") == cache_key(enc, "d1", "cuda")  # which GPU does not matter
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert cache_key(enc, "d1", "cpu") != cpu
    monkeypatch.undo()
    # An edit to the encoder's module (here: its digest as the key sees it) is another key.
    from harness.common import sources

    real = sources.source_digest
    monkeypatch.setattr(sources, "source_digest", lambda item: "edited" if item == "baselines.floors" else real(item))
    assert cache_key(enc, "d1", "cpu") != cpu


def test_dense_entry_serves_global_requests(tmp_path):
    enc = PixelsEncoder(PIXELS_PREPROCESS)
    cache = FeatureCache(tmp_path)
    glob = extract(TinyTask(), [enc], cache, dense=False, workers=0)["pixels"]
    manifest = cache.entry(glob.key) / "manifest.json"
    written = manifest.stat().st_mtime_ns
    dense = extract(TinyTask(), [enc], cache, dense=True, workers=0)["pixels"]  # a dense entry beside it
    assert not dense.from_cache and dense.patch is not None
    # The global-only entry is left alone: another run may be reading it right now.
    assert manifest.is_file() and manifest.stat().st_mtime_ns == written
    assert cache.entry(glob.key, dense=True) != cache.entry(glob.key)
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


_SAVER = """
import sys
import numpy as np
from harness.features import FeatureCache

from pathlib import Path

cache, role, n = FeatureCache(sys.argv[1]), sys.argv[2], int(sys.argv[3])
stop = Path(sys.argv[1] + ".writers-done")
g = np.arange(40, dtype=np.float32).reshape(10, 4)
patch = np.arange(180, dtype=np.float16).reshape(10, 2, 3, 3)
if role == "writer":
    for i in range(n):
        dense = i % 2 == 1
        w = cache.writer("abcd", dense, shard_bytes=100)  # 72 bytes a row: a shard per row
        for s in range(0, 10, 3):
            w.add(g[s:s + 3], [patch[s:s + 3], -patch[s:s + 3]] if dense else None)
        w.publish({"i": i})
else:
    seen, last = 0, False
    while not last:
        last = stop.exists()  # one more pass after the writers are done
        for want_dense in (False, True):
            if cache.has("abcd", want_dense):
                fs = cache.load("abcd", want_dense)
                assert fs is not None, "an entry has() reported was gone"
                assert (fs.global_ == g).all()
                if want_dense:  # every shard present and whole
                    assert (fs.patch[:] == patch).all() and (fs.layers[0][::-1] == -patch[::-1]).all()
                seen += 1
    assert seen, "the reader never saw an entry"
"""


@pytest.mark.slow
def test_two_writers_and_a_reader_share_one_key(tmp_path):
    """Runs sharing --cache-dir: concurrent saves of one key all succeed, and a reader never finds half an entry
    or one deleted under it."""
    import os
    import subprocess
    import sys

    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(cache), role, "30"], env=env,
                              stderr=subprocess.PIPE, text=True) for role in ("writer", "writer", "reader")]
    errors = [p.communicate(timeout=300)[1] for p in procs[:2]]
    (tmp_path / "cache.writers-done").touch()
    errors.append(procs[2].communicate(timeout=300)[1])
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(errors)
    shard = cache / "features" / "ab"
    assert sorted(p.name for p in shard.iterdir()) == ["abcd", "abcd.dense"]  # no temporary folder left over
    assert len(list((shard / "abcd.dense").glob("dense-*.safetensors"))) == 10  # sharded
