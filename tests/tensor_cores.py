"""The tensor-core attention's test helpers, shared by the CPU harness's tests and the GPU's: NumPy
models of mma.m16n8k16's (float16) and mma.m16n8k8's (TF32) fragment layouts and of the rounding to
TF32, problems in each format, and the bounds each kernel's outputs must meet."""

import math
from dataclasses import dataclass

import numpy

from npllama.ops import attention

U16, U32 = 2.0**-11, 2.0**-24  # unit roundoffs of float16 and float32
UTF32 = 2.0**-11  # TF32's: 10 fraction bits, as float16's


@dataclass(frozen=True)
class Format:
    """What a kernel format rounds, and by how much: the operands of its products (relative unit, and
    the absolute error below the normal range) and its outputs."""

    dtype: str  # of the inputs and outputs
    operand_unit: float
    operand_tiny: float
    output_unit: float
    output_tiny: float


FLOAT16 = Format("float16", U16, 2.0**-25, U16, 2.0**-25)
# TF32 keeps float32's exponents: below them it rounds to multiples of 2^-136; outputs are float32's
TF32 = Format("float32", UTF32, 2.0**-137, U32, 2.0**-150)
FORMATS = {"float16": FLOAT16, "float32": TF32}


def round_to_tf32(x):
    """float32 to TF32 as cvt.rna.tf32.f32 then clearing the 13 low bits: to nearest, ties away from
    zero (half the dropped unit added to the magnitude's bits); infinities stay, NaN stays NaN."""
    bits = numpy.asarray(x, dtype=numpy.float32).view(numpy.uint32)
    rounded = ((bits + numpy.uint32(0x1000)) & numpy.uint32(0xFFFFE000)).astype(numpy.uint32)
    special = (bits & numpy.uint32(0x7F800000)) == numpy.uint32(0x7F800000)
    nan = special & ((bits & numpy.uint32(0x007FFFFF)) != 0)
    rounded = numpy.where(special, bits, rounded)
    return numpy.where(nan, numpy.uint32(0x7FFFE000), rounded).astype(numpy.uint32).view(numpy.float32)


def operands(x):
    """What a kernel computes with for the input x: float16 as it is, float32 rounded to TF32."""
    return round_to_tf32(x) if x.dtype == numpy.float32 else x


def _pack(low, high):
    """Two float16 arrays as uint32 words, `low` in the lower 16 bits."""
    return low.astype(numpy.float16).view(numpy.uint16).astype(numpy.uint32) | (
        high.astype(numpy.float16).view(numpy.uint16).astype(numpy.uint32) << 16)


def _bits(x):
    return numpy.asarray(x, dtype=numpy.float32).view(numpy.uint32)


def fragments(a, b, c):
    """Each lane's registers (lane = 4 g + t) in the layouts the PTX ISA gives mma.sync .row.col with
    float32 accumulators, C (16 x 8) float32: (a (32, 4), b (32, 2), c (32, 4)). float16 A (16 x 16)
    and B (16 x 8) for m16n8k16, two halves a register; float32 (TF32 values) A (16 x 8) and B (8 x 8)
    for m16n8k8, one a register."""
    lane = numpy.arange(32)
    g, t = lane // 4, lane % 4
    if a.dtype == numpy.float16:
        a_regs = numpy.stack([_pack(a[g, 2 * t], a[g, 2 * t + 1]), _pack(a[g + 8, 2 * t], a[g + 8, 2 * t + 1]),
                              _pack(a[g, 2 * t + 8], a[g, 2 * t + 9]),
                              _pack(a[g + 8, 2 * t + 8], a[g + 8, 2 * t + 9])], axis=1)
        b_regs = numpy.stack([_pack(b[2 * t, g], b[2 * t + 1, g]), _pack(b[2 * t + 8, g], b[2 * t + 9, g])], axis=1)
    else:
        a_regs = numpy.stack([_bits(a[g, t]), _bits(a[g + 8, t]), _bits(a[g, t + 4]), _bits(a[g + 8, t + 4])], axis=1)
        b_regs = numpy.stack([_bits(b[t, g]), _bits(b[t + 4, g])], axis=1)
    c_regs = numpy.stack([c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]], axis=1)
    return numpy.ascontiguousarray(a_regs), numpy.ascontiguousarray(b_regs), c_regs.astype(numpy.float32)


def unfragment(d):
    """D (16 x 8) from each lane's four accumulators."""
    lane = numpy.arange(32)
    g, t = lane // 4, lane % 4
    result = numpy.empty((16, 8), dtype=d.dtype)
    result[g, 2 * t], result[g, 2 * t + 1], result[g + 8, 2 * t], result[g + 8, 2 * t + 1] = d.T
    return result


def mma_problem(seed, dtype="float16"):
    """A, B of one product (float16, 16 x 16 and 16 x 8; or TF32 values as float32, 16 x 8 and 8 x 8)
    and C in float32, each entry distinct enough that a swapped element shows."""
    rng = numpy.random.default_rng(seed)
    k = 16 if dtype == "float16" else 8
    a, b = rng.standard_normal((16, k)).astype(dtype), rng.standard_normal((k, 8)).astype(dtype)
    return operands(a), operands(b), rng.standard_normal((16, 8)).astype(numpy.float32)


def assert_is_the_product(d, a, b, c):
    """D = C + A B: the products of float16s or of TF32s are exact in float32, the k sums add at most
    (k + 1) U32 of the magnitudes (the hardware's order of addition is its own)."""
    a64, b64, c64 = (x.astype(numpy.float64) for x in (a, b, c))
    exact = c64 + a64 @ b64
    bound = (a.shape[1] + 1) * U32 * (abs(c64) + abs(a64) @ abs(b64))
    assert (abs(d.astype(numpy.float64) - exact) <= bound).all(), abs(d - exact).max()


def draw_inputs(seed, dtype, batch, n_heads, n_kv_heads, n_queries, n_keys, head_dim, scale=1.0):
    """q, k, v of a kernel format's dtype (float32 ones not yet TF32: the kernel rounds them)."""
    rng = numpy.random.default_rng(seed)
    q = (scale * rng.standard_normal((batch, n_heads, n_queries, head_dim))).astype(dtype)
    k, v = ((scale * rng.standard_normal((batch, n_kv_heads, n_keys, head_dim))).astype(dtype) for _ in range(2))
    return q, k, v


def assert_within_the_kernels_roundings(out, lse, q, k, v):
    """Against the float64 reference on the inputs the kernel computes with (float16 ones as they are,
    float32 ones rounded to TF32). O = sum_j fl(p_j) v_j / sum_j p_j in the output format: P's
    rounding to the operand format moves it by at most u sum_j P_ij |v_j| (P normalised; u = 2^-11
    for both), the final rounding by the output's unit of |O| (U16, or 2^-25 below float16's normal
    range; U32 for float32), and float32 by at most (D + 2T + 8) U32 of sum_j P_ij |v_j| (D products
    a score, T terms a sum, a few more operations). L = max + log(sum) in float32: the scores' D
    products (D U32 of s sum_d |q_d k_d|) and the sum of T exponentials ((T + 8) U32)."""
    form = FORMATS[q.dtype.name]
    q64, k64, v64 = (operands(a).astype(numpy.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k64, v64 = numpy.repeat(k64, group, axis=1), numpy.repeat(v64, group, axis=1)
    out64, lse64 = attention.naive_forward(q64, k64, v64)
    head_dim, n_queries, n_keys = q.shape[-1], q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    scores = scale * (q64 @ k64.swapaxes(-1, -2))
    future = numpy.triu(numpy.ones((n_queries, n_keys), bool), 1 + n_keys - n_queries)
    probs = numpy.exp(numpy.where(future, -numpy.inf, scores) - lse64[..., None])
    weighted = probs @ abs(v64)
    assert out.dtype == q.dtype and lse.dtype == numpy.float32
    assert numpy.isfinite(out).all() and numpy.isfinite(lse).all(), "an element was never written (still NaN)"
    out_bound = (form.output_unit * abs(out64) + form.output_tiny + 1.01 * form.operand_unit * weighted
                 + (head_dim + 2 * n_keys + 8) * U32 * weighted)
    assert (abs(out.astype(numpy.float64) - out64) <= out_bound).all(), abs(out - out64).max()
    products = scale * (abs(q64) @ abs(k64).swapaxes(-1, -2))
    lse_bound = (head_dim + 8) * U32 * numpy.where(future, 0, products).max(-1) + (n_keys + 8) * U32 * (1 + abs(lse64))
    assert (abs(lse.astype(numpy.float64) - lse64) <= lse_bound).all(), abs(lse - lse64).max()


def assert_gradients_within_the_kernels_roundings(dq, dk, dv, q, k, v, dout, out, lse, dvec):
    """The backward kernels' dQ, dK, dV against float64 on what they compute with (float16 q, k, v, dO
    as they are, float32 ones rounded to TF32), given forward's O (the inputs' dtype), L (float32) and
    Dvec = rowsum(dO * O) (float32): each error the kernels can make, bounded where it arises and
    carried through the sums (u = 2^-11, the unit of float16 and of TF32 alike).

    - P = exp(s S - L): S's D float32 products move s S by (D + 4) U32 s sum|q||k|, L is off float64's
      by what it is off, exp adds a few U32: P moves by eps P, relatively.
    - dP = dO V^T in float32: D U32 sum|dO||v|. Dvec is off float64's by what the given one is off,
      and by another float32 sum of D terms (D U32 sum|dO||O|): the kernels' caller sums on its own.
    - dS = P (dP - Dvec), then rounded to the operand format for the products: u |dS|, or the
      format's absolute error below its normal range. P is rounded the same way for dV = P^T dO.
    - The products add T terms in float32 ((T + 2) U32 of their magnitudes); dQ and dK are s times
      theirs. Each result is rounded to the output format once (U16 of it or 2^-25; U32).
    Grouped heads: dK and dV of a shared head are the sums of their group's, errors summed too."""
    form = FORMATS[q.dtype.name]
    q64, k64, v64, dout64 = (operands(a).astype(numpy.float64) for a in (q, k, v, dout))
    lse32, dvec32, out16 = (a.astype(numpy.float64) for a in (lse, dvec, out))
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
    rounding = form.operand_unit * abs(dscores) + form.operand_tiny * (probs > 0)
    dscores_error = (probs * eps * abs(dprobs - dvec64[..., None])
                     + probs * (dprobs_error + dvec_error[..., None]) + 4 * U32 * abs(dscores) + rounding)
    sums = (n_keys + 2) * U32
    errors = (scale * (dscores_error @ abs(k64)) + sums * scale * (abs(dscores) @ abs(k64)),
              scale * (dscores_error.swapaxes(-1, -2) @ abs(q64)) + sums * scale * (abs(dscores).swapaxes(-1, -2)
                                                                                   @ abs(q64)),
              ((form.operand_unit + eps) * probs + form.operand_tiny * (probs > 0)).swapaxes(-1, -2) @ abs(dout64)
              + sums * (probs.swapaxes(-1, -2) @ abs(dout64)))
    batch, n_kv_heads = k.shape[:2]
    for name, got, want, error in zip(("dQ", "dK", "dV"), (dq, dk, dv), expected, errors):
        if name != "dQ":  # a shared head's gradient: its group's sum
            want, error = (a.reshape(batch, n_kv_heads, group, n_keys, head_dim).sum(axis=2) for a in (want, error))
        assert got.dtype == q.dtype and numpy.isfinite(got).all(), f"{name}: not written, or not finite"
        bound = form.output_unit * (abs(want) + error) + error + form.output_tiny
        excess = abs(got.astype(numpy.float64) - want) - bound
        assert (excess <= 0).all(), f"{name}: {int((excess > 0).sum())} beyond the bound, worst by {excess.max()}"
