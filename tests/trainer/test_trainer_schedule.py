"""Learning-rate schedule values at chosen steps (hand-computed)."""

from __future__ import annotations

import math

import pytest

from kontrast.trainer.step.schedule import Schedule, make_schedule
from specs import params_of


def test_cosine_with_warmup():
    s = Schedule("cosine", base_lr=1.0, warmup=4, total_steps=12)
    assert [s.lr(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr(4) == 1.0                                              # cosine starts at the peak
    assert s.lr(8) == pytest.approx(0.5)                               # half way through 8 decay steps
    assert s.lr(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert s.lr(11) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))  # last step: small, > 0
    assert s.peak_lr() == 1.0 and s.warning() is None


def test_const_and_const_cooldown():
    const = Schedule("const", base_lr=2e-3, warmup=2, total_steps=10)
    assert [const.lr(i) for i in (0, 1, 2, 9)] == [1e-3, 2e-3, 2e-3, 2e-3]
    # open_clip's verified example: 8 steps, 4 of cooldown, power 2
    cool = Schedule("const-cooldown", base_lr=1e-3, warmup=0, total_steps=8, cooldown_steps=4, cooldown_power=2.0)
    assert [round(cool.lr(i), 7) for i in range(8)] == [1e-3] * 4 + [1e-3, 5.625e-4, 2.5e-4, 6.25e-5]
    linear = Schedule("const-cooldown", base_lr=1.0, warmup=0, total_steps=8, cooldown_steps=4)
    assert [linear.lr(i) for i in range(4, 8)] == [1.0, 0.75, 0.5, 0.25]


def test_skip_scheduler_is_constant_without_warmup():
    s = Schedule("cosine", base_lr=3e-4, warmup=100, total_steps=50, skip=True)
    assert {s.lr(i) for i in range(50)} == {3e-4}
    assert s.peak_lr() == 3e-4 and s.warning() is None


def test_warmup_longer_than_run_warns_with_real_peak():
    s = Schedule("cosine", base_lr=1e-3, warmup=100, total_steps=40)
    assert max(s.lr(i) for i in range(40)) == pytest.approx(4e-4) == pytest.approx(s.peak_lr())
    assert "peak is 0.0004" in s.warning() and "100 steps" in s.warning() and "40" in s.warning()


def test_make_schedule_counts_epochs_and_cooldown_epochs():
    params = params_of({"epochs": 5, "lrScheduler": "const-cooldown", "epochsCooldown": 2, "lr": 0.1,
                        "warmup": 3})
    s = make_schedule(params, steps_per_epoch=10)
    assert (s.total_steps, s.cooldown_steps, s.warmup) == (50, 20, 3)
    assert s.lr(29) == 0.1 and s.lr(30) == 0.1 and s.lr(40) == pytest.approx(0.05)
