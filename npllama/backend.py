"""Array backends: numpy (CPU) or cupy (GPU), chosen by name, and moving arrays to the host.

The ops never choose a backend: they take the namespace of their input arrays
(`npllama.ops._namespace.array_namespace`). Entry points choose one here, by name.
"""

from __future__ import annotations

import numpy

from .ops._namespace import array_namespace

BACKENDS = ("numpy", "cupy")

__all__ = ["BACKENDS", "array_namespace", "get_backend", "to_host"]


def get_backend(name: str):
    """The array module for `name`; a ValueError with a one-line reason when it cannot be used."""
    if name == "numpy":
        return numpy
    if name == "cupy":
        try:
            import cupy
        except ImportError:
            raise ValueError("backend 'cupy' needs CuPy: pip install 'npllama[gpu]'") from None
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise ValueError("backend 'cupy': no CUDA device is visible")
        except cupy.cuda.runtime.CUDARuntimeError as error:
            raise ValueError(f"backend 'cupy': CUDA is not usable here ({error})") from None
        return cupy
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def to_host(array) -> numpy.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if type(array).__module__.split(".")[0] == "cupy":
        return array.get()
    return numpy.asarray(array)
