"""The run-length encoding of CANDID-PTX masks (the SIIM-ACR pneumothorax convention).

A mask is a space-separated list of ``start length`` pairs over the pixels taken **column by column** (top to
bottom, then left to right), 0-based. Each start is **relative**: the offset from the end of the previous run
(the first one from pixel 0). Every public CANDID decoder uses a 1024 x 1024 grid whatever the DICOM size, so
masks are decoded there and then resized to the image (`resize_mask`). The string ``-1`` means "no region".
"""
from __future__ import annotations

import numpy as np

CANDID_GRID = (1024, 1024)


def rle_runs(rle: str, shape: tuple[int, int] = CANDID_GRID) -> tuple[np.ndarray, np.ndarray]:
    """RLE string -> absolute (starts, ends) of its runs in the flat column-major order, checked: raises
    ValueError when the string is malformed or a run falls outside the grid. ``-1`` or '' has no runs."""
    text = rle.strip()
    if text in ("", "-1"):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    try:
        numbers = np.array([int(t) for t in text.split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"RLE holds a non-integer token: {text[:40]!r}") from None
    if numbers.size % 2:
        raise ValueError(f"RLE has an odd number of values ({numbers.size}); it must be start/length pairs")
    rel_starts, lengths = numbers[0::2], numbers[1::2]
    if (rel_starts < 0).any() or (lengths <= 0).any():
        raise ValueError("RLE has a negative start or a non-positive run length")
    # Absolute start of run k = its relative start + everything consumed before it (starts and lengths).
    ends = np.cumsum(rel_starts + lengths)
    if ends[-1] > shape[0] * shape[1]:
        raise ValueError(f"RLE runs reach pixel {int(ends[-1])}, beyond the {shape[0]}x{shape[1]} grid")
    return ends - lengths, ends


def rle_decode(rle: str, shape: tuple[int, int] = CANDID_GRID) -> np.ndarray:
    """RLE string -> bool [H, W] (see `rle_runs` for the checks)."""
    height, width = shape
    starts, ends = rle_runs(rle, shape)
    edges = np.zeros(height * width + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    flat = np.cumsum(edges[:-1]) > 0
    # Column-major enumeration: the flat vector is the transposed image read row by row.
    return flat.reshape(width, height).T


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to `shape`, sampling at pixel centres so that a resize to the
    same shape is the identity and the mask stays aligned with the image it is stretched over."""
    height, width = shape
    if mask.shape == (height, width):
        return mask
    rows = ((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.int64)
    return mask[rows[:, None], cols[None, :]]
