"""The tensor-core attention kernels (npllama/kernels/attention_mma.cu), in both operand formats
(float16, and float32 as TF32), run on the CPU by the harness under AddressSanitizer + UBSan and
under ThreadSanitizer, their mma.sync layer emulated in the fragment layouts the PTX ISA documents
(tests/harness/cuda_on_cpu.h).

The layer: one warp's product through each self-test kernel equals C + A B for fragments packed by a
NumPy model of those layouts (tests/tensor_cores.py), which tests/test_gpu.py checks against the
instructions themselves; the emulated rounding to TF32 is the NumPy model's, bit for bit. The
kernels: O, L and the gradients against the float64 reference on the inputs they compute with,
within bounds derived from where they round (P, dS and the outputs; the TF32 kernels also each
input); the emulation refuses an operand that is not a TF32 value, so a TF32 kernel that skips a
rounding fails here.
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
from npllama.kernels import attention_mma
from npllama.ops import attention
from tensor_cores import (
    UTF32,
    assert_gradients_within_the_kernels_roundings,
    assert_is_the_product,
    assert_within_the_kernels_roundings,
    draw_inputs,
    fragments,
    mma_problem,
    round_to_tf32,
    unfragment,
)

KERNELS = Path(attention_mma.__file__).parent
HEAD_DIMS = (16, 48, 128)  # the smallest, one of several k-steps that is not a power of two, the largest
DTYPES = ("float16", "float32")  # the two operand formats: float16, and float32 as TF32


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    if kernel_harness.unavailable_reason():
        pytest.skip(kernel_harness.unavailable_reason())
    folder = tmp_path_factory.mktemp("tensor-core-kernels")
    names = [attention_mma.kernel_name(head_dim, kind, dtype) for dtype in DTYPES for head_dim in HEAD_DIMS
             for kind in attention_mma.KINDS] + list(attention_mma.SELF_TESTS)
    source = [KERNELS / "attention_mma.cu"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        builds = {sanitizer: pool.submit(build, source, names, sanitizer, folder)
                  for sanitizer in ("address", "thread")}
        return {name: future.result() for name, future in builds.items()}


# --- the mma layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2**32 - 1))
def test_the_emulated_mma_is_c_plus_a_b_in_the_documented_fragment_layouts(harness, dtype, seed):
    a, b, c = mma_problem(seed, dtype)
    a_regs, b_regs, c_regs = fragments(a, b, c)
    d_regs = run(harness["address"], attention_mma.mma_launch(a_regs, b_regs, c_regs, dtype))[2]
    assert_is_the_product(unfragment(d_regs), a, b, c)


def test_the_emulated_tf32_mma_refuses_an_operand_that_is_not_tf32(harness):
    """The hardware's reading of a register's 13 low bits is its own: a kernel must round first."""
    a, b, c = mma_problem(0, "float32")
    a[3, 5] = numpy.nextafter(a[3, 5], numpy.float32(numpy.inf))  # one bit below TF32's precision
    with pytest.raises(AssertionError, match="not a TF32 value"):
        run(harness["address"], attention_mma.mma_launch(*fragments(a, b, c), "float32"))


@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300))
def test_the_emulated_tf32_rounding_is_round_to_nearest_ties_away_bit_for_bit(harness, bits):
    """Against the NumPy model (tests/tensor_cores.py), on any float32 bits: ties (a dropped part of
    exactly 0x1000), the largest finite values (to infinity), subnormals, infinities and NaNs."""
    x = numpy.array(bits + [0x3F801000, 0xBF803000, 0x7F7FFFFF, 0x00001FFF, 0x7F800000, 0xFF800001],
                    dtype=numpy.uint32).view(numpy.float32)
    got = run(harness["address"], attention_mma.tf32_rounding_launch(x))[0]
    want = round_to_tf32(x)
    assert (got.view(numpy.uint32) == want.view(numpy.uint32)).all()
    assert (want.view(numpy.uint32) & 0x1FFF == 0).all()
    finite = numpy.isfinite(x) & numpy.isfinite(want)
    exact = x[finite].astype(numpy.float64)
    assert (abs(want[finite] - exact) <= UTF32 * abs(exact) + 2.0**-137).all()  # half a unit, relatively


def test_the_tf32_model_rounds_ties_away_from_zero():
    """1 + 2^-11 is halfway between TF32's 1 and 1 + 2^-10: away from zero gives the larger, as
    cvt.rna does (round-to-nearest-even would give 1)."""
    x = numpy.array([1 + 2.0**-11, -(1 + 2.0**-11), 1 + 2.0**-11 - 2.0**-23, 1 + 3 * 2.0**-11], dtype=numpy.float32)
    assert round_to_tf32(x).tolist() == [1 + 2.0**-10, -(1 + 2.0**-10), 1.0, 1 + 2 * 2.0**-10]


def test_fragments_and_unfragment_are_inverse_and_cover_every_element():
    """The layout model itself: every element of C lands in exactly one lane's register and comes back."""
    c = numpy.arange(128, dtype=numpy.float32).reshape(16, 8)
    _, _, c_regs = fragments(numpy.zeros((16, 16)), numpy.zeros((16, 8)), c)
    assert sorted(c_regs.ravel().tolist()) == list(range(128))
    assert (unfragment(c_regs) == c).all()


# --- the forward kernel -------------------------------------------------------------------------

def run_forward(binary, q, k, v):
    """out (q's dtype) and lse (float32) from the kernel, both starting as NaN."""
    out = numpy.full(q.shape, numpy.nan, dtype=q.dtype)
    lse = numpy.full(q.shape[:3], numpy.nan, dtype=numpy.float32)
    args = run(binary, attention_mma.forward_launch(q, k, v, out, lse, 1.0 / math.sqrt(q.shape[-1])))
    return args[3], args[4]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq", [1, 17, 63, 64, 65, 129])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_the_forward_matches_the_reference_under_address_and_undefined_behaviour_sanitizers(harness, head_dim, seq,
                                                                                            dtype):
    q, k, v = draw_inputs(seq + head_dim, dtype, 2, 2, 2, seq, seq, head_dim)
    assert_within_the_kernels_roundings(*run_forward(harness["address"], q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads, n_kv_heads, n_queries, n_keys", [(4, 2, 17, 129), (3, 1, 1, 65), (2, 2, 64, 100)])
def test_the_forward_handles_groups_and_fewer_queries_than_keys(harness, n_heads, n_kv_heads, n_queries, n_keys,
                                                                dtype):
    q, k, v = draw_inputs(n_keys, dtype, 1, n_heads, n_kv_heads, n_queries, n_keys, 48)
    assert_within_the_kernels_roundings(*run_forward(harness["address"], q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_forward_stays_exact_with_large_logits(harness, dtype):
    """Scores near 100 overflow exp() unless each row's running max is subtracted first."""
    q, k, v = draw_inputs(5, dtype, 1, 2, 2, 70, 70, 16, scale=6.0)
    assert_within_the_kernels_roundings(*run_forward(harness["address"], q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, n_heads, n_kv_heads, seq", [(128, 2, 2, 129), (48, 4, 2, 70)])
def test_the_forward_has_no_data_race_under_thread_sanitizer(harness, head_dim, n_heads, n_kv_heads, seq, dtype):
    q, k, v = draw_inputs(seq, dtype, 1, n_heads, n_kv_heads, seq, seq, head_dim)
    assert_within_the_kernels_roundings(*run_forward(harness["thread"], q, k, v), q, k, v)


def test_the_tf32_forward_is_not_full_float32():
    """The bound the TF32 kernels are held to is TF32's, not a looser float32 one: the float64
    reference on float32 inputs that are not TF32 values is further from the TF32 reference than
    float32's own rounding would allow, so a kernel that skipped the rounding would show."""
    q, k, v = draw_inputs(3, "float32", 1, 2, 2, 64, 64, 64)
    exact, _ = attention.naive_forward(*(a.astype(numpy.float64) for a in (q, k, v)))
    rounded, _ = attention.naive_forward(*(round_to_tf32(a).astype(numpy.float64) for a in (q, k, v)))
    assert abs(exact - rounded).max() > 1000 * 2.0**-24 * abs(exact).max()


# --- the backward kernels -----------------------------------------------------------------------

def run_backward(binary, q, k, v, dout):
    """dq, dk, dv from the two backward kernels (each output starting as NaN), on O and L from the
    forward kernel and Dvec = rowsum(dO * O) in float32 (as attention_mma.backward computes it)."""
    out, lse = run_forward(binary, q, k, v)
    dvec = (dout.astype(numpy.float32) * out.astype(numpy.float32)).sum(axis=-1)
    dq, dk, dv = (numpy.full(a.shape, numpy.nan, dtype=q.dtype) for a in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    dkdv_run = attention_mma.backward_launches(dout, q, k, v, lse, dvec, dq, dk, dv, scale)[0]
    dk, dv = run(binary, dkdv_run)[6:8]
    dq = run(binary, attention_mma.backward_launches(dout, q, k, v, lse, dvec, dq, dk, dv, scale)[1])[6]
    return (dq, dk, dv), (out, lse, dvec)


def draw_gradient(seed, q, scale=1.0):
    """dO for q, loss-scaled sizes included: float16 products of dO and V reach 1e3 and more."""
    rng = numpy.random.default_rng(seed)
    return (scale * rng.standard_normal(q.shape)).astype(q.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq", [1, 17, 63, 64, 65, 129])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_the_backward_matches_the_reference_under_address_and_undefined_behaviour_sanitizers(harness, head_dim, seq,
                                                                                             dtype):
    q, k, v = draw_inputs(seq + head_dim, dtype, 2, 2, 2, seq, seq, head_dim)
    dout = draw_gradient(seq, q, scale=100.0)
    grads, forward = run_backward(harness["address"], q, k, v, dout)
    assert_gradients_within_the_kernels_roundings(*grads, q, k, v, dout, *forward)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads, n_kv_heads, n_queries, n_keys", [(4, 2, 17, 129), (3, 1, 1, 65), (2, 2, 64, 100),
                                                                     (4, 1, 70, 70)])
def test_the_backward_sums_each_groups_heads_and_handles_fewer_queries_than_keys(harness, n_heads, n_kv_heads,
                                                                                 n_queries, n_keys, dtype):
    q, k, v = draw_inputs(n_keys, dtype, 1, n_heads, n_kv_heads, n_queries, n_keys, 48)
    dout = draw_gradient(n_queries, q)
    grads, forward = run_backward(harness["address"], q, k, v, dout)
    assert_gradients_within_the_kernels_roundings(*grads, q, k, v, dout, *forward)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, n_heads, n_kv_heads, seq", [(128, 2, 2, 129), (48, 4, 2, 70)])
def test_the_backward_has_no_data_race_under_thread_sanitizer(harness, head_dim, n_heads, n_kv_heads, seq, dtype):
    q, k, v = draw_inputs(seq, dtype, 1, n_heads, n_kv_heads, seq, seq, head_dim)
    dout = draw_gradient(seq, q)
    grads, forward = run_backward(harness["thread"], q, k, v, dout)
    assert_gradients_within_the_kernels_roundings(*grads, q, k, v, dout, *forward)


@pytest.mark.parametrize("change, message", [
    (dict(lse_dtype=numpy.float16), "lse must be float32"),
    (dict(head_dim=24), "no instance for float16 and head dim 24"),
    (dict(dtype=numpy.float64), "no instance for float64"),
])
def test_the_launch_refuses_what_the_kernel_cannot_take(change, message):
    head_dim, dtype = change.get("head_dim", 16), change.get("dtype", numpy.float16)
    q = numpy.zeros((1, 2, 5, head_dim), dtype=dtype)
    lse = numpy.zeros((1, 2, 5), dtype=change.get("lse_dtype", numpy.float32))
    with pytest.raises(ValueError, match=message):
        attention_mma.forward_launch(q, q, q, q, lse, 0.25)


@pytest.mark.parametrize("dtype, row_bytes, operands", [(numpy.float16, (64 + 8) * 2, "Float16Operands"),
                                                         (numpy.float32, (64 + 4) * 4, "Tf32Operands")])
def test_the_launch_has_a_block_per_tile_of_64_queries_of_each_query_head(dtype, row_bytes, operands):
    """Shared rows are 16 bytes longer than a row of D elements: 8 halves, or 4 floats."""
    q = numpy.zeros((3, 4, 129, 64), dtype=dtype)
    k = numpy.zeros((3, 2, 129, 64), dtype=dtype)
    launch = attention_mma.forward_launch(q, k, k, q, numpy.zeros((3, 4, 129), dtype=numpy.float32), 0.125)
    assert launch.kernel == f"npllama::attention_forward_mma<npllama::{operands}, 64>"
    assert launch.grid == (3, 12, 1) and launch.block == (128, 1, 1)
    assert launch.shared_bytes == 2 * 64 * row_bytes
    assert [type(arg) for arg in launch.args[5:]] == [numpy.int32, numpy.int32, numpy.int32, numpy.float32]
    assert launch.args[7] == 2  # G = 4 / 2


@pytest.mark.parametrize("change, message", [
    (dict(dvec=numpy.float16), "dvec must be float32"),
    (dict(dq=numpy.float32), "dq must be contiguous float16"),
    (dict(dk_heads=4), r"dk must be contiguous float16 of shape \(1, 2, 70, 16\)"),
])
def test_the_backward_launches_refuse_what_the_kernels_cannot_take(change, message):
    q = numpy.zeros((1, 4, 70, 16), dtype=numpy.float16)
    k = numpy.zeros((1, 2, 70, 16), dtype=numpy.float16)
    lse = numpy.zeros((1, 4, 70), dtype=numpy.float32)
    dvec = numpy.zeros(lse.shape, dtype=change.get("dvec", numpy.float32))
    dq = numpy.zeros(q.shape, dtype=change.get("dq", numpy.float16))
    dk = numpy.zeros((1, change.get("dk_heads", 2), 70, 16), dtype=numpy.float16)
    with pytest.raises(ValueError, match=message):
        attention_mma.backward_launches(q, q, k, k, lse, dvec, dq, dk, k.copy(), 0.25)


@pytest.mark.parametrize("dtype, row_bytes", [(numpy.float16, 72 * 2), (numpy.float32, 68 * 4)])
def test_the_backward_has_a_dkdv_block_per_64_keys_of_each_key_value_head_and_a_dq_block_per_64_queries(dtype,
                                                                                                      row_bytes):
    q = numpy.zeros((3, 4, 129, 64), dtype=dtype)
    k = numpy.zeros((3, 2, 200, 64), dtype=dtype)
    lse = numpy.zeros((3, 4, 129), dtype=numpy.float32)
    dkdv, dq = attention_mma.backward_launches(q, q, k, k, lse, lse.copy(), q.copy(), k.copy(), k.copy(), 0.125)
    assert dkdv.grid == (4, 6, 1) and dq.grid == (3, 12, 1)
    assert dkdv.shared_bytes == 2 * 64 * row_bytes + 2 * 32 * row_bytes + 2 * 32 * 4
    assert dq.shared_bytes == 2 * 64 * row_bytes + 2 * 32 * row_bytes


@pytest.mark.parametrize("dtype, tf32, fits, expected", [
    ("float32", True, True, "tensor cores"), ("float32", False, True, "kernels"),
    ("float16", False, True, "tensor cores"), ("float16", True, True, "tensor cores"),
    ("float64", True, True, "kernels"), ("float32", True, False, "kernels")])
def test_the_op_sends_cupy_float32_to_the_tf32_kernels_only_while_float32_products_are_tf32(monkeypatch, dtype, tf32,
                                                                                          fits, expected):
    """ops/attention.py's choice for CuPy arrays (stand-ins here): float16 on the tensor cores; float32
    there while backend.tf32_products says CuPy's float32 products are TF32 (--tf32), else on
    attention.cu's float32 kernels; float64 never; nor where the device's shared memory cannot hold
    the tiles. Backward follows forward even when the float32 products change in between."""
    from npllama.kernels import attention as cuda_attention

    calls = []
    products = {"tf32": tf32}

    def recorded(where, kind):
        def call(*args):
            calls.append((where, kind))
            q = args[0] if kind == "forward" else args[1]
            if kind == "forward":
                return q.copy(), numpy.zeros(q.shape[:3], dtype=numpy.float32)
            return q.copy(), args[2].copy(), args[3].copy()
        return call

    for where, module in (("tensor cores", attention_mma), ("kernels", cuda_attention)):
        for kind in ("forward", "backward"):
            monkeypatch.setattr(module, kind, recorded(where, kind))
    monkeypatch.setattr(attention, "is_cupy_array", lambda array: True)
    monkeypatch.setattr(attention, "tf32_products", lambda xp: products["tf32"])
    monkeypatch.setattr(attention_mma, "fits_the_device", lambda dtype, head_dim: fits)
    q, k, v = draw_inputs(0, dtype, 1, 2, 1, 5, 5, 16)
    out, cache = attention.forward(q, k, v)
    products["tf32"] = not tf32
    attention.backward(numpy.ones_like(out), cache)
    assert calls == [(expected, "forward"), (expected, "backward")]


@pytest.mark.parametrize("dtype, head_dim, limit, fits", [
    ("float32", 128, 101_376, False),  # sm_86 and sm_89 allow a block 99 KiB: the TF32 dK/dV's tiles are 256 more
    ("float32", 128, 101_632, True), ("float32", 64, 101_376, True), ("float16", 128, 101_376, True),
    ("float16", 128, 48 * 1024, False), ("float16", 64, 48 * 1024, True)])
def test_an_instance_fits_a_device_when_each_of_its_kernels_shared_tiles_do(dtype, head_dim, limit, fits):
    assert attention_mma.fits(dtype, head_dim, limit) is fits


def misaligned(shape, dtype):
    """A C-contiguous array of zeros whose data starts 4 bytes past a 16-byte boundary."""
    dtype = numpy.dtype(dtype)
    size = int(numpy.prod(shape)) * dtype.itemsize
    buffer = numpy.zeros(size + 64, dtype=numpy.uint8)
    start = (-buffer.ctypes.data) % 16 + 4
    return buffer[start:start + size].view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_launches_refuse_inputs_the_16_byte_loads_cannot_read(dtype):
    """The kernels load q, k, v and dO 16 bytes at a time: an array starting 4 bytes past a boundary
    (a contiguous view from an odd offset) is refused, not read misaligned."""
    q = numpy.zeros((1, 2, 5, 16), dtype=dtype)
    lse = numpy.zeros((1, 2, 5), dtype=numpy.float32)
    with pytest.raises(ValueError, match="16-byte boundary"):
        attention_mma.forward_launch(q, misaligned(q.shape, dtype), q, q.copy(), lse, 0.25)
    with pytest.raises(ValueError, match="dout must start on a 16-byte boundary"):
        attention_mma.backward_launches(misaligned(q.shape, dtype), q, q, q, lse, lse.copy(), q.copy(), q.copy(),
                                        q.copy(), 0.25)


def test_a_misaligned_input_is_copied_to_a_boundary_before_a_launch_and_an_aligned_one_is_not():
    x = misaligned((3, 40), numpy.float32)
    x[...] = numpy.arange(120).reshape(3, 40)
    moved = attention_mma._aligned(x)
    assert moved is not x and moved.ctypes.data % 16 == 0 and (moved == x).all()
    assert attention_mma._aligned(moved) is moved
