"""SwiGLU gate (Shazeer, 2020): y = silu(a) * b, with silu(a) = a * sigmoid(a).

Forward:   s = sigmoid(a) = 1 / (1 + exp(-a));  y = a * s * b
Backward:  da = dy * b * s * (1 + a * (1 - s))
           db = dy * a * s
Shapes:    a, b, y (..., F), F the FFN width; a = W1 x and b = W3 x in the Llama block.
Everything is computed in float32 or wider and each result is rounded to the inputs' dtype once
(so float16 inputs lose nothing in between; float32 and float64 are computed as they are).
On CuPy arrays both run as one fused kernel each (npllama/kernels/swiglu.cu: these operations in
this order, each rounded once; sigmoid(a) is recomputed in backward rather than kept), and this
array code is the reference it is tested against.
Derivation: reference/derivations.md#swiglu
"""

from dataclasses import dataclass

from ..backend import array_namespace, compute_dtype, is_cupy_array
from ..kernels import swiglu as cuda_swiglu


@dataclass(frozen=True)
class SwiGLUCache:
    """What backward needs: both inputs and sigmoid(a) (in the compute dtype; None where the fused
    kernel ran, which recomputes it)."""

    a: object
    b: object
    sigmoid: object


def _sigmoid(xp, a):
    # 1 / (1 + exp(-a)) overflows exp for a < -709 in float64 (-88 in float32), harmlessly giving
    # 1/inf = 0, which is the right limit; silence the warning rather than change the value.
    with _errstate(xp):
        return 1.0 / (1.0 + xp.exp(-a))


def _errstate(xp):
    errstate = getattr(xp, "errstate", None)
    if errstate is None:  # CuPy does not raise floating-point warnings at all
        import contextlib

        return contextlib.nullcontext()
    return errstate(over="ignore")


def forward(a, b):
    """Return (y, cache)."""
    if is_cupy_array(a) and cuda_swiglu.supports(a, b):
        return cuda_swiglu.forward(a, b), SwiGLUCache(a, b, None)
    xp = array_namespace(a)
    ct = compute_dtype(xp, a.dtype)
    a_c, b_c = a.astype(ct, copy=False), b.astype(ct, copy=False)
    sig = _sigmoid(xp, a_c)
    return (a_c * sig * b_c).astype(a.dtype, copy=False), SwiGLUCache(a, b, sig)


def backward(dy, cache):
    """Return (da, db), in dy's dtype."""
    sig = cache.sigmoid
    if sig is None:  # forward ran the fused kernel: so does backward, given a dy of a's dtype and shape
        if dy.dtype == cache.a.dtype and dy.shape == cache.a.shape:
            return cuda_swiglu.backward(dy, cache.a, cache.b)
        xp = array_namespace(cache.a)
        sig = _sigmoid(xp, cache.a.astype(compute_dtype(xp, cache.a.dtype), copy=False))
    ct = sig.dtype
    a, b, dy_c = cache.a.astype(ct, copy=False), cache.b.astype(ct, copy=False), dy.astype(ct, copy=False)
    # forward was: y = a * s * b, s = sigmoid(a), ds/da = s * (1 - s)
    # so dy/db = a * s  and  dy/da = b * (s + a * s * (1 - s)) = b * s * (1 + a * (1 - s))
    db = dy_c * a * sig
    da = dy_c * b * sig * (1.0 + a * (1.0 - sig))
    return da.astype(dy.dtype, copy=False), db.astype(dy.dtype, copy=False)
