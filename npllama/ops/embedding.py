"""Token embedding: a row gather.

Forward:   y[b, t, :] = weight[ids[b, t], :]
Backward:  dweight[v, :] = sum over every (b, t) with ids[b, t] == v of dy[b, t, :]
           (a scatter-add: a token id that occurs several times collects every one of its rows)
Shapes:    ids (B, T) integers in [0, V); weight (V, C); y and dy (B, T, C).
On CuPy the scatter-add runs as npllama's kernel (npllama/kernels/embedding.cu): positions sorted by
id, each id's rows summed in position order, as NumPy's add.at adds them, with no atomics, so
two runs give the same bits.
Derivation: reference/derivations.md#embedding
"""

from dataclasses import dataclass

from ..backend import array_namespace, compute_dtype, is_cupy_array
from ..kernels import embedding as cuda_embedding


@dataclass(frozen=True)
class EmbeddingCache:
    """What backward needs: the ids and the weight's shape (not the weight itself)."""

    ids: object
    weight_shape: tuple


def forward(ids, weight):
    """Gather the rows of `weight` named by `ids`. Returns (y, cache)."""
    y = weight[ids]
    return y, EmbeddingCache(ids, weight.shape)


def backward(dy, cache):
    """Return dweight, in dy's dtype: each row summed in float32 or wider and rounded once.
    `ids` are integers and have no gradient."""
    xp = array_namespace(dy)
    ct = compute_dtype(xp, dy.dtype)
    if is_cupy_array(dy) and ct.name in cuda_embedding.CXX_TYPES and dy.size:
        dweight = cuda_embedding.backward(dy.astype(ct, copy=False), cache.ids, cache.weight_shape)
        return dweight.astype(dy.dtype, copy=False)
    dim = cache.weight_shape[-1]
    # forward was: y[b, t] = weight[ids[b, t]]
    # so every position routes its gradient to the row it read; repeated ids must add up, which a
    # plain `dweight[ids] = dy` would not do (the last write would win). ufunc.at is unbuffered.
    dweight = xp.zeros(cache.weight_shape, dtype=ct)
    xp.add.at(dweight, cache.ids.reshape(-1), dy.reshape(-1, dim).astype(ct, copy=False))
    return dweight.astype(dy.dtype, copy=False)
