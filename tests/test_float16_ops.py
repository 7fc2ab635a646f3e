"""Every op in float16, as mixed-precision training runs them: float16 in, float32 inside, float16 out.

Two properties for each op's forward and backward, over drawn shapes and values (at the sizes a
loss-scaled backward sees: incoming gradients up to 3e4, whose products with the weights leave
float16's range, 65504, while the results stay inside it):

1. The float16 result is the float32 computation on the widened inputs (exact: every float16 is a
   float32), rounded to float16 once: bitwise, so nothing in between is rounded to float16.
2. It lies within one float16 rounding of the float64 result, plus the float32 computation's own
   error. Rounding y to float16 moves it by at most U16 |y| (unit roundoff 2^-11), or by half the
   spacing of float16's subnormals (2^-25) for a tiny y; and the float32 result y32 differs from the
   float64 one by at most E32, bounded a priori below for each op (n roundings in float32 move a
   value by at most about n U32 of the magnitudes involved, U32 = 2^-24). So
       |y16 - y64| <= U16 (|y64| + E32) + E32 + 2^-25.
   Computing in float16 instead gives errors of 2 U16 and more: the bound fails.

Where backward reads a value forward rounded to float16 (RMSNorm's xhat, attention's output O),
property 1 does not hold and property 2 adds that rounding's effect, derived in the test.
"""

import math

import numpy
from hypothesis import assume, given
from hypothesis import strategies as st

from assertions import assert_finite, assert_same
from npllama.backend import matmul
from npllama.ops import attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu
from strategies import head_dims, model_dims, rng_from, seeds, seq_lens, softmax_scales

U16 = 2.0**-11  # float16's unit roundoff (11 significant bits)
U32 = 2.0**-24  # float32's
HALF_SUBNORMAL = 2.0**-25  # the most a rounding to float16 moves a number below its normal range
FLOAT16_MAX = 65504.0

f16, f32, f64 = numpy.float16, numpy.float32, numpy.float64
gradient_scales = st.sampled_from([1.0, 1e2, 3e4])  # 3e4: a loss-scaled gradient, near float16's top


def halves(rng, shape, scale=1.0):
    """Normal draws times `scale`, rounded to float16 (the inputs: exact float16 numbers)."""
    return numpy.clip(scale * rng.standard_normal(shape), -3e4, 3e4).astype(f16)


def widened(*arrays, dtype=f32):
    return [a.astype(dtype) for a in arrays]


def assert_rounded_once(got, from_float32, exact, float32_error, what=""):
    """Properties 1 and 2 above for one output: got (float16) == round16(from_float32), and
    |got - exact| <= U16 (|exact| + E32) + E32 + 2^-25."""
    assert got.dtype == f16, what
    assert_same(got, from_float32.astype(f16), err_msg=what)
    assert_within_one_rounding(got, exact, float32_error, what)


def assert_within_one_rounding(got, exact, error_before, what=""):
    """|got - exact| <= U16 (|exact| + e) + e + 2^-25, e the error before the final rounding."""
    assert_finite(got, exact, what=what)
    exact = numpy.asarray(exact, dtype=f64)
    bound = U16 * (numpy.abs(exact) + error_before) + error_before + HALF_SUBNORMAL
    excess = numpy.abs(got.astype(f64) - exact) - bound
    assert (excess <= 0).all(), f"{what}: {int((excess > 0).sum())} entries beyond the bound, worst by {excess.max()}"


def representable(*arrays):
    """The float64 results fit float16 with room to spare (else there is nothing to compare)."""
    return all(numpy.abs(a).max(initial=0.0) < FLOAT16_MAX / 2 for a in arrays)


# --- linear ---------------------------------------------------------------------------------------

@given(rows=st.integers(1, 40), n_in=model_dims, n_out=model_dims, seed=seeds, dy_scale=gradient_scales)
def test_linear_in_float16_accumulates_in_float32_and_rounds_once(rows, n_in, n_out, seed, dy_scale):
    rng = rng_from(seed)
    x, weight, dy = halves(rng, (rows, n_in)), halves(rng, (n_out, n_in), 0.5), halves(rng, (rows, n_out), dy_scale)
    x64, w64, dy64 = widened(x, weight, dy, dtype=f64)
    assume(representable(x64 @ w64.T, dy64 @ w64, dy64.T @ x64))
    y, cache = linear.forward(x, weight)
    dx, dweight = linear.backward(dy, cache)
    y32, cache32 = linear.forward(*widened(x, weight))
    dx32, dweight32 = linear.backward(dy.astype(f32), cache32)
    # a sum of K products in float32: at most K U32 of the sum of their magnitudes
    assert_rounded_once(y, y32, x64 @ w64.T, n_in * U32 * (abs(x64) @ abs(w64).T), "y")
    assert_rounded_once(dx, dx32, dy64 @ w64, n_out * U32 * (abs(dy64) @ abs(w64)), "dx")
    assert_rounded_once(dweight, dweight32, dy64.T @ x64, rows * U32 * (abs(dy64).T @ abs(x64)), "dW")


@given(rows=st.integers(3, 12), block=st.integers(1, 4), threads=st.integers(1, 3), seed=seeds)
def test_float16_products_by_blocks_of_rows_on_threads_are_each_blocks_product_rounded_once(rows, block, threads,
                                                                                          seed):
    """The blocks a pool's threads compute (a cut fixed by the shape, not the threads) write their
    float16 rows through `out`: each block's own product, on any number of threads."""
    from concurrent.futures import ThreadPoolExecutor

    rng = rng_from(seed)
    x, weight = halves(rng, (rows, 6)), halves(rng, (5, 6))
    by_block = numpy.concatenate([matmul(x[start:start + block], weight.T) for start in range(0, rows, block)])
    with ThreadPoolExecutor(threads) as pool:
        on_threads = linear._product(x, weight.T, pool, block=block)
    assert on_threads.dtype == by_block.dtype == f16
    assert_same(on_threads, by_block)


# --- SwiGLU ---------------------------------------------------------------------------------------

@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 40)), seed=seeds, gate_scale=st.sampled_from([1.0, 6.0]),
       dy_scale=gradient_scales)
def test_swiglu_in_float16_computes_in_float32_and_rounds_once(shape, seed, gate_scale, dy_scale):
    rng = rng_from(seed)
    a, b, dy = halves(rng, shape, gate_scale), halves(rng, shape, 2.0), halves(rng, shape, dy_scale)
    a64, b64, dy64 = widened(a, b, dy, dtype=f64)
    y64, cache64 = swiglu.forward(a64, b64)
    da64, db64 = swiglu.backward(dy64, cache64)
    assume(representable(y64, da64, db64))
    y, cache = swiglu.forward(a, b)
    da, db = swiglu.backward(dy, cache)
    y32, cache32 = swiglu.forward(*widened(a, b))
    da32, db32 = swiglu.backward(dy.astype(f32), cache32)
    # sigmoid (exp, an addition, a division) and the products: each factor within a few U32, at
    # most 16 roundings in all; 1 + a (1 - s) is a sum, so its error is absolute, of order |a| U32
    assert_rounded_once(y, y32, y64, 16 * U32 * abs(y64), "y")
    assert_rounded_once(da, da32, da64, 16 * U32 * abs(dy64 * b64) * (1 + abs(a64)), "da")
    assert_rounded_once(db, db32, db64, 16 * U32 * abs(db64), "db")


# --- RoPE -----------------------------------------------------------------------------------------

@given(seq=seq_lens, heads=st.integers(1, 3), head_dim=head_dims, seed=seeds, dy_scale=gradient_scales)
def test_rope_in_float16_rotates_in_float32_with_float32_tables_and_rounds_once(seq, heads, head_dim, seed,
                                                                                 dy_scale):
    rng = rng_from(seed)
    x, dy = halves(rng, (1, seq, heads, head_dim), 3.0), halves(rng, (1, seq, heads, head_dim), dy_scale)
    positions = numpy.arange(seq)
    cos32, sin32 = rope.frequencies(head_dim, positions, dtype=f32)  # what the model gives float16 weights
    cos64, sin64 = rope.frequencies(head_dim, positions)
    y64, cache64 = rope.forward(x.astype(f64), cos64, sin64)
    dx64 = rope.backward(dy.astype(f64), cache64)
    assume(representable(y64, dx64))
    y, cache = rope.forward(x, cos32, sin32)
    dx = rope.backward(dy, cache)
    y32, cache32 = rope.forward(x.astype(f32), cos32, sin32)
    dx32 = rope.backward(dy.astype(f32), cache32)
    # each output is a x_e c + b x_o s: the tables' roundings and three in the arithmetic, each at
    # most U32 of |x_e| + |x_o|, taken for both entries of the pair
    pair_size = lambda v: numpy.repeat(abs(v[..., 0::2]) + abs(v[..., 1::2]), 2, axis=-1)  # noqa: E731
    assert_rounded_once(y, y32, y64, 5 * U32 * pair_size(x.astype(f64)), "y")
    assert_rounded_once(dx, dx32, dx64, 5 * U32 * pair_size(dy.astype(f64)), "dx")


# --- embedding ------------------------------------------------------------------------------------

@given(vocab=st.integers(1, 9), dim=model_dims, n_ids=st.integers(1, 40), seed=seeds, dy_scale=gradient_scales)
def test_embedding_in_float16_gathers_exactly_and_adds_repeated_rows_in_float32(vocab, dim, n_ids, seed, dy_scale):
    rng = rng_from(seed)
    weight, ids = halves(rng, (vocab, dim)), rng.integers(0, vocab, (1, n_ids))
    dy = halves(rng, (1, n_ids, dim), dy_scale)
    y, cache = embedding.forward(ids, weight)
    assert y.dtype == f16
    assert_same(y, weight[ids])
    dweight64 = embedding.backward(dy.astype(f64), embedding.forward(ids, weight.astype(f64))[1])
    assume(representable(dweight64))
    magnitude = embedding.backward(abs(dy.astype(f64)), cache)  # each row's sum of |dy|
    dweight = embedding.backward(dy, cache)
    dweight32 = embedding.backward(dy.astype(f32), embedding.forward(ids, weight.astype(f32))[1])
    # a row that collects r gradients is a sum of r terms: at most r U32 of their magnitudes
    assert_rounded_once(dweight, dweight32, dweight64, n_ids * U32 * magnitude, "dweight")


# --- RMSNorm forward (its float16 backward: tests/test_op_properties.py) --------------------------

@given(rows=st.integers(1, 4), dim=st.integers(1, 40), seed=seeds, x_scale=st.sampled_from([1e-2, 1.0, 1e3]))
def test_rmsnorm_forward_in_float16_normalises_in_float32_and_rounds_once(rows, dim, seed, x_scale):
    rng = rng_from(seed)
    x, gain = halves(rng, (rows, dim), x_scale), (1 + halves(rng, (dim,), 0.3)).astype(f16)
    assume(numpy.abs(x.astype(f64)).max() > 0)
    y, cache = rmsnorm.forward(x, gain, 1e-6)
    y32, _ = rmsnorm.forward(*widened(x, gain), 1e-6)
    y64, _ = rmsnorm.forward(*widened(x, gain, dtype=f64), 1e-6)
    assert cache.xhat.dtype == f16
    # the mean of C squares (C + 1 roundings), the square root and the reciprocal, two products
    assert_rounded_once(y, y32, y64, (dim + 6) * U32 * abs(y64), "y")


# --- cross-entropy --------------------------------------------------------------------------------

@given(rows=st.integers(1, 6), vocab=st.integers(2, 40), seed=seeds, logit_scale=st.sampled_from([1.0, 10.0, 1e3]),
       loss_scale=st.sampled_from([1.0, 2.0**10, 2.0**16]))
def test_cross_entropy_of_float16_logits_is_float32s_and_its_scaled_gradient_is_rounded_once(
        rows, vocab, seed, logit_scale, loss_scale):
    """The loss stays float32 (never rounded to float16); dlogits, for the loss times a loss scale
    as mixed precision asks, is float32's rounded once."""
    rng = rng_from(seed)
    logits, targets = halves(rng, (rows, vocab), logit_scale), rng.integers(0, vocab, rows)
    loss64, cache64 = cross_entropy.forward(logits.astype(f64), targets)
    dlogits64 = cross_entropy.backward(loss_scale, cache64)
    assume(representable(dlogits64))  # else the step overflows, and mixed precision skips it
    loss, cache = cross_entropy.forward(logits, targets)
    dlogits = cross_entropy.backward(loss_scale, cache)
    loss32, cache32 = cross_entropy.forward(logits.astype(f32), targets)
    dlogits32 = cross_entropy.backward(loss_scale, cache32)
    assert loss.dtype == f32
    assert_same(loss, loss32)
    # softmax: V exponentials summed, a division; (p - [v = t]) dy / N' carries that relative error
    probs64 = cross_entropy.backward(1.0, cross_entropy.forward(logits.astype(f64), targets)[1]) * rows
    onehot = numpy.eye(vocab)[targets]
    scale = loss_scale / rows
    assert_rounded_once(dlogits, dlogits32, dlogits64, (vocab + 8) * U32 * scale * (abs(probs64 + onehot) + onehot),
                        "dlogits")
    assert math.isclose(float(loss), float(loss64), rel_tol=(vocab + 8) * U32 * 4, abs_tol=(vocab + 8) * U32 * 4)


# --- attention ------------------------------------------------------------------------------------

@st.composite
def float16_attention_problems(draw):
    """(q, k, v, dO) in float16, one to three heads over T <= 19 positions, and a softmax scale."""
    rng = rng_from(draw(seeds))
    heads, seq, head_dim = draw(st.integers(1, 3)), draw(seq_lens), draw(head_dims.filter(lambda d: d <= 16))
    shape = (1, heads, seq, head_dim)
    q, k, v = (halves(rng, shape, 2.0) for _ in range(3))
    return q, k, v, halves(rng, shape, draw(gradient_scales)), draw(softmax_scales), draw(st.integers(1, seq + 1))


def naive_probabilities(q, k, scale):
    """P = softmax(s Q K^T) under the causal mask, in float64: (B, H, T, T)."""
    head_dim, seq = q.shape[-1], q.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = scale * (q @ k.swapaxes(-1, -2))
    scores = numpy.where(numpy.triu(numpy.ones((seq, seq), bool), 1), -numpy.inf, scores)
    weights = numpy.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True), scale


@given(problem=float16_attention_problems())
def test_attention_forward_in_float16_is_float32s_rounded_once(problem):
    q, k, v, _, softmax_scale, tile_size = problem
    out, cache = attention.forward(q, k, v, tile_size, scale=softmax_scale)
    out32, cache32 = attention.forward(*widened(q, k, v), tile_size, scale=softmax_scale)
    q64, k64, v64 = widened(q, k, v, dtype=f64)
    out64, lse64 = attention.naive_forward(q64, k64, v64, scale=softmax_scale)
    probs, _ = naive_probabilities(q64, k64, softmax_scale)
    assert cache.lse.dtype == f32
    assert_same(cache.lse, cache32.lse)
    # O = sum_j P_ij v_j: the scores (D products), the exponentials and sums over T keys (the
    # online softmax rescales at most T times), the division; at most (D + 2T + 8) U32 of sum P|v|
    head_dim, seq = q.shape[-1], q.shape[2]
    assert_rounded_once(out, out32, out64, (head_dim + 2 * seq + 8) * U32 * (probs @ abs(v64)), "O")


@given(problem=float16_attention_problems())
def test_attention_backward_in_float16_is_within_the_roundings_of_its_float16_output(problem):
    """dV never reads O: float32's rounded once. dQ and dK read Dvec = rowsum(dO * O) with O in
    float16, which moves Dvec_i by at most sum_d |dO_id| (U16 |O_id| + 2^-25); through
    dS_ij = P_ij (dP_ij - Dvec_i) that moves dQ_i by at most s Dvec-error_i sum_j P_ij |k_j| and
    dK_j by at most s sum_i P_ij Dvec-error_i |q_i|."""
    q, k, v, dout, softmax_scale, tile_size = problem
    q64, k64, v64, dout64 = widened(q, k, v, dout, dtype=f64)
    dq64, dk64, dv64 = attention.backward(dout64, attention.forward(q64, k64, v64, tile_size,
                                                                    scale=softmax_scale)[1])
    assume(representable(dq64, dk64, dv64))
    dq, dk, dv = attention.backward(dout, attention.forward(q, k, v, tile_size, scale=softmax_scale)[1])
    dq32, dk32, dv32 = attention.backward(dout.astype(f32),
                                          attention.forward(*widened(q, k, v), tile_size, scale=softmax_scale)[1])
    probs, scale = naive_probabilities(q64, k64, softmax_scale)
    out64 = probs @ v64
    head_dim, seq = q.shape[-1], q.shape[2]
    terms = head_dim + 2 * seq + 8  # roundings in float32 along any one path, as in forward
    dprobs = dout64 @ v64.swapaxes(-1, -2)
    dvec = (dout64 * out64).sum(-1, keepdims=True)
    dvec_error = (abs(dout64) * (U16 * abs(out64) + HALF_SUBNORMAL)).sum(-1, keepdims=True)
    size = probs * (abs(dprobs) + abs(dvec) + dvec_error)  # |dS| and what moves it
    dq_error = scale * (size @ abs(k64)) * terms * U32 + scale * dvec_error * (probs @ abs(k64))
    dk_error = scale * (size.swapaxes(-1, -2) @ abs(q64)) * terms * U32 + scale * (
        (probs * dvec_error).swapaxes(-1, -2) @ abs(q64))
    assert_rounded_once(dv, dv32, dv64, terms * U32 * (probs.swapaxes(-1, -2) @ abs(dout64)), "dV")
    assert dq.dtype == dk.dtype == f16
    assert_within_one_rounding(dq, dq64, dq_error, "dQ")
    assert_within_one_rounding(dk, dk64, dk_error, "dK")
