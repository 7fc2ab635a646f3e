"""Linear map without bias: y = x W^T, with W stored [out, in] as in Meta's and PyTorch's checkpoints.

Forward:   y = x W^T                 x (..., K), W (N, K), y (..., N)
Backward:  dx = dy W                 (..., K)
           dW = dy^T x               (N, K), summed over every leading index
The leading dimensions (B, T, ...) are flattened to one, so BLAS sees a single 2-D product
(M, K) x (K, N) with M = B*T, instead of a batch of small ones.
Derivation: reference/derivations.md#linear
"""


def forward(x, weight):
    """Return (y, cache) with y = x @ weight.T."""
    n_out, n_in = weight.shape
    lead = x.shape[:-1]
    y = x.reshape(-1, n_in) @ weight.T
    return y.reshape(*lead, n_out), (x, weight)


def backward(dy, cache):
    """Return (dx, dweight)."""
    x, weight = cache
    n_out, n_in = weight.shape
    dy2 = dy.reshape(-1, n_out)
    x2 = x.reshape(-1, n_in)
    # forward was: y[m, n] = sum_k x[m, k] * W[n, k]
    # so dx[m, k] = sum_n dy[m, n] * W[n, k]   and   dW[n, k] = sum_m dy[m, n] * x[m, k]
    dx = (dy2 @ weight).reshape(x.shape)
    dweight = dy2.T @ x2
    return dx, dweight
