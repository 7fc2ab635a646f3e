"""AdamW, clipping and the schedule against their closed forms."""

import math

import numpy
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from assertions import assert_close, assert_same
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


@given(seed=seeds, scales=st.lists(st.sampled_from([1e-2, 10.0]), min_size=1, max_size=4),
       lr=st.floats(1e-5, 1e-2), weight_decay=st.sampled_from([0.0, 0.1]), grad_clip=st.sampled_from([1.0, 0.5, 0.0]))
@example(seed=1, scales=[10.0, 10.0], lr=2e-3, weight_decay=0.1, grad_clip=1.0)  # clipped at both steps
@example(seed=1, scales=[1e-2, 10.0, 1e-2], lr=2e-3, weight_decay=0.1, grad_clip=1.0)  # clipped only at step 2
def test_adamw_after_t_steps_equals_its_closed_form_with_each_steps_clip(seed, scales, lr, weight_decay, grad_clip):
    """With c_k = min(1, clip / (|G_k| + 1e-6)) the global clip factor of step k (1 with clip 0):
    m_t = sum_k (1 - b1) b1^(t-k) c_k g_k and v_t = sum_k (1 - b2) b2^(t-k) (c_k g_k)^2 (clipping scales
    the gradient, so v sees c_k^2), and p_t = p_{t-1} (1 - lr wd) - lr m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t))
    + eps), matrices decayed and norm gains not. The scales put |G_k| far below and far above the clip."""
    rng = rng_from(seed)
    params = {"w.weight": rng.standard_normal((3, 4)), "norm.weight": rng.standard_normal(4)}
    expected = {name: p.copy() for name, p in params.items()}
    config = optim.AdamWConfig(weight_decay=weight_decay, grad_clip=grad_clip)
    (b1, b2), state = config.betas, optim.init_state(params)
    history = []
    for t, scale in enumerate(scales, start=1):
        grads = {name: scale * rng.standard_normal(p.shape) for name, p in params.items()}
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
        clip = min(1.0, grad_clip / (norm + 1e-6)) if grad_clip else 1.0
        history.append((clip, grads))
        stats = optim.step(params, grads, state, lr, config)
        assert_close(stats["clip"], clip, rtol=1e-12)
        for name in params:
            m = sum((1 - b1) * b1 ** (t - k) * c * g[name] for k, (c, g) in enumerate(history, start=1))
            v = sum((1 - b2) * b2 ** (t - k) * (c * g[name]) ** 2 for k, (c, g) in enumerate(history, start=1))
            decay = weight_decay if params[name].ndim >= 2 else 0.0
            expected[name] = (expected[name] * (1 - lr * decay)
                              - lr * (m / (1 - b1**t)) / (numpy.sqrt(v / (1 - b2**t)) + config.eps))
            # m sums terms of both signs: its error is rounding of the terms' size, not of m's
            size = sum((1 - b1) * b1 ** (t - k) * abs(c * g[name]) for k, (c, g) in enumerate(history, start=1))
            assert numpy.all(numpy.abs(state.m[name] - m) <= 1e-12 * size)
            assert_close(state.v[name], v, rtol=1e-12, atol=1e-300)
            # the update, lr |m_hat| / sqrt(v_hat) with |m_hat| / sqrt(v_hat) of order 1, carries m's rounding
            assert_close(params[name], expected[name], rtol=1e-12, atol=1e-12 * lr)


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
