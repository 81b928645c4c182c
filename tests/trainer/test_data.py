"""trainer.data: manifests, the deterministic sample stream, batches, unreadable files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from trainer.data import BadImageError, RankBatches, SampleStream, load_square, make_loader, parse_source, read_manifest


def write_png(path: Path, value: int, size: tuple[int, int] = (40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """12 PNGs whose constant grey value (10 * i) identifies them, one in a subfolder, plus a non-image."""
    root = tmp_path / "imgs"
    for i in range(11):
        write_png(root / f"{i:02d}.png", 10 * i)
    write_png(root / "sub" / "11.png", 110)
    (root / "notes.txt").write_text("not an image")
    return root


def grey_ids(images: torch.Tensor) -> list[int]:
    """Recover each image's id from its constant grey value."""
    return [round(float(img.mean()) * 255 / 10) for img in images]


def test_folder_manifest_is_recursive_sorted_and_skips_non_images(folder):
    files = read_manifest(folder)
    assert [f.name for f in files] == [f"{i:02d}.png" for i in range(11)] + ["11.png"]


def test_list_manifests_resolve_relative_paths(folder, tmp_path):
    txt = folder / "list.txt"
    txt.write_text("# a comment\n03.png\n\nsub/11.png\n")
    assert read_manifest(txt) == [folder / "03.png", folder / "sub" / "11.png"]

    csv = tmp_path / "list.csv"
    pl.DataFrame({"path": [str(folder / "01.png"), "imgs/02.png"], "age": [1, 2]}).write_csv(csv)
    assert read_manifest(csv) == [folder / "01.png", tmp_path / "imgs" / "02.png"]

    parquet = tmp_path / "list.parquet"
    pl.DataFrame({"image": ["imgs/05.png"]}).write_parquet(parquet)
    assert read_manifest(parquet) == [tmp_path / "imgs" / "05.png"]


def test_bad_manifests_say_what_is_wrong(tmp_path):
    no_column = tmp_path / "x.csv"
    pl.DataFrame({"name": ["a.png"]}).write_csv(no_column)
    with pytest.raises(ValueError, match="no image column"):
        read_manifest(no_column)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no images"):
        read_manifest(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="use a folder"):
        read_manifest(tmp_path / "x.json")


def test_parse_source_weights():
    assert parse_source("/data/a.csv@0.25").weight == 0.25
    assert parse_source("/data/a@b.csv").path == Path("/data/a@b.csv")  # '@' in a name, no weight
    with pytest.raises(ValueError, match="weight must be > 0"):
        parse_source("a.csv@0")


def test_unweighted_stream_is_a_fresh_permutation_each_pass_and_deterministic(folder):
    stream = SampleStream([str(folder)], seed=3)
    n = len(stream)
    first, second = [stream.index_at(q) for q in range(n)], [stream.index_at(q) for q in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second
    again = SampleStream([str(folder)], seed=3)
    assert [again.index_at(q) for q in range(2 * n)] == first + second  # a pure function of (seed, position)
    other = SampleStream([str(folder)], seed=4)
    assert [other.index_at(q) for q in range(n)] != first


def test_weighted_sources_are_drawn_in_proportion(tmp_path):
    a = [write_png(tmp_path / "a" / f"{i}.png", 0) for i in range(2)]
    for i in range(8):
        write_png(tmp_path / "b" / f"{i}.png", 0)
    stream = SampleStream([f"{tmp_path / 'a'}@3", f"{tmp_path / 'b'}@1"], seed=0)
    draws = np.array([stream.index_at(q) for q in range(4000)])
    share_a = np.isin(draws, [stream.paths.index(p) for p in a]).mean()
    assert abs(share_a - 0.75) < 0.03  # 2 images carry 3/4 of the samples despite being 1/5 of the files
    with pytest.raises(ValueError, match="every source or to none"):
        SampleStream([f"{tmp_path / 'a'}@3", str(tmp_path / "b")], seed=0)


def test_rank_slices_are_world_size_independent(folder):
    stream = SampleStream([str(folder)], seed=0)
    single = iter(RankBatches(stream, 4, 16, rank=0, world_size=1, start_position=6, skip_bad=False))
    ranks = [iter(RankBatches(stream, 2, 16, rank=r, world_size=2, start_position=6, skip_bad=False)) for r in (0, 1)]
    wholes = [next(single)["images"] for _ in range(3)]
    for whole in wholes:
        assert torch.equal(whole, torch.cat([next(r)["images"] for r in ranks]))
    # Resuming at a sample position continues the same sequence (step 3 starts at 6 + 2 * 4).
    resumed = next(iter(RankBatches(stream, 4, 16, 0, 1, start_position=6 + 2 * 4, skip_bad=False)))
    assert torch.equal(resumed["images"], wholes[2])


def test_loader_workers_do_not_change_the_order(folder):
    stream = SampleStream([str(folder)], seed=1)
    kw = {"batch_size": 3, "image_size": 16, "rank": 0, "world_size": 1, "start_position": 0, "skip_bad": False,
          "pin_memory": False}
    plain, workers = make_loader(stream, num_workers=0, **kw), make_loader(stream, num_workers=2, **kw)
    for _ in range(5):
        assert grey_ids(next(plain)["images"]) == grey_ids(next(workers)["images"])


def test_in_memory_cache_returns_the_same_batches(folder):
    stream = SampleStream([str(folder)], seed=2)
    plain = iter(RankBatches(stream, 5, 16, 0, 1, 0, skip_bad=False))
    cached_ds = RankBatches(stream, 5, 16, 0, 1, 0, skip_bad=False, cache=True)
    cached = iter(cached_ds)
    for _ in range(4):  # 20 positions over 12 images: the second pass is served from memory
        assert torch.equal(next(plain)["images"], next(cached)["images"])
    assert len(cached_ds.cache) == len(stream)


def test_load_square_resizes_the_whole_image(tmp_path):
    arr = np.zeros((20, 60), dtype=np.uint8)
    arr[:, :20] = 255  # bright left third: kept (stretched), not cropped away
    Image.fromarray(arr).save(tmp_path / "wide.png")
    img = load_square(tmp_path / "wide.png", 12)
    assert img.shape == (1, 12, 12) and img.dtype == torch.float32
    assert float(img.max()) <= 1.0 and float(img.min()) >= 0.0
    assert float(img[..., :3].min()) > 0.95 and float(img[..., 5:].max()) < 0.05
    assert abs(float(img.mean()) - 1 / 3) < 0.05


def test_unreadable_file_stops_with_its_path_or_is_skipped_and_counted(folder):
    broken = folder / "04.png"
    broken.write_bytes(b"not a png at all")
    stream = SampleStream([str(folder)], seed=0)
    n = len(stream)
    strict = RankBatches(stream, n, 16, 0, 1, 0, skip_bad=False)
    with pytest.raises(BadImageError, match=r"04\.png.*; fix or remove.*--skip-bad"):
        next(iter(strict))
    lenient = RankBatches(stream, n, 16, 0, 1, 0, skip_bad=True)
    batch = next(iter(lenient))
    assert batch["images"].shape == (n, 1, 16, 16)
    assert batch["n_bad"] >= 1
    assert 4 not in grey_ids(batch["images"])
    assert torch.equal(next(iter(lenient))["images"], batch["images"])  # the stand-in is deterministic
