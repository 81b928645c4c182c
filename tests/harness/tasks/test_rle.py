"""The CANDID-PTX run-length encoding (column-major, relative starts) and the mask resize."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from harness.tasks.rle import resize_mask, rle_decode, rle_runs

# Worked by hand: columns read top to bottom are [0 0 1], [1 1 0], [0 0 0], [0 1 1] -> flat
# 0 0 1 1 1 0 0 0 0 0 1 1: a run at 2 of length 3, then one at 10 = 5 + 5 (relative to the end, 5) of length 2.
SMALL = np.array([[0, 1, 0, 0],
                  [0, 1, 0, 1],
                  [1, 0, 0, 1]], dtype=bool)
SMALL_RLE = "2 3 5 2"


def rle_encode(mask: np.ndarray) -> str:
    """bool [H, W] -> RLE string in the convention `rle_decode` reads (an empty mask encodes as ``-1``, as in the
    CSVs): the inverse the round-trip tests check the decoder against."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    if changes.size == 0:
        return "-1"
    starts, ends = changes[0::2], changes[1::2]
    previous_ends = np.concatenate([[0], ends[:-1]])
    pairs = np.stack([starts - previous_ends, ends - starts], axis=1).reshape(-1)
    return " ".join(str(int(v)) for v in pairs)


def test_hand_worked_example_both_ways():
    assert rle_encode(SMALL) == SMALL_RLE
    np.testing.assert_array_equal(rle_decode(SMALL_RLE, SMALL.shape), SMALL)


def test_orientation_is_column_major_on_a_non_square_grid():
    # A run of 2 from pixel 0 covers the first two rows of column 0, not the first two columns of row 0.
    m = rle_decode("0 2", (3, 5))
    assert m[0, 0] and m[1, 0] and not m[0, 1] and m.sum() == 2


def test_negative_and_empty():
    assert not rle_decode("-1").any() and rle_decode("-1").shape == (1024, 1024)
    assert not rle_decode(" ", (4, 4)).any()
    assert rle_encode(np.zeros((8, 8), dtype=bool)) == "-1"


def test_run_to_the_last_pixel_is_kept():
    m = np.zeros((4, 4), dtype=bool)
    m[2:, 3] = True  # the last two pixels in column-major order
    assert rle_encode(m) == "14 2"
    np.testing.assert_array_equal(rle_decode("14 2", (4, 4)), m)


@pytest.mark.parametrize("bad", ["1 2 3", "a 2", "-2 3", "0 0", "10 7"])
def test_malformed_strings_raise(bad):
    with pytest.raises(ValueError):
        rle_runs(bad, (4, 4))


@settings(max_examples=200, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 24), st.integers(1, 24))))
def test_round_trip_small_grids(mask):
    text = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(text, mask.shape), mask)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1023), st.integers(1, 300), st.integers(0, 1023), st.integers(1, 300)),
                max_size=4))
def test_round_trip_on_the_candid_grid(rects):
    mask = np.zeros((1024, 1024), dtype=bool)
    for r, h, c, w in rects:
        mask[r:r + h, c:c + w] = True
    text = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(text), mask)
    # Every start is relative: none exceeds the grid, and the values sum to the end of the last run.
    values = [int(v) for v in text.split()] if text != "-1" else []
    assert sum(values) <= 1024 * 1024


def test_resize_mask_identity_and_nearest():
    m = np.eye(4, dtype=bool)
    assert resize_mask(m, (4, 4)) is m
    up = resize_mask(m, (8, 8))
    np.testing.assert_array_equal(up, np.kron(np.eye(4), np.ones((2, 2))).astype(bool))
    np.testing.assert_array_equal(resize_mask(up, (4, 4)), m)
