"""The deterministic embedding backward on CuPy (embedding.cu): sort the positions by id, then one
thread per (id, column) sums that id's rows in position order, as NumPy's `add.at` does."""

from __future__ import annotations

import functools
import math

import numpy

from . import COMPILE_OPTIONS, CXX_TYPES, Launch, kernel_source

THREADS = 128


def kernel_names() -> list[str]:
    return [f"npllama::embedding_backward<{cxx}>" for cxx in CXX_TYPES.values()]


def instances() -> list[tuple[str, int]]:
    """Every kernel instance as (C++ name expression, dynamic shared bytes per block)."""
    return [(name, 0) for name in kernel_names()]


def source() -> str:
    return kernel_source("embedding.cu")


def backward_launch(sorted_ids, order, dy, dweight) -> Launch:
    """sorted_ids, order (N,) int64; dy (N, C); dweight (V, C) zeros, dy's dtype."""
    n_positions, dim = dy.shape
    return Launch(f"npllama::embedding_backward<{CXX_TYPES[dy.dtype.name]}>",
                  (math.ceil(n_positions * dim / THREADS), 1, 1), (THREADS, 1, 1), 0,
                  (sorted_ids, order, dy, dweight, numpy.int32(n_positions), numpy.int32(dim)))


def sort_positions(xp, ids):
    """(sorted_ids, order): the positions of `ids` (flat) sorted by (id, position), whatever the sort's
    stability, since every key id * N + position is distinct."""
    n_positions = ids.size
    keys = xp.sort(ids.reshape(-1).astype(xp.int64) * n_positions + xp.arange(n_positions, dtype=xp.int64))
    return keys // n_positions, keys % n_positions


@functools.cache
def _module():
    import cupy

    return cupy.RawModule(code=source(), options=COMPILE_OPTIONS, name_expressions=kernel_names())


def backward(dy, ids, weight_shape):
    """dweight for CuPy dy (..., C) and ids (...), deterministic."""
    import cupy

    dim = weight_shape[-1]
    dy = cupy.ascontiguousarray(dy.reshape(-1, dim))
    sorted_ids, order = sort_positions(cupy, ids)
    dweight = cupy.zeros(weight_shape, dtype=dy.dtype)
    run = backward_launch(sorted_ids, order, dy, dweight)
    _module().get_function(run.kernel)(run.grid, run.block, run.args, shared_mem=run.shared_bytes)
    return dweight
