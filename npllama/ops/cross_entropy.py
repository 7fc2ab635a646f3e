"""Cross-entropy of logits against target ids: fused log-softmax and mean negative log-likelihood.

Forward:   lse_n = m_n + log sum_v exp(z[n, v] - m_n),   m_n = max_v z[n, v]
           loss  = (1/N') sum over counted rows n of (lse_n - z[n, y_n])
           where a row is counted unless y_n == ignore_index, and N' is the number counted.
Backward:  dz[n, v] = dloss / N' * (softmax(z)[n, v] - [v == y_n])   for counted rows, 0 otherwise
Shapes:    logits z (..., V) flattened to (N, V), N = B*T; targets (...,) integers; loss a scalar.

Subtracting the row maximum keeps exp() in [0, 1], so logits of magnitude 1e4 (or 1e30) give
the exact loss rather than inf or nan. The statistics run in at least float32. Backward builds
dz in a single logits-sized buffer: z - lse, exponentiated in place, the target entry reduced by
one, then scaled in place. If no row is counted the loss is 0 and so is the gradient (PyTorch
would return nan), so a batch of padding cannot poison a run.
Derivation: reference/derivations.md#cross-entropy
"""

from ._namespace import array_namespace, compute_dtype


def forward(logits, targets, ignore_index=-100):
    """Return (loss, cache); loss is a 0-d array in the compute dtype (float32 or wider)."""
    xp = array_namespace(logits)
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab)
    y = targets.reshape(-1)
    if y.shape[0] != z.shape[0]:
        raise ValueError(f"cross_entropy: {z.shape[0]} rows of logits but {y.shape[0]} targets")
    ct = compute_dtype(xp, logits.dtype)
    counted = y != ignore_index
    n_counted = int(counted.sum())
    safe_targets = xp.where(counted, y, 0)

    row_max = z.max(axis=-1).astype(ct, copy=False)
    shifted = z.astype(ct) - row_max[:, None]  # the one logits-sized temporary of forward
    xp.exp(shifted, out=shifted)
    lse = row_max + xp.log(shifted.sum(axis=-1))
    del shifted
    target_logits = z[xp.arange(z.shape[0]), safe_targets].astype(ct, copy=False)
    nll = xp.where(counted, lse - target_logits, 0.0)
    loss = nll.sum() / max(n_counted, 1)
    return loss, (logits, safe_targets, counted, n_counted, lse)


def backward(dloss, cache):
    """Return dlogits, built in one logits-sized buffer."""
    logits, safe_targets, counted, n_counted, lse = cache
    xp = array_namespace(logits)
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab)
    ct = compute_dtype(xp, logits.dtype)
    # forward was: loss = (1/N') sum_n (lse_n - z[n, y_n]), with d lse_n / d z[n, v] = softmax(z)[n, v]
    # so dz[n, v] = dloss / N' * (exp(z[n, v] - lse_n) - [v == y_n]) on counted rows
    dlogits = z.astype(ct) - lse[:, None]  # the one buffer
    xp.exp(dlogits, out=dlogits)
    dlogits[xp.arange(z.shape[0]), safe_targets] -= 1.0
    row_scale = counted.astype(ct) * (dloss / max(n_counted, 1))
    dlogits *= row_scale[:, None]
    return dlogits.astype(logits.dtype, copy=False).reshape(logits.shape)
