"""Schedules (facebookresearch/dinov2 dinov2/utils/utils.py, dinov2/train/train.py): values at known iterations,
written from the formulas by hand."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from trainer.config import load_config
from trainer.schedules import Schedules, cosine_schedule, teacher_temp_schedule


def test_cosine_without_warmup():
    s = cosine_schedule(1.0, 0.0, total_iters=10)
    assert len(s) == 10
    assert s[0] == pytest.approx(1.0)
    assert s[5] == pytest.approx(0.5)                                   # half-way: the mean of base and final
    assert s[9] == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))  # one step short of final
    assert (np.diff(s) < 0).all()


def test_linear_warmup_then_cosine():
    s = cosine_schedule(2.0, 0.5, total_iters=10, warmup_iters=4, start_warmup=0.2)
    np.testing.assert_allclose(s[:4], [0.2, 0.8, 1.4, 2.0])
    assert s[4] == pytest.approx(2.0)
    assert s[7] == pytest.approx(0.5 + 0.75)  # cosine over 6 steps, step 3 is its midpoint


def test_increasing_weight_decay():
    s = cosine_schedule(0.04, 0.4, total_iters=100)
    assert s[0] == pytest.approx(0.04) and s[50] == pytest.approx(0.22)
    assert (np.diff(s) > 0).all() and s[-1] < 0.4


def test_teacher_temperature_warms_up_linearly_then_stays():
    s = teacher_temp_schedule(final=0.07, start=0.04, warmup_iters=31, total_iters=100)
    assert s[0] == pytest.approx(0.04) and s[15] == pytest.approx(0.055) and s[30] == pytest.approx(0.07)
    np.testing.assert_allclose(s[30:], 0.07)
    short = teacher_temp_schedule(final=0.07, start=0.04, warmup_iters=31, total_iters=16)
    np.testing.assert_allclose(short, s[:16])  # a run shorter than the warm-up does not compress it


def test_from_config_lays_out_all_five_arrays():
    optim = replace(load_config("rad-dino").optim, total_iters=200, min_lr=1e-6, warmup_iters=20, weight_decay=0.04,
                    weight_decay_end=0.4, freeze_last_layer_iters=10, momentum_teacher=0.992,
                    final_momentum_teacher=1.0, teacher_temp=0.07, warmup_teacher_temp=0.04,
                    warmup_teacher_temp_iters=60)
    s = Schedules.from_config(optim, peak_lr=1e-3)
    for arr in (s.lr, s.wd, s.momentum, s.teacher_temp, s.last_layer_lr):
        assert arr.shape == (200,)
    assert s.lr[0] == 0.0 and s.lr[19] == pytest.approx(1e-3) and s.lr.max() == pytest.approx(1e-3)
    assert s.lr[20 + 90] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # cosine midpoint of 180 steps
    np.testing.assert_array_equal(s.last_layer_lr[:10], 0.0)
    np.testing.assert_array_equal(s.last_layer_lr[10:], s.lr[10:])
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[100] == pytest.approx(0.996)
    assert s.wd[100] == pytest.approx(0.22)
    assert s.teacher_temp[59] == pytest.approx(0.07) and s.teacher_temp[0] == pytest.approx(0.04)
    assert s.at(10) == {"lr": s.lr[10], "wd": s.wd[10], "momentum": s.momentum[10],
                        "teacher_temp": s.teacher_temp[10], "last_layer_lr": s.last_layer_lr[10]}
    assert s.at(10_000) == s.at(199)


def test_warmup_longer_than_the_run_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="optim.warmup_iters"):
        Schedules.from_config(replace(load_config("rad-dino").optim, total_iters=10, warmup_iters=20), peak_lr=1e-3)
    with pytest.raises(ValueError, match="warmup_iters"):
        cosine_schedule(1.0, 0.0, total_iters=5, warmup_iters=6)
