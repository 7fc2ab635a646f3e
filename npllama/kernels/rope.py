"""The fused RoPE kernel (rope.cu): its instances, its launch, and running it on CuPy arrays.
npllama/ops/rope.py sends CuPy arrays here (x of float32, float64 or float16, the tables in the dtype
it is computed in); the array code there is the reference the kernel is tested against."""

from __future__ import annotations

import functools
import math

import numpy

from . import COMPILE_OPTIONS, COMPUTE, STORAGE, Launch, kernel_source

THREADS = 256  # kRopeThreads


def kernel_names() -> list[str]:
    return [f"npllama::rope_rotate<{cxx}>" for cxx in STORAGE.values()]


def instances() -> list[tuple[str, int]]:
    """Every kernel instance as (C++ name expression, dynamic shared bytes per block)."""
    return [(name, 0) for name in kernel_names()]


def source() -> str:
    return kernel_source("rope.cu")


def supports(x, cos, sin) -> bool:
    """x (B, T, H, D), any strides, D even, of a dtype an instance exists for, not empty, fewer than
    2^31 of each of B, T, H and D/2; cos and sin (T, D/2) contiguous in x's compute dtype."""
    if x.ndim != 4 or x.dtype.name not in STORAGE or x.size == 0 or x.shape[-1] % 2:
        return False
    table = (x.shape[1], x.shape[-1] // 2)
    return (all(t.dtype == COMPUTE[x.dtype.name] and t.shape == table and t.flags.c_contiguous for t in (cos, sin))
            and max(x.shape) < 2**31 and all(stride % x.itemsize == 0 for stride in x.strides))


def rotate_launch(x, cos, sin, y, inverse: bool) -> Launch:
    """y = each pair of x rotated by its position's angle (by minus it where `inverse`); x read
    through its strides, y contiguous of x's shape and dtype."""
    if not supports(x, cos, sin):
        raise ValueError(f"rope kernel: x must be (B, T, H, D), D even, of one of {', '.join(STORAGE)}, and cos and "
                         f"sin contiguous (T, D/2) tables in its compute dtype; got x {x.dtype.name} {x.shape}, "
                         f"tables {cos.dtype.name} {cos.shape} and {sin.dtype.name} {sin.shape}")
    if y.shape != x.shape or y.dtype != x.dtype or not y.flags.c_contiguous:
        raise ValueError(f"rope kernel: y must be a contiguous {x.dtype.name} array of x's shape {x.shape}")
    batch, seq, heads, head_dim = x.shape
    strides = (numpy.int64(stride // x.itemsize) for stride in x.strides)
    return Launch(f"npllama::rope_rotate<{STORAGE[x.dtype.name]}>", (math.ceil(x.size // 2 / THREADS), 1, 1),
                  (THREADS, 1, 1), 0, (x, *strides, cos, sin, y, numpy.int32(batch), numpy.int32(seq),
                                       numpy.int32(heads), numpy.int32(head_dim // 2), numpy.int32(inverse)))


# --- running on CuPy ---------------------------------------------------------------------------


@functools.cache
def _module():
    import cupy

    return cupy.RawModule(code=source(), options=COMPILE_OPTIONS, name_expressions=kernel_names())


def launch(run: Launch) -> None:
    """Launch `run` on the current CuPy device and stream (asynchronous, like any CuPy call). An array
    argument is passed as the address of its first element, whatever its strides (CuPy's RawKernel)."""
    _module().get_function(run.kernel)(run.grid, run.block, run.args)


def rotate(x, cos, sin, inverse: bool):
    """x rotated (inverse: rotated back), for CuPy arrays; a new contiguous array."""
    import cupy

    y = cupy.empty(x.shape, dtype=x.dtype)
    launch(rotate_launch(x, cos, sin, y, inverse))
    return y
