"""Properties a reader of the paper would check, beyond gradients."""

import math

import numpy
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from assertions import assert_close, assert_differ, assert_finite, assert_same
from npllama.ops import attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu
from strategies import (
    attention_problems,
    batch_sizes,
    grouped_attention_problems,
    head_counts,
    head_dims,
    model_dims,
    rng_from,
    seeds,
    seq_lens,
    softmax_scales,
)

# float64 results that differ only by the order of a few additions agree to ~1e-15 relative;
# 1e-12 allows for the longer sums of tiled attention while catching any real difference.
FLOAT64_TOL = 1e-12


# --- attention --------------------------------------------------------------------------------

@given(problem=attention_problems(), softmax_scale=softmax_scales, seed=seeds)
def test_tiled_attention_equals_naive_softmax_attention_for_every_tile_size(problem, softmax_scale, seed):
    batch, heads, seq, head_dim, _ = problem
    rng = rng_from(seed)
    q, k, v = (rng.standard_normal((batch, heads, seq, head_dim)) for _ in range(3))
    expected_out, expected_lse = attention.naive_forward(q, k, v, scale=softmax_scale)
    for tile_size in range(1, seq + 2):
        out, cache = attention.forward(q, k, v, tile_size, scale=softmax_scale)
        assert_close(out, expected_out, rtol=FLOAT64_TOL, atol=FLOAT64_TOL)
        assert_close(cache.lse, expected_lse, rtol=FLOAT64_TOL, atol=FLOAT64_TOL)


@given(problem=attention_problems(), softmax_scale=softmax_scales, seed=seeds)
def test_attention_gradients_do_not_depend_on_tile_size(problem, softmax_scale, seed):
    batch, heads, seq, head_dim, tile_size = problem
    rng = rng_from(seed)
    q, k, v, dout = (rng.standard_normal((batch, heads, seq, head_dim)) for _ in range(4))
    # one tile: no tiling
    reference = attention.backward(dout, attention.forward(q, k, v, seq, scale=softmax_scale)[1])
    tiled = attention.backward(dout, attention.forward(q, k, v, tile_size, scale=softmax_scale)[1])
    for expected, got in zip(reference, tiled):
        assert_close(got, expected, rtol=1e-10, atol=1e-12)


@given(seq=st.integers(2, 19), n_cached=st.integers(0, 18), head_dim=head_dims, seed=seeds,
       tile_size=st.integers(1, 8))
def test_attention_with_fewer_queries_than_keys_equals_the_last_rows_of_full_attention(
        seq, n_cached, head_dim, seed, tile_size):
    """Decoding with a KV cache: the last queries see every earlier key, nothing later."""
    n_cached = min(n_cached, seq - 1)
    rng = rng_from(seed)
    q, k, v = (rng.standard_normal((2, 2, seq, head_dim)) for _ in range(3))
    full, _ = attention.forward(q, k, v, tile_size)
    last, _ = attention.forward(q[:, :, n_cached:], k, v, tile_size)
    assert_close(last, full[:, :, n_cached:], rtol=FLOAT64_TOL, atol=FLOAT64_TOL)


@given(problem=attention_problems(), position=st.integers(0, 17), seed=seeds)
def test_attention_is_causal(problem, position, seed):
    """Changing keys and values after position t changes no output at or before t (and does change later ones)."""
    batch, heads, seq, head_dim, tile_size = problem
    seq = max(seq, 2)
    position = min(position, seq - 2)  # at least one position after t to change
    rng = rng_from(seed)
    q, k, v = (rng.standard_normal((batch, heads, seq, head_dim)) for _ in range(3))
    out, _ = attention.forward(q, k, v, tile_size)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, position + 1:] += 10 * rng.standard_normal(k2[:, :, position + 1:].shape)
    v2[:, :, position + 1:] += 10 * rng.standard_normal(v2[:, :, position + 1:].shape)
    out2, _ = attention.forward(q, k2, v2, tile_size)
    assert_same(out2[:, :, :position + 1], out[:, :, :position + 1])
    assert_differ(out2[:, :, position + 1:], out[:, :, position + 1:])


@given(problem=grouped_attention_problems(), seed=seeds)
def test_grouped_query_attention_equals_multi_head_attention_over_repeated_key_value_heads(problem, seed):
    """Sharing a key/value head among G query heads is attention with that head copied G times;
    its gradients are the copies' gradients summed over the group."""
    batch, n_kv_heads, group, seq, head_dim, tile_size = problem
    rng = rng_from(seed)
    q, dout = (rng.standard_normal((batch, n_kv_heads * group, seq, head_dim)) for _ in range(2))
    k, v = (rng.standard_normal((batch, n_kv_heads, seq, head_dim)) for _ in range(2))
    k_copies, v_copies = numpy.repeat(k, group, axis=1), numpy.repeat(v, group, axis=1)
    out, cache = attention.forward(q, k, v, tile_size)
    expected_out, expected_cache = attention.forward(q, k_copies, v_copies, tile_size)
    assert_close(out, expected_out, rtol=FLOAT64_TOL, atol=FLOAT64_TOL)
    assert_close(cache.lse, expected_cache.lse, rtol=FLOAT64_TOL, atol=FLOAT64_TOL)
    dq, dk, dv = attention.backward(dout, cache)
    expected_dq, dk_copies, dv_copies = attention.backward(dout, expected_cache)
    assert dk.shape == k.shape and dv.shape == v.shape
    assert_close(dq, expected_dq, rtol=FLOAT64_TOL, atol=FLOAT64_TOL)
    for got, copies in ((dk, dk_copies), (dv, dv_copies)):
        assert_close(got, copies.reshape(batch, n_kv_heads, group, seq, head_dim).sum(axis=2),
                     rtol=FLOAT64_TOL, atol=FLOAT64_TOL)


@pytest.mark.parametrize("q_shape, kv_shape", [((1, 3, 4, 2), (1, 2, 4, 2)), ((1, 2, 4, 2), (2, 1, 4, 2)),
                                               ((1, 2, 4, 2), (1, 1, 4, 4))])
def test_attention_refuses_key_value_heads_that_do_not_divide_the_query_heads(q_shape, kv_shape):
    q, k = numpy.zeros(q_shape), numpy.zeros(kv_shape)
    with pytest.raises(ValueError, match="do not fit"):
        attention.forward(q, k, k)


def test_attention_keeps_float32_in_float32():
    rng = rng_from(0)
    q, k, v = (rng.standard_normal((1, 2, 5, 4)).astype(numpy.float32) for _ in range(3))
    out, cache = attention.forward(q, k, v, 2)
    assert out.dtype == numpy.float32 and cache.lse.dtype == numpy.float32
    assert all(g.dtype == numpy.float32 for g in attention.backward(out, cache))


# --- rope -------------------------------------------------------------------------------------

@given(batch=batch_sizes, seq=seq_lens, heads=head_counts, head_dim=head_dims, seed=seeds)
def test_rope_preserves_the_norm_of_every_pair(batch, seq, heads, head_dim, seed):
    rng = rng_from(seed)
    x = rng.standard_normal((batch, seq, heads, head_dim))
    cos, sin = rope.frequencies(head_dim, numpy.arange(seq))
    y, _ = rope.forward(x, cos, sin)
    def pair_norms(a):
        return numpy.hypot(a[..., 0::2], a[..., 1::2])

    assert_close(pair_norms(y), pair_norms(x), rtol=FLOAT64_TOL)


@given(head_dim=head_dims, m=st.integers(0, 4096), n=st.integers(0, 4096), shift=st.integers(-2000, 2000),
       seed=seeds)
def test_rope_dot_product_depends_only_on_relative_position(head_dim, m, n, shift, seed):
    """<rope(q, m), rope(k, n)> = <rope(q, m + s), rope(k, n + s)> for any shift s."""
    shift = max(shift, -min(m, n))
    rng = rng_from(seed)
    q, k = (rng.standard_normal((1, 1, 1, head_dim)) for _ in range(2))

    def rotated_dot(pos_q, pos_k):
        cos_q, sin_q = rope.frequencies(head_dim, numpy.array([pos_q]))
        cos_k, sin_k = rope.frequencies(head_dim, numpy.array([pos_k]))
        return float((rope.forward(q, cos_q, sin_q)[0] * rope.forward(k, cos_k, sin_k)[0]).sum())

    # angles up to ~6000 rad are rounded to ~1e-12 rad, so dot products agree to ~1e-11 * |q||k|
    scale = numpy.linalg.norm(q) * numpy.linalg.norm(k)
    assert abs(rotated_dot(m, n) - rotated_dot(m + shift, n + shift)) <= 1e-10 * scale


def test_rope_uses_meta_interleaved_pairs():
    """Position 1, head_dim 4: pair (0, 1) turns by 1 rad, pair (2, 3) by theta^(-1/2) rad."""
    x = numpy.array([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 1, 4)
    cos, sin = rope.frequencies(4, numpy.array([1]), theta=10000.0)
    y, _ = rope.forward(x, cos, sin)
    expected = [math.cos(1.0), math.sin(1.0), math.cos(0.01), math.sin(0.01)]
    assert_close(y.reshape(-1), expected, rtol=1e-15)


# --- rmsnorm ----------------------------------------------------------------------------------

@given(batch=batch_sizes, dim=st.integers(2, 24), factor=st.floats(1e-2, 1e3), seed=seeds)
def test_rmsnorm_is_invariant_to_input_scale(batch, dim, factor, seed):
    rng = rng_from(seed)
    x = rng.standard_normal((batch, 3, dim))
    weight = rng.standard_normal(dim)
    eps = 0.0  # with eps = 0 the invariance is exact; eps only guards x = 0
    assert_close(rmsnorm.forward(factor * x, weight, eps)[0], rmsnorm.forward(x, weight, eps)[0],
                                  rtol=1e-12)


def test_rmsnorm_output_has_unit_rms_before_the_gain():
    x = rng_from(3).standard_normal((4, 16)) * 7
    y, _ = rmsnorm.forward(x, numpy.ones(16), 0.0)
    assert_close(numpy.sqrt((y * y).mean(-1)), 1.0, rtol=1e-14)


def test_rmsnorm_statistics_do_not_overflow_in_float16():
    """Squares of 1e3 overflow float16 (max 65504); the statistics run in float32."""
    x = numpy.full((1, 8), 1000.0, dtype=numpy.float16)
    y, _ = rmsnorm.forward(x, numpy.ones(8, dtype=numpy.float16), 1e-6)
    assert y.dtype == numpy.float16
    assert_close(y.astype(float), 1.0, rtol=1e-3)


FLOAT16_MAX = 65504.0


FLOAT16_ROUNDING = 2.0**-11  # unit roundoff of float16 (11 significant bits)
FLOAT16_SUBNORMAL_ROUNDING = 2.0**-25  # half the spacing of float16's subnormals


@st.composite
def loss_scaled_float16_rmsnorm_problems(draw):
    """(x, g, dy) in float16 as loss-scaled training makes them: large inputs (r = 1/rms(x) small),
    gains up to 60 and incoming gradients up to 3e4. One entry always has dy * g = 2000 * 60 =
    1.2e5, beyond float16's 65504, while dx = r * (...) stays far inside it."""
    rng = rng_from(draw(seeds))
    rows, dim = draw(st.integers(1, 3)), draw(st.integers(2, 32))
    x_scale, gain_scale, dy_scale = (draw(st.sampled_from(s)) for s in ([10.0, 1e2, 1e3], [1.0, 30.0], [1.0, 1e3]))
    x = x_scale * rng.standard_normal((rows, dim))
    gain = gain_scale * rng.uniform(0.5, 1.5, dim)
    dy = numpy.clip(dy_scale * rng.standard_normal((rows, dim)), -3e4, 3e4)
    overflowing = draw(st.integers(0, dim - 1))
    gain[overflowing], dy[0, overflowing] = 60.0, draw(st.sampled_from([-2000.0, 2000.0]))
    return tuple(a.astype(numpy.float16) for a in (x, gain, dy))


def float64_rmsnorm_backward(x, gain, dy, eps):
    y, cache = rmsnorm.forward(x.astype(numpy.float64), gain.astype(numpy.float64), eps)
    return rmsnorm.backward(dy.astype(numpy.float64), cache)


@given(problem=loss_scaled_float16_rmsnorm_problems())
def test_rmsnorm_backward_in_float16_equals_float64_to_float16_precision(problem):
    """The backward runs in float32 whatever the input dtype: float16 in, float16 out, no overflow
    of the intermediate products, and the float64 result up to float16's roundings."""
    x, gain, dy = problem
    dx64, dgain64 = float64_rmsnorm_backward(x, gain, dy, 1e-6)
    assume(numpy.abs(dx64).max() < FLOAT16_MAX / 2 and numpy.abs(dgain64).max() < FLOAT16_MAX / 2)
    dx, dgain = rmsnorm.backward(dy, rmsnorm.forward(x, gain, 1e-6)[1])
    assert dx.dtype == dgain.dtype == numpy.float16
    assert_finite(dx, dgain)  # computed in float16, the planted dy * g is inf and so is dx
    # The only errors are float16's roundings of xhat (kept in the cache) and of the result: at most
    # 2u of the size of the terms summed (u = 2^-11), plus, for dg, a subnormal xhat's absolute
    # rounding times |dy|. Over 20,000 draws the worst error was 0.74 (dx) and 0.96 (dg) of these
    # bounds; the test allows twice the bound.
    x64, dy64 = x.astype(numpy.float64), dy.astype(numpy.float64)
    rstd = 1 / numpy.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6)
    dx_bound = 2 * FLOAT16_ROUNDING * (rstd * numpy.abs(dy64 * gain.astype(numpy.float64))).max()
    dgain_bound = (2 * FLOAT16_ROUNDING * numpy.abs(dy64 * x64 * rstd).sum(0)
                   + FLOAT16_SUBNORMAL_ROUNDING * (numpy.abs(dy64).sum(0) + 1))
    assert numpy.abs(dx.astype(numpy.float64) - dx64).max() <= 2 * dx_bound
    assert (numpy.abs(dgain.astype(numpy.float64) - dgain64) <= 2 * dgain_bound).all()


def test_rmsnorm_backward_in_float16_survives_products_beyond_float16():
    """dy * g = 2e3 * 60 = 1.2e5 overflows float16, while dx (with r = 1/rms(x) ~ 1e-2) is ~1e3."""
    x = numpy.array([[100.0, -200.0, 150.0, 50.0]], dtype=numpy.float16)
    gain = numpy.full(4, 60.0, dtype=numpy.float16)
    dy = numpy.array([[2000.0, 1000.0, -2000.0, 500.0]], dtype=numpy.float16)
    with numpy.errstate(over="ignore"):  # the overflow is expected: it is what this test is about
        assert not numpy.isfinite(dy * gain).all()  # the product that must not be formed in float16
    dx, dgain = rmsnorm.backward(dy, rmsnorm.forward(x, gain, 1e-6)[1])
    dx64, dgain64 = float64_rmsnorm_backward(x, gain, dy, 1e-6)
    # float16 keeps 11 significant bits: 1e-3 relative is two roundings
    assert_close(dx.astype(numpy.float64), dx64, rtol=2e-3, atol=2e-3 * numpy.abs(dx64).max())
    assert_close(dgain.astype(numpy.float64), dgain64, rtol=2e-3)


# --- embedding, linear, swiglu ------------------------------------------------------------------

def test_embedding_backward_adds_up_repeated_ids():
    weight = numpy.zeros((4, 2))
    ids = numpy.array([[1, 1, 3, 1]])
    dout = numpy.arange(8.0).reshape(1, 4, 2)
    dweight = embedding.backward(dout, embedding.forward(ids, weight)[1])
    assert_same(dweight, [[0, 0], [0 + 2 + 6, 1 + 3 + 7], [0, 0], [4, 5]])


@given(batch=batch_sizes, seq=seq_lens, n_in=model_dims, n_out=model_dims, seed=seeds)
def test_linear_flattens_leading_dims_into_one_product(batch, seq, n_in, n_out, seed):
    rng = rng_from(seed)
    x, weight = rng.standard_normal((batch, seq, n_in)), rng.standard_normal((n_out, n_in))
    y, _ = linear.forward(x, weight)
    assert_close(y, numpy.einsum("btk,nk->btn", x, weight), rtol=1e-12, atol=1e-12)


def test_swiglu_is_finite_for_large_negative_and_positive_gates():
    a = numpy.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    y, cache = swiglu.forward(a, numpy.ones(5))
    assert numpy.isfinite(y).all() and numpy.isfinite(swiglu.backward(numpy.ones(5), cache)).all()
    assert_close(y, [0.0, -50.0 / (1 + math.exp(50.0)), 0.0, 50.0 / (1 + math.exp(-50.0)), 1000.0])


# --- cross-entropy ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_cross_entropy_is_exact_for_logits_of_magnitude_1e4(dtype):
    rng = rng_from(4)
    logits = (rng.uniform(-1e4, 1e4, (6, 50))).astype(dtype)
    targets = rng.integers(0, 50, 6)
    loss, cache = cross_entropy.forward(logits, targets)
    # closed form in float64: logsumexp is within log(V) of the max, which dominates exactly
    z = logits.astype(numpy.float64)
    row_max = z.max(-1)
    expected = numpy.mean(row_max + numpy.log(numpy.exp(z - row_max[:, None]).sum(-1)) - z[numpy.arange(6), targets])
    # the only rounding left is float32's (m - z[y]), ~6e-8 relative, and a sum of six rows
    assert_close(float(loss), expected, rtol=1e-6 if dtype == numpy.float32 else 1e-13)
    dlogits = cross_entropy.backward(1.0, cache)
    assert dlogits.dtype == dtype
    # closed form in float64: (softmax - onehot) / N; float32 rounds each entry to ~6e-8 of 1/N
    expected_grad = numpy.exp(z - row_max[:, None])
    expected_grad /= expected_grad.sum(-1, keepdims=True)
    expected_grad[numpy.arange(6), targets] -= 1.0
    expected_grad /= 6
    atol = 1e-8 if dtype == numpy.float32 else 1e-16
    assert_close(dlogits, expected_grad, rtol=0, atol=atol)


def test_cross_entropy_keeps_a_tiny_loss_next_to_huge_logits_in_float32():
    """A confident row: loss = log(1 + e^-20) ~ 2e-9, though |z| = 1e4 has float32 spacing 1e-3."""
    logits = numpy.array([[1e4, 1e4 - 20.0]], dtype=numpy.float32)
    loss, cache = cross_entropy.forward(logits, numpy.array([0]))
    assert float(loss) == pytest.approx(math.log1p(math.exp(-20.0)), rel=1e-6)
    dlogits = cross_entropy.backward(1.0, cache)
    assert_close(dlogits, [[-math.exp(-20.0), math.exp(-20.0)]], rtol=1e-5)


def test_cross_entropy_ignores_rows_and_averages_over_the_rest():
    logits = numpy.log(numpy.array([[1.0, 3.0], [1.0, 1.0], [2.0, 2.0]]))
    targets = numpy.array([1, -100, 0])
    loss, cache = cross_entropy.forward(logits, targets)
    assert float(loss) == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2, rel=1e-14)
    dlogits = cross_entropy.backward(1.0, cache)
    assert_close(dlogits, [[0.25 / 2, -0.25 / 2], [0.0, 0.0], [-0.5 / 2, 0.5 / 2]], atol=1e-15)


def test_cross_entropy_of_only_ignored_rows_is_zero_not_nan():
    loss, cache = cross_entropy.forward(numpy.ones((3, 4)), numpy.full(3, -100))
    assert float(loss) == 0.0
    assert_same(cross_entropy.backward(1.0, cache), 0.0)


def test_cross_entropy_ignored_rows_get_zero_gradient_even_when_their_logits_are_not_finite():
    logits = numpy.array([[0.0, 1.0], [numpy.nan, numpy.inf]])
    loss, cache = cross_entropy.forward(logits, numpy.array([1, -100]))
    assert math.isfinite(float(loss))
    assert_same(cross_entropy.backward(1.0, cache)[1], 0.0)


@pytest.mark.parametrize("bad_target", [-1, 5])
def test_cross_entropy_rejects_targets_outside_the_vocabulary(bad_target):
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
        cross_entropy.forward(numpy.zeros((2, 5)), numpy.array([0, bad_target]))


def test_cross_entropy_uses_one_logits_sized_buffer_which_backward_reuses():
    """Forward allocates one logits-sized array (exp(z - m)); backward turns it into dlogits in place."""
    import tracemalloc

    rng = rng_from(5)
    logits = rng.standard_normal((2048, 1000)).astype(numpy.float32)
    targets = rng.integers(0, 1000, 2048)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        loss, cache = cross_entropy.forward(logits, targets)
        _, forward_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        before_backward, _ = tracemalloc.get_traced_memory()
        dlogits = cross_entropy.backward(1.0, cache)
        _, backward_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # forward: one logits-sized buffer (8 MB) plus per-row vectors (2048 x a few 8-byte values)
    assert forward_peak < 1.1 * logits.nbytes, forward_peak / logits.nbytes
    # backward: only per-row vectors on top of what forward left
    assert backward_peak - before_backward < 0.1 * logits.nbytes, (backward_peak - before_backward) / logits.nbytes
    assert dlogits.shape == logits.shape and dlogits.dtype == logits.dtype


def test_cross_entropy_backward_consumes_its_cache():
    loss, cache = cross_entropy.forward(numpy.zeros((2, 3)), numpy.array([0, 1]))
    cross_entropy.backward(1.0, cache)
    with pytest.raises(RuntimeError, match="once per forward"):
        cross_entropy.backward(1.0, cache)
