"""Every Llama-1 operation as a pair of pure functions.

    out, cache = op.forward(inputs..., params...)
    dinputs..., dparams... = op.backward(dout, cache)

Each module's docstring states the forward formula, the backward result and the shapes, and
points to its section of reference/derivations.md. Nothing here keeps state or writes into its
inputs; the namespace (NumPy or CuPy) is taken from the input arrays.
"""

from . import attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu

__all__ = ["attention", "cross_entropy", "embedding", "linear", "rmsnorm", "rope", "swiglu"]
