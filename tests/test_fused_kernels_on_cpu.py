"""The fused elementwise kernels (npllama/kernels/swiglu.cu), run on the CPU by the harness under
AddressSanitizer + UBSan and under ThreadSanitizer, against the array code of npllama/ops that they
fuse, in every dtype they exist for (float32, float64, float16 as its bits)."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

import kernel_harness
from kernel_harness import build, run
from npllama.kernels import swiglu as cuda_swiglu
from npllama.ops import swiglu

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
    source = [KERNELS / "swiglu.cu"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        builds = {sanitizer: pool.submit(build, source, cuda_swiglu.kernel_names(), sanitizer, folder)
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
