"""Two-stage learning-rate and weight-decay schedules pinned at their landmarks."""

import numpy as np
import pytest

from bitnet_jax.config import from_dict
from bitnet_jax.schedules import learning_rate_schedule, stage, weight_decay_schedule

T, W, S = 1000, 100, 500
P1, P2 = 1.5e-3, 1.0e-3


def _cfg(lr_shape="linear", wd_shape="constant", min_lr=0.0):
    return from_dict({"train": {"steps": T}, "optim": {
        "peak_lr_1": P1, "peak_lr_2": P2, "warmup_steps": W, "stage_switch": S, "lr_shape": lr_shape,
        "wd_shape": wd_shape, "weight_decay": 0.1, "min_lr": min_lr}})


def _at(fn, t):
    return float(fn(t))


def approx(v, rel=1e-5):
    return pytest.approx(v, rel=rel, abs=1e-12)


def test_linear_lr_landmarks():
    lr = learning_rate_schedule(_cfg())
    assert _at(lr, 0) == 0.0
    assert _at(lr, W // 2) == approx(P1 / 2)
    assert _at(lr, W) == approx(P1)  # end of warm-up: the peak
    assert _at(lr, S - 1) == approx(P1 * (T - (S - 1)) / (T - W))
    assert _at(lr, S) == approx(P2 * (T - S) / (T - W))  # abrupt drop at the switch
    assert _at(lr, T - 1) == approx(P2 * 1 / (T - W))
    assert _at(lr, T) == approx(0.0)


def test_cosine_lr_landmarks():
    lr = learning_rate_schedule(_cfg(lr_shape="cosine", min_lr=1e-5))
    p = lambda t: (t - W) / (T - W)
    cos = lambda t: 0.5 * (1 + np.cos(np.pi * p(t)))
    assert _at(lr, 0) == 0.0
    assert _at(lr, W) == approx(P1)
    assert _at(lr, S - 1) == approx(1e-5 + (P1 - 1e-5) * cos(S - 1), rel=1e-5)
    assert _at(lr, S) == approx(1e-5 + (P2 - 1e-5) * cos(S), rel=1e-5)
    assert _at(lr, T - 1) == approx(1e-5 + (P2 - 1e-5) * cos(T - 1), rel=1e-4)
    assert _at(lr, T) == approx(1e-5)


def test_constant_weight_decay_two_stages():
    wd = weight_decay_schedule(_cfg())
    for t in (0, W, S - 1):
        assert _at(wd, t) == approx(0.1)
    for t in (S, T - 1):
        assert _at(wd, t) == 0.0


def test_cosine_weight_decay():
    wd = weight_decay_schedule(_cfg(wd_shape="cosine"))
    assert _at(wd, 0) == approx(0.1)
    assert _at(wd, S // 2) == approx(0.05, rel=1e-5)
    assert _at(wd, S - 1) == approx(0.1 * 0.5 * (1 + np.cos(np.pi * (S - 1) / S)), rel=1e-4)
    assert _at(wd, S) == 0.0 and _at(wd, T - 1) == 0.0


def test_stage_switch_defaults_to_half_and_stage_numbers():
    cfg = from_dict({"train": {"steps": 60000}, "optim": {"warmup_steps": 375}})
    assert cfg.stage_switch == 30000
    assert int(stage(cfg, 29999)) == 1 and int(stage(cfg, 30000)) == 2
