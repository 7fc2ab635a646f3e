"""Array backends: NumPy on the CPU, CuPy on the GPU.

Two ways to name one, and the only place in npllama that knows how to recognise a CuPy array:

    xp = array_namespace(x, ...)      the module that owns the arrays in hand (what every op calls)
    xp = get_backend("numpy")         the module a command line asked for by name (--backend)

Ops never choose a backend: they take the namespace of their inputs, so the same lines run on
NumPy and CuPy. Entry points resolve `--backend` through `get_backend`, which raises a one-line
`BackendError` for a name it does not know or a backend that is not available. The GPU backend
(CuPy with the CUDA attention kernel) is not part of this release: `get_backend("cupy")` says so.
"""

from __future__ import annotations

import numpy

from .errors import NpllamaError

__all__ = ["BACKENDS", "BackendError", "array_namespace", "compute_dtype", "get_backend", "is_cupy_array",
           "to_host"]

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


def to_host(array) -> numpy.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if is_cupy_array(array):
        return array.get()
    return numpy.asarray(array)


def get_backend(name: str):
    """The array module for --backend `name`, or a BackendError that says what to pass instead."""
    if name == "numpy":
        return numpy
    if name == "cupy":
        raise BackendError("--backend cupy: the GPU backend is not available yet in this release; "
                           "use --backend numpy")
    raise BackendError(f"--backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}")
