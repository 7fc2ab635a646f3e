"""AdamW, clipping and the schedule against their closed forms."""

import math

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from assertions import assert_close, assert_differ, assert_same
from npllama import optim
from strategies import rng_from, seeds


def params_and_grads(seed, scale=1.0):
    rng = rng_from(seed)
    params = {"w.weight": rng.standard_normal((3, 4)), "norm.weight": rng.standard_normal(4)}
    grads = {name: scale * rng.standard_normal(p.shape) for name, p in params.items()}
    return params, grads


@given(seed=seeds, lr=st.floats(1e-5, 1e-1), weight_decay=st.sampled_from([0.0, 0.1, 0.5]))
def test_first_adamw_step_equals_its_closed_form(seed, lr, weight_decay):
    """At t = 1 bias correction gives m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps)."""
    params, grads = params_and_grads(seed, scale=1e-2)  # small gradients: clipping stays off
    before = {name: p.copy() for name, p in params.items()}
    config = optim.AdamWConfig(weight_decay=weight_decay)
    state = optim.init_state(params)
    stats = optim.step(params, grads, state, lr, config)
    assert stats["clip"] == 1.0
    for name, p in params.items():
        g = grads[name]
        decay = weight_decay if before[name].ndim >= 2 else 0.0  # norm gains are not decayed
        expected = before[name] * (1 - lr * decay) - lr * g / (numpy.abs(g) + config.eps)
        assert_close(p, expected, rtol=1e-12, atol=1e-15)


def test_second_adamw_step_equals_its_closed_form():
    params, grads1 = params_and_grads(0, scale=1e-2)
    _, grads2 = params_and_grads(1, scale=1e-2)
    p0 = params["w.weight"].copy()
    config = optim.AdamWConfig()
    state = optim.init_state(params)
    optim.step(params, grads1, state, 1e-3, config)
    p1 = params["w.weight"].copy()
    optim.step(params, grads2, state, 2e-3, config)
    b1, b2 = config.betas
    g1, g2 = grads1["w.weight"], grads2["w.weight"]
    m = (1 - b1) * (b1 * g1 + g2)
    v = (1 - b2) * (b2 * g1**2 + g2**2)
    m_hat, v_hat = m / (1 - b1**2), v / (1 - b2**2)
    expected = p1 * (1 - 2e-3 * config.weight_decay) - 2e-3 * m_hat / (numpy.sqrt(v_hat) + config.eps)
    assert_close(params["w.weight"], expected, rtol=1e-12)
    assert_differ(p0, p1)


def test_clipping_scales_every_gradient_by_one_global_factor():
    params, grads = params_and_grads(2, scale=10.0)
    norm = math.sqrt(sum((g**2).sum() for g in grads.values()))
    state = optim.init_state(params)
    stats = optim.step(params, grads, state, 1e-3, optim.AdamWConfig(grad_clip=1.0))
    assert_close(stats["grad_norm"], norm, rtol=1e-12)
    assert_close(stats["clip"], 1.0 / (norm + 1e-6), rtol=1e-12)
    assert_close(state.m["w.weight"], 0.1 * grads["w.weight"] * stats["clip"], rtol=1e-12)


def test_step_does_not_modify_the_gradients():
    params, grads = params_and_grads(3, scale=10.0)
    copies = {name: g.copy() for name, g in grads.items()}
    optim.step(params, grads, optim.init_state(params), 1e-3)
    for name in grads:
        assert_same(grads[name], copies[name])


def test_paper_defaults():
    config = optim.AdamWConfig()
    assert (config.betas, config.weight_decay, config.grad_clip) == ((0.9, 0.95), 0.1, 1.0)
    assert optim.CosineSchedule(3e-4, 10_000).warmup == 2000


@given(peak=st.floats(1e-5, 1.0), warmup=st.integers(1, 50), decay=st.integers(1, 200))
def test_schedule_warms_up_linearly_then_decays_by_cosine_to_ten_percent(peak, warmup, decay):
    schedule = optim.CosineSchedule(peak, warmup + decay, warmup)
    assert schedule(0) == pytest.approx(peak / warmup)
    assert schedule(warmup - 1) == pytest.approx(peak)
    assert schedule(warmup) == pytest.approx(peak)
    assert schedule(warmup + decay) == pytest.approx(0.1 * peak)
    assert schedule(warmup + decay + 100) == pytest.approx(0.1 * peak)
    halfway = warmup + decay / 2
    if halfway == int(halfway):
        assert schedule(int(halfway)) == pytest.approx(0.55 * peak)
    lrs = [schedule(s) for s in range(warmup + decay + 1)]
    assert all(a <= b + 1e-15 for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b - 1e-15 for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
