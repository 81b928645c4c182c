"""Atomic file writes: a crash or a kill mid-write never leaves a half-written cache entry or leaderboard."""
from __future__ import annotations

import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _create_unique(parent: Path, stem: str, make) -> Path:
    """Create a fresh `.stem.<random>.tmp` beside the target with `make(path)` (which must fail with
    FileExistsError when the name is taken)."""
    while True:
        tmp = parent / f".{stem}.{secrets.token_hex(6)}.tmp"
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue


def temp_file(parent: Path, stem: str) -> Path:
    """A new empty file in `parent`. Created with mode 0666 so the kernel applies the umask, as for any file a
    user writes (tempfile.mkstemp would force 0600 and make shared leaderboards and caches unreadable)."""
    return _create_unique(parent, stem,
                          lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def temp_dir(parent: Path, stem: str) -> Path:
    """A new empty directory in `parent`, mode 0777 minus the umask (tempfile.mkdtemp would force 0700)."""
    return _create_unique(parent, stem, lambda p: os.mkdir(p, 0o777))


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk, so a rename after it cannot expose an entry
    whose bytes are lost in a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed to disk and renamed over `path` (atomic on
    POSIX), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path.parent, path.name)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def safe_name(s: str) -> str:
    """A file-name-safe version of a task or model name (``ckpt:/runs/a`` -> ``ckpt_runs_a``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")
