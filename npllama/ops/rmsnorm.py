"""RMSNorm (Zhang & Sennrich, 2019), the pre-normalisation of Llama.

Forward:   r = 1 / sqrt(mean_c(x_c^2) + eps)          per row, in at least float32
           xhat = x * r
           y = xhat * g
Backward:  dg = sum over rows of dy * xhat
           dxhat = dy * g
           dx = r * (dxhat - xhat * mean_c(dxhat * xhat))
Shapes:    x, y (..., C); g (C,); r (..., 1).
Derivation: reference/derivations.md#rmsnorm
"""

from ._namespace import array_namespace, compute_dtype


def forward(x, weight, eps=1e-6):
    """Return (y, cache). Statistics are computed in float32 or wider; y has x's dtype."""
    xp = array_namespace(x)
    xf = x.astype(compute_dtype(xp, x.dtype), copy=False)
    rstd = 1.0 / xp.sqrt(xp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    xhat = (xf * rstd).astype(x.dtype, copy=False)
    y = xhat * weight
    return y, (xhat, weight, rstd)


def backward(dy, cache):
    """Return (dx, dweight)."""
    xhat, weight, rstd = cache
    xp = array_namespace(dy)
    dim = xhat.shape[-1]
    # forward was: y = xhat * g
    # so dg = sum over rows of dy * xhat, and dxhat = dy * g
    dweight = (dy * xhat).reshape(-1, dim).sum(axis=0)
    dxhat = dy * weight
    # forward was: xhat = x * r, with r = (mean(x^2) + eps)^(-1/2)
    # so dr/dx_c = -r^3 x_c / C, and dx = r * dxhat - x * r^3 * mean(dxhat * x)
    #                                    = r * (dxhat - xhat * mean(dxhat * xhat))
    ct = compute_dtype(xp, dy.dtype)
    dxhat = dxhat.astype(ct, copy=False)
    xhat_c = xhat.astype(ct, copy=False)
    proj = xp.mean(dxhat * xhat_c, axis=-1, keepdims=True)
    dx = (rstd * (dxhat - xhat_c * proj)).astype(dy.dtype, copy=False)
    return dx, dweight
