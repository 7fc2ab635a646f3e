"""The CUDA attention kernels (attention.cu): which instances exist, how each is launched, and
running them on CuPy arrays.

One function per kernel gives its launch (`Launch`: kernel name, grid, block, dynamic shared memory
and the arguments with their exact scalar types). The CuPy path below launches exactly that, and
the CPU harness of the tests (tests/harness/) runs exactly that too, so the harness checks the
launch configuration as well as the kernel source.

Instances: float32 and float64 (the gradient audit's dtype), head dims HEAD_DIMS. Tiles differ by
dtype, to keep a thread's accumulators in registers (`python -m npllama.kernels` shows each
instance's registers and spills). CuPy itself is imported only when a kernel runs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy

from . import COMPILE_OPTIONS, CXX_TYPES, Launch, kernel_source

THREADS = 128  # kThreads in attention.cu
HEAD_DIMS = (16, 32, 48, 64, 128)
DTYPES = ("float32", "float64")
MAX_SHARED_BYTES = 163 * 1024  # the most dynamic shared memory a block may ask for on sm_80 (sm_90 allows more)
MAX_HEADS = 65535  # gridDim.y carries batch * heads


@dataclass(frozen=True)
class Tiles:
    """(queries, keys) per tile of each kernel, for one dtype."""

    forward: tuple[int, int]
    dkdv: tuple[int, int]
    dq: tuple[int, int]


TILES = {
    "float32": Tiles(forward=(64, 64), dkdv=(32, 32), dq=(64, 32)),
    "float64": Tiles(forward=(32, 32), dkdv=(16, 32), dq=(32, 16)),
}


def supports(dtype, head_dim: int) -> bool:
    """Whether an instance exists for this dtype and head dimension."""
    return numpy.dtype(dtype).name in DTYPES and head_dim in HEAD_DIMS


def kernel_names(dtype, head_dim: int) -> list[str]:
    """The C++ name expressions of the four kernels of one (dtype, head_dim) instance."""
    name = numpy.dtype(dtype).name
    cxx, tiles = CXX_TYPES[name], TILES[name]
    return [f"npllama::attention_forward<{cxx}, {head_dim}, {tiles.forward[0]}, {tiles.forward[1]}>",
            f"npllama::attention_backward_dvec<{cxx}, {head_dim}>",
            f"npllama::attention_backward_dkdv<{cxx}, {head_dim}, {tiles.dkdv[0]}, {tiles.dkdv[1]}>",
            f"npllama::attention_backward_dq<{cxx}, {head_dim}, {tiles.dq[0]}, {tiles.dq[1]}>"]


def instances() -> list[tuple[str, int]]:
    """Every kernel instance as (C++ name expression, dynamic shared bytes per block)."""
    kinds = ("forward", "dvec", "dkdv", "dq")  # the order of kernel_names
    return [(name, shared_bytes(kind, dtype, head_dim)) for dtype in DTYPES for head_dim in HEAD_DIMS
            for kind, name in zip(kinds, kernel_names(dtype, head_dim))]


def source() -> str:
    return kernel_source("attention.cu")


def shared_bytes(kernel: str, dtype, head_dim: int) -> int:
    """Dynamic shared memory of one kernel, as attention.cu lays it out (rows padded to D + 1)."""
    name = numpy.dtype(dtype).name
    tiles, stride, size = TILES[name], head_dim + 1, numpy.dtype(dtype).itemsize
    if kernel == "forward":
        queries, keys = tiles.forward
        return size * (queries * stride + 2 * keys * stride + queries * (keys + 1))
    if kernel == "dkdv":
        queries, keys = tiles.dkdv
        return size * (2 * keys * stride + 2 * queries * stride + 2 * keys * (queries + 1) + 2 * queries)
    if kernel == "dq":
        queries, keys = tiles.dq
        return size * (2 * queries * stride + 2 * keys * stride + queries * (keys + 1))
    return 0


def _shape(q, k):
    batch, n_heads, n_queries, head_dim = q.shape
    n_keys = k.shape[2]
    if not supports(q.dtype, head_dim):
        raise ValueError(f"attention kernels: no instance for {q.dtype} and head dim {head_dim}")
    if batch * n_heads > MAX_HEADS:
        raise ValueError(f"attention kernels: batch x heads = {batch * n_heads} exceeds {MAX_HEADS}")
    if not 1 <= n_queries <= n_keys:
        raise ValueError(f"attention kernels: {n_queries} queries and {n_keys} keys (need 1 <= queries <= keys)")
    for array in (q, k):
        if not array.flags.c_contiguous:
            raise ValueError("attention kernels: arrays must be C-contiguous")
    return batch * n_heads, n_queries, n_keys, head_dim


def forward_launch(q, k, v, out, lse, scale: float) -> Launch:
    """O and L: q, out (B, H, Tq, D); k, v (B, H, Tk, D); lse (B, H, Tq); all contiguous, one dtype."""
    heads, n_queries, n_keys, head_dim = _shape(q, k)
    scalar = q.dtype.type
    queries, _ = TILES[q.dtype.name].forward
    return Launch(kernel_names(q.dtype, head_dim)[0], (math.ceil(n_queries / queries), heads, 1), (THREADS, 1, 1),
                  shared_bytes("forward", q.dtype, head_dim),
                  (q, k, v, out, lse, numpy.int32(n_queries), numpy.int32(n_keys), scalar(scale)))


def backward_launches(dout, q, k, v, out, lse, dvec, dq, dk, dv, scale: float) -> list[Launch]:
    """Dvec, then dK and dV, then dQ; dvec is scratch of lse's shape. Each output is written once."""
    heads, n_queries, n_keys, head_dim = _shape(q, k)
    names, tiles, scalar = kernel_names(q.dtype, head_dim), TILES[q.dtype.name], q.dtype.type
    n_rows, block = heads * n_queries, (THREADS, 1, 1)
    sizes = (numpy.int32(n_queries), numpy.int32(n_keys), scalar(scale))
    rows_per_block = THREADS // 8  # kGroups
    return [
        Launch(names[1], (math.ceil(n_rows / rows_per_block), 1, 1), block, 0, (dout, out, dvec, numpy.int32(n_rows))),
        Launch(names[2], (math.ceil(n_keys / tiles.dkdv[1]), heads, 1), block, shared_bytes("dkdv", q.dtype, head_dim),
               (q, k, v, dout, lse, dvec, dk, dv, *sizes)),
        Launch(names[3], (math.ceil(n_queries / tiles.dq[0]), heads, 1), block, shared_bytes("dq", q.dtype, head_dim),
               (q, k, v, dout, lse, dvec, dq, *sizes)),
    ]


# --- running on CuPy ---------------------------------------------------------------------------


@functools.cache
def _module(dtype_name: str, head_dim: int):
    import cupy

    return cupy.RawModule(code=source(), options=COMPILE_OPTIONS, name_expressions=kernel_names(dtype_name, head_dim))


@functools.cache
def _function(dtype_name: str, head_dim: int, kernel: str, shared_bytes: int, device_id: int):
    """The compiled kernel on one device, opted in to its shared memory (once, not at every launch)."""
    function = _module(dtype_name, head_dim).get_function(kernel)
    if shared_bytes > 48 * 1024:  # above 48 KiB a kernel must opt in
        function.max_dynamic_shared_size_bytes = shared_bytes
    return function


def launch(run: Launch, dtype, head_dim: int):
    """Launch `run` on the current CuPy device and stream (asynchronous, like any CuPy call)."""
    import cupy

    function = _function(numpy.dtype(dtype).name, head_dim, run.kernel, run.shared_bytes, cupy.cuda.Device().id)
    function(run.grid, run.block, run.args, shared_mem=run.shared_bytes)


def forward(q, k, v, scale: float):
    """(out, lse) for CuPy q (B, H, Tq, D), k and v (B, H, Tk, D)."""
    import cupy

    q, k, v = (cupy.ascontiguousarray(a) for a in (q, k, v))
    out = cupy.empty_like(q)
    lse = cupy.empty(q.shape[:3], dtype=q.dtype)
    launch(forward_launch(q, k, v, out, lse, scale), q.dtype, q.shape[3])
    return out, lse


def backward(dout, q, k, v, out, lse, scale: float):
    """(dq, dk, dv) for CuPy arrays, given dout = dO and forward's out and lse."""
    import cupy

    dout, q, k, v, out = (cupy.ascontiguousarray(a, dtype=q.dtype) for a in (dout, q, k, v, out))
    dq, dk, dv = cupy.empty_like(q), cupy.empty_like(k), cupy.empty_like(v)
    dvec = cupy.empty(q.shape[:3], dtype=q.dtype)
    for run in backward_launches(dout, q, k, v, out, lse, dvec, dq, dk, dv, scale):
        launch(run, q.dtype, q.shape[3])
    return dq, dk, dv
