"""Attention never materialises the T x T probabilities: its memory grows linearly in T."""

import tracemalloc

import numpy

from npllama.ops import attention

BATCH, HEADS, HEAD_DIM = 1, 2, 16


def peak_bytes_of_forward_and_backward(seq, tile_size=128):
    """Peak bytes allocated (NumPy reports its buffers to tracemalloc) beyond the inputs."""
    rng = numpy.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((BATCH, HEADS, seq, HEAD_DIM)) for _ in range(4))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out, cache = attention.forward(q, k, v, tile_size)
        grads = attention.backward(dout, cache)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == q.shape and len(grads) == 3
    return peak


def test_attention_at_t_2048_allocates_under_a_quarter_of_the_probability_matrix():
    seq = 2048
    probabilities_bytes = BATCH * HEADS * seq * seq * 8  # float64 P: 64 MiB
    peak = peak_bytes_of_forward_and_backward(seq)
    assert peak < probabilities_bytes / 4, f"peak {peak / 2**20:.1f} MiB"


def test_attention_memory_grows_linearly_in_t():
    """Doubling T at most doubles the peak (plus slack for the fixed tile buffers); quadratic would 4x it."""
    ratio = peak_bytes_of_forward_and_backward(2048) / peak_bytes_of_forward_and_backward(1024)
    assert ratio < 2.5, ratio


def test_tracemalloc_sees_numpy_buffers():
    """The measurement is not vacuous: allocating a T x T float64 array shows up in full."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        matrix = numpy.ones((1024, 1024))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert matrix.nbytes <= peak
