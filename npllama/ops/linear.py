"""Linear map without bias: y = x W^T, with W stored [out, in] as in Meta's and PyTorch's checkpoints.

Forward:   y = x W^T                 x (..., K), W (N, K), y (..., N)
Backward:  dx = dy W                 (..., K)
           dW = dy^T x               (N, K), summed over every leading index
The leading dimensions (B, T, ...) are flattened to one, so BLAS sees a single 2-D product
(M, K) x (K, N) with M = B*T, instead of a batch of small ones. float16 operands (mixed precision)
are multiplied with float32 accumulation and each result is rounded to float16 once
(backend.matmul: float32 BLAS on NumPy, cuBLAS's float16 GEMM with float32 compute on CuPy).

With `pool` (an executor of threads, each with a one-thread BLAS: npllama.parallel) and more than
ROWS_PER_TASK rows, the products are cut into parts that share nothing and run on its threads: y and
dx by blocks of ROWS_PER_TASK rows of M, dW by blocks of FEATURES_PER_TASK of its N rows (each
still summed over all of M in one product, so no part is ever added to another). The blocks are
fixed by the shapes, never by the number of threads, so any number of threads gives the same bits.
Derivation: reference/derivations.md#linear
"""

from dataclasses import dataclass

from ..backend import array_namespace, matmul

ROWS_PER_TASK = 256  # rows of x (and dy) in one task on a pool's thread
FEATURES_PER_TASK = 64  # output features (rows of dW) in one task


@dataclass(frozen=True)
class LinearCache:
    """What backward needs: the input and the weight."""

    x: object
    weight: object


def forward(x, weight, *, pool=None):
    """Return (y, cache) with y = x @ weight.T (by blocks of rows on `pool`'s threads, when given)."""
    n_out, n_in = weight.shape
    lead = x.shape[:-1]
    y = _product(x.reshape(-1, n_in), weight.T, pool)
    return y.reshape(*lead, n_out), save_for_backward(x, weight)


def _blocks(n: int, size: int) -> list:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _product(a, b, pool, block=None):
    """a @ b; with `pool` and more than `block` (default ROWS_PER_TASK) rows of a, by blocks of
    `block` rows on its threads."""
    block = ROWS_PER_TASK if block is None else block
    if pool is None or a.shape[0] <= block:
        return matmul(a, b)
    xp = array_namespace(a, b)
    out = xp.empty((a.shape[0], b.shape[1]), dtype=xp.result_type(a, b))

    def rows(part):
        matmul(a[part], b, out=out[part])

    for _ in pool.map(rows, _blocks(a.shape[0], block)):
        pass
    return out


def save_for_backward(x, weight):
    """The cache `forward(x, weight)` returns, without computing the product again.

    Selective recompute drops a linear's input after the forward pass (it is cheap to recompute)
    and keeps its output (it is not); when backward has recomputed the input, this gives it the
    very cache forward returned.
    """
    return LinearCache(x, weight)


def backward(dy, cache, *, pool=None):
    """Return (dx, dweight) (by blocks of rows of dx and of dweight on `pool`'s threads, when given)."""
    x, weight = cache.x, cache.weight
    n_out, n_in = weight.shape
    dy2 = dy.reshape(-1, n_out)
    x2 = x.reshape(-1, n_in)
    # forward was: y[m, n] = sum_k x[m, k] * W[n, k]
    # so dx[m, k] = sum_n dy[m, n] * W[n, k]   and   dW[n, k] = sum_m dy[m, n] * x[m, k]
    dx = _product(dy2, weight, pool).reshape(x.shape)
    if pool is None or dy2.shape[0] <= ROWS_PER_TASK:
        dweight = matmul(dy2.T, x2)
    else:  # dW's rows n0..n1 are dy[:, n0:n1]^T x over all of M: a part of its own, nothing to add
        dweight = _product(dy2.T, x2, pool, block=FEATURES_PER_TASK)
    return dx, dweight
