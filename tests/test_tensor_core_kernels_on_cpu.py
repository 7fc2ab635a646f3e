"""The float16 tensor-core attention forward (npllama/kernels/attention_f16.cu), run on the CPU by the
harness under AddressSanitizer + UBSan and under ThreadSanitizer, its mma.sync layer emulated in the
fragment layouts the PTX ISA documents (tests/harness/cuda_on_cpu.h).

The layer: one warp's product through the self-test kernel equals C + A B for fragments packed by a
NumPy model of those layouts (tests/tensor_cores.py), which tests/test_gpu.py checks against the instruction
itself. The kernel: O and L against the float64 reference on the same float16 inputs, within a
bound derived from where the kernel rounds (P and O to float16; everything else float32).
"""

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernel_harness
from kernel_harness import build, run
from npllama.kernels import attention_f16
from tensor_cores import (
    assert_gradients_within_the_kernels_roundings,
    assert_is_the_product,
    assert_within_the_kernels_roundings,
    draw_halves,
    fragments,
    mma_problem,
    unfragment,
)

KERNELS = Path(attention_f16.__file__).parent
HEAD_DIMS = (16, 48, 128)  # the smallest, one of several k-steps that is not a power of two, the largest


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    if kernel_harness.unavailable_reason():
        pytest.skip(kernel_harness.unavailable_reason())
    folder = tmp_path_factory.mktemp("tensor-core-kernels")
    names = [attention_f16.kernel_name(head_dim, kind) for head_dim in HEAD_DIMS
             for kind in attention_f16.KINDS] + [attention_f16.MMA_SELF_TEST]
    source = [KERNELS / "attention_f16.cu"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        builds = {sanitizer: pool.submit(build, source, names, sanitizer, folder)
                  for sanitizer in ("address", "thread")}
        return {name: future.result() for name, future in builds.items()}


# --- the mma layer ------------------------------------------------------------------------------

@given(seed=st.integers(0, 2**32 - 1))
def test_the_emulated_mma_is_c_plus_a_b_in_the_documented_fragment_layouts(harness, seed):
    a, b, c = mma_problem(seed)
    a_regs, b_regs, c_regs = fragments(a, b, c)
    d_regs = run(harness["address"], attention_f16.mma_launch(a_regs, b_regs, c_regs))[2]
    assert_is_the_product(unfragment(d_regs), a, b, c)


def test_fragments_and_unfragment_are_inverse_and_cover_every_element():
    """The layout model itself: every element of C lands in exactly one lane's register and comes back."""
    c = numpy.arange(128, dtype=numpy.float32).reshape(16, 8)
    _, _, c_regs = fragments(numpy.zeros((16, 16)), numpy.zeros((16, 8)), c)
    assert sorted(c_regs.ravel().tolist()) == list(range(128))
    assert (unfragment(c_regs) == c).all()


# --- the forward kernel -------------------------------------------------------------------------

def run_forward(binary, q, k, v):
    """out (float16) and lse (float32) from the kernel, both starting as NaN."""
    out = numpy.full(q.shape, numpy.nan, dtype=numpy.float16)
    lse = numpy.full(q.shape[:3], numpy.nan, dtype=numpy.float32)
    args = run(binary, attention_f16.forward_launch(q, k, v, out, lse, 1.0 / math.sqrt(q.shape[-1])))
    return args[3], args[4]


@pytest.mark.parametrize("seq", [1, 17, 63, 64, 65, 129])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_the_float16_forward_matches_the_reference_under_address_and_undefined_behaviour_sanitizers(harness, head_dim,
                                                                                                    seq):
    q, k, v = draw_halves(seq + head_dim, 2, 2, 2, seq, seq, head_dim)
    assert_within_the_kernels_roundings(*run_forward(harness["address"], q, k, v), q, k, v)


@pytest.mark.parametrize("n_heads, n_kv_heads, n_queries, n_keys", [(4, 2, 17, 129), (3, 1, 1, 65), (2, 2, 64, 100)])
def test_the_float16_forward_handles_groups_and_fewer_queries_than_keys(harness, n_heads, n_kv_heads, n_queries,
                                                                         n_keys):
    q, k, v = draw_halves(n_keys, 1, n_heads, n_kv_heads, n_queries, n_keys, 48)
    assert_within_the_kernels_roundings(*run_forward(harness["address"], q, k, v), q, k, v)


def test_the_float16_forward_stays_exact_with_large_logits(harness):
    """Scores near 100 overflow exp() unless each row's running max is subtracted first."""
    q, k, v = draw_halves(5, 1, 2, 2, 70, 70, 16, scale=6.0)
    assert_within_the_kernels_roundings(*run_forward(harness["address"], q, k, v), q, k, v)


@pytest.mark.parametrize("head_dim, n_heads, n_kv_heads, seq", [(128, 2, 2, 129), (48, 4, 2, 70)])
def test_the_float16_forward_has_no_data_race_under_thread_sanitizer(harness, head_dim, n_heads, n_kv_heads, seq):
    q, k, v = draw_halves(seq, 1, n_heads, n_kv_heads, seq, seq, head_dim)
    assert_within_the_kernels_roundings(*run_forward(harness["thread"], q, k, v), q, k, v)


def run_backward(binary, q, k, v, dout):
    """dq, dk, dv from the two backward kernels (each output starting as NaN), on O and L from the
    forward kernel and Dvec = rowsum(dO * O) in float32 (as attention_f16.backward computes it)."""
    out, lse = run_forward(binary, q, k, v)
    dvec = (dout.astype(numpy.float32) * out.astype(numpy.float32)).sum(axis=-1)
    dq, dk, dv = (numpy.full(a.shape, numpy.nan, dtype=numpy.float16) for a in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    dkdv_run = attention_f16.backward_launches(dout, q, k, v, lse, dvec, dq, dk, dv, scale)[0]
    dk, dv = run(binary, dkdv_run)[6:8]
    dq = run(binary, attention_f16.backward_launches(dout, q, k, v, lse, dvec, dq, dk, dv, scale)[1])[6]
    return (dq, dk, dv), (out, lse, dvec)


def draw_gradient(seed, q, scale=1.0):
    """dO for q, loss-scaled sizes included: float16 products of dO and V reach 1e3 and more."""
    rng = numpy.random.default_rng(seed)
    return (scale * rng.standard_normal(q.shape)).astype(numpy.float16)


@pytest.mark.parametrize("seq", [1, 17, 63, 64, 65, 129])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_the_float16_backward_matches_the_reference_under_address_and_undefined_behaviour_sanitizers(harness, head_dim,
                                                                                                     seq):
    q, k, v = draw_halves(seq + head_dim, 2, 2, 2, seq, seq, head_dim)
    dout = draw_gradient(seq, q, scale=100.0)
    grads, forward = run_backward(harness["address"], q, k, v, dout)
    assert_gradients_within_the_kernels_roundings(*grads, q, k, v, dout, *forward)


@pytest.mark.parametrize("n_heads, n_kv_heads, n_queries, n_keys", [(4, 2, 17, 129), (3, 1, 1, 65), (2, 2, 64, 100),
                                                                     (4, 1, 70, 70)])
def test_the_float16_backward_sums_each_groups_heads_and_handles_fewer_queries_than_keys(harness, n_heads,
                                                                                         n_kv_heads, n_queries,
                                                                                         n_keys):
    q, k, v = draw_halves(n_keys, 1, n_heads, n_kv_heads, n_queries, n_keys, 48)
    dout = draw_gradient(n_queries, q)
    grads, forward = run_backward(harness["address"], q, k, v, dout)
    assert_gradients_within_the_kernels_roundings(*grads, q, k, v, dout, *forward)


@pytest.mark.parametrize("head_dim, n_heads, n_kv_heads, seq", [(128, 2, 2, 129), (48, 4, 2, 70)])
def test_the_float16_backward_has_no_data_race_under_thread_sanitizer(harness, head_dim, n_heads, n_kv_heads, seq):
    q, k, v = draw_halves(seq, 1, n_heads, n_kv_heads, seq, seq, head_dim)
    dout = draw_gradient(seq, q)
    grads, forward = run_backward(harness["thread"], q, k, v, dout)
    assert_gradients_within_the_kernels_roundings(*grads, q, k, v, dout, *forward)


@pytest.mark.parametrize("change, message", [
    (dict(lse_dtype=numpy.float16), "lse must be float32"),
    (dict(head_dim=24), "no instance for float16 and head dim 24"),
    (dict(dtype=numpy.float32), "no instance for float32"),
])
def test_the_float16_launch_refuses_what_the_kernel_cannot_take(change, message):
    head_dim, dtype = change.get("head_dim", 16), change.get("dtype", numpy.float16)
    q = numpy.zeros((1, 2, 5, head_dim), dtype=dtype)
    lse = numpy.zeros((1, 2, 5), dtype=change.get("lse_dtype", numpy.float32))
    with pytest.raises(ValueError, match=message):
        attention_f16.forward_launch(q, q, q, q, lse, 0.25)


def test_the_float16_launch_has_a_block_per_tile_of_64_queries_of_each_query_head():
    q = numpy.zeros((3, 4, 129, 64), dtype=numpy.float16)
    k = numpy.zeros((3, 2, 129, 64), dtype=numpy.float16)
    launch = attention_f16.forward_launch(q, k, k, q, numpy.zeros((3, 4, 129), dtype=numpy.float32), 0.125)
    assert launch.grid == (3, 12, 1) and launch.block == (128, 1, 1)
    assert launch.shared_bytes == 2 * 64 * (64 + 8) * 2
    assert [type(arg) for arg in launch.args[5:]] == [numpy.int32, numpy.int32, numpy.int32, numpy.float32]
    assert launch.args[7] == 2  # G = 4 / 2


@pytest.mark.parametrize("change, message", [
    (dict(dvec=numpy.float16), "dvec must be float32"),
    (dict(dq=numpy.float32), "dq must be contiguous float16"),
    (dict(dk_heads=4), r"dk must be contiguous float16 of shape \(1, 2, 70, 16\)"),
])
def test_the_float16_backward_launches_refuse_what_the_kernels_cannot_take(change, message):
    q = numpy.zeros((1, 4, 70, 16), dtype=numpy.float16)
    k = numpy.zeros((1, 2, 70, 16), dtype=numpy.float16)
    lse = numpy.zeros((1, 4, 70), dtype=numpy.float32)
    dvec = numpy.zeros(lse.shape, dtype=change.get("dvec", numpy.float32))
    dq = numpy.zeros(q.shape, dtype=change.get("dq", numpy.float16))
    dk = numpy.zeros((1, change.get("dk_heads", 2), 70, 16), dtype=numpy.float16)
    with pytest.raises(ValueError, match=message):
        attention_f16.backward_launches(q, q, k, k, lse, dvec, dq, dk, k.copy(), 0.25)


def test_the_float16_backward_has_a_dkdv_block_per_64_keys_of_each_key_value_head_and_a_dq_block_per_64_queries():
    q = numpy.zeros((3, 4, 129, 64), dtype=numpy.float16)
    k = numpy.zeros((3, 2, 200, 64), dtype=numpy.float16)
    lse = numpy.zeros((3, 4, 129), dtype=numpy.float32)
    dkdv, dq = attention_f16.backward_launches(q, q, k, k, lse, lse.copy(), q.copy(), k.copy(), k.copy(), 0.125)
    assert dkdv.grid == (4, 6, 1) and dq.grid == (3, 12, 1)
    assert dkdv.shared_bytes == 2 * 64 * 72 * 2 + 2 * 32 * 72 * 2 + 2 * 32 * 4
    assert dq.shared_bytes == 2 * 64 * 72 * 2 + 2 * 32 * 72 * 2
