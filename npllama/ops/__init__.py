"""Every Llama-1 operation as a pair of pure functions.

    y, cache = op.forward(inputs..., params...)
    dinputs..., dparams... = op.backward(dy, cache)

`dy` is always the gradient of the loss with respect to the op's output y. Backward takes exactly
the cache its forward returned: each op defines its cache as a dataclass (`LinearCache`,
`AttentionCache`, ...), and callers pass it along without opening or building it, so another
implementation of an op (a CUDA attention kernel, say) may keep something else in its cache with
no change to the code that calls it. The one door for selective recompute is
`linear.save_for_backward(x, weight)`, the cache of a linear whose input was dropped and recomputed.

Each module's docstring states the forward formula, the backward result and the shapes, and
points to its section of reference/derivations.md. Nothing here keeps state or writes into its
inputs (cross-entropy's backward consumes its own cache's buffer, once); the namespace (NumPy or
CuPy) is taken from the input arrays.
"""

from . import attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu

__all__ = ["attention", "cross_entropy", "embedding", "linear", "rmsnorm", "rope", "swiglu"]
