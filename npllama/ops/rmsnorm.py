"""RMSNorm (Zhang & Sennrich, 2019), the pre-normalisation of Llama.

Forward:   r = 1 / sqrt(mean_c(x_c^2) + eps)          per row, in at least float32
           xhat = x * r
           y = xhat * g
Backward:  dg = sum over rows of dy * xhat
           dxhat = dy * g
           dx = r * (dxhat - xhat * mean_c(dxhat * xhat))
Shapes:    x, y (..., C); g (C,); r (..., 1).
On CuPy arrays forward runs as one fused kernel and backward as three (npllama/kernels/rmsnorm.cu:
these operations in this order, each rounded once, the sums in an order of their own), and this
array code is the reference they are tested against.
Derivation: reference/derivations.md#rmsnorm
"""

from dataclasses import dataclass

from ..backend import array_namespace, compute_dtype, is_cupy_array
from ..kernels import rmsnorm as cuda_rmsnorm


@dataclass(frozen=True)
class RMSNormCache:
    """What backward needs: the normalised input, the gain and the per-row 1/rms."""

    xhat: object
    weight: object
    rstd: object


def forward(x, weight, eps=1e-6):
    """Return (y, cache). Everything is computed in float32 or wider; y has x's dtype, rounded to it
    once (the cache keeps xhat in x's dtype too)."""
    if is_cupy_array(x) and cuda_rmsnorm.supports(x, weight):
        y, xhat, rstd = cuda_rmsnorm.forward(x, weight, eps)
        return y, RMSNormCache(xhat, weight, rstd)
    xp = array_namespace(x)
    ct = compute_dtype(xp, x.dtype)
    xf = x.astype(ct, copy=False)
    rstd = 1.0 / xp.sqrt(xp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    xhat = xf * rstd
    y = (xhat * weight.astype(ct, copy=False)).astype(x.dtype, copy=False)
    return y, RMSNormCache(xhat.astype(x.dtype, copy=False), weight, rstd)


def backward(dy, cache):
    """Return (dx, dweight), computed in float32 or wider and returned in dy's dtype.

    In float16 the products dy * g and dxhat * xhat overflow (65504) long before dx does, since
    dx carries the factor r = 1/rms(x); so every product and sum runs in the compute dtype.
    """
    xhat, weight, rstd = cache.xhat, cache.weight, cache.rstd
    if is_cupy_array(dy) and cuda_rmsnorm.supports_backward(dy, xhat, weight, rstd):
        return cuda_rmsnorm.backward(dy, xhat, weight, rstd)
    xp = array_namespace(dy)
    dim = xhat.shape[-1]
    ct = compute_dtype(xp, dy.dtype)
    dy_c = dy.astype(ct, copy=False)
    xhat_c = xhat.astype(ct, copy=False)
    # forward was: y = xhat * g
    # so dg = sum over rows of dy * xhat, and dxhat = dy * g
    dweight = (dy_c * xhat_c).reshape(-1, dim).sum(axis=0)
    dxhat = dy_c * weight.astype(ct, copy=False)
    # forward was: xhat = x * r, with r = (mean(x^2) + eps)^(-1/2)
    # so dr/dx_c = -r^3 x_c / C, and dx = r * dxhat - x * r^3 * mean(dxhat * x)
    #                                    = r * (dxhat - xhat * mean(dxhat * xhat))
    proj = xp.mean(dxhat * xhat_c, axis=-1, keepdims=True)
    dx = rstd * (dxhat - xhat_c * proj)
    return dx.astype(dy.dtype, copy=False), dweight.astype(weight.dtype, copy=False)
