"""Cross-entropy of logits against target ids: fused log-softmax and mean negative log-likelihood.

Forward:   m_n = max_v z[n, v],   e[n, v] = exp(z[n, v] - m_n),   sum_v e[n, v] = 1 + rest_n
           loss  = (1/N') sum over counted rows n of (lse_n - z[n, t_n]),   lse_n = m_n + log(1 + rest_n)
                 = (1/N') sum over counted rows n of ((m_n - z[n, t_n]) + log1p(rest_n))
           where a row is counted unless t_n == ignore_index, and N' is the number counted
           (or, when these rows are a slice of a larger batch, the batch's count, given by the
           caller: the slices' losses and gradients then add up to the whole batch's).
Backward:  dz[n, v] = dy / N' * (softmax(z)[n, v] - [v == t_n])   for counted rows, 0 otherwise
           with softmax(z)[n, v] = e[n, v] / (1 + rest_n), and at v = t_n = argmax
           softmax - 1 = -rest_n / (1 + rest_n) (no cancellation)
Shapes:    logits z (..., V) flattened to (N, V), N = B*T; targets t (...,) integers; loss a scalar;
           dy = dL/dloss, the incoming gradient, a scalar.

Subtracting the row maximum keeps exp() in [0, 1], so logits of magnitude 1e4 (or 1e30) give
the exact loss rather than inf or nan; keeping the max's own term apart (log1p(rest)) keeps a
confident row's tiny loss in float32 too. The statistics run in at least float32.

Memory: one logits-sized buffer in all. Forward computes e = exp(z - m) into one buffer and keeps
it in the cache instead of the logits (the caller may free the logits at once); backward scales
that same buffer in place into dz. So the cache is consumed: backward runs once per forward.
If no row is counted the loss is 0 and so is the gradient (PyTorch would return nan), so a batch
of padding cannot poison a run.
On CuPy arrays forward and backward run as one kernel each, a block a row (npllama/kernels/
cross_entropy.cu: these operations in this order, the row sum in an order of its own, exp and log1p
CUDA's), and this array code is the reference they are tested against.
Derivation: reference/derivations.md#cross-entropy
"""

from dataclasses import dataclass

from ..backend import array_namespace, compute_dtype, is_cupy_array
from ..kernels import cross_entropy as cuda_cross_entropy


@dataclass
class CrossEntropyCache:
    """exp(z - m), the buffer backward turns into dz (None once backward has taken it), and the
    per-row statistics. The one op cache that is not frozen, because backward consumes it."""

    exps: object
    shape: tuple
    dtype: object
    safe_targets: object
    counted: object
    n_counted: object  # N', the divisor: a 0-d array of the compute dtype, at least 1
    argmax: object
    rest: object


def check_targets(targets, vocab: int, ignore_index=-100):
    """Raise ValueError unless every target lies in [0, vocab) or equals ignore_index."""
    counted = targets != ignore_index
    if bool((((targets < 0) | (targets >= vocab)) & counted).any()):
        raise ValueError(f"cross_entropy: targets must lie in [0, {vocab}) or equal ignore_index {ignore_index}")


def batch_count(targets, ignore_index, dtype):
    """N', the number of targets that count (at least 1), as a 0-d array of the compute dtype of
    `dtype`; it stays where the targets are (no host sync on a GPU)."""
    xp = array_namespace(targets)
    return xp.maximum((targets != ignore_index).sum(), 1).astype(compute_dtype(xp, dtype))


def forward(logits, targets, ignore_index=-100, n_counted=None):
    """Return (loss, cache); loss is a 0-d array in the compute dtype (float32 or wider).

    n_counted: the N' to divide by, when these rows are a chunk of a batch (`batch_count` of the
    whole batch's targets); by default `batch_count` of these rows'."""
    xp = array_namespace(logits)
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab)
    t = targets.reshape(-1)
    if t.shape[0] != z.shape[0]:
        raise ValueError(f"cross_entropy: {z.shape[0]} rows of logits but {t.shape[0]} targets")
    ct = compute_dtype(xp, logits.dtype)
    if not is_cupy_array(t):  # on a GPU this check would stall every step: model.py checks on the host
        check_targets(t, vocab, ignore_index)
    counted = t != ignore_index
    if n_counted is None:
        n_counted = batch_count(t, ignore_index, logits.dtype)
    safe_targets = xp.where(counted, t, 0)
    if is_cupy_array(z) and cuda_cross_entropy.supports(z):
        safe_targets = safe_targets.astype(xp.int64, copy=False)
        exps, rest, argmax, nll = cuda_cross_entropy.forward(z, safe_targets, counted.astype(xp.int32))
        return nll.sum() / n_counted, CrossEntropyCache(exps, logits.shape, logits.dtype, safe_targets, counted,
                                                        n_counted, argmax, rest)

    rows = xp.arange(z.shape[0])
    argmax = z.argmax(axis=-1)
    row_max = z[rows, argmax].astype(ct, copy=False)
    target_logits = z[rows, safe_targets].astype(ct, copy=False)
    exps = xp.subtract(z, row_max[:, None], dtype=ct)  # the one logits-sized buffer
    xp.exp(exps, out=exps)
    exps[rows, argmax] = 0.0  # the max's own term, exp(0) = 1, is added back through log1p
    rest = exps.sum(axis=-1)
    exps[rows, argmax] = 1.0
    # lse - z[t] = (m - z[t]) + log1p(rest): the large parts cancel exactly before the small ones
    # are added, so a confident prediction keeps its tiny loss even when |z| is 1e4 in float32
    nll = xp.where(counted, (row_max - target_logits) + xp.log1p(rest), 0.0)
    loss = nll.sum() / n_counted
    return loss, CrossEntropyCache(exps, logits.shape, logits.dtype, safe_targets, counted, n_counted, argmax,
                                   rest)


def backward(dy, cache):
    """Return dlogits given dy = dL/dloss, written into the cache's exp buffer (so call it once per forward)."""
    if cache.exps is None:
        raise RuntimeError("cross_entropy.backward reuses its cache's buffer and can run once per forward")
    dlogits, cache.exps = cache.exps, None
    xp = array_namespace(dlogits)
    if is_cupy_array(dlogits) and cuda_cross_entropy.supports_backward(dlogits, cache):
        scale = xp.asarray(dy / cache.n_counted, dtype=dlogits.dtype).reshape(1)  # on the device: no host sync
        return cuda_cross_entropy.backward(dlogits, cache.rest, cache.argmax, cache.safe_targets,
                                           cache.counted.astype(xp.int32), scale, cache.dtype).reshape(cache.shape)
    rows = xp.arange(dlogits.shape[0])
    targets, rest = cache.safe_targets, cache.rest
    # forward was: loss = (1/N') sum_n (lse_n - z[n, t_n]), with d lse_n / d z[n, v] = softmax(z)[n, v]
    # so dz[n, v] = dy / N' * (e[n, v] / (1 + rest_n) - [v == t_n]) on counted rows.
    # softmax is taken as e / (1 + rest) rather than exp(z - lse): lse = m + log(1 + rest) would
    # round log(1 + rest) away next to a large m, and the probabilities with it.
    row_scale = cache.counted.astype(dlogits.dtype) * (dy / cache.n_counted)
    dlogits *= (row_scale / (1.0 + rest))[:, None]
    # the target entry, p_t - 1: when t is the argmax, p_t = 1 / (1 + rest), and 1/(1 + rest) - 1
    # would cancel to 0 in float32 for a confident row; -rest / (1 + rest) is the same, exactly
    target_grad = xp.where(targets == cache.argmax, -rest * row_scale / (1.0 + rest),
                           dlogits[rows, targets] - row_scale)
    dlogits[rows, targets] = target_grad
    # an ignored row's logits may be inf or nan, and 0 * nan is nan: overwrite those rows with 0
    if is_cupy_array(dlogits):  # in place through the mask, which stays on the device (no host sync)
        xp.copyto(dlogits, 0.0, where=~cache.counted[:, None])
    else:  # only the ignored rows, rather than a pass over the whole buffer
        dlogits[~cache.counted] = 0.0
    return dlogits.astype(cache.dtype, copy=False).reshape(cache.shape)
