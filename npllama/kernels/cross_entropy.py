"""The fused cross-entropy kernels (cross_entropy.cu): their instances, launches, and running them on
CuPy arrays. npllama/ops/cross_entropy.py sends CuPy logits (float32, float64 or float16) here; the
array code there is the reference the kernels are tested against."""

from __future__ import annotations

import functools

import numpy

from . import COMPILE_OPTIONS, COMPUTE, STORAGE, Launch, check_arrays, kernel_source

THREADS = 256  # kCrossEntropyThreads
WARPS = THREADS // 32


def kernel_names() -> list[str]:
    return [f"npllama::cross_entropy_{kind}<{cxx}>" for cxx in STORAGE.values() for kind in ("forward", "backward")]


def shared_bytes(dtype) -> int:
    """The block's scratch: a compute-dtype value and an int for each warp."""
    return WARPS * (numpy.dtype(COMPUTE[numpy.dtype(dtype).name]).itemsize + 4)


def instances() -> list[tuple[str, int]]:
    """Every kernel instance as (C++ name expression, dynamic shared bytes per block)."""
    return [(f"npllama::cross_entropy_forward<{cxx}>", shared_bytes(name)) for name, cxx in STORAGE.items()] + \
        [(f"npllama::cross_entropy_backward<{cxx}>", 0) for cxx in STORAGE.values()]


def source() -> str:
    return kernel_source("cross_entropy.cu")


def supports(logits) -> bool:
    """(rows, V) logits, C-contiguous, not empty, of a dtype an instance exists for, with fewer than
    2^31 rows and 2^31 entries a row."""
    return (logits.ndim == 2 and logits.dtype.name in STORAGE and logits.size > 0 and logits.flags.c_contiguous
            and max(logits.shape) < 2**31)


def supports_backward(exps, cache) -> bool:
    """A cache (ops/cross_entropy.py's) whose exps are (rows, V) in its logits' compute dtype, and whose
    argmax and targets are int64, as the fused forward leaves them."""
    return (cache.dtype.name in STORAGE and exps.ndim == 2 and exps.dtype == COMPUTE[cache.dtype.name]
            and exps.flags.c_contiguous and max(exps.shape) < 2**31 and exps.size > 0
            and cache.argmax.dtype == numpy.int64 and cache.safe_targets.dtype == numpy.int64
            and cache.rest.dtype == exps.dtype)


def forward_launch(logits, targets, counted, exps, rest, argmax, nll) -> Launch:
    """A block a row of (rows, V) logits: exps (rows, V), rest, argmax and nll (rows,). targets: int64,
    in [0, V) on counted rows; counted: int32, 1 where the row counts."""
    if not supports(logits):
        raise ValueError(f"cross_entropy kernel: logits must be a contiguous (rows, V) array of one of "
                         f"{', '.join(STORAGE)}, got {logits.dtype.name} {logits.shape}")
    (rows, vocab), compute = logits.shape, COMPUTE[logits.dtype.name]
    check_arrays("cross_entropy kernel (forward)", {
        "targets": (targets, numpy.int64, rows), "counted": (counted, numpy.int32, rows),
        "exps": (exps, compute, rows * vocab), "rest": (rest, compute, rows),
        "argmax": (argmax, numpy.int64, rows), "nll": (nll, compute, rows)})
    return Launch(f"npllama::cross_entropy_forward<{STORAGE[logits.dtype.name]}>", (rows, 1, 1), (THREADS, 1, 1),
                  shared_bytes(logits.dtype), (logits, targets, counted, exps, rest, argmax, nll, numpy.int32(vocab)))


def backward_launch(exps, rest, argmax, targets, counted, scale, dlogits) -> Launch:
    """dlogits (rows, V) of the logits' dtype from forward's exps, rest and argmax; scale: one value
    of the compute dtype, dy / N'. dlogits may be exps itself, when their dtypes agree."""
    if not supports(dlogits):
        raise ValueError(f"cross_entropy kernel: dlogits must be a contiguous (rows, V) array of one of "
                         f"{', '.join(STORAGE)}, got {dlogits.dtype.name} {dlogits.shape}")
    (rows, vocab), compute = dlogits.shape, COMPUTE[dlogits.dtype.name]
    check_arrays("cross_entropy kernel (backward)", {
        "exps": (exps, compute, rows * vocab), "rest": (rest, compute, rows),
        "argmax": (argmax, numpy.int64, rows), "targets": (targets, numpy.int64, rows),
        "counted": (counted, numpy.int32, rows), "scale": (scale, compute, 1)})
    return Launch(f"npllama::cross_entropy_backward<{STORAGE[dlogits.dtype.name]}>", (rows, 1, 1), (THREADS, 1, 1),
                  0, (exps, rest, argmax, targets, counted, scale, dlogits, numpy.int32(vocab)))


# --- running on CuPy ---------------------------------------------------------------------------


@functools.cache
def _module():
    import cupy

    return cupy.RawModule(code=source(), options=COMPILE_OPTIONS, name_expressions=kernel_names())


def launch(run: Launch) -> None:
    """Launch `run` on the current CuPy device and stream (asynchronous, like any CuPy call)."""
    _module().get_function(run.kernel)(run.grid, run.block, run.args, shared_mem=run.shared_bytes)


def forward(logits, targets, counted):
    """(exps, rest, argmax, nll) for CuPy (rows, V) logits, int64 targets and int32 counted."""
    import cupy

    rows, vocab = logits.shape
    compute = COMPUTE[logits.dtype.name]
    exps, rest, nll = cupy.empty((rows, vocab), dtype=compute), cupy.empty(rows, compute), cupy.empty(rows, compute)
    argmax = cupy.empty(rows, dtype=numpy.int64)
    launch(forward_launch(logits, targets, counted, exps, rest, argmax, nll))
    return exps, rest, argmax, nll


def backward(exps, rest, argmax, targets, counted, scale, dtype):
    """dlogits of `dtype`, written over exps where that is exps' dtype."""
    import cupy

    dlogits = exps if exps.dtype == dtype else cupy.empty(exps.shape, dtype=dtype)
    launch(backward_launch(exps, rest, argmax, targets, counted, scale, dlogits))
    return dlogits
