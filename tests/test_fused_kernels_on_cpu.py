"""The fused kernels (npllama/kernels/swiglu.cu, rmsnorm.cu, rope.cu, cross_entropy.cu), run on the
CPU by the harness under AddressSanitizer + UBSan and under ThreadSanitizer, against the array code
of npllama/ops that they fuse, in every dtype they exist for (float32, float64, float16 as its bits)."""

import contextlib
import dataclasses
import functools
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

import kernel_harness
from kernel_harness import build, run
from npllama.kernels import cross_entropy as cuda_cross_entropy
from npllama.kernels import rmsnorm as cuda_rmsnorm
from npllama.kernels import rope as cuda_rope
from npllama.kernels import swiglu as cuda_swiglu
from npllama.ops import cross_entropy, rmsnorm, rope, swiglu
from npllama.ops import cross_entropy as cross_entropy_op
from npllama.ops import rmsnorm as rmsnorm_op
from npllama.ops import rope as rope_op
from npllama.ops import swiglu as swiglu_op

KERNELS = Path(cuda_swiglu.__file__).parent
# How far the kernel may be from the array code, relative to the size of the terms: the same
# operations in the same order, each rounded once, but exp from the C library here and NumPy's own
# in the array code (a few units in the last place apart). float16: both round float32 results that
# close, so a result may land on the neighbouring float16 (one spacing, 2^-10 relative, or 2^-24
# among the subnormals).
UNIT = {"float64": 2.0**-53, "float32": 2.0**-24}


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    if kernel_harness.unavailable_reason():
        pytest.skip(kernel_harness.unavailable_reason())
    folder = tmp_path_factory.mktemp("fused-kernels")
    source = [KERNELS / name for name in ("swiglu.cu", "rmsnorm.cu", "rope.cu", "cross_entropy.cu")]
    names = [name for kernels in (cuda_swiglu, cuda_rmsnorm, cuda_rope, cuda_cross_entropy)
             for name in kernels.kernel_names()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        builds = {sanitizer: pool.submit(build, source, names, sanitizer, folder)
                  for sanitizer in ("address", "thread")}
        return {name: future.result() for name, future in builds.items()}


def assert_close_to_the_array_code(got, want, magnitude, dtype, what):
    assert got.dtype == want.dtype and numpy.isfinite(got).all(), f"{what}: not written, or not finite"
    got, want = got.astype(numpy.float64), want.astype(numpy.float64)
    if dtype == "float16":  # one spacing, or more where the float32 results themselves differ (da's 1 + a(1 - s)
        # cancels near a = -1.28, where a last-bit difference of exp moves it by a float16 spacing)
        bound = 2.0**-10 * abs(want) + 2.0**-24 + 8 * UNIT["float32"] * magnitude
    else:
        bound = 8 * UNIT[dtype] * magnitude
    assert (abs(got - want) <= bound).all(), f"{what}: worst {abs(got - want).max()}"


@given(dtype=st.sampled_from(["float32", "float64", "float16"]), size=st.integers(1, 600),
       gate_scale=st.sampled_from([1.0, 8.0, 100.0]), dy_scale=st.sampled_from([1.0, 1e3]),
       sanitizer=st.sampled_from(["address", "thread"]), seed=st.integers(0, 2**32 - 1))
@example(dtype="float32", size=257, gate_scale=100.0, dy_scale=1.0, sanitizer="address", seed=0)  # exp overflows
@example(dtype="float16", size=1, gate_scale=1.0, dy_scale=1e3, sanitizer="thread", seed=1)
@example(dtype="float16", size=300, gate_scale=8.0, dy_scale=1e3, sanitizer="address", seed=2)
def test_the_fused_swiglu_kernels_give_the_array_codes_numbers(harness, dtype, size, gate_scale, dy_scale, sanitizer,
                                                               seed):
    """Sizes that end mid-block; gates up to +-300, where exp(-a) overflows (sigmoid 0) or vanishes."""
    rng = numpy.random.default_rng(seed)
    a = numpy.clip(gate_scale * rng.standard_normal(size), -300, 300).astype(dtype)
    b, dy = rng.standard_normal(size).astype(dtype), (dy_scale * rng.standard_normal(size)).astype(dtype)
    a64, b64, dy64 = (x.astype(numpy.float64) for x in (a, b, dy))
    largest = numpy.finfo(dtype).max / 2  # results that overflow the dtype: inf on both sides, nothing to compare
    assume(max(abs(a64 * b64).max(), abs(dy64 * a64).max(), (abs(dy64 * b64) * (1 + abs(a64))).max()) < largest)
    with numpy.errstate(over="ignore"):  # the array code's exp(-a) overflows to inf for the largest gates
        y_want, cache = swiglu.forward(a, b)
        da_want, db_want = swiglu.backward(dy, cache)
    y = run(harness[sanitizer], cuda_swiglu.forward_launch(a, b, numpy.full_like(a, numpy.nan)))[2]
    da, db = run(harness[sanitizer], cuda_swiglu.backward_launch(dy, a, b, numpy.full_like(a, numpy.nan),
                                                                 numpy.full_like(b, numpy.nan)))[3:5]
    assert_close_to_the_array_code(y, y_want, abs(a64 * b64), dtype, "y")
    assert_close_to_the_array_code(db, db_want, abs(dy64 * a64), dtype, "db")
    assert_close_to_the_array_code(da, da_want, abs(dy64 * b64) * (1 + abs(a64)), dtype, "da")


@pytest.mark.parametrize("arrays, message", [
    (lambda: (numpy.zeros(4, "float32"), numpy.zeros(4, "float64"), numpy.zeros(4, "float32")), "one dtype"),
    (lambda: (numpy.zeros(4, "int32"),) * 3, "one dtype of float32, float64, float16"),
    (lambda: (numpy.zeros(4, "float32"), numpy.zeros(5, "float32"), numpy.zeros(4, "float32")), "one shape"),
    (lambda: (numpy.zeros((4, 2), "float32").T,) * 3, "contiguous"),
])
def test_the_fused_swiglu_launch_refuses_arrays_it_cannot_take(arrays, message):
    with pytest.raises(ValueError, match=message):
        cuda_swiglu.forward_launch(*arrays())


def test_the_fused_swiglu_launch_has_a_thread_per_element():
    a = numpy.zeros((3, 5, 100), dtype=numpy.float16)
    launch = cuda_swiglu.forward_launch(a, a, a)
    assert launch.grid == (6, 1, 1) and launch.block == (256, 1, 1) and launch.args[3] == 1500
    assert launch.kernel == "npllama::swiglu_forward<unsigned short>" and type(launch.args[3]) is numpy.int64


# RMSNorm's sums run in another order than NumPy's (a lane every 32nd column, then a butterfly; the
# gain's gradient by blocks of rows): a sum of n terms in any order is within (n - 1) u of the sum of
# their magnitudes from the exact one, so two orders are within 2 n u of each other; the few single
# operations around the sums add a unit each. float16 results may round to the neighbouring float16.
def assert_within(got, want, bound, dtype, what):
    assert got.dtype == want.dtype and numpy.isfinite(got).all(), f"{what}: not written, or not finite"
    got, want = got.astype(numpy.float64), want.astype(numpy.float64)
    if dtype == "float16":
        bound = bound + 2.0**-10 * abs(want) + 2.0**-24
    assert (abs(got - want) <= bound).all(), f"{what}: worst {abs(got - want).max()}, bound {bound.min()}"


def rmsnorm_on_the_harness(binary, x, weight, dy, cache, eps, rows_per_block):
    """y, xhat, rstd of the forward kernel; dx of the backward kernel and dweight of the gain's two
    kernels, both given the array code's cache (so that they are compared on the same inputs)."""
    rows, cols = x.size // x.shape[-1], x.shape[-1]
    compute = cuda_rmsnorm.COMPUTE[x.dtype.name]
    nan = functools.partial(numpy.full, fill_value=numpy.nan)
    y, xhat, rstd = run(binary, cuda_rmsnorm.forward_launch(x, weight, nan(x.shape, dtype=x.dtype),
                                                            nan(x.shape, dtype=x.dtype), nan(rows, dtype=compute),
                                                            eps))[2:5]
    dx = run(binary, cuda_rmsnorm.backward_launch(dy, cache.xhat, weight, cache.rstd, nan(x.shape, dtype=x.dtype)))[4]
    partial = nan((-(-rows // rows_per_block), cols), dtype=compute)
    first, second = cuda_rmsnorm.weight_grad_launches(dy, cache.xhat, partial, nan(cols, dtype=x.dtype),
                                                      rows_per_block)
    partial = run(binary, first)[2]
    dweight = run(binary, replace(second, args=(partial, *second.args[1:])))[1]
    return y, xhat, rstd.reshape(cache.rstd.shape), dx, dweight


@given(dtype=st.sampled_from(["float32", "float64", "float16"]), rows=st.integers(1, 20), cols=st.integers(1, 300),
       x_scale=st.sampled_from([1e-3, 1.0, 100.0]), eps=st.sampled_from([1e-6, 1e-5, 0.1]),
       rows_per_block=st.integers(1, 7), sanitizer=st.sampled_from(["address", "thread"]),
       seed=st.integers(0, 2**32 - 1))
@example(dtype="float32", rows=9, cols=257, x_scale=1.0, eps=1e-6, rows_per_block=4, sanitizer="thread", seed=0)
@example(dtype="float16", rows=1, cols=1, x_scale=1e-3, eps=1e-5, rows_per_block=1, sanitizer="address", seed=1)
@example(dtype="float64", rows=17, cols=33, x_scale=100.0, eps=0.1, rows_per_block=7, sanitizer="address", seed=2)
def test_the_fused_rmsnorm_kernels_give_the_array_codes_numbers(harness, dtype, rows, cols, x_scale, eps,
                                                                rows_per_block, sanitizer, seed):
    """Rows that end mid-block (8 a block) and mid-warp (32 columns a lane round), row blocks of the
    gain's gradient that end mid-way; inputs small enough for eps to matter, and large."""
    rng = numpy.random.default_rng(seed)
    x = (x_scale * rng.standard_normal((rows, cols))).astype(dtype)
    weight, dy = (1 + rng.standard_normal(cols)).astype(dtype), rng.standard_normal((rows, cols)).astype(dtype)
    y_want, cache = rmsnorm.forward(x, weight, eps)
    dx_want, dweight_want = rmsnorm.backward(dy, cache)
    y, xhat, rstd, dx, dweight = rmsnorm_on_the_harness(harness[sanitizer], x, weight, dy, cache, eps, rows_per_block)

    unit = 2.0**-53 if dtype == "float64" else 2.0**-24
    r, xhat64, g, dy64 = (a.astype(numpy.float64) for a in (cache.rstd, cache.xhat, weight, dy))
    x_ratio = (2 * cols + 8) * unit  # rstd, and all that is computed from it, may differ by this much, relatively
    assert_within(rstd, cache.rstd, x_ratio * r, dtype, "rstd")
    assert_within(xhat, cache.xhat, x_ratio * abs(x.astype(numpy.float64)) * r, dtype, "xhat")
    assert_within(y, y_want, x_ratio * abs(x.astype(numpy.float64) * r * g), dtype, "y")
    dxhat = abs(dy64 * g)
    projection = (dxhat * abs(xhat64)).mean(axis=-1, keepdims=True)
    assert_within(dx, dx_want, (2 * cols + 8) * unit * r * (dxhat + abs(xhat64) * projection), dtype, "dx")
    assert_within(dweight, dweight_want, (2 * rows + 8) * unit * abs(dy64 * xhat64).sum(axis=0), dtype, "dweight")


def test_the_fused_rmsnorm_launches_have_a_warp_per_row_and_a_thread_per_column():
    x = numpy.zeros((3, 5, 100), dtype=numpy.float16)
    rstd = numpy.zeros(15, dtype=numpy.float32)
    launch = cuda_rmsnorm.forward_launch(x, x[0, 0], x, x, rstd, 1e-6)
    assert launch.kernel == "npllama::rmsnorm_forward<unsigned short>"
    assert launch.grid == (2, 1, 1) and launch.block == (256, 1, 1)
    assert launch.args[5:] == (15, 100, numpy.float32(1e-6)) and type(launch.args[7]) is numpy.float32
    first, second = cuda_rmsnorm.weight_grad_launches(x, x, numpy.zeros((3, 100), numpy.float32), x[0, 0], 6)
    assert first.grid == (1, 3, 1) and second.grid == (1, 1, 1) and second.args[2:] == (3, 100)


@pytest.mark.parametrize("rows, rows_per_block", [(1, 64), (64 * 65535, 64), (64 * 65535 + 1, 65), (10**9, 15260)])
def test_the_gain_gradient_takes_at_most_65535_row_blocks(rows, rows_per_block):
    assert cuda_rmsnorm.weight_grad_rows_per_block(rows) == rows_per_block
    assert -(-rows // rows_per_block) <= 65535


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "rstd": numpy.zeros(15, numpy.float16)}, "rstd must be a contiguous float32 array of 15"),
    (lambda a: {**a, "weight": numpy.zeros(99, numpy.float16)}, "weight must be a contiguous float16 array of 100"),
    (lambda a: {**a, "y": numpy.zeros((3, 5, 100), numpy.float32)}, "y must be a contiguous float16"),
    (lambda a: {**a, "xhat": numpy.zeros((3, 100, 5), numpy.float16).transpose(0, 2, 1)}, "xhat must be a contiguous"),
    (lambda a: {**a, "x": numpy.zeros((3, 5, 100), numpy.int32)}, "int32 arrays have no instance"),
])
def test_the_fused_rmsnorm_launch_refuses_arrays_it_cannot_take(change, message):
    x = numpy.zeros((3, 5, 100), dtype=numpy.float16)
    arrays = change({"x": x, "weight": x[0, 0], "y": x, "xhat": x, "rstd": numpy.zeros(15, numpy.float32)})
    with pytest.raises(ValueError, match=message):
        cuda_rmsnorm.forward_launch(**arrays, eps=1e-6)


def as_the_gpu_sees_it(arg):
    """A kernel receives an array as the address of its first element: for a strided view that starts
    where its contiguous base does (a transpose), the harness is given that base."""
    if not isinstance(arg, numpy.ndarray) or arg.flags.c_contiguous:
        return arg
    base = arg
    while base.base is not None:
        base = base.base
    assert base.flags.c_contiguous and base.ctypes.data == arg.ctypes.data, "a view the harness cannot pass"
    return base


@contextlib.contextmanager
def cupy_path_on_the_harness(binary):
    """The ops' CuPy path with NumPy arrays: every array looks like CuPy's to the ops, `cupy` is NumPy's
    allocation (new arrays NaN, or -1 for integers, to see what a kernel leaves unwritten), and each
    launch runs on the harness, its results copied back into its arrays. Yields the list of the
    launches' (kernel, grid)."""
    def unwritten(shape, dtype):
        return numpy.full(shape, -1 if numpy.dtype(dtype).kind == "i" else numpy.nan, dtype=dtype)

    fake = types.SimpleNamespace(empty=unwritten,
                                 empty_like=lambda a: numpy.full_like(a, numpy.nan),
                                 ascontiguousarray=numpy.ascontiguousarray)
    launched = []

    def launch(run_):
        launched.append((run_.kernel, run_.grid))
        for arg, result in zip(run_.args, run(binary, replace(run_, args=tuple(map(as_the_gpu_sees_it, run_.args))))):
            if isinstance(arg, numpy.ndarray) and arg.flags.c_contiguous:  # a strided view is only read
                numpy.copyto(arg, result.reshape(arg.shape))

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "cupy", fake)
        for kernels in (cuda_rmsnorm, cuda_swiglu, cuda_rope, cuda_cross_entropy):
            patch.setattr(kernels, "launch", launch)
        for op in (rmsnorm_op, swiglu_op, rope_op, cross_entropy_op):
            patch.setattr(op, "is_cupy_array", lambda a: True)
        yield launched


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("shape", [(1, 1, 6), (2, 35, 40)])
def test_the_ops_cupy_path_runs_the_fused_kernels_with_the_array_codes_numbers(harness, dtype, shape):
    """What ops/rmsnorm.py, ops/swiglu.py, ops/rope.py and ops/cross_entropy.py do with CuPy arrays (the
    arrays they allocate, the row blocks of the gain's gradient: 70 rows are two, RoPE's gradient as
    the model hands it, attention's (B, H, T, D) transposed, int32 targets with an ignored one, the
    gradient's scale dy / N' on the device): the bits of the kernels launched directly on the inputs
    the path gives them (its own forward's caches: the tests above hold those launches to the array
    code), and the array code's shapes and dtypes."""
    rng = numpy.random.default_rng(0)
    binary = harness["address"]
    x, dy, a, b = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    weight = rng.standard_normal(shape[-1]).astype(dtype)
    heads = x.reshape(shape[0], shape[1], -1, 2)  # (B, T, H, D = 2)
    heads_dy = rng.standard_normal((shape[0], heads.shape[2], shape[1], 2)).astype(dtype).transpose(0, 2, 1, 3)
    cos, sin = rope.frequencies(2, numpy.arange(shape[1]), dtype=cuda_rope.COMPUTE[dtype])
    logits = x.reshape(-1, shape[-1])
    targets = rng.integers(0, shape[-1], logits.shape[0]).astype(numpy.int32)
    targets[-1] = -100
    caches = {}

    def the_four_ops():
        """Each op forward and backward: the results in order, the caches in `caches` (cross-entropy's
        before its backward takes the exp buffer)."""
        y, caches["rmsnorm"] = rmsnorm.forward(x, weight)
        results = [y, caches["rmsnorm"].xhat, caches["rmsnorm"].rstd, *rmsnorm.backward(dy, caches["rmsnorm"])]
        y, cache = swiglu.forward(a, b)
        results += [y, *swiglu.backward(dy, cache)]
        y, cache = rope.forward(heads, cos, sin)
        results += [y, rope.backward(heads_dy, cache)]
        loss, cache = cross_entropy.forward(logits, targets)
        caches["cross_entropy"] = dataclasses.replace(cache, exps=cache.exps.copy())
        return results + [loss, cross_entropy.backward(3.0, cache)]

    want = the_four_ops()
    with cupy_path_on_the_harness(binary) as launched:
        got = the_four_ops()
    counted = (targets != -100).astype(numpy.int32)
    safe = numpy.where(targets != -100, targets, 0).astype(numpy.int64)
    cache = caches["cross_entropy"]
    *_, nll, dlogits, _ = cross_entropy_on_the_harness(binary, logits, safe, counted, cache, 3.0)
    nan = functools.partial(numpy.full_like, fill_value=numpy.nan)
    direct = [*rmsnorm_on_the_harness(binary, x, weight, dy, caches["rmsnorm"], 1e-6, cuda_rmsnorm.WEIGHT_GRAD_ROWS),
              run(binary, cuda_swiglu.forward_launch(a, b, nan(a)))[2],
              *run(binary, cuda_swiglu.backward_launch(dy, a, b, nan(a), nan(b)))[3:5],
              rope_on_the_harness(binary, heads, cos, sin, False),
              rope_on_the_harness(binary, heads_dy, cos, sin, True),
              nll.sum() / cache.n_counted, dlogits]
    names = ("y", "xhat", "rstd", "dx", "dweight", "swiglu y", "da", "db", "rope y", "rope dx", "loss", "dlogits")
    for name, path, launched_directly, array_code in zip(names, got, direct, want, strict=True):
        assert path.shape == array_code.shape and path.dtype == array_code.dtype, name
        assert path.tobytes() == numpy.ascontiguousarray(launched_directly).tobytes(), name
    rows, row_blocks = x.size // shape[-1], -(-x.size // shape[-1] // cuda_rmsnorm.WEIGHT_GRAD_ROWS)
    elements = -(-x.size // cuda_swiglu.THREADS)
    assert launched == [(f"npllama::rmsnorm_{kind}<{cuda_rmsnorm.STORAGE[dtype]}>", grid) for kind, grid in
                        (("forward", (-(-rows // 8), 1, 1)), ("backward", (-(-rows // 8), 1, 1)),
                         ("weight_grad_partial", (1, row_blocks, 1)), ("weight_grad_sum", (1, 1, 1)))] + \
        [(f"npllama::swiglu_{kind}<{cuda_swiglu.STORAGE[dtype]}>", (elements, 1, 1))
         for kind in ("forward", "backward")] + \
        [(f"npllama::rope_rotate<{cuda_rope.STORAGE[dtype]}>", (-(-x.size // 2 // cuda_rope.THREADS), 1, 1))] * 2 + \
        [(f"npllama::cross_entropy_{kind}<{cuda_cross_entropy.STORAGE[dtype]}>", (rows, 1, 1))
         for kind in ("forward", "backward")]


def test_the_fused_rmsnorm_backward_takes_only_its_forwards_dtype(harness):
    """A float32 gradient of a float16 forward (the fused forward's cache) takes the array code: dx in
    float32, computed in float32, as on NumPy; the float16 kernel would read float32 bits as float16."""
    rng = numpy.random.default_rng(0)
    x, weight = rng.standard_normal((3, 40)).astype(numpy.float16), rng.standard_normal(40).astype(numpy.float16)
    dy = rng.standard_normal((3, 40)).astype(numpy.float32)
    with cupy_path_on_the_harness(harness["address"]) as launched:
        _, cache = rmsnorm.forward(x, weight)
        dx, dweight = rmsnorm.backward(dy, cache)
    assert [kernel for kernel, _ in launched] == ["npllama::rmsnorm_forward<unsigned short>"]
    dx_want, dweight_want = rmsnorm.backward(dy, cache)
    assert dx.dtype == numpy.float32 and dx.tobytes() == dx_want.tobytes()
    assert dweight.tobytes() == dweight_want.tobytes()


def rope_on_the_harness(binary, x, cos, sin, inverse):
    launch = cuda_rope.rotate_launch(x, cos, sin, numpy.full(x.shape, numpy.nan, dtype=x.dtype), inverse)
    return run(binary, replace(launch, args=tuple(map(as_the_gpu_sees_it, launch.args))))[7]


@given(dtype=st.sampled_from(["float32", "float64", "float16"]), batch=st.integers(1, 2), seq=st.integers(1, 9),
       heads=st.integers(1, 3), head_dim=st.sampled_from([2, 6, 16, 64]), start=st.sampled_from([0, 5, 4000]),
       transposed=st.booleans(), sanitizer=st.sampled_from(["address", "thread"]), seed=st.integers(0, 2**32 - 1))
@example(dtype="float16", batch=2, seq=9, heads=3, head_dim=64, start=4000, transposed=True, sanitizer="thread",
         seed=0)  # 1728 pairs: 7 blocks, the last one partial
def test_the_fused_rope_kernel_gives_the_array_codes_bits(harness, dtype, batch, seq, heads, head_dim, start,
                                                          transposed, sanitizer, seed):
    """Forward and backward: the same operations in the same order, each rounded once, and no function
    of the C library in between, so the bits are the array code's; x contiguous (B, T, H, D), or
    attention's (B, H, T, D) gradient transposed (read through its strides)."""
    rng = numpy.random.default_rng(seed)
    compute = cuda_rope.COMPUTE[dtype]
    cos, sin = rope.frequencies(head_dim, numpy.arange(start, start + seq), dtype=compute)
    for inverse in (False, True):
        if transposed:
            x = rng.standard_normal((batch, heads, seq, head_dim)).astype(dtype).transpose(0, 2, 1, 3)
        else:
            x = rng.standard_normal((batch, seq, heads, head_dim)).astype(dtype)
        want = rope.backward(x, rope.RopeCache(cos, sin)) if inverse else rope.forward(x, cos, sin)[0]
        got = rope_on_the_harness(harness[sanitizer], x, cos, sin, inverse)
        assert got.dtype == want.dtype and got.reshape(want.shape).tobytes() == numpy.ascontiguousarray(want).tobytes()


@pytest.mark.parametrize("x, table, message", [
    (lambda: numpy.zeros((1, 4, 2, 8), "float16"), lambda: numpy.zeros((4, 4), "float16"), "tables float16"),
    (lambda: numpy.zeros((1, 4, 2, 8), "float32"), lambda: numpy.zeros((4, 8), "float32"), r"\(T, D/2\)"),
    (lambda: numpy.zeros((1, 4, 2, 7), "float32"), lambda: numpy.zeros((4, 3), "float32"), "D even"),
    (lambda: numpy.zeros((4, 2, 8), "float32"), lambda: numpy.zeros((4, 4), "float32"), r"\(B, T, H, D\)"),
    (lambda: numpy.zeros((1, 4, 2, 8), "int32"), lambda: numpy.zeros((4, 4), "float32"), "one of float32"),
])
def test_the_fused_rope_launch_refuses_arrays_it_cannot_take(x, table, message):
    x, table = x(), table()
    with pytest.raises(ValueError, match=message):
        cuda_rope.rotate_launch(x, table, table, numpy.zeros_like(x), inverse=False)


def test_the_fused_rope_launch_has_a_thread_per_pair_and_reads_x_through_its_strides():
    x = numpy.zeros((2, 5, 3, 64), dtype=numpy.float16).transpose(0, 2, 1, 3)  # (B, T, H, D) = (2, 3, 5, 64)
    table = numpy.zeros((3, 32), dtype=numpy.float32)
    launch = cuda_rope.rotate_launch(x, table, table, numpy.zeros((2, 3, 5, 64), numpy.float16), inverse=True)
    assert launch.kernel == "npllama::rope_rotate<unsigned short>" and launch.grid == (4, 1, 1)  # 960 pairs
    assert launch.args[1:5] == (960, 64, 192, 1) and all(type(a) is numpy.int64 for a in launch.args[1:5])
    assert launch.args[8:] == (2, 3, 5, 32, 1)


def cross_entropy_on_the_harness(binary, logits, targets, counted, cache, dy):
    """exps, rest, argmax and nll of the forward kernel; dlogits of the backward kernel given the array
    code's cache (so that both compute from the same exps and rest)."""
    rows, vocab = logits.shape
    compute = cuda_cross_entropy.COMPUTE[logits.dtype.name]
    nan = functools.partial(numpy.full, fill_value=numpy.nan)
    forward = cuda_cross_entropy.forward_launch(logits, targets, counted, nan((rows, vocab), dtype=compute),
                                                nan(rows, dtype=compute), numpy.full(rows, -1),
                                                nan(rows, dtype=compute))
    exps, rest, argmax, nll = run(binary, forward)[3:7]
    scale = numpy.asarray([dy / cache.n_counted], dtype=compute)
    backward = cuda_cross_entropy.backward_launch(cache.exps.copy(), cache.rest, cache.argmax, targets, counted, scale,
                                                  nan((rows, vocab), dtype=logits.dtype))
    return exps.reshape(rows, vocab), rest, argmax, nll, run(binary, backward)[6].reshape(rows, vocab), scale[0]


@given(dtype=st.sampled_from(["float32", "float64", "float16"]), rows=st.integers(1, 6), vocab=st.integers(1, 700),
       scale=st.sampled_from([1.0, 10.0, 30.0, 1e4]), ties=st.booleans(), ignored=st.integers(0, 2),
       target_is_argmax=st.booleans(), dy=st.sampled_from([1.0, -3.0, 1024.0]),
       sanitizer=st.sampled_from(["address", "thread"]), seed=st.integers(0, 2**32 - 1))
@example(dtype="float32", rows=3, vocab=700, scale=1.0, ties=True, ignored=1, target_is_argmax=True, dy=1.0,
         sanitizer="thread", seed=0)
@example(dtype="float16", rows=2, vocab=1, scale=10.0, ties=False, ignored=0, target_is_argmax=False, dy=1024.0,
         sanitizer="address", seed=1)
@example(dtype="float32", rows=1, vocab=50, scale=30.0, ties=False, ignored=0, target_is_argmax=True, dy=1.0,
         sanitizer="address", seed=2)  # a confident row: -rest / (1 + rest) with rest ~ 1e-3
def test_the_fused_cross_entropy_kernels_give_the_array_codes_numbers(harness, dtype, rows, vocab, scale, ties, ignored,
                                                                      target_is_argmax, dy, sanitizer, seed):
    """Rows that end mid-block; equal maxima (the first is the argmax, as NumPy's); ignored rows holding
    inf and nan (loss 0, gradient 0); targets at the argmax (the branch without cancellation); logits
    to 1e4, where only the row max keeps exp in range. exp, log1p and the row sum's order are the
    kernel's own: each value within its error bound of the array code's (below), the argmax exact."""
    rng = numpy.random.default_rng(seed)
    logits = (scale * rng.standard_normal((rows, vocab))).astype(dtype)
    if ties:  # the row max again at a random place (the first stays the argmax)
        logits[numpy.arange(rows), rng.integers(0, vocab, rows)] = logits.max(axis=1)
    targets = rng.integers(0, vocab, rows)
    if target_is_argmax:
        targets[0] = logits[0].argmax()
    targets[rows - min(ignored, rows - 1):] = -100  # row 0 always counts
    if ignored and rows > 1:
        logits[-1, :2] = [numpy.inf, numpy.nan][:min(2, vocab)]
    with numpy.errstate(invalid="ignore"):  # the ignored row's inf - inf, in the array code and below
        check_cross_entropy(harness[sanitizer], logits, targets, dy)


def check_cross_entropy(binary, logits, targets, dy):
    rows, vocab = logits.shape
    _, cache = cross_entropy.forward(logits, targets)
    counted, safe = (targets != -100).astype(numpy.int32), numpy.where(targets != -100, targets, 0).astype(numpy.int64)
    want_exps, want_rest = cache.exps.copy(), cache.rest  # backward takes the cache's buffer
    exps, rest, argmax, nll, dlogits, s = cross_entropy_on_the_harness(binary, logits, safe, counted, cache, dy)
    dlogits_want = cross_entropy.backward(dy, cache).reshape(rows, vocab)
    on = counted.astype(bool)
    assert (argmax[on] == cache.argmax[on]).all() and (nll[~on] == 0).all() and (dlogits[~on] == 0).all()

    # exp: each side within 2 units of the exact value; the row sum of positive terms, in two orders,
    # within 2 V units of the sum; 1 / (1 + rest) and log1p(rest) move by rest / (1 + rest) times that
    # (plus, below the smallest normal number, where there are fewer digits, that number, per term)
    dtype = logits.dtype.name
    unit, tiny = (2.0**-53, 2.0**-1022) if dtype == "float64" else (2.0**-24, 2.0**-126)
    exps, rest, nll, want_exps, want_rest = (a.astype(numpy.float64) for a in (exps, rest, nll, want_exps, want_rest))
    assert (abs(exps - want_exps)[on] <= 4 * unit * want_exps[on] + tiny).all(), "exps"
    assert (abs(rest - want_rest)[on] <= (2 * vocab + 8) * unit * want_rest[on] + vocab * tiny).all(), "rest"
    moved = (2 * vocab + 16) * unit * want_rest / (1 + want_rest)
    z = logits.astype(numpy.float64)
    gap = z.max(axis=1) - z[numpy.arange(rows), safe]
    nll_want = gap + numpy.log1p(want_rest)
    assert (abs(nll - nll_want)[on] <= (moved + 8 * unit * (gap + numpy.log1p(want_rest)) + unit)[on]).all(), "nll"
    probability = want_exps / (1 + want_rest)[:, None]
    # at the target, p - 1: the array code's subtraction there rounds at the scale of s, unless the target
    # is the argmax, where -rest / (1 + rest) is computed without it (and a confident row's is tiny)
    at_target = numpy.arange(vocab)[None, :] == safe[:, None]
    at_argmax = (safe == cache.argmax)[:, None]
    magnitude = abs(s) * numpy.where(at_target, numpy.where(at_argmax, (want_rest / (1 + want_rest))[:, None],
                                                            probability + 1), probability)
    bound = (moved[:, None] + 8 * unit) * magnitude + vocab * tiny * abs(s)
    assert_within(dlogits[on], dlogits_want[on], bound[on], dtype, "dlogits")


def test_the_fused_cross_entropy_launches_have_a_block_a_row_and_its_scratch():
    logits = numpy.zeros((5, 32000), dtype=numpy.float16)
    rows = numpy.zeros(5, numpy.int64), numpy.ones(5, numpy.int32)
    exps, stats = numpy.zeros((5, 32000), numpy.float32), numpy.zeros(5, numpy.float32)
    forward = cuda_cross_entropy.forward_launch(logits, *rows, exps, stats, rows[0], stats)
    assert forward.kernel == "npllama::cross_entropy_forward<unsigned short>" and forward.grid == (5, 1, 1)
    assert forward.block == (256, 1, 1) and forward.shared_bytes == 8 * (4 + 4) and forward.args[-1] == 32000
    backward = cuda_cross_entropy.backward_launch(exps, stats, rows[0], rows[0], rows[1], numpy.zeros(1, numpy.float32),
                                                  logits)
    assert backward.kernel == "npllama::cross_entropy_backward<unsigned short>" and backward.grid == (5, 1, 1)
    assert cuda_cross_entropy.shared_bytes(numpy.float64) == 8 * (8 + 4)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "targets": numpy.zeros(5, numpy.int32)}, "targets must be a contiguous int64 array of 5"),
    (lambda a: {**a, "counted": numpy.zeros(4, numpy.int32)}, "counted must be a contiguous int32 array of 5"),
    (lambda a: {**a, "exps": numpy.zeros((5, 7), numpy.float16)}, "exps must be a contiguous float32 array of 35"),
    (lambda a: {**a, "logits": numpy.zeros((5, 7, 1), numpy.float16)}, r"contiguous \(rows, V\) array"),
    (lambda a: {**a, "logits": numpy.zeros((7, 5), numpy.float16).T}, r"contiguous \(rows, V\) array"),
    (lambda a: {**a, "logits": numpy.zeros((5, 7), numpy.int32)}, "got int32"),
])
def test_the_fused_cross_entropy_launch_refuses_arrays_it_cannot_take(change, message):
    stats = numpy.zeros(5, numpy.float32)
    arrays = change({"logits": numpy.zeros((5, 7), numpy.float16), "targets": numpy.zeros(5, numpy.int64),
                     "counted": numpy.ones(5, numpy.int32), "exps": numpy.zeros((5, 7), numpy.float32), "rest": stats,
                     "argmax": numpy.zeros(5, numpy.int64), "nll": stats})
    with pytest.raises(ValueError, match=message):
        cuda_cross_entropy.forward_launch(**arrays)


def test_the_fused_cross_entropy_reads_no_logit_for_a_target_outside_the_vocabulary(harness):
    """model.py checks the targets on the host; should one slip through, the row's loss and gradient
    are NaN (under ASan: no read outside the logits)."""
    logits = numpy.zeros((2, 7), numpy.float32)
    targets, counted = numpy.array([7, 2], numpy.int64), numpy.ones(2, numpy.int32)
    launch = cuda_cross_entropy.forward_launch(logits, targets, counted, numpy.zeros((2, 7), numpy.float32),
                                               numpy.zeros(2, numpy.float32), numpy.zeros(2, numpy.int64),
                                               numpy.zeros(2, numpy.float32))
    exps, rest, argmax, nll = run(harness["address"], launch)[3:7]
    assert numpy.isnan(nll[0]) and numpy.isclose(nll[1], numpy.log(7))
    dlogits = run(harness["address"], cuda_cross_entropy.backward_launch(
        exps.reshape(2, 7), rest, argmax, targets, counted, numpy.ones(1, numpy.float32),
        numpy.zeros((2, 7), numpy.float32)))[6].reshape(2, 7)
    assert numpy.isnan(dlogits[0]).all() and numpy.isfinite(dlogits[1]).all()


def test_the_fused_cross_entropy_backward_takes_only_int64_targets():
    """A cache the array code made (logits the kernel does not take) with int32 targets stays with the
    array code: the kernel reads its targets as int64."""
    logits = numpy.zeros((3, 7), numpy.float32)
    for targets, fused in ((numpy.arange(3, dtype=numpy.int32), False), (numpy.arange(3), True)):
        _, cache = cross_entropy.forward(logits, targets)
        assert cuda_cross_entropy.supports_backward(cache.exps, cache) is fused


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_the_fused_cross_entropy_argmax_is_numpys_with_nan_and_inf_on_a_counted_row(harness, dtype):
    """NaN comes first (the first NaN), then +inf (the first of two), as NumPy's argmax has it; such a
    row's loss and gradient are NaN, as the array code's."""
    logits = numpy.array([[0.0, numpy.nan, 3.0, numpy.nan], [numpy.inf, 1.0, numpy.inf, 2.0],
                          [1.0, 5.0, 2.0, 5.0]], dtype=dtype)
    targets, counted = numpy.array([2, 1, 0]), numpy.ones(3, numpy.int32)
    with numpy.errstate(invalid="ignore"):
        _, cache = cross_entropy.forward(logits, targets)
        exps, rest, argmax, nll, dlogits, _ = cross_entropy_on_the_harness(harness["address"], logits, targets,
                                                                          counted, cache, 1.0)
    assert argmax.tolist() == logits.argmax(axis=1).tolist() == [1, 0, 1]
    assert numpy.isnan(nll[:2]).all() and numpy.isnan(dlogits[:2]).all() and numpy.isfinite(dlogits[2]).all()
