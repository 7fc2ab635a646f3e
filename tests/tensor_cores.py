"""The float16 tensor-core attention's test helpers, shared by the CPU harness's tests and the GPU's:
a NumPy model of mma.m16n8k16's fragment layouts, float16 problems, and the bound the forward
kernel's output must meet."""

import math

import numpy

from npllama.ops import attention

U16, U32 = 2.0**-11, 2.0**-24  # unit roundoffs of float16 and float32
HALF_SUBNORMAL = 2.0**-25  # the most a rounding to float16 moves a number below its normal range


def _pack(low, high):
    """Two float16 arrays as uint32 words, `low` in the lower 16 bits."""
    return low.astype(numpy.float16).view(numpy.uint16).astype(numpy.uint32) | (
        high.astype(numpy.float16).view(numpy.uint16).astype(numpy.uint32) << 16)


def fragments(a, b, c):
    """Each lane's registers (lane = 4 g + t) for A (16 x 16) and B (16 x 8) float16 and C (16 x 8)
    float32, in the layouts the PTX ISA gives mma.m16n8k16 .f16 .f32: (a (32, 4), b (32, 2), c (32, 4))."""
    lane = numpy.arange(32)
    g, t = lane // 4, lane % 4
    a_regs = numpy.stack([_pack(a[g, 2 * t], a[g, 2 * t + 1]), _pack(a[g + 8, 2 * t], a[g + 8, 2 * t + 1]),
                          _pack(a[g, 2 * t + 8], a[g, 2 * t + 9]), _pack(a[g + 8, 2 * t + 8], a[g + 8, 2 * t + 9])],
                         axis=1)
    b_regs = numpy.stack([_pack(b[2 * t, g], b[2 * t + 1, g]), _pack(b[2 * t + 8, g], b[2 * t + 9, g])], axis=1)
    c_regs = numpy.stack([c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]], axis=1)
    return a_regs, b_regs, c_regs.astype(numpy.float32)


def unfragment(d):
    """D (16 x 8) from each lane's four accumulators."""
    lane = numpy.arange(32)
    g, t = lane // 4, lane % 4
    result = numpy.empty((16, 8), dtype=d.dtype)
    result[g, 2 * t], result[g, 2 * t + 1], result[g + 8, 2 * t], result[g + 8, 2 * t + 1] = d.T
    return result


def mma_problem(seed):
    """A, B in float16 and C in float32, each entry distinct enough that a swapped element shows."""
    rng = numpy.random.default_rng(seed)
    return (rng.standard_normal((16, 16)).astype(numpy.float16), rng.standard_normal((16, 8)).astype(numpy.float16),
            rng.standard_normal((16, 8)).astype(numpy.float32))


def assert_is_the_product(d, a, b, c):
    """D = C + A B: the float16 products are exact in float32, the 16 sums add at most 16 U32 of the
    magnitudes (the hardware's order of addition is its own)."""
    a64, b64, c64 = (x.astype(numpy.float64) for x in (a, b, c))
    exact = c64 + a64 @ b64
    bound = 17 * U32 * (abs(c64) + abs(a64) @ abs(b64))
    assert (abs(d.astype(numpy.float64) - exact) <= bound).all(), abs(d - exact).max()


def draw_halves(seed, batch, n_heads, n_kv_heads, n_queries, n_keys, head_dim, scale=1.0):
    rng = numpy.random.default_rng(seed)
    q = (scale * rng.standard_normal((batch, n_heads, n_queries, head_dim))).astype(numpy.float16)
    k, v = ((scale * rng.standard_normal((batch, n_kv_heads, n_keys, head_dim))).astype(numpy.float16)
            for _ in range(2))
    return q, k, v


def assert_within_the_kernels_roundings(out, lse, q, k, v):
    """Against the float64 reference on the same float16 inputs. O = sum_j fl16(p_j) v_j / sum_j p_j
    rounded to float16: P's rounding moves it by at most U16 sum_j P_ij |v_j| (P normalised), the
    final rounding by U16 |O| (or 2^-25 below float16's normal range), and float32 by at most
    (D + 2T + 8) U32 of sum_j P_ij |v_j| (D products a score, T terms a sum, a few more operations).
    L = max + log(sum) in float32: the scores' D products (D U32 of s sum_d |q_d k_d|) and the sum
    of T exponentials ((T + 8) U32)."""
    q64, k64, v64 = (a.astype(numpy.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k64, v64 = numpy.repeat(k64, group, axis=1), numpy.repeat(v64, group, axis=1)
    out64, lse64 = attention.naive_forward(q64, k64, v64)
    head_dim, n_queries, n_keys = q.shape[-1], q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    scores = scale * (q64 @ k64.swapaxes(-1, -2))
    future = numpy.triu(numpy.ones((n_queries, n_keys), bool), 1 + n_keys - n_queries)
    probs = numpy.exp(numpy.where(future, -numpy.inf, scores) - lse64[..., None])
    weighted = probs @ abs(v64)
    assert out.dtype == numpy.float16 and lse.dtype == numpy.float32
    assert numpy.isfinite(out).all() and numpy.isfinite(lse).all(), "an element was never written (still NaN)"
    out_bound = U16 * abs(out64) + HALF_SUBNORMAL + 1.01 * U16 * weighted + (head_dim + 2 * n_keys + 8) * U32 * weighted
    assert (abs(out.astype(numpy.float64) - out64) <= out_bound).all(), abs(out - out64).max()
    products = scale * (abs(q64) @ abs(k64).swapaxes(-1, -2))
    lse_bound = (head_dim + 8) * U32 * numpy.where(future, 0, products).max(-1) + (n_keys + 8) * U32 * (1 + abs(lse64))
    assert (abs(lse.astype(numpy.float64) - lse64) <= lse_bound).all(), abs(lse - lse64).max()


def assert_gradients_within_the_kernels_roundings(dq, dk, dv, q, k, v, dout, out, lse, dvec):
    """The backward kernels' dQ, dK, dV (float16) against float64 on the same float16 q, k, v, dO,
    given forward's O (float16), L (float32) and Dvec = rowsum(dO * O) (float32): each error the
    kernels can make, bounded where it arises and carried through the sums.

    - P = exp(s S - L): S's D float32 products move s S by (D + 4) U32 s sum|q||k|, L is off float64's
      by what it is off, exp adds a few U32: P moves by eps P, relatively.
    - dP = dO V^T in float32: D U32 sum|dO||v|. Dvec is off float64's by what the given one is off,
      and by another float32 sum of D terms (D U32 sum|dO||O|): the kernels' caller sums on its own.
    - dS = P (dP - Dvec), then rounded to float16 for the products: U16 |dS|, or 2^-25 if subnormal.
      P is rounded the same way for dV = P^T dO.
    - The products add T terms in float32 ((T + 2) U32 of their magnitudes); dQ and dK are s times
      theirs. Each result is rounded to float16 once (U16 of it, or 2^-25).
    Grouped heads: dK and dV of a shared head are the sums of their group's, errors summed too."""
    f64 = [a.astype(numpy.float64) for a in (q, k, v, dout, lse, dvec, out)]
    q64, k64, v64, dout64, lse32, dvec32, out16 = f64
    group = q.shape[1] // k.shape[1]
    k64, v64 = numpy.repeat(k64, group, axis=1), numpy.repeat(v64, group, axis=1)
    head_dim, n_queries, n_keys = q.shape[-1], q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    future = numpy.triu(numpy.ones((n_queries, n_keys), bool), 1 + n_keys - n_queries)
    scores = numpy.where(future, -numpy.inf, scale * (q64 @ k64.swapaxes(-1, -2)))
    _, lse64 = attention.naive_forward(q64, k64, v64)
    probs = numpy.exp(scores - lse64[..., None])
    dprobs = dout64 @ v64.swapaxes(-1, -2)
    dvec64 = (dout64 * (probs @ v64)).sum(-1)
    dscores = probs * (dprobs - dvec64[..., None])
    expected = (scale * dscores @ k64, scale * dscores.swapaxes(-1, -2) @ q64, probs.swapaxes(-1, -2) @ dout64)

    eps = ((head_dim + 4) * U32 * scale * (abs(q64) @ abs(k64).swapaxes(-1, -2))
           + abs(lse32 - lse64)[..., None] + 4 * U32)
    dprobs_error = head_dim * U32 * (abs(dout64) @ abs(v64).swapaxes(-1, -2))
    dvec_error = abs(dvec32 - dvec64) + head_dim * U32 * (abs(dout64) * abs(out16)).sum(-1)
    rounding = U16 * abs(dscores) + HALF_SUBNORMAL * (probs > 0)
    dscores_error = (probs * eps * abs(dprobs - dvec64[..., None])
                     + probs * (dprobs_error + dvec_error[..., None]) + 4 * U32 * abs(dscores) + rounding)
    sums = (n_keys + 2) * U32
    errors = (scale * (dscores_error @ abs(k64)) + sums * scale * (abs(dscores) @ abs(k64)),
              scale * (dscores_error.swapaxes(-1, -2) @ abs(q64)) + sums * scale * (abs(dscores).swapaxes(-1, -2)
                                                                                   @ abs(q64)),
              ((U16 + eps) * probs + HALF_SUBNORMAL * (probs > 0)).swapaxes(-1, -2) @ abs(dout64)
              + sums * (probs.swapaxes(-1, -2) @ abs(dout64)))
    batch, n_kv_heads = k.shape[:2]
    for name, got, want, error in zip(("dQ", "dK", "dV"), (dq, dk, dv), expected, errors):
        if name != "dQ":  # a shared head's gradient: its group's sum
            want, error = (a.reshape(batch, n_kv_heads, group, n_keys, head_dim).sum(axis=2) for a in (want, error))
        assert got.dtype == numpy.float16 and numpy.isfinite(got).all(), f"{name}: not written, or not finite"
        bound = U16 * (abs(want) + error) + error + HALF_SUBNORMAL
        excess = abs(got.astype(numpy.float64) - want) - bound
        assert (excess <= 0).all(), f"{name}: {int((excess > 0).sum())} beyond the bound, worst by {excess.max()}"
