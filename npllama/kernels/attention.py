"""The CUDA attention kernels (attention.cu): which instances exist, how each is launched, and
running them on CuPy arrays.

One function per kernel gives its launch (`Launch`: kernel name, grid, block, dynamic shared memory
and the arguments with their exact scalar types). The CuPy path below launches exactly that, and
the CPU harness of the tests (tests/harness/) runs exactly that too, so the harness checks the
launch configuration as well as the kernel source.

Shapes: q, out, dout, dq (B, H, Tq, D); k, v, dk, dv (B, Hkv, Tk, D), where H is a multiple of Hkv
(grouped-query attention: the G = H / Hkv query heads h of a group read key/value head h // G; G = 1 is
multi-head attention, Hkv = 1 multi-query); lse (B, H, Tq). The kernels index the shared key/value
head, never a copy per query head: they take G as an argument.

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
MAX_HEADS = 65535  # gridDim.y carries batch * heads (forward, dQ) and batch * key/value heads (dK/dV)


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
GROUPS, LANES = THREADS // 8, 8  # kGroups row groups of kLanes threads: a tile's rows split over the groups


def tiles_of(dtype, tiles: Tiles | None = None) -> Tiles:
    """`tiles`, or by default the dtype's in TILES (bench/attention_tiles.py times others)."""
    return tiles if tiles is not None else TILES[numpy.dtype(dtype).name]


def tiles_problem(tiles: Tiles, dtype, head_dim: int) -> str | None:
    """Why attention.cu cannot take these tiles (its static_asserts: a tile's rows split over the row
    groups, its columns over a group's lanes; and the shared memory limit), or None."""
    for kernel, (queries, keys) in (("forward", tiles.forward), ("dkdv", tiles.dkdv), ("dq", tiles.dq)):
        rows, columns = (keys, queries) if kernel == "dkdv" else (queries, keys)
        if rows % GROUPS or columns % LANES:
            return f"{kernel} tile {queries} x {keys}: its rows must be a multiple of {GROUPS}, its columns of {LANES}"
        if shared_bytes(kernel, dtype, head_dim, tiles) > MAX_SHARED_BYTES:
            return f"{kernel} tile {queries} x {keys} needs more than {MAX_SHARED_BYTES} bytes of shared memory"
    return None


def supports(dtype, head_dim: int) -> bool:
    """Whether an instance exists for this dtype and head dimension."""
    return numpy.dtype(dtype).name in DTYPES and head_dim in HEAD_DIMS


def kernel_names(dtype, head_dim: int, tiles: Tiles | None = None) -> list[str]:
    """The C++ name expressions of the four kernels of one (dtype, head_dim) instance."""
    name = numpy.dtype(dtype).name
    cxx, tiles = CXX_TYPES[name], tiles_of(dtype, tiles)
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


def shared_bytes(kernel: str, dtype, head_dim: int, tiles: Tiles | None = None) -> int:
    """Dynamic shared memory of one kernel, as attention.cu lays it out (rows padded to D + 1)."""
    tiles, stride, size = tiles_of(dtype, tiles), head_dim + 1, numpy.dtype(dtype).itemsize
    if kernel == "forward":
        queries, keys = tiles.forward
        return size * (queries * stride + keys * stride + queries * (keys + 1))  # Q, K then V, P
    if kernel == "dkdv":
        queries, keys = tiles.dkdv
        return size * (2 * keys * stride + 2 * queries * stride + 2 * keys * (queries + 1) + 2 * queries)
    if kernel == "dq":
        queries, keys = tiles.dq
        return size * (2 * queries * stride + 2 * keys * stride + queries * (keys + 1))
    return 0


@dataclass(frozen=True)
class Shape:
    """The sizes of one attention call, as the launches need them."""

    query_heads: int  # B H: gridDim.y of the forward and dQ kernels
    kv_heads: int  # B Hkv: gridDim.y of the dK/dV kernel
    group_size: int  # G = H / Hkv, the query heads that share one key/value head
    n_queries: int
    n_keys: int
    head_dim: int


def _check_shapes(q, k, v) -> None:
    """ValueError unless q is (B, H, Tq, D) and k, v are both (B, Hkv, Tk, D) of q's dtype, H % Hkv == 0."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"attention kernels: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "need q (B, H, Tq, D) and k, v both (B, Hkv, Tk, D)")
    (batch, n_heads, _, head_dim), (kv_batch, n_kv_heads, _, kv_head_dim) = q.shape, k.shape
    if kv_batch != batch or kv_head_dim != head_dim or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"attention kernels: q {tuple(q.shape)} and k, v {tuple(k.shape)} do not fit: need the "
                         "same batch and head dim, and query heads a multiple of the key/value heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention kernels: q, k, v are {q.dtype}, {k.dtype}, {v.dtype}; need one dtype")


def _shape(q, k, v) -> Shape:
    """The sizes of q (B, H, Tq, D) with k, v (B, Hkv, Tk, D); ValueError where no launch fits them."""
    _check_shapes(q, k, v)
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    if not supports(q.dtype, head_dim):
        raise ValueError(f"attention kernels: no instance for {q.dtype} and head dim {head_dim}")
    for what, heads in (("heads", batch * n_heads), ("key/value heads", batch * n_kv_heads)):
        if not 1 <= heads <= MAX_HEADS:
            raise ValueError(f"attention kernels: batch x {what} = {heads}, need 1 to {MAX_HEADS} (the grid's y)")
    if not 1 <= n_queries <= n_keys:
        raise ValueError(f"attention kernels: {n_queries} queries and {n_keys} keys (need 1 <= queries <= keys)")
    for array in (q, k, v):
        if not array.flags.c_contiguous:
            raise ValueError("attention kernels: arrays must be C-contiguous")
    return Shape(batch * n_heads, batch * n_kv_heads, n_heads // n_kv_heads, n_queries, n_keys, head_dim)


def forward_launch(q, k, v, out, lse, scale: float, tiles: Tiles | None = None) -> Launch:
    """O and L: q, out (B, H, Tq, D); k, v (B, Hkv, Tk, D); lse (B, H, Tq); all contiguous, one dtype.
    A block per tile of queries of each query head."""
    shape = _shape(q, k, v)
    scalar = q.dtype.type
    queries, _ = tiles_of(q.dtype, tiles).forward
    grid = (math.ceil(shape.n_queries / queries), shape.query_heads, 1)
    return Launch(kernel_names(q.dtype, shape.head_dim, tiles)[0], grid, (THREADS, 1, 1),
                  shared_bytes("forward", q.dtype, shape.head_dim, tiles),
                  (q, k, v, out, lse, numpy.int32(shape.n_queries), numpy.int32(shape.n_keys),
                   numpy.int32(shape.group_size), scalar(scale)))


def backward_launches(dout, q, k, v, out, lse, dvec, dq, dk, dv, scale: float,
                      tiles: Tiles | None = None) -> list[Launch]:
    """Dvec, then dK and dV, then dQ; dvec is scratch of lse's shape. Each output is written once.
    dq is q's shape; dk and dv are k's, (B, Hkv, Tk, D): dK/dV has a block per key tile of each
    key/value head, which sums over the G query heads of its group."""
    shape = _shape(q, k, v)
    n_queries, n_keys, head_dim = shape.n_queries, shape.n_keys, shape.head_dim
    names, scalar = kernel_names(q.dtype, head_dim, tiles), q.dtype.type
    shared = functools.partial(shared_bytes, dtype=q.dtype, head_dim=head_dim, tiles=tiles)
    tiles = tiles_of(q.dtype, tiles)
    n_rows, block = shape.query_heads * n_queries, (THREADS, 1, 1)
    sizes = (numpy.int32(n_queries), numpy.int32(n_keys), numpy.int32(shape.group_size), scalar(scale))
    rows_per_block = THREADS // 8  # kGroups
    heads = shape.kv_heads  # the dK/dV grid runs over key/value heads
    return [
        Launch(names[1], (math.ceil(n_rows / rows_per_block), 1, 1), block, 0, (dout, out, dvec, numpy.int32(n_rows))),
        Launch(names[2], (math.ceil(n_keys / tiles.dkdv[1]), heads, 1), block, shared("dkdv"),
               (q, k, v, dout, lse, dvec, dk, dv, *sizes)),
        Launch(names[3], (math.ceil(n_queries / tiles.dq[0]), shape.query_heads, 1), block,
               shared("dq"), (q, k, v, dout, lse, dvec, dq, *sizes)),
    ]


# --- running on CuPy ---------------------------------------------------------------------------


@functools.cache
def _module(dtype_name: str, head_dim: int, tiles: Tiles | None):
    import cupy

    return cupy.RawModule(code=source(), options=COMPILE_OPTIONS,
                          name_expressions=kernel_names(dtype_name, head_dim, tiles))


@functools.cache
def _function(dtype_name: str, head_dim: int, tiles: Tiles | None, kernel: str, shared_bytes: int, device_id: int):
    """The compiled kernel on one device, opted in to its shared memory (once, not at every launch)."""
    function = _module(dtype_name, head_dim, tiles).get_function(kernel)
    if shared_bytes > 48 * 1024:  # above 48 KiB a kernel must opt in
        function.max_dynamic_shared_size_bytes = shared_bytes
    return function


def launch(run: Launch, dtype, head_dim: int, tiles: Tiles | None = None):
    """Launch `run` (made with `tiles`: by default the dtype's) on the current CuPy device and stream
    (asynchronous, like any CuPy call)."""
    import cupy

    name = numpy.dtype(dtype).name
    tiles = None if tiles == TILES.get(name) else tiles  # the defaults' module, compiled once
    function = _function(name, head_dim, tiles, run.kernel, run.shared_bytes, cupy.cuda.Device().id)
    function(run.grid, run.block, run.args, shared_mem=run.shared_bytes)


def forward(q, k, v, scale: float, tiles: Tiles | None = None):
    """(out, lse) for CuPy q (B, H, Tq, D), k and v (B, Hkv, Tk, D) of q's dtype, H a multiple of Hkv:
    out (B, H, Tq, D), lse (B, H, Tq). ValueError for shapes or dtypes that do not fit. `tiles`: by
    default the dtype's."""
    import cupy

    q, k, v = (cupy.ascontiguousarray(a) for a in (q, k, v))
    out = cupy.empty_like(q)
    lse = cupy.empty(q.shape[:3], dtype=q.dtype)
    launch(forward_launch(q, k, v, out, lse, scale, tiles), q.dtype, q.shape[3], tiles)
    return out, lse


def backward(dout, q, k, v, out, lse, scale: float, tiles: Tiles | None = None):
    """(dq, dk, dv) for CuPy arrays, given dout = dO and forward's out and lse: dq of q's shape
    (B, H, Tq, D), dk and dv of k's (B, Hkv, Tk, D), each key/value head's the sum over its group."""
    import cupy

    q, k, v = (cupy.ascontiguousarray(a) for a in (q, k, v))  # one dtype, which _shape checks
    dout, out = (cupy.ascontiguousarray(a, dtype=q.dtype) for a in (dout, out))
    dq, dk, dv = cupy.empty_like(q), cupy.empty_like(k), cupy.empty_like(v)
    dvec = cupy.empty(q.shape[:3], dtype=q.dtype)
    for run in backward_launches(dout, q, k, v, out, lse, dvec, dq, dk, dv, scale, tiles):
        launch(run, q.dtype, q.shape[3], tiles)
    return dq, dk, dv
