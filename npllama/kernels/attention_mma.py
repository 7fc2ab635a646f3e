"""The tensor-core attention kernels (attention_mma.cu): their instances, their launches, and running
them on CuPy arrays, in two operand formats chosen by the arrays' dtype:

    float16  mma.m16n8k16 with float16 operands; float16 in and out (mixed precision)
    float32  mma.m16n8k8 with TF32 operands, each input element rounded to TF32 once, as its tile
             is loaded; float32 in and out (the attention of --tf32)

q, out, dout, dq (B, H, Tq, D) and k, v, dk, dv (B, Hkv, Tk, D) share one of those dtypes, H a
multiple of Hkv (grouped-query attention as in attention.py); lse and dvec (B, H, Tq) are float32.
Forward: a block of THREADS threads per tile of QUERIES queries of one query head, key tiles of KEYS
keys in shared memory. Backward: Dvec = rowsum(dO * O) in float32 by the array code, then dK and dV
(a block per KEYS keys of each key/value head, query tiles of BACK_QUERIES) and dQ (a block per
QUERIES queries, key tiles of BACK_KEYS). The kernels load q, k, v and dO 16 bytes at a time: each
must start on a 16-byte boundary (the launches refuse one that does not; the CuPy calls copy it).

The layer under the kernels, tensor_cores.cuh, is emulated on the CPU by the test harness; the
self-test kernels (`SELF_TESTS`: each format's one warp, one product; `TF32_ROUNDING`) let a GPU test compare
the instructions with what the emulation assumes (`mma_launch`, `tf32_rounding_launch`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy

from . import COMPILE_OPTIONS, Launch, kernel_source
from .attention import MAX_HEADS, Shape, _check_shapes

THREADS = 128  # kMmaThreads in attention_mma.cu
QUERIES = 64  # kMmaQueries: 16 a warp
KEYS = 64  # kMmaKeys
BACK_QUERIES = 32  # kMmaBackQueries
BACK_KEYS = 32  # kMmaBackKeys
HEAD_DIMS = (16, 32, 48, 64, 128)  # multiples of 16: every preset's
VECTOR_BYTES = 16  # the kernels load their inputs 16 bytes at a time: each must start on such a boundary


@dataclass(frozen=True)
class Operands:
    """One operand format of attention_mma.cu: the dtype it takes and gives, its C++ struct, the
    elements a shared row has past D (16 bytes), and its one-warp self-test kernel."""

    dtype: str
    cxx: str
    pad: int
    mma_self_test: str


FORMATS = {"float16": Operands("float16", "npllama::Float16Operands", 8, "npllama::mma_16816_once"),
           "float32": Operands("float32", "npllama::Tf32Operands", 4, "npllama::mma_1688_tf32_once")}
TF32_ROUNDING = "npllama::tf32_rounding_once"
SELF_TESTS = (*(operands.mma_self_test for operands in FORMATS.values()), TF32_ROUNDING)  # no shared memory
KINDS = ("forward", "dkdv", "dq")


def supports(dtype, head_dim: int) -> bool:
    """Whether an instance exists for this dtype (float16, or float32 as TF32) and head dimension."""
    return numpy.dtype(dtype).name in FORMATS and head_dim in HEAD_DIMS


def fits(dtype, head_dim: int, shared_limit: int) -> bool:
    """Whether every kernel of the instance fits a device that allows a block `shared_limit` bytes of
    shared memory (opted in): 227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_86 and sm_89, where
    the TF32 dK/dV kernel at D = 128 (99 KiB and 256 bytes) does not."""
    return max(shared_bytes(head_dim, kind, dtype) for kind in KINDS) <= shared_limit


def kernel_name(head_dim: int, kind: str = "forward", dtype="float16") -> str:
    operands = FORMATS[numpy.dtype(dtype).name].cxx
    return {"forward": f"npllama::attention_forward_mma<{operands}, {head_dim}>",
            "dkdv": f"npllama::attention_backward_dkdv_mma<{operands}, {head_dim}>",
            "dq": f"npllama::attention_backward_dq_mma<{operands}, {head_dim}>"}[kind]


def shared_bytes(head_dim: int, kind: str = "forward", dtype="float16") -> int:
    """Each kernel's shared tiles, rows of D + pad elements: forward K and V (KEYS rows each, Q staged
    in K's place first); dK/dV K and V (KEYS rows) and Q and dO (BACK_QUERIES rows) with the tile's L
    and Dvec (float32); dQ Q and dO (QUERIES rows) and K and V (BACK_KEYS rows)."""
    dtype = numpy.dtype(dtype)
    row = (head_dim + FORMATS[dtype.name].pad) * dtype.itemsize
    if kind == "forward":
        return 2 * KEYS * row
    if kind == "dkdv":
        return 2 * KEYS * row + 2 * BACK_QUERIES * row + 2 * BACK_QUERIES * 4
    return 2 * QUERIES * row + 2 * BACK_KEYS * row


def instances() -> list[tuple[str, int]]:
    """Every kernel instance as (C++ name expression, dynamic shared bytes per block)."""
    return [(kernel_name(head_dim, kind, dtype), shared_bytes(head_dim, kind, dtype)) for dtype in FORMATS
            for head_dim in HEAD_DIMS for kind in KINDS] + [(name, 0) for name in SELF_TESTS]


def source() -> str:
    return kernel_source("attention_mma.cu")


def _address(array) -> int:
    """Where a NumPy or CuPy array's data starts."""
    return array.data.ptr if hasattr(array.data, "ptr") else array.ctypes.data


def _aligned(array):
    """`array` (CuPy, C-contiguous), or a copy of it where it does not start on a 16-byte boundary (a
    view from an odd offset)."""
    return array.copy() if _address(array) % VECTOR_BYTES else array


def _shape(q, k, v, lse) -> Shape:
    """The sizes of a call; ValueError where no launch fits them."""
    _check_shapes(q, k, v)
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    if not supports(q.dtype, head_dim):
        raise ValueError(f"tensor-core attention kernel: no instance for {q.dtype} and head dim {head_dim}")
    if lse.dtype != numpy.float32 or tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"tensor-core attention kernel: lse must be float32 of shape {tuple(q.shape[:3])}")
    if not 1 <= batch * n_heads <= MAX_HEADS:
        raise ValueError(f"tensor-core attention kernel: batch x heads = {batch * n_heads}, need 1 to {MAX_HEADS}")
    if not 1 <= n_queries <= n_keys:
        raise ValueError(f"tensor-core attention kernel: {n_queries} queries and {n_keys} keys "
                         "(need 1 <= queries <= keys)")
    for array in (q, k, v):
        if not array.flags.c_contiguous:
            raise ValueError("tensor-core attention kernel: arrays must be C-contiguous")
        if _address(array) % VECTOR_BYTES:
            raise ValueError(f"tensor-core attention kernel: q, k and v must start on a {VECTOR_BYTES}-byte boundary")
    return Shape(batch * n_heads, batch * n_kv_heads, n_heads // n_kv_heads, n_queries, n_keys, head_dim)


def forward_launch(q, k, v, out, lse, scale: float) -> Launch:
    """O (q's dtype) and L (float32) of q, k, v, all contiguous: a block per tile of QUERIES queries
    of each query head."""
    shape = _shape(q, k, v, lse)
    grid = (math.ceil(shape.n_queries / QUERIES), shape.query_heads, 1)
    return Launch(kernel_name(shape.head_dim, "forward", q.dtype), grid, (THREADS, 1, 1),
                  shared_bytes(shape.head_dim, "forward", q.dtype),
                  (q, k, v, out, lse, numpy.int32(shape.n_queries), numpy.int32(shape.n_keys),
                   numpy.int32(shape.group_size), numpy.float32(scale)))


def backward_launches(dout, q, k, v, lse, dvec, dq, dk, dv, scale: float) -> list[Launch]:
    """dK and dV, then dQ, given Dvec = rowsum(dO * O) (float32, lse's shape). dq is q's shape; dk and
    dv are k's: the dK/dV kernel sums the G query heads of each key/value head's group."""
    shape = _shape(q, k, v, lse)
    dtype = numpy.dtype(q.dtype)
    for name, array in (("dout", dout), ("dq", dq), ("dk", dk), ("dv", dv)):
        expected = q if name in ("dout", "dq") else k
        if array.dtype != dtype or tuple(array.shape) != tuple(expected.shape) or not array.flags.c_contiguous:
            raise ValueError(f"tensor-core attention kernel: {name} must be contiguous {dtype.name} of shape "
                             f"{tuple(expected.shape)}")
    if _address(dout) % VECTOR_BYTES:
        raise ValueError(f"tensor-core attention kernel: dout must start on a {VECTOR_BYTES}-byte boundary")
    if dvec.dtype != numpy.float32 or tuple(dvec.shape) != tuple(lse.shape):
        raise ValueError(f"tensor-core attention kernel: dvec must be float32 of shape {tuple(lse.shape)}")
    sizes = (numpy.int32(shape.n_queries), numpy.int32(shape.n_keys), numpy.int32(shape.group_size),
             numpy.float32(scale))
    return [Launch(kernel_name(shape.head_dim, "dkdv", dtype), (math.ceil(shape.n_keys / KEYS), shape.kv_heads, 1),
                   (THREADS, 1, 1), shared_bytes(shape.head_dim, "dkdv", dtype),
                   (q, k, v, dout, lse, dvec, dk, dv, *sizes)),
            Launch(kernel_name(shape.head_dim, "dq", dtype), (math.ceil(shape.n_queries / QUERIES),
                                                              shape.query_heads, 1),
                   (THREADS, 1, 1), shared_bytes(shape.head_dim, "dq", dtype), (q, k, v, dout, lse, dvec, dq, *sizes))]


def mma_launch(a, b, d, dtype="float16") -> Launch:
    """One product of the format for `dtype` by one warp: a (32, 4) and b (32, 2) uint32 registers,
    d (32, 4) float32, the accumulator in and the result out, each lane's row as the fragment layouts
    place it."""
    return Launch(FORMATS[numpy.dtype(dtype).name].mma_self_test, (1, 1, 1), (32, 1, 1), 0, (a, b, d))


def tf32_rounding_launch(x) -> Launch:
    """float_to_tf32 of each element of x (contiguous float32), in place, by one block."""
    return Launch(TF32_ROUNDING, (1, 1, 1), (128, 1, 1), 0, (x, numpy.int32(x.size)))


# --- running on CuPy ---------------------------------------------------------------------------


@functools.cache
def _shared_limit(device_id: int) -> int:
    import cupy

    return cupy.cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"]


def fits_the_device(dtype, head_dim: int) -> bool:
    """`fits` on the current CuPy device."""
    import cupy

    return fits(dtype, head_dim, _shared_limit(cupy.cuda.Device().id))


@functools.cache
def _module():
    import cupy

    names = [name for name, _ in instances()]
    return cupy.RawModule(code=source(), options=COMPILE_OPTIONS, name_expressions=names)


@functools.cache
def _function(kernel: str, shared_bytes: int, device_id: int):
    """The compiled kernel on one device, opted in to its shared memory (once, not at every launch)."""
    function = _module().get_function(kernel)
    if shared_bytes > 48 * 1024:  # above 48 KiB a kernel must opt in
        function.max_dynamic_shared_size_bytes = shared_bytes
    return function


def launch(run: Launch) -> None:
    """Launch `run` on the current CuPy device and stream (asynchronous, like any CuPy call)."""
    import cupy

    function = _function(run.kernel, run.shared_bytes, cupy.cuda.Device().id)
    function(run.grid, run.block, run.args, shared_mem=run.shared_bytes)


def forward(q, k, v, scale: float):
    """(out, lse) for CuPy q (B, H, Tq, D), k and v (B, Hkv, Tk, D), all float16 or all float32 (TF32
    products): out of q's shape and dtype, lse float32 (B, H, Tq). ValueError for shapes or dtypes
    that do not fit."""
    import cupy

    q, k, v = (_aligned(cupy.ascontiguousarray(a)) for a in (q, k, v))
    out = cupy.empty_like(q)
    lse = cupy.empty(q.shape[:3], dtype=cupy.float32)
    launch(forward_launch(q, k, v, out, lse, scale))
    return out, lse


def backward(dout, q, k, v, out, lse, scale: float):
    """(dq, dk, dv) for CuPy arrays of one of the formats' dtypes, given forward's out (that dtype) and
    lse (float32): dq of q's shape, dk and dv of k's, each key/value head's the sum over its group."""
    import cupy

    q, k, v = (_aligned(cupy.ascontiguousarray(a)) for a in (q, k, v))
    dout = _aligned(cupy.ascontiguousarray(dout, dtype=q.dtype))
    # Dvec_i = sum_d dO_id O_id, in float32 (the array code: one elementwise pass and a sum)
    dvec = cupy.ascontiguousarray((dout.astype(cupy.float32) * out.astype(cupy.float32)).sum(axis=-1))
    dq, dk, dv = cupy.empty_like(q), cupy.empty_like(k), cupy.empty_like(v)
    for run in backward_launches(dout, q, k, v, cupy.ascontiguousarray(lse), dvec, dq, dk, dv, scale):
        launch(run)
    return dq, dk, dv
