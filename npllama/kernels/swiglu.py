"""The fused SwiGLU kernels (swiglu.cu): which instances exist, their launches, and running them on
CuPy arrays. npllama/ops/swiglu.py sends CuPy arrays of one dtype (float32, float64 or float16) here;
the array code there is the reference the kernels are tested against."""

from __future__ import annotations

import functools
import math

import numpy

from . import COMPILE_OPTIONS, STORAGE, Launch, kernel_source

THREADS = 256  # kSwigluThreads


def kernel_names() -> list[str]:
    return [f"npllama::swiglu_{kind}<{cxx}>" for cxx in STORAGE.values() for kind in ("forward", "backward")]


def instances() -> list[tuple[str, int]]:
    """Every kernel instance as (C++ name expression, dynamic shared bytes per block)."""
    return [(name, 0) for name in kernel_names()]


def source() -> str:
    return kernel_source("swiglu.cu")


def supports(*arrays) -> bool:
    """Arrays of one dtype an instance exists for, one shape, each C-contiguous and not empty."""
    first = arrays[0]
    return (first.dtype.name in STORAGE and first.size > 0
            and all(a.dtype == first.dtype and a.shape == first.shape and a.flags.c_contiguous for a in arrays))


def _grid(n: int) -> tuple:
    return (math.ceil(n / THREADS), 1, 1)


def forward_launch(a, b, y) -> Launch:
    """y = silu(a) b, elementwise; a, b, y of one shape and dtype, contiguous."""
    if not supports(a, b, y):
        raise ValueError(f"swiglu kernel: a, b, y must be contiguous arrays of one shape and of one dtype of "
                         f"{', '.join(STORAGE)}")
    return Launch(f"npllama::swiglu_forward<{STORAGE[a.dtype.name]}>", _grid(a.size), (THREADS, 1, 1), 0,
                  (a, b, y, numpy.int64(a.size)))


def backward_launch(dy, a, b, da, db) -> Launch:
    """da and db of y = silu(a) b given dy; every array of one shape and dtype, contiguous."""
    if not supports(dy, a, b, da, db):
        raise ValueError(f"swiglu kernel: dy, a, b, da, db must be contiguous arrays of one shape and of one dtype "
                         f"of {', '.join(STORAGE)}")
    return Launch(f"npllama::swiglu_backward<{STORAGE[a.dtype.name]}>", _grid(a.size), (THREADS, 1, 1), 0,
                  (dy, a, b, da, db, numpy.int64(a.size)))


# --- running on CuPy ---------------------------------------------------------------------------


@functools.cache
def _module():
    import cupy

    return cupy.RawModule(code=source(), options=COMPILE_OPTIONS, name_expressions=kernel_names())


def launch(run: Launch) -> None:
    """Launch `run` on the current CuPy device and stream (asynchronous, like any CuPy call)."""
    _module().get_function(run.kernel)(run.grid, run.block, run.args)


def forward(a, b):
    """y = silu(a) b for CuPy a and b (one dtype and shape)."""
    import cupy

    y = cupy.empty_like(a)
    launch(forward_launch(a, b, y))
    return y


def backward(dy, a, b):
    """(da, db) for CuPy arrays of one dtype and shape."""
    import cupy

    da, db = cupy.empty_like(a), cupy.empty_like(b)
    launch(backward_launch(cupy.ascontiguousarray(dy), a, b, da, db))
    return da, db
