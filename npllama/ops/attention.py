"""Causal attention, multi-head or grouped-query, that never stores the T x T attention weights.

Forward (per batch b and query head h; s = 1/sqrt(D) unless given):
    S = s * Q K^T            S[i, j] = -inf where key j comes after query i (causal mask)
    L = logsumexp_j S        per-row log-normaliser, the only statistic kept
    P = exp(S - L)           softmax(S) row by row
    O = P V
Backward, with Dvec = rowsum(dO * O) (equal to rowsum(P * dP), see the derivation):
    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - Dvec)
    dQ = s * dS K            dK = s * dS^T Q
Shapes: q (B, H, Tq, D); k, v (B, Hkv, Tk, D); O (B, H, Tq, D); L (B, H, Tq). Usually Tq = Tk = T.
When Tq < Tk (decoding with a KV cache) the queries are the last Tq positions: query i sits at
position Tk - Tq + i and sees keys 0 .. Tk - Tq + i.

Grouped-query attention (Ainslie et al., 2023): H is a multiple of Hkv, and the G = H / Hkv query
heads h = g*G .. g*G + G - 1 share key/value head g (Hkv = H is multi-head attention, Hkv = 1
multi-query). Keys and values are never copied per query head: the queries are viewed as
(B, Hkv, G, Tq, D) and each key/value head broadcasts over its group. A shared head's dK and dV
are the sums of the G query heads' contributions (K and V are used G times).

The algorithm is FlashAttention's (Dao et al., 2022; Dao, 2023), in NumPy/CuPy: queries are cut
into tiles of `tile_size` rows and each meets the key tiles one at a time with an online softmax
(running max m, running sum l, rescaled accumulator); key tiles wholly above the diagonal are
skipped. Backward walks key tiles, recomputes P = exp(S - L) one tile pair at a time and
accumulates dK, dV for the key tile and dQ for the query tile. The largest temporary is one
(B, H, tile, tile) block: memory is linear in T. Scores, softmax and accumulators run in at least
float32; the results have the input dtype.

On CuPy arrays of float32 or float64 with a head dim the kernels were built for (16, 32, 48, 64,
128), forward and backward run npllama's CUDA kernels instead (npllama/kernels/attention.cu): the
same algorithm, one thread block per tile, and this NumPy code is the reference they are tested
against. On the tensor cores (npllama/kernels/attention_mma.cu: float32 accumulators and
statistics, L in float32) run CuPy float16 inputs (mixed precision: float16 products, each output
rounded to float16 once) and CuPy float32 inputs while float32 products are TF32
(backend.tf32_products: --tf32; each input rounded to TF32 once). Other CuPy inputs run the code
below on the GPU. Either way the cache is the same.
Derivation: reference/derivations.md#attention
"""

import math
from dataclasses import dataclass

from ..backend import array_namespace, compute_dtype, is_cupy_array, tf32_products
from ..kernels import attention as cuda_attention
from ..kernels import attention_mma as tensor_core_attention

DEFAULT_TILE_SIZE = 128


@dataclass(frozen=True)
class AttentionCache:
    """What backward needs: the inputs, O and the row logsumexp L, how forward tiled (on the CPU; the
    CUDA kernels have tiles of their own) and scaled, and whether it ran on the tensor cores (backward
    follows forward, whatever the float32 products are when it runs)."""

    q: object
    k: object
    v: object
    out: object
    lse: object
    tile_size: int
    scale: float
    on_tensor_cores: bool = False


def _causal_mask(xp, query_start, n_queries, key_start, n_keys):
    """True where key (key_start + c) lies after the query at position (query_start + r)."""
    query_pos = query_start + xp.arange(n_queries)[:, None]
    key_pos = key_start + xp.arange(n_keys)[None, :]
    return key_pos > query_pos


def _runs_on_kernels(*arrays) -> bool:
    """CuPy arrays of one dtype, a head dim the CUDA kernels were built for, and a grid they can launch."""
    q = arrays[-3]
    batch, n_heads, n_queries, head_dim = q.shape
    return (all(is_cupy_array(a) for a in arrays) and len({a.dtype for a in arrays}) == 1
            and cuda_attention.supports(q.dtype, head_dim)
            and n_queries >= 1 and 1 <= batch * n_heads <= cuda_attention.MAX_HEADS)


def _runs_on_tensor_cores(q, k, v) -> bool:
    """CuPy arrays of one dtype, float16, or float32 while float32 products are TF32, with a head dim
    the tensor-core kernels were built for, in a grid they can launch, on a device whose shared
    memory holds their tiles."""
    batch, n_heads, n_queries, head_dim = q.shape
    dtype = q.dtype
    return (all(is_cupy_array(a) and a.dtype == dtype for a in (q, k, v))
            and (dtype == "float16" or (dtype == "float32" and tf32_products(array_namespace(q))))
            and tensor_core_attention.supports(dtype, head_dim)
            and n_queries >= 1 and 1 <= batch * n_heads <= cuda_attention.MAX_HEADS
            and tensor_core_attention.fits_the_device(dtype, head_dim))


def group_size(q, k, v) -> int:
    """G = H / Hkv, the query heads per key/value head; ValueError if the shapes do not fit together."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "need q (B, H, Tq, D) and k, v both (B, Hkv, Tk, D)")
    (batch, n_heads, _, head_dim), (kv_batch, n_kv_heads, _, kv_head_dim) = q.shape, k.shape
    if kv_batch != batch or kv_head_dim != head_dim or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"attention: q {tuple(q.shape)} and k, v {tuple(k.shape)} do not fit: need the same "
                         "batch and head dim, and a number of query heads that is a multiple of the key/value heads")
    return n_heads // n_kv_heads


def _grouped(q, k, v, ct):
    """q as (B, Hkv, G, Tq, D) and k, v as (B, Hkv, 1, Tk, D), in the compute dtype: each key/value
    head broadcasts over the G query heads of its group, without a copy."""
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads = k.shape[1]
    grouped_q = q.astype(ct, copy=False).reshape(batch, n_kv_heads, n_heads // n_kv_heads, n_queries, head_dim)
    return grouped_q, k.astype(ct, copy=False)[:, :, None], v.astype(ct, copy=False)[:, :, None]


def _head_groups(q, k):
    """(batch row, query heads, key/value head) of each key/value head's group: the parts that
    attend independently of one another, which `pool`'s threads may share."""
    group = q.shape[1] // k.shape[1]
    return [(slice(b, b + 1), slice(g * group, (g + 1) * group), slice(g, g + 1))
            for b in range(q.shape[0]) for g in range(k.shape[1])]


def forward(q, k, v, tile_size=DEFAULT_TILE_SIZE, scale=None, *, pool=None):
    """Return (out, cache); cache holds the inputs, out and the row logsumexp L, nothing T x T.

    With `pool` (an executor; NumPy only), each key/value head's group of query heads, in each batch
    row, runs on its threads: the groups attend independently, and each runs the same arithmetic
    as here, so out and L are the same to the bit."""
    if pool is not None and not _runs_on_kernels(q, k, v) and len(_head_groups(q, k)) > 1:
        return _forward_by_groups(q, k, v, tile_size, scale, pool)
    xp = array_namespace(q, k, v)
    group_size(q, k, v)
    batch, n_heads, n_queries, head_dim = q.shape
    n_keys = k.shape[2]
    if n_queries > n_keys:
        raise ValueError(f"attention: {n_queries} queries but only {n_keys} keys")
    if tile_size < 1:
        raise ValueError(f"attention: tile_size must be >= 1, got {tile_size}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if _runs_on_tensor_cores(q, k, v):
        out, lse = tensor_core_attention.forward(q, k, v, scale)
        return out, AttentionCache(q, k, v, out, lse, tile_size, scale, on_tensor_cores=True)
    if _runs_on_kernels(q, k, v):
        out, lse = cuda_attention.forward(q, k, v, scale)
        return out, AttentionCache(q, k, v, out, lse, tile_size, scale)
    offset = n_keys - n_queries  # absolute position of query 0
    ct = compute_dtype(xp, q.dtype)

    grouped_q, grouped_k, grouped_v = _grouped(q, k, v, ct)  # (B, Hkv, G, Tq, D), (B, Hkv, 1, Tk, D) x 2
    out = xp.empty(grouped_q.shape, dtype=q.dtype)
    lse = xp.empty(grouped_q.shape[:-1], dtype=ct)
    q_scaled = grouped_q * scale  # s Q once: (s Q) K^T = s (Q K^T)
    for q0 in range(0, n_queries, tile_size):
        q1 = min(q0 + tile_size, n_queries)
        q_tile = q_scaled[..., q0:q1, :]
        row_max = xp.full(q_tile.shape[:-1], -xp.inf, dtype=ct)
        row_sum = xp.zeros(q_tile.shape[:-1], dtype=ct)
        acc = xp.zeros(q_tile.shape, dtype=ct)
        last_visible_key = offset + q1 - 1  # the last query of the tile sees keys up to here
        for k0 in range(0, last_visible_key + 1, tile_size):
            k1 = min(k0 + tile_size, n_keys)
            scores = q_tile @ grouped_k[..., k0:k1, :].swapaxes(-1, -2)
            if k1 - 1 > offset + q0:  # the tile crosses the diagonal: mask the future keys
                xp.copyto(scores, -xp.inf, where=_causal_mask(xp, offset + q0, q1 - q0, k0, k1 - k0))
            # online softmax: every row sees key 0 in the first tile, so new_max is finite
            new_max = xp.maximum(row_max, scores.max(axis=-1))
            # probs = exp(scores - new_max), computed in the scores' own buffer (one tile's
            # temporaries are written in place here and below: the same arithmetic, less memory traffic)
            probs = xp.exp(xp.subtract(scores, new_max[..., None], out=scores), out=scores)
            rescale = xp.exp(row_max - new_max)  # exp(-inf) = 0 on the first tile
            row_sum = row_sum * rescale + probs.sum(axis=-1)
            acc = acc * rescale[..., None] + probs @ grouped_v[..., k0:k1, :]
            row_max = new_max
        out[..., q0:q1, :] = acc / row_sum[..., None]
        lse[..., q0:q1] = row_max + xp.log(row_sum)
    out, lse = out.reshape(q.shape), lse.reshape(q.shape[:-1])
    return out, AttentionCache(q, k, v, out, lse, tile_size, scale)


def _forward_by_groups(q, k, v, tile_size, scale, pool):
    xp = array_namespace(q, k, v)
    group_size(q, k, v)
    out = xp.empty(q.shape, dtype=q.dtype)
    lse = xp.empty(q.shape[:-1], dtype=compute_dtype(xp, q.dtype))

    def attend(parts):
        rows, heads, kv_head = parts
        out[rows, heads], part = forward(q[rows, heads], k[rows, kv_head], v[rows, kv_head], tile_size, scale)
        lse[rows, heads] = part.lse
        return part.scale

    scales = list(pool.map(attend, _head_groups(q, k)))
    return out, AttentionCache(q, k, v, out, lse, tile_size, scales[0])


def _backward_by_groups(dy, cache, pool):
    q, k, v = cache.q, cache.k, cache.v
    xp = array_namespace(dy)
    dq, dk, dv = xp.empty(q.shape, dtype=q.dtype), xp.empty(k.shape, dtype=k.dtype), xp.empty(v.shape, dtype=v.dtype)

    def attend_back(parts):
        rows, heads, kv_head = parts
        part = AttentionCache(q[rows, heads], k[rows, kv_head], v[rows, kv_head], cache.out[rows, heads],
                              cache.lse[rows, heads], cache.tile_size, cache.scale)
        dq[rows, heads], dk[rows, kv_head], dv[rows, kv_head] = backward(dy[rows, heads], part)

    for _ in pool.map(attend_back, _head_groups(q, k)):
        pass
    return dq, dk, dv


def backward(dy, cache, *, pool=None):
    """Return (dq, dk, dv) given dy = dO, recomputing P = exp(S - L) one tile pair at a time (each
    key/value head's group on `pool`'s threads, when given, as in `forward`)."""
    q, k, v, out, lse = cache.q, cache.k, cache.v, cache.out, cache.lse
    tile_size, scale = cache.tile_size, cache.scale
    if cache.on_tensor_cores and is_cupy_array(dy):
        return tensor_core_attention.backward(dy, q, k, v, out, lse, scale)
    if _runs_on_kernels(dy, q, k, v):
        return cuda_attention.backward(dy, q, k, v, out, lse, scale)
    if pool is not None and len(_head_groups(q, k)) > 1:
        return _backward_by_groups(dy, cache, pool)
    xp = array_namespace(dy)
    n_queries, n_keys = q.shape[2], k.shape[2]
    offset = n_keys - n_queries
    ct = compute_dtype(xp, q.dtype)

    grouped_q, grouped_k, grouped_v = _grouped(q, k, v, ct)  # (B, Hkv, G, Tq, D), (B, Hkv, 1, Tk, D) x 2
    lse = lse.reshape(grouped_q.shape[:-1])
    dy_c = dy.astype(ct, copy=False).reshape(grouped_q.shape)
    # Dvec_i = sum_d dO[i, d] * O[i, d] = sum_j P[i, j] dP[i, j]: the softmax Jacobian's
    # projection term, computed once from O instead of from the T x T P and dP.
    dvec = (dy_c * out.astype(ct, copy=False).reshape(grouped_q.shape)).sum(axis=-1)
    q_scaled = grouped_q * scale
    dq = xp.zeros(grouped_q.shape, dtype=ct)
    dk = xp.empty(k.shape, dtype=ct)
    dv = xp.empty(v.shape, dtype=ct)
    for k0 in range(0, n_keys, tile_size):
        k1 = min(k0 + tile_size, n_keys)
        k_tile, v_tile = grouped_k[..., k0:k1, :], grouped_v[..., k0:k1, :]
        # one dK, dV tile per query head of the group; the shared head's are their sum, below
        dk_tile = xp.zeros(grouped_q.shape[:3] + k_tile.shape[-2:], dtype=ct)
        dv_tile = xp.zeros(dk_tile.shape, dtype=ct)
        first_query = max(0, k0 - offset)  # the first query that sees any key of this tile
        for q0 in range((first_query // tile_size) * tile_size, n_queries, tile_size):
            q1 = min(q0 + tile_size, n_queries)
            q_tile = q_scaled[..., q0:q1, :]
            dy_tile = dy_c[..., q0:q1, :]
            # forward was: S = s Q K^T (masked), P = exp(S - L)
            scores = q_tile @ k_tile.swapaxes(-1, -2)
            if k1 - 1 > offset + q0:  # mask before exp: a future score may exceed L by any amount
                xp.copyto(scores, -xp.inf, where=_causal_mask(xp, offset + q0, q1 - q0, k0, k1 - k0))
            probs = xp.exp(xp.subtract(scores, lse[..., q0:q1, None], out=scores), out=scores)
            # forward was: O = P V, so dV = P^T dO and dP = dO V^T
            dv_tile += probs.swapaxes(-1, -2) @ dy_tile
            dprobs = dy_tile @ v_tile.swapaxes(-1, -2)
            # forward was: P = softmax(S) per row, so dS = P * (dP - rowsum(P * dP)) = P * (dP - Dvec)
            dscores = xp.multiply(probs, xp.subtract(dprobs, dvec[..., q0:q1, None], out=dprobs), out=dprobs)
            # forward was: S = (s Q) K^T, so dQ = s dS K and dK = dS^T (s Q)
            dq[..., q0:q1, :] += (dscores @ k_tile) * scale
            dk_tile += dscores.swapaxes(-1, -2) @ q_tile
        # forward was: every query head g of a group reads the shared K, V; so dK, dV = sum over g
        dk[:, :, k0:k1] = dk_tile.sum(axis=2)
        dv[:, :, k0:k1] = dv_tile.sum(axis=2)
    dq = dq.reshape(q.shape)
    return dq.astype(q.dtype, copy=False), dk.astype(k.dtype, copy=False), dv.astype(v.dtype, copy=False)


def naive_forward(q, k, v, scale=None):
    """softmax(s Q K^T + causal mask) V with the whole (B, H, Tq, Tk) matrix: the test oracle.

    Returns (out, lse). Grouped-query attention by copying each key/value head G times, the plain
    way `forward` avoids. Quadratic memory; use only to check `forward` on small shapes.
    """
    xp = array_namespace(q, k, v)
    group = group_size(q, k, v)
    n_queries, head_dim = q.shape[2], q.shape[3]
    n_keys = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    ct = compute_dtype(xp, q.dtype)
    k, v = xp.repeat(k, group, axis=1), xp.repeat(v, group, axis=1)  # query head h reads head h // G
    scores = (q.astype(ct) @ k.astype(ct).swapaxes(-1, -2)) * scale
    mask = _causal_mask(xp, n_keys - n_queries, n_queries, 0, n_keys)
    scores = xp.where(mask, -xp.inf, scores)
    row_max = scores.max(axis=-1, keepdims=True)
    weights = xp.exp(scores - row_max)
    row_sum = weights.sum(axis=-1, keepdims=True)
    out = (weights / row_sum) @ v.astype(ct)
    lse = (row_max + xp.log(row_sum))[..., 0]
    return out.astype(q.dtype), lse
