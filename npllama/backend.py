"""Array backends: NumPy on the CPU, CuPy on the GPU.

Two ways to name one, and the only place in npllama that knows how to recognise a CuPy array:

    xp = array_namespace(x, ...)      the module that owns the arrays in hand (what every op calls)
    xp = get_backend("numpy")         the module a command line asked for by name (--backend)

Ops never choose a backend: they take the namespace of their inputs, so the same lines run on
NumPy and CuPy. Entry points resolve `--backend` through `get_backend`, which raises a one-line
`BackendError` for a name it does not know or a backend that cannot run here: CuPy missing, CuPy
without a GPU it can use, or without the NVRTC library it compiles npllama's kernels with.

On CuPy, matrix products are cuBLAS's in the arrays' dtype. What cuBLAS may do inside a float32
product is CuPy's per-dtype "compute type", process-wide, which `float32_products` sets for the span
of a training run: full float32 (cuBLAS's CUBLAS_COMPUTE_32F) unless TF32 is asked for (`--tf32`:
CUBLAS_COMPUTE_32F_FAST_TF32, inputs rounded to a 10-bit mantissa on the tensor cores, float32
accumulation). It is set either way, so CUPY_TF32=1 in the environment does not change a training
run; elsewhere CuPy's own rule holds (TF32 only with CUPY_TF32=1, which npllama never sets).
`tf32_products` says which holds now; npllama's attention follows it (float32 attention on the
TF32 tensor-core kernels when it is true).

float16 products (mixed precision) go through `matmul`: float16 operands, float32 accumulation, the
result rounded to float16 once. On NumPy that is float32 BLAS on the exactly widened operands
(NumPy's own float16 matmul is an unblocked loop); on CuPy it is cuBLAS's float16 GEMM on the tensor
cores with CUBLAS_COMPUTE_32F, which CuPy picks for float16 unless its compute type is PEDANTIC, and
which `float32_products` also sets explicitly for the span of a training run, together with
CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION: without it cuBLAS may add a split-K product's
partial sums in float16 (PyTorch's allow_fp16_reduced_precision_reduction), a second rounding.
Outside a training run (inference, evaluation) cuBLAS's default math mode holds.
"""

from __future__ import annotations

import contextlib
import importlib.util

import numpy

from .errors import NpllamaError

__all__ = ["BACKENDS", "BackendError", "array_namespace", "compute_dtype", "get_backend", "is_cupy_array",
           "float32_products", "matmul", "synchronize", "tf32_products", "to_host"]

BACKENDS = ("numpy", "cupy")


class BackendError(NpllamaError):
    """A --backend that cannot be used, in one line: which, why, what to pass instead."""


def is_cupy_array(array) -> bool:
    """True for a CuPy array (recognised without importing CuPy)."""
    return type(array).__module__.split(".")[0] == "cupy"


def array_namespace(*arrays):
    """The module (numpy or cupy) that owns the given arrays."""
    if any(is_cupy_array(array) for array in arrays):
        import cupy

        return cupy
    return numpy


def compute_dtype(xp, dtype):
    """The dtype reductions run in: the input's, but never below float32."""
    return xp.promote_types(dtype, xp.float32)


def matmul(a, b, out=None):
    """a @ b (into `out` when given). Two float16 operands are multiplied with float32 accumulation
    and the result is rounded to float16 once; any other dtypes are plain a @ b."""
    if a.dtype != numpy.float16 or b.dtype != numpy.float16 or is_cupy_array(a):  # cuBLAS: see the docstring
        return array_namespace(a, b).matmul(a, b, out=out)
    product = a.astype(numpy.float32) @ b.astype(numpy.float32)  # the float32 product's own BLAS call, bit for bit
    if out is None:
        return product.astype(numpy.float16)
    out[...] = product
    return out


def to_host(array) -> numpy.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if is_cupy_array(array):
        return array.get()
    return numpy.asarray(array)


def synchronize(xp):
    """Wait until the device has finished the work queued so far (for timing); nothing on NumPy."""
    if xp is not numpy:
        xp.cuda.get_current_stream().synchronize()


@contextlib.contextmanager
def float32_products(xp, tf32: bool):
    """Within the block, CuPy's float32 matrix products run in TF32 when `tf32`, else in full float32;
    the compute type before it comes back after. NumPy's are float32 whatever `tf32` says (callers
    refuse --tf32 there)."""
    if xp is numpy:
        yield
        return
    from cupy._core import _routines_linalg as linalg

    before = linalg.get_compute_type(numpy.float32), linalg.get_compute_type(numpy.float16)
    linalg.set_compute_type(numpy.float32, linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_FP32)
    linalg.set_compute_type(numpy.float16, linalg.COMPUTE_TYPE_FP32)  # float16 GEMMs accumulate in float32
    try:
        with float32_reductions():
            yield
    finally:
        linalg.set_compute_type(numpy.float32, before[0])
        linalg.set_compute_type(numpy.float16, before[1])


def tf32_products(xp) -> bool:
    """Whether CuPy's float32 matrix products run in TF32 here and now (inside float32_products(xp,
    True), or with CUPY_TF32=1 outside it): npllama's own float32 products, attention's, follow the
    same rule. Never on NumPy."""
    if xp is numpy:
        return False
    from cupy._core import _routines_linalg as linalg

    return linalg.get_compute_type(numpy.float32) == linalg.COMPUTE_TYPE_TF32


DISALLOW_REDUCED_PRECISION_REDUCTION = 16  # cublasMath_t's CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION


@contextlib.contextmanager
def float32_reductions():
    """Within the block, this thread's cuBLAS handle (CuPy's, for the current device) adds a split-K
    product's partial sums in the compute type (float32), never in a float16 output's; its math mode
    comes back after."""
    from cupy.cuda import device
    from cupy_backends.cuda.libs import cublas

    handle = device.get_cublas_handle()
    before = cublas.getMathMode(handle)
    cublas.setMathMode(handle, before | DISALLOW_REDUCED_PRECISION_REDUCTION)
    try:
        yield
    finally:
        cublas.setMathMode(handle, before)


def get_backend(name: str):
    """The array module for --backend `name`, or a BackendError that says what to pass instead."""
    if name == "numpy":
        return numpy
    if name == "cupy":
        return _usable_cupy()
    raise BackendError(f"--backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}")


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _usable_cupy():
    """CuPy, once it is known to import, to see a GPU and to load NVRTC; else a one-line BackendError."""
    if importlib.util.find_spec("cupy") is None:
        raise BackendError('--backend cupy needs CuPy, which is not installed: pip install "npllama[gpu]" '
                           "(or use --backend numpy)")
    try:
        import cupy
    except Exception as error:  # a wheel built for another CUDA, a missing runtime library
        raise BackendError(f"--backend cupy: CuPy is installed but does not import ({_first_line(error)}); "
                           "install the cupy-cuda wheel for your CUDA driver, or use --backend numpy") from None
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, or a driver too old for this CuPy
        raise BackendError(f"--backend cupy: CuPy finds no usable GPU ({_first_line(error)}); check the NVIDIA "
                           "driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or use --backend numpy") from None
    if n_devices == 0:
        raise BackendError("--backend cupy: CuPy sees no GPU; check CUDA_VISIBLE_DEVICES, or use --backend numpy")
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as error:
        raise BackendError(f"--backend cupy: CuPy cannot load NVRTC, which compiles npllama's kernels "
                           f"({_first_line(error)}); pip install nvidia-cuda-nvrtc, or use --backend numpy") from None
    try:  # CuPy compiles even its elementwise kernels, with the CUDA headers it must find
        int((cupy.arange(2) + 1).sum())
    except Exception as error:
        raise BackendError(f"--backend cupy: CuPy cannot compile a kernel ({_first_line(error)}); "
                           'pip install "npllama[gpu]" (it brings the CUDA toolkit as wheels), or use --backend numpy'
                           ) from None
    return cupy
