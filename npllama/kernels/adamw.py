"""AdamW's update on CuPy in one kernel (adamw.cu): one pass over a parameter, its moments and its
gradient, where the array code of npllama.optim makes a dozen; NumPy's bits for the same scalars."""

from __future__ import annotations

import functools
import math

import numpy

from . import COMPILE_OPTIONS, CXX_TYPES, Launch, kernel_source

THREADS = 256
SCALARS = ("beta1", "beta2", "g_scale", "g2_scale", "decay", "inv_bias2", "eps", "step_size")  # the kernel's order


def kernel_names() -> list[str]:
    return [f"npllama::adamw_update<{cxx}>" for cxx in CXX_TYPES.values()]


def instances() -> list[tuple[str, int]]:
    """Every kernel instance as (C++ name expression, dynamic shared bytes per block)."""
    return [(name, 0) for name in kernel_names()]


def source() -> str:
    return kernel_source("adamw.cu")


def supports(p, m, v, g) -> bool:
    """p, m, v contiguous arrays of one dtype the kernel was built for, and g of their shape and dtype."""
    return (p.dtype.name in CXX_TYPES and p.dtype == m.dtype == v.dtype == g.dtype and p.shape == m.shape == v.shape
            == g.shape and all(a.flags.c_contiguous for a in (p, m, v)))


def update_launch(p, m, v, g, scalars) -> Launch:
    """p, m, v (written in place) and g, contiguous, of one dtype; `scalars` has the attributes SCALARS
    (npllama.optim.AdamWScalars), each rounded to that dtype here."""
    scalar = p.dtype.type
    return Launch(f"npllama::adamw_update<{CXX_TYPES[p.dtype.name]}>", (max(1, math.ceil(p.size / THREADS)), 1, 1),
                  (THREADS, 1, 1), 0,
                  (p, m, v, g, numpy.int64(p.size), *(scalar(getattr(scalars, name)) for name in SCALARS)))


@functools.cache
def _module():
    import cupy

    return cupy.RawModule(code=source(), options=COMPILE_OPTIONS, name_expressions=kernel_names())


def update(p, m, v, g, scalars) -> None:
    """One AdamW step of a CuPy parameter p and its moments m, v, in place (see `supports`)."""
    import cupy

    run = update_launch(p, m, v, cupy.ascontiguousarray(g), scalars)
    _module().get_function(run.kernel)(run.grid, run.block, run.args)
