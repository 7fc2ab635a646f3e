"""Linear map without bias: y = x W^T, with W stored [out, in] as in Meta's and PyTorch's checkpoints.

Forward:   y = x W^T                 x (..., K), W (N, K), y (..., N)
Backward:  dx = dy W                 (..., K)
           dW = dy^T x               (N, K), summed over every leading index
The leading dimensions (B, T, ...) are flattened to one, so BLAS sees a single 2-D product
(M, K) x (K, N) with M = B*T, instead of a batch of small ones.
Derivation: reference/derivations.md#linear
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearCache:
    """What backward needs: the input and the weight."""

    x: object
    weight: object


def forward(x, weight):
    """Return (y, cache) with y = x @ weight.T."""
    n_out, n_in = weight.shape
    lead = x.shape[:-1]
    y = x.reshape(-1, n_in) @ weight.T
    return y.reshape(*lead, n_out), save_for_backward(x, weight)


def save_for_backward(x, weight):
    """The cache `forward(x, weight)` returns, without computing the product again.

    Selective recompute drops a linear's input after the forward pass (it is cheap to recompute)
    and keeps its output (it is not); when backward has recomputed the input, this gives it the
    very cache forward returned.
    """
    return LinearCache(x, weight)


def backward(dy, cache):
    """Return (dx, dweight)."""
    x, weight = cache.x, cache.weight
    n_out, n_in = weight.shape
    dy2 = dy.reshape(-1, n_out)
    x2 = x.reshape(-1, n_in)
    # forward was: y[m, n] = sum_k x[m, k] * W[n, k]
    # so dx[m, k] = sum_n dy[m, n] * W[n, k]   and   dW[n, k] = sum_m dy[m, n] * x[m, k]
    dx = (dy2 @ weight).reshape(x.shape)
    dweight = dy2.T @ x2
    return dx, dweight
