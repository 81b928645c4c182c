"""Atomic writes: a crash or a kill mid-write never leaves a half-written file or directory under its final name.

Everything is written into a fresh temporary sibling (same file system, so the rename is atomic on POSIX),
flushed to disk, then renamed into place; on error the temporary is removed. Temporaries are created with mode
0666/0777 so the kernel applies the umask, as for any file a user writes: `tempfile.mkstemp`/`mkdtemp` would force
0600/0700 and make shared leaderboards, caches and checkpoints unreadable to the rest of a group.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def _create_unique(parent: Path, stem: str, make: Callable[[Path], object]) -> Path:
    """Create a fresh `.stem.<random>.tmp` beside the target with `make(path)` (which must fail with
    FileExistsError when the name is taken). A random name, not the pid: two threads, or two hosts sharing a file
    system, may write the same target at once."""
    while True:
        tmp = parent / f".{stem}.{secrets.token_hex(6)}.tmp"
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue


def temp_file(parent: Path, stem: str) -> Path:
    """A new empty file in `parent`, mode 0666 minus the umask."""
    return _create_unique(parent, stem,
                          lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def temp_dir(parent: Path, stem: str) -> Path:
    """A new empty directory in `parent`, mode 0777 minus the umask."""
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
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for any writer to fill (it exists, empty); on success it is flushed
    and renamed over `path`, on error it is removed."""
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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: object) -> None:
    """`obj` as indented JSON with a final newline; values JSON cannot hold (paths, dates) are written as text."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a new empty directory beside `path` to fill; on success every file in it is flushed and it is renamed
    to `path`, on error it is removed.

    An existing non-empty `path` is a FileExistsError (checked before and after filling, so a long write fails
    early and never mixes old and new files) unless `replace` is set: the old directory is then moved aside and
    deleted once the new one is in place (a re-saved checkpoint)."""
    path = Path(path)

    def refuse_non_empty() -> None:
        if not replace and path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} exists and is not an empty directory; remove it or write elsewhere")

    refuse_non_empty()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(path.parent, path.name)
    try:
        yield tmp
        for f in sorted(tmp.rglob("*"), reverse=True):  # files before the directories holding them
            fsync_path(f)
        fsync_path(tmp)
        refuse_non_empty()
        if path.is_dir() and any(path.iterdir()):  # `replace`: a directory cannot be renamed over a non-empty one
            aside = temp_dir(path.parent, path.name + ".old")
            os.rename(path, aside / "old")
            os.rename(tmp, path)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, path)  # also over an empty directory
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
