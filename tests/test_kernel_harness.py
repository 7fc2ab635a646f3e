"""The CPU harness for CUDA kernels (tests/kernel_harness.py, tests/harness/) runs a kernel as the GPU
would, and fails loudly: a data race, an out-of-bounds read, undefined behaviour, a hang and a launch
whose arguments do not match the kernel each end in HarnessFailure, with the report that says why.

The kernels under test are the small ones of tests/harness/sample_kernels.cu."""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy
import pytest

import kernel_harness
from kernel_harness import HarnessFailure, build, run

SAMPLE = Path(__file__).resolve().parent / "harness" / "sample_kernels.cu"
KERNELS = ["sample::block_sum<float>", "sample::block_sum<double>", "sample::block_sum<int>", "sample::scale<float>",
           "sample::scale<double>", "sample::read_shared_before_write<float>",
           "sample::read_shared_before_write<double>", "sample::spin_forever", "sample::divergent_syncthreads"]
CXX_TYPE = {numpy.float32: "float", numpy.float64: "double", numpy.int32: "int"}
# The barrier the race test removes from a copy of the sample kernels.
BARRIER = "    __syncthreads();  // the warp sums are written before warp 0 reads them\n"

@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple
    block: tuple
    shared_bytes: int
    args: tuple


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    """The harness binaries the tests run, built once per session, side by side: the sample kernels
    under "address" and "thread", and a copy of them without one __syncthreads under "thread"."""
    if kernel_harness.unavailable_reason():
        pytest.skip(kernel_harness.unavailable_reason())
    folder = tmp_path_factory.mktemp("kernel-harness")
    source = SAMPLE.read_text()
    assert source.count(BARRIER) == 1, "the barrier the race test removes is no longer in the sample kernels"
    racy = folder / "sample_kernels_without_a_barrier.cu"
    racy.write_text(source.replace(BARRIER, ""))
    with ThreadPoolExecutor(max_workers=3) as pool:
        builds = {"address": pool.submit(build, [SAMPLE], KERNELS, "address", folder),
                  "thread": pool.submit(build, [SAMPLE], KERNELS, "thread", folder),
                  "racy": pool.submit(build, [racy], ["sample::block_sum<float>"], "thread", folder)}
        binaries = {name: future.result() for name, future in builds.items()}
    return {**binaries, "folder": folder}


def rows_of_small_integers(dtype, rows, n, high=50):
    """Values whose sums are exact in any order, in float32 too: a kernel's result compares exactly."""
    return numpy.random.default_rng(rows * 1000 + n).integers(-high, high, size=(rows, n)).astype(dtype)


def block_sum(dtype, grid, block, n, x=None):
    rows = int(numpy.prod(grid))
    x = rows_of_small_integers(dtype, rows, n) if x is None else x
    warps = int(numpy.prod(block)) // 32
    kernel = f"sample::block_sum<{CXX_TYPE[dtype]}>"
    return x, Launch(kernel, grid, block, warps * numpy.dtype(dtype).itemsize,
                     (x, numpy.zeros(rows, dtype), numpy.int32(n)))


@pytest.mark.parametrize("sanitizer", ["address", "thread"])
@pytest.mark.parametrize("dtype, grid, block, n", [
    (numpy.float32, (3, 1, 1), (32, 1, 1), 1000),
    (numpy.float64, (2, 3, 1), (64, 2, 1), 37),
    (numpy.int32, (1, 2, 2), (32, 2, 4), 1),
    (numpy.float32, (1, 1, 1), (1024, 1, 1), 3000),
])
def test_block_sum_gives_each_rows_sum_for_any_grid_block_and_element_type(harness, sanitizer, dtype, grid, block, n):
    """Also: the emulation's own synchronisation (barriers, shuffles, shared memory between blocks) is
    no data race to ThreadSanitizer."""
    x, launch = block_sum(dtype, grid, block, n)
    after = run(harness[sanitizer], launch)
    numpy.testing.assert_array_equal(after[1], x.sum(axis=1, dtype=dtype))
    numpy.testing.assert_array_equal(after[0], x)
    assert after[2] is launch.args[2]


@pytest.mark.parametrize("kernel, dtype, factor", [
    ("sample::scale<float>", numpy.float32, numpy.float32(0.1)),
    ("sample::scale<double>", numpy.float64, numpy.float64(1 / 3)),
    ("sample::scale<double>", numpy.float64, numpy.float64(5e-324)),
])
def test_scalar_arguments_arrive_exactly_and_the_callers_arrays_are_left_alone(harness, kernel, dtype, factor):
    data = numpy.linspace(-3, 3, 100, dtype=dtype)
    original = data.copy()
    after = run(harness["address"], Launch(kernel, (4, 1, 1), (32, 1, 1), 0, (data, factor, numpy.int32(100))))
    numpy.testing.assert_array_equal(after[0], data * factor)
    numpy.testing.assert_array_equal(data, original)
    assert after[1] is factor


@pytest.mark.parametrize("dtype, kernel", [(numpy.float32, "sample::read_shared_before_write<float>"),
                                           (numpy.float64, "sample::read_shared_before_write<double>")])
def test_shared_memory_reads_nan_before_anything_wrote_it_in_every_block(harness, dtype, kernel):
    """Each block writes its shared memory after reading it: the next block still finds NaN."""
    blocks, threads = 3, 64
    out = numpy.zeros(blocks * threads, dtype)
    launch = Launch(kernel, (blocks, 1, 1), (threads, 1, 1), threads * out.itemsize, (out,))
    assert numpy.isnan(run(harness["address"], launch)[0]).all()


def test_a_missing_syncthreads_is_reported_as_a_data_race(harness):
    """The copy of block_sum without its barrier still gives the right sum here, by luck of timing;
    ThreadSanitizer reports the race regardless, in one of three runs at most. (It remembers a bounded
    number of accesses to each 8 bytes of memory, four, and replaces one when more come, so now and then
    the racing write is forgotten before the read that would expose it: seen once in a full suite,
    never in isolation.)"""
    _, launch = block_sum(numpy.float32, (2, 1, 1), (128, 1, 1), 500)
    reports = []
    for _ in range(3):
        try:
            run(harness["racy"], launch)
        except HarnessFailure as failure:
            reports.append(str(failure))
            break
    assert reports, "ThreadSanitizer reported no race in three runs of a kernel without its barrier"
    assert "ThreadSanitizer: data race" in reports[0] and "sample::block_sum<float>" in reports[0], reports[0]


def test_an_out_of_bounds_global_read_is_reported_by_address_sanitizer(harness):
    """Each array is its own heap block of exactly its size: n one too large reads past the end."""
    x = rows_of_small_integers(numpy.float32, 1, 100)
    launch = Launch("sample::block_sum<float>", (1, 1, 1), (64, 1, 1), 8, (x, numpy.zeros(1, numpy.float32),
                                                                          numpy.int32(101)))
    with pytest.raises(HarnessFailure, match="AddressSanitizer: heap-buffer-overflow") as failure:
        run(harness["address"], launch)
    assert "READ of size 4" in str(failure.value) and "block_sum" in str(failure.value)


def test_dynamic_shared_memory_is_exactly_shared_bytes_long(harness):
    threads = 64
    launch = Launch("sample::read_shared_before_write<float>", (1, 1, 1), (threads, 1, 1), threads * 4 - 4,
                    (numpy.zeros(threads, numpy.float32),))
    with pytest.raises(HarnessFailure, match="AddressSanitizer: heap-buffer-overflow"):
        run(harness["address"], launch)


def test_signed_integer_overflow_is_reported_by_undefined_behaviour_sanitizer(harness):
    x = numpy.full((1, 64), 2**30, numpy.int32)
    _, launch = block_sum(numpy.int32, (1, 1, 1), (32, 1, 1), 64, x=x)
    with pytest.raises(HarnessFailure, match="signed integer overflow"):
        run(harness["address"], launch)


@pytest.mark.parametrize("sanitizer", ["address", "thread"])
@pytest.mark.parametrize("kernel, args", [("sample::spin_forever", (numpy.zeros(1, numpy.int32),)),
                                          ("sample::divergent_syncthreads", ())])
def test_a_hang_is_ended_by_the_watchdog_naming_the_kernel(harness, sanitizer, kernel, args):
    started = time.monotonic()
    with pytest.raises(HarnessFailure, match="watchdog") as failure:
        run(harness[sanitizer], Launch(kernel, (2, 1, 1), (32, 1, 1), 0, args), timeout=1)
    assert f"kernel {kernel} did not finish within 1 s" in str(failure.value)
    assert time.monotonic() - started < kernel_harness.BACKSTOP_SECONDS, "the watchdog did not fire; the backstop did"


X = numpy.zeros(64, numpy.float32)
OUT = numpy.zeros(1, numpy.float32)


@pytest.mark.parametrize("kernel, args, fragments", [
    ("sample::block_sum<float>", (X, OUT, numpy.int64(64)),
     ["argument 2 is `int` (pass a numpy.int32)", "gave a numpy.int64"]),
    ("sample::scale<float>", (X, 0.5, numpy.int32(64)),
     ["argument 1 is `float` (pass a numpy.float32)", "gave a Python float"]),
    ("sample::scale<double>", (X.astype(numpy.float64), numpy.float32(0.5), numpy.int32(64)),
     ["argument 1 is `double` (pass a numpy.float64)", "gave a numpy.float32"]),
    ("sample::block_sum<float>", (X.astype(numpy.float64), OUT, numpy.int32(64)),
     ["argument 0 is `const float*` (pass a float32 array)", "gave a float64 array"]),
    ("sample::block_sum<float>", (X, OUT.astype(numpy.float16), numpy.int32(64)),
     ["argument 1 is `float*` (pass a float32 array)", "gave a float16 array"]),
    ("sample::block_sum<int>", (X.astype(numpy.int32), OUT.astype(numpy.int32), 64),
     ["argument 2 is `int` (pass a numpy.int32)", "gave a Python int"]),
    ("sample::block_sum<float>", (X, OUT),
     ["takes 3 arguments (const float*, float*, int), the launch gave 2"]),
])
def test_a_launch_whose_arguments_do_not_match_the_kernel_is_refused_naming_them(harness, kernel, args, fragments):
    with pytest.raises(HarnessFailure, match="refused the launch") as failure:
        run(harness["address"], Launch(kernel, (1, 1, 1), (32, 1, 1), 4, args))
    assert f"kernel {kernel}" in str(failure.value)
    for fragment in fragments:
        assert fragment in str(failure.value)


def test_an_unknown_kernel_is_refused_with_the_kernels_the_build_has(harness):
    with pytest.raises(HarnessFailure, match="no kernel 'sample::block_sum<long>'") as failure:
        run(harness["address"], Launch("sample::block_sum<long>", (1, 1, 1), (32, 1, 1), 0, ()))
    assert "sample::scale<double>" in str(failure.value)


def test_kernel_names_match_whatever_their_spacing(harness):
    x, launch = block_sum(numpy.float32, (1, 1, 1), (32, 1, 1), 10)
    spaced = Launch("sample :: block_sum< float >", launch.grid, launch.block, launch.shared_bytes, launch.args)
    numpy.testing.assert_array_equal(run(harness["address"], spaced)[1], x.sum(axis=1))


def test_a_non_contiguous_array_is_refused_before_the_launch(harness):
    strided = numpy.zeros(128, numpy.float32)[::2]
    with pytest.raises(ValueError, match="argument 0 is not a C-contiguous array"):
        run(harness["address"], Launch("sample::block_sum<float>", (1, 1, 1), (32, 1, 1), 4,
                                       (strided, OUT, numpy.int32(64))))


def test_a_second_build_of_the_same_is_the_binary_already_built(harness):
    started = time.monotonic()
    again = build([SAMPLE], KERNELS, "address", harness["folder"])
    assert again == harness["address"]
    assert time.monotonic() - started < 1
