"""SwiGLU gate (Shazeer, 2020): y = silu(a) * b, with silu(a) = a * sigmoid(a).

Forward:   s = sigmoid(a) = 1 / (1 + exp(-a));  y = a * s * b
Backward:  da = dy * b * s * (1 + a * (1 - s))
           db = dy * a * s
Shapes:    a, b, y (..., F), F the FFN width; a = W1 x and b = W3 x in the Llama block.
Derivation: reference/derivations.md#swiglu
"""

from dataclasses import dataclass

from ..backend import array_namespace


@dataclass(frozen=True)
class SwiGLUCache:
    """What backward needs: both inputs and sigmoid(a)."""

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
    xp = array_namespace(a)
    sig = _sigmoid(xp, a)
    return a * sig * b, SwiGLUCache(a, b, sig)


def backward(dy, cache):
    """Return (da, db)."""
    a, b, sig = cache.a, cache.b, cache.sigmoid
    # forward was: y = a * s * b, s = sigmoid(a), ds/da = s * (1 - s)
    # so dy/db = a * s  and  dy/da = b * (s + a * s * (1 - s)) = b * s * (1 + a * (1 - s))
    db = dy * a * sig
    da = dy * b * sig * (1.0 + a * (1.0 - sig))
    return da, db
