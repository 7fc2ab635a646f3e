"""Token embedding: a row gather.

Forward:   out[b, t, :] = weight[ids[b, t], :]
Backward:  dweight[v, :] = sum over every (b, t) with ids[b, t] == v of dout[b, t, :]
           (a scatter-add: a token id that occurs several times collects every one of its rows)
Shapes:    ids (B, T) integers in [0, V); weight (V, C); out and dout (B, T, C).
Derivation: reference/derivations.md#embedding
"""

from ..backend import array_namespace


def forward(ids, weight):
    """Gather the rows of `weight` named by `ids`. Returns (out, cache)."""
    out = weight[ids]
    return out, (ids, weight.shape)


def backward(dout, cache):
    """Return dweight. `ids` are integers and have no gradient."""
    ids, weight_shape = cache
    xp = array_namespace(dout)
    dim = weight_shape[-1]
    # forward was: out[b, t] = weight[ids[b, t]]
    # so every position routes its gradient to the row it read; repeated ids must add up, which a
    # plain `dweight[ids] = dout` would not do (the last write would win). ufunc.at is unbuffered.
    dweight = xp.zeros(weight_shape, dtype=dout.dtype)
    xp.add.at(dweight, ids.reshape(-1), dout.reshape(-1, dim))
    return dweight
