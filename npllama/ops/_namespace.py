"""Which array library an op works with: the one its input arrays come from.

This is the only file under `npllama/ops/` that imports NumPy, and it only hands the module back;
every op then calls `xp.<function>` so the same lines run on NumPy (CPU) and CuPy (GPU).
"""


def array_namespace(*arrays):
    """Return the module (numpy or cupy) that owns the given arrays."""
    for array in arrays:
        if type(array).__module__.split(".")[0] == "cupy":
            import cupy

            return cupy
    import numpy

    return numpy


def compute_dtype(xp, dtype):
    """The dtype reductions run in: the input's, but never below float32."""
    return xp.promote_types(dtype, xp.float32)
