"""harness.common.atomic: files and directories appear whole under their final name or not at all, with the
modes the umask gives."""
import json
import os
import stat

import pytest

from harness.common.atomic import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from harness.splits import write_split


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writers_use_the_umask_mode(tmp_path, umask_022):
    # Leaderboards, results and split files are shared with other users: 0644 under umask 022, as `open` gives.
    atomic_write_text(tmp_path / "board.md", "x")
    atomic_write_json(tmp_path / "res.json", {"a": 1})
    atomic_write_bytes(tmp_path / "blob.bin", b"\0\1")
    write_split(tmp_path / "split.csv", "t", ["i1", "i2"], ["p1", "p2"], ["train", "test"])
    with atomic_path(tmp_path / "pred.parquet") as tmp:
        tmp.write_bytes(b"1")
    for name in ("board.md", "res.json", "blob.bin", "split.csv", "pred.parquet"):
        assert _mode(tmp_path / name) == 0o644, name
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "a").write_text("1")
    assert _mode(tmp_path / "ckpt") == 0o755


def test_atomic_writers_follow_a_stricter_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "board.md", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "board.md") == 0o600


def test_contents_round_trip_and_replace_the_old_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    atomic_write_text(tmp_path / "a.txt", "new ü")
    assert (tmp_path / "a.txt").read_text() == "new ü"
    atomic_write_bytes(tmp_path / "sub" / "b.bin", bytes(range(256)))  # the parent folder is created
    assert (tmp_path / "sub" / "b.bin").read_bytes() == bytes(range(256))
    atomic_write_json(tmp_path / "c.json", {"path": tmp_path, "n": [1, 2]})
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == {"path": str(tmp_path), "n": [1, 2]} and text.endswith("}\n")


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_never_exposes_a_half_file(tmp_path):
    atomic_write_text(tmp_path / "a.json", '{"complete": true}\n')

    class Unserialisable:
        def __repr__(self) -> str:
            raise RuntimeError("serialiser died half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        atomic_write_json(tmp_path / "a.json", {"ok": 1, "bad": Unserialisable()})
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text('{"comp')
            raise RuntimeError("killed")
    assert (tmp_path / "a.json").read_text() == '{"complete": true}\n'  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]            # and no temporary beside it


def test_atomic_dir_refuses_a_non_empty_target_before_and_after(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        with atomic_dir(out):
            pytest.fail("the body must not run: the refusal comes before any work")
    empty, late = tmp_path / "empty", tmp_path / "late"
    empty.mkdir()
    with atomic_dir(empty) as tmp:  # an empty directory is taken over
        (tmp / "f").write_text("1")
    assert (empty / "f").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_dir(late) as tmp:
            (tmp / "f").write_text("new")
            late.mkdir()  # another writer got there while this one was writing
            (late / "theirs").write_text("1")
    assert [p.name for p in late.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "late", "out"]


def test_atomic_dir_replace_and_failure(tmp_path):
    ckpt = tmp_path / "ckpt"
    with atomic_dir(ckpt, replace=True) as tmp:
        (tmp / "state.json").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
    with atomic_dir(ckpt, replace=True) as tmp:
        (tmp / "state.json").write_text("2")
    assert [p.name for p in ckpt.iterdir()] == ["state.json"] and (ckpt / "state.json").read_text() == "2"
    with pytest.raises(RuntimeError):
        with atomic_dir(ckpt, replace=True) as tmp:
            (tmp / "state.json").write_text("3")
            raise RuntimeError("killed")
    assert (ckpt / "state.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # neither the new temporary nor the old one left
