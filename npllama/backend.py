"""Array backends: which one an array belongs to (numpy on the CPU, cupy on the GPU), and moving
arrays to the host.

The ops never choose a backend: they take the namespace of their input arrays
(`npllama.ops._namespace.array_namespace`). Selecting cupy by name arrives with the GPU backend.
"""

from __future__ import annotations

import numpy

from .ops._namespace import array_namespace

__all__ = ["array_namespace", "to_host"]


def to_host(array) -> numpy.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if type(array).__module__.split(".")[0] == "cupy":
        return array.get()
    return numpy.asarray(array)
