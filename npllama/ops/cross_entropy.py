"""Cross-entropy of logits against target ids: fused log-softmax and mean negative log-likelihood.

Forward:   m_n = max_v z[n, v],   sumexp_n = sum_v exp(z[n, v] - m_n) = 1 + rest_n
           loss  = (1/N') sum over counted rows n of (lse_n - z[n, y_n]),   lse_n = m_n + log sumexp_n
                 = (1/N') sum over counted rows n of ((m_n - z[n, y_n]) + log1p(rest_n))
           where a row is counted unless y_n == ignore_index, and N' is the number counted.
Backward:  dz[n, v] = dloss / N' * (softmax(z)[n, v] - [v == y_n])   for counted rows, 0 otherwise
           with softmax(z)[n, v] = exp(z[n, v] - m_n) / sumexp_n, and at v = y_n = argmax
           softmax - 1 = -rest_n / sumexp_n (no cancellation)
Shapes:    logits z (..., V) flattened to (N, V), N = B*T; targets (...,) integers; loss a scalar.

Subtracting the row maximum keeps exp() in [0, 1], so logits of magnitude 1e4 (or 1e30) give
the exact loss rather than inf or nan; keeping the max's own term apart (log1p(rest)) keeps a
confident row's tiny loss in float32 too. The statistics run in at least float32. Backward
builds dz in a single logits-sized buffer: z - m, exponentiated in place, scaled in place by
dloss / (N' sumexp), and the target entry set. If no row is counted the loss is 0 and so is the
gradient (PyTorch would return nan), so a batch of padding cannot poison a run.
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
    if bool((((y < 0) | (y >= vocab)) & counted).any()):
        raise ValueError(f"cross_entropy: targets must lie in [0, {vocab}) or equal ignore_index {ignore_index}")
    safe_targets = xp.where(counted, y, 0)

    rows = xp.arange(z.shape[0])
    argmax = z.argmax(axis=-1)
    row_max = z[rows, argmax].astype(ct, copy=False)
    shifted = xp.subtract(z, row_max[:, None], dtype=ct)  # the one logits-sized temporary of forward
    xp.exp(shifted, out=shifted)
    shifted[rows, argmax] = 0.0  # the max's own term, exp(0) = 1, is added back through log1p
    rest = shifted.sum(axis=-1)
    del shifted
    # lse - z[y] = (m - z[y]) + log1p(rest): the large parts cancel exactly before the small ones
    # are added, so a confident prediction keeps its tiny loss even when |z| is 1e4 in float32
    target_logits = z[rows, safe_targets].astype(ct, copy=False)
    nll = xp.where(counted, (row_max - target_logits) + xp.log1p(rest), 0.0)
    loss = nll.sum() / max(n_counted, 1)
    return loss, (logits, safe_targets, counted, n_counted, argmax, row_max, rest)


def backward(dloss, cache):
    """Return dlogits, built in one logits-sized buffer."""
    logits, safe_targets, counted, n_counted, argmax, row_max, rest = cache
    xp = array_namespace(logits)
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab)
    ct = compute_dtype(xp, logits.dtype)
    # forward was: loss = (1/N') sum_n (lse_n - z[n, y_n]), with d lse_n / d z[n, v] = softmax(z)[n, v]
    # so dz[n, v] = dloss / N' * (exp(z[n, v] - m_n) / sumexp_n - [v == y_n]) on counted rows.
    # softmax is taken as exp(z - m) / sumexp rather than exp(z - lse): lse = m + log(sumexp)
    # would round log(sumexp) away next to a large m, and the probabilities with it.
    rows = xp.arange(z.shape[0])
    row_scale = counted.astype(ct) * (dloss / max(n_counted, 1))
    dlogits = xp.subtract(z, row_max[:, None], dtype=ct)  # the one buffer
    xp.exp(dlogits, out=dlogits)
    dlogits *= (row_scale / (1.0 + rest))[:, None]
    # the target entry, p_y - 1: when y is the argmax, p_y = 1 / (1 + rest), and 1/(1 + rest) - 1
    # would cancel to 0 in float32 for a confident row; -rest / (1 + rest) is the same, exactly
    target_grad = xp.where(safe_targets == argmax, -rest * row_scale / (1.0 + rest),
                           dlogits[rows, safe_targets] - row_scale)
    dlogits[rows, safe_targets] = target_grad
    dlogits[~counted] = 0.0  # an ignored row's logits may be inf or nan; 0 * nan would be nan
    return dlogits.astype(logits.dtype, copy=False).reshape(logits.shape)
