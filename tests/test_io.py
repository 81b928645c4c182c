import os
import stat

import pytest

from harness.io import atomic_path, atomic_write_json, atomic_write_text
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
    write_split(tmp_path / "split.csv", "t", ["i1", "i2"], ["p1", "p2"], ["train", "test"])
    with atomic_path(tmp_path / "pred.parquet") as tmp:
        tmp.write_bytes(b"1")
    for name in ("board.md", "res.json", "split.csv", "pred.parquet"):
        assert _mode(tmp_path / name) == 0o644, name


def test_atomic_writers_follow_a_stricter_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "board.md", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "board.md") == 0o600


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
