"""The fused RMSNorm kernels (rmsnorm.cu): which instances exist, their launches, and running them on
CuPy arrays. npllama/ops/rmsnorm.py sends CuPy arrays of one dtype (float32, float64 or float16) here;
the array code there is the reference the kernels are tested against."""

from __future__ import annotations

import functools
import math

import numpy

from . import COMPILE_OPTIONS, COMPUTE, STORAGE, Launch, check_arrays, kernel_source

THREADS = 256  # kRmsnormThreads
ROWS_PER_BLOCK = THREADS // 32  # a warp a row
WEIGHT_GRAD_ROWS = 64  # rows a block of the gain's gradient adds, at least (more past 65535 blocks: grid.y's limit)
MAX_GRID_Y = 65535


def kernel_names() -> list[str]:
    kinds = ("forward", "backward", "weight_grad_partial", "weight_grad_sum")
    return [f"npllama::rmsnorm_{kind}<{cxx}>" for cxx in STORAGE.values() for kind in kinds]


def instances() -> list[tuple[str, int]]:
    """Every kernel instance as (C++ name expression, dynamic shared bytes per block)."""
    return [(name, 0) for name in kernel_names()]


def source() -> str:
    return kernel_source("rmsnorm.cu")


def supports(x, weight) -> bool:
    """x (..., C) C-contiguous, not empty, of a dtype an instance exists for, with fewer than 2^31
    rows and columns; weight (C,) contiguous of the same dtype."""
    return (x.dtype.name in STORAGE and x.size > 0 and x.ndim >= 1 and x.flags.c_contiguous
            and weight.dtype == x.dtype and weight.shape == x.shape[-1:] and weight.flags.c_contiguous
            and x.size // x.shape[-1] < 2**31 and x.shape[-1] < 2**31)


def supports_backward(dy, xhat, weight, rstd) -> bool:
    """forward's xhat, weight and rstd as the fused forward leaves them, and a dy of xhat's shape and dtype."""
    return (supports(xhat, weight) and dy.shape == xhat.shape and dy.dtype == xhat.dtype
            and rstd.dtype == COMPUTE[xhat.dtype.name] and rstd.size == _rows(xhat)[0] and rstd.flags.c_contiguous)


def _rows(x) -> tuple[int, int]:
    return x.size // x.shape[-1], x.shape[-1]


def _storage(x) -> str:
    if x.dtype.name not in STORAGE:
        raise ValueError(f"rmsnorm kernel: {x.dtype.name} arrays have no instance; one of {', '.join(STORAGE)}")
    return STORAGE[x.dtype.name]


def forward_launch(x, weight, y, xhat, rstd, eps: float) -> Launch:
    """y and xhat of x (..., C), rstd (rows,) in the compute dtype; one warp a row."""
    cxx, (rows, cols) = _storage(x), _rows(x)
    check_arrays(f"rmsnorm kernel (forward, {rows} rows of {cols})", {
        "x": (x, x.dtype, rows * cols), "weight": (weight, x.dtype, cols), "y": (y, x.dtype, rows * cols),
        "xhat": (xhat, x.dtype, rows * cols), "rstd": (rstd, COMPUTE[x.dtype.name], rows)})
    return Launch(f"npllama::rmsnorm_forward<{cxx}>", (math.ceil(rows / ROWS_PER_BLOCK), 1, 1), (THREADS, 1, 1), 0,
                  (x, weight, y, xhat, rstd, numpy.int32(rows), numpy.int32(cols), COMPUTE[x.dtype.name](eps)))


def backward_launch(dy, xhat, weight, rstd, dx) -> Launch:
    """dx of RMSNorm given dy and forward's xhat and rstd; one warp a row."""
    cxx, (rows, cols) = _storage(dy), _rows(dy)
    check_arrays(f"rmsnorm kernel (backward, {rows} rows of {cols})", {
        "dy": (dy, dy.dtype, rows * cols), "xhat": (xhat, dy.dtype, rows * cols), "weight": (weight, dy.dtype, cols),
        "rstd": (rstd, COMPUTE[dy.dtype.name], rows), "dx": (dx, dy.dtype, rows * cols)})
    return Launch(f"npllama::rmsnorm_backward<{cxx}>", (math.ceil(rows / ROWS_PER_BLOCK), 1, 1), (THREADS, 1, 1), 0,
                  (dy, xhat, weight, rstd, dx, numpy.int32(rows), numpy.int32(cols)))


def weight_grad_rows_per_block(rows: int, rows_per_block: int = WEIGHT_GRAD_ROWS) -> int:
    """Rows each block of the gain gradient's first kernel adds: `rows_per_block`, or more, so that
    the row blocks stay within the grid's y limit."""
    return max(rows_per_block, math.ceil(rows / MAX_GRID_Y))


def weight_grad_launches(dy, xhat, partial, dweight, rows_per_block: int) -> tuple[Launch, Launch]:
    """dg = the sum over rows of dy xhat: the row blocks' parts into `partial` (row blocks, C) in the
    compute dtype, then their sum into dweight (C,)."""
    cxx, (rows, cols) = _storage(dy), _rows(dy)
    row_blocks = math.ceil(rows / rows_per_block)
    if rows_per_block < 1 or row_blocks > MAX_GRID_Y:
        raise ValueError(f"rmsnorm kernel: {rows_per_block} rows a block for {rows} rows; at least 1, and "
                         f"at most {MAX_GRID_Y} blocks")
    check_arrays(f"rmsnorm kernel (gain gradient, {rows} rows of {cols})", {
        "dy": (dy, dy.dtype, rows * cols), "xhat": (xhat, dy.dtype, rows * cols),
        "partial": (partial, COMPUTE[dy.dtype.name], row_blocks * cols), "dweight": (dweight, dy.dtype, cols)})
    column_blocks = math.ceil(cols / THREADS)
    return (Launch(f"npllama::rmsnorm_weight_grad_partial<{cxx}>", (column_blocks, row_blocks, 1), (THREADS, 1, 1), 0,
                   (dy, xhat, partial, numpy.int32(rows), numpy.int32(cols), numpy.int32(rows_per_block))),
            Launch(f"npllama::rmsnorm_weight_grad_sum<{cxx}>", (column_blocks, 1, 1), (THREADS, 1, 1), 0,
                   (partial, dweight, numpy.int32(row_blocks), numpy.int32(cols))))


# --- running on CuPy ---------------------------------------------------------------------------


@functools.cache
def _module():
    import cupy

    return cupy.RawModule(code=source(), options=COMPILE_OPTIONS, name_expressions=kernel_names())


def launch(run: Launch) -> None:
    """Launch `run` on the current CuPy device and stream (asynchronous, like any CuPy call)."""
    _module().get_function(run.kernel)(run.grid, run.block, run.args)


def forward(x, weight, eps: float):
    """(y, xhat, rstd) for CuPy x (..., C) and weight (C,) of one dtype; rstd (..., 1) in the compute dtype."""
    import cupy

    y, xhat = cupy.empty_like(x), cupy.empty_like(x)
    rstd = cupy.empty((*x.shape[:-1], 1), dtype=COMPUTE[x.dtype.name])
    launch(forward_launch(x, weight, y, xhat, rstd, eps))
    return y, xhat, rstd


def backward(dy, xhat, weight, rstd):
    """(dx, dweight) for CuPy arrays of forward's dtype."""
    import cupy

    dy = cupy.ascontiguousarray(dy)
    dx, dweight = cupy.empty_like(dy), cupy.empty_like(weight)
    launch(backward_launch(dy, xhat, weight, rstd, dx))
    rows_per_block = weight_grad_rows_per_block(_rows(dy)[0])
    partial = cupy.empty((math.ceil(_rows(dy)[0] / rows_per_block), dy.shape[-1]), dtype=COMPUTE[dy.dtype.name])
    for run in weight_grad_launches(dy, xhat, partial, dweight, rows_per_block):
        launch(run)
    return dx, dweight
