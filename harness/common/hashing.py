"""sha256 hex digests of bytes, text, files and arrays: the one definition behind every cache key, content digest,
weights digest and pseudonym, so two places that digest the same thing always agree."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np

#: Files are read in blocks of this size: hashing a multi-GB weights file never holds it in memory.
CHUNK = 1 << 20


def sha256_chunks(chunks: Iterable[bytes]) -> str:
    """Digest of the concatenation of `chunks`, fed one at a time (a record format is the caller's: separators
    between fields are part of what it passes)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    """Digest of `text` encoded as UTF-8."""
    return sha256_bytes(text.encode())


def _blocks(paths: Iterable[str | Path]) -> Iterable[bytes]:
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(CHUNK):
                yield block


def sha256_files(paths: Iterable[str | Path]) -> str:
    """Digest of several files' bytes back to back, in the order given (their names are not part of it)."""
    return sha256_chunks(_blocks(paths))


def sha256_file(path: str | Path) -> str:
    return sha256_files([path])


def array_digest(*arrays: np.ndarray) -> str:
    """Digest of arrays' dtypes, shapes and bytes (a cache-key part for data that has no name of its own)."""
    return sha256_arrays((f"{a.dtype.str}{a.shape}", a) for a in map(np.asarray, arrays))


def sha256_arrays(named: Iterable[tuple[str, np.ndarray]]) -> str:
    """Digest of each name (UTF-8) followed by its array's bytes in C order, in the order given (sort the items
    for a digest that does not depend on insertion order). Shape and dtype are not part of it."""
    return sha256_chunks(part for name, a in named for part in (name.encode(), np.ascontiguousarray(a).tobytes()))
