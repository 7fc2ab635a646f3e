"""The Llama-1 model: configuration, presets, initialisation, forward, and a hand-written backward.

A block (Touvron et al. 2023 §2.2):

    n1 = rmsnorm(x)                                   pre-normalisation
    q, k, v = Wq n1, Wk n1, Wv n1                     q (B, T, C), C = H * D; k, v (B, T, Hkv * D)
    o = attention(rope(q), rope(k), v)                causal, per head, memory-efficient; the H
                                                      query heads share the Hkv key/value heads
                                                      in groups of H / Hkv (Hkv = H: Llama-1)
    h = x + Wo o
    n2 = rmsnorm(h)
    a, b = W1 n2, W3 n2                               (B, T, F)
    y = h + W2 (silu(a) * b)

The model is: tok_embeddings -> n_layers blocks -> rmsnorm -> output -> logits (B, T, V). With tied
embeddings the output head is the embedding matrix itself, and its gradient adds both uses.

Every op's backward takes exactly the cache its forward returned (npllama/ops); the block never
opens or builds one, so another attention implementation slots in without a change here.

Selective recompute (paper §2.4): in training a block keeps only the activations that are
expensive to compute: the outputs of its matrix products (h = x + Wo o, a, b), its input x, and
attention's cache (rope(q), rope(k), v, the output o and its logsumexp). Backward recomputes the
cheap ones, the two RMSNorms, SwiGLU and the head merge, by calling the same forward functions on
the same inputs, so `recompute=True` and `recompute=False` give bitwise-identical gradients. The
policy is `KEPT_ACTIVATIONS`, `KEPT_CACHES` and `_recompute`, side by side.

Parameters live in a flat dict under Meta's names (`layers.{i}.attention.wq.weight`, ...), with
linear weights stored [out, in]; npllama/params.py is the table of names, shapes and roles. The
namespace (NumPy or CuPy) is taken from the parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy

from .backend import array_namespace, compute_dtype
from .ops import attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu
from .ops.rope import RopeScaling
from .params import (
    FINAL_NORM,
    NORM,
    OUTPUT_HEAD,
    TOK_EMBEDDINGS,
    head_name,
    layer_name,
    layer_weights,
    parameter_shapes,
    parameter_table,
)


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-1 model. The FFN width is `hidden_dim` when a checkpoint states it (Hugging
    Face's `intermediate_size`), else Meta's rule (see `ffn_dim`)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    vocab_size: int = 32000
    multiple_of: int = 256
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    hidden_dim: int | None = None  # the FFN width, when it does not follow Meta's rule
    # key/value heads, shared by groups of n_heads / n_kv_heads query heads (grouped-query
    # attention); None means n_heads (multi-head attention, Llama-1), and becomes it
    n_kv_heads: int | None = None
    tie_embeddings: bool = False  # the output head is tok_embeddings (no output.weight)
    rope_scaling: RopeScaling | None = None  # RoPE frequency scaling (linear, llama3); a dict becomes one

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if isinstance(self.rope_scaling, dict):  # as config.json holds it
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"LlamaConfig.rope_scaling must be a RopeScaling, got {self.rope_scaling!r}")
        names = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len", "n_kv_heads")
        for name in names + (("hidden_dim",) if self.hidden_dim is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % (self.n_kv_heads or self.n_heads):
            raise ValueError(f"LlamaConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim {self.head_dim} must be even for RoPE")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"LlamaConfig.tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive finite number, got {value!r:.40}")
            object.__setattr__(self, name, float(value))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the keys and of the values: n_kv_heads * head_dim (dim under multi-head attention)."""
        return (self.n_kv_heads or self.n_heads) * self.head_dim  # never None after __post_init__

    @property
    def ffn_dim(self) -> int:
        """`hidden_dim` if set, else Meta's rule: 2/3 of 4*dim, rounded up to a multiple of
        `multiple_of` (11008 for 4096)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def n_params(self) -> int:
        """Number of parameters: embeddings + blocks + final norm + output head (unless tied)."""
        return sum(math.prod(shape) for shape in parameter_shapes(self).values())

    def to_dict(self) -> dict:
        """The fields, without those that hold Llama-1's choice (as configs were before them): no
        `hidden_dim` when the rule gives the width, no `n_kv_heads` under multi-head attention, no
        `tie_embeddings` when untied, no `rope_scaling` without scaling."""
        fields = asdict(self)
        for name, llama1 in (("hidden_dim", None), ("n_kv_heads", self.n_heads), ("tie_embeddings", False),
                             ("rope_scaling", None)):
            if fields[name] == llama1:
                del fields[name]
        return fields


PRESETS: dict[str, LlamaConfig] = {
    # The paper's models (Table 2); configs only, for parameter counts and shape checks.
    "7B": LlamaConfig(dim=4096, n_layers=32, n_heads=32),
    "13B": LlamaConfig(dim=5120, n_layers=40, n_heads=40),
    "33B": LlamaConfig(dim=6656, n_layers=60, n_heads=52),
    "65B": LlamaConfig(dim=8192, n_layers=80, n_heads=64),
    # Small models that train on a laptop. `small` is the benchmark shape (dim 288, 6 layers).
    "nano": LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=128),
    "tiny": LlamaConfig(dim=128, n_layers=4, n_heads=4, vocab_size=4096, multiple_of=32, max_seq_len=256),
    "small": LlamaConfig(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256),
    # The GPU benchmark shape: GPT-2 small's width and depth in Llama's form, 134M parameters, T = 1024.
    "134M": LlamaConfig(dim=768, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=1024),
}


def get_preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def init_params(config: LlamaConfig, seed: int = 0, dtype="float32", xp=numpy, std: float = 0.02):
    """Random initial parameters, drawn on the CPU with a seeded generator (same on every backend).

    Norm gains are 1. Embedding and linear weights are N(0, std^2); the two projections that write
    into the residual stream (wo, w2) get std / sqrt(2 * n_layers), so the residual's variance
    does not grow with depth (GPT-2's rule; the paper does not state its initialisation).
    """
    rng = numpy.random.default_rng(seed)
    residual_std = std / math.sqrt(2 * config.n_layers)
    params = {}
    for name, spec in parameter_table(config).items():
        if spec.role == NORM:
            value = numpy.ones(spec.shape)
        elif spec.residual:
            value = rng.normal(0.0, residual_std, size=spec.shape)
        else:
            value = rng.normal(0.0, std, size=spec.shape)
        params[name] = xp.asarray(value.astype(dtype))
    return params


def rope_tables(config: LlamaConfig, n_positions: int, dtype, xp, start: int = 0):
    """(cos, sin) for positions start .. start + n_positions - 1, each (T, D/2)."""
    positions = xp.arange(start, start + n_positions)
    return rope.frequencies(config.head_dim, positions, config.rope_theta, dtype=dtype, xp=xp,
                            scaling=config.rope_scaling)


# ---------------------------------------------------------------------------------------------
# One block


def _split_heads(x, n_heads):
    """(B, T, C) -> (B, T, H, D)."""
    batch, seq, dim = x.shape
    return x.reshape(batch, seq, n_heads, dim // n_heads)


def _to_attention_layout(x, xp):
    """(B, T, H, D) -> contiguous (B, H, T, D), the layout the attention op tiles over."""
    return xp.ascontiguousarray(x.transpose(0, 2, 1, 3))


def _merge_heads(x):
    """(B, H, T, D) -> (B, T, C): the attention layout back to one row of C features per position."""
    batch, n_heads, seq, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, seq, n_heads * head_dim)


@dataclass
class BlockCache:
    """What block_backward takes: exactly what block_forward returned.

    `ops` maps each op of the block to the cache its forward returned, by the name of its weight
    (`wq`, `attention_norm`, ...) or of the op (`rope_q`, `rope_k`, `attention`, `swiglu`).
    Under selective recompute `ops` holds only the caches in `KEPT_CACHES` and `activations` the
    arrays in `KEPT_ACTIVATIONS`, from which `_recompute` rebuilds the rest.
    """

    ops: dict
    activations: dict | None = None


# Selective recompute (paper §2.4), the whole policy. Kept: the block input x, the residual h and
# the FFN projections a, b (outputs of matrix products), the attention output, and the caches of
# attention (its inputs, output and row logsumexp, whatever the implementation keeps) and of RoPE
# (two small tables). Recomputed: the two RMSNorms, SwiGLU and the head merge, which are
# elementwise and cheap, and with them the inputs of the seven linears.
KEPT_ACTIVATIONS = ("x", "attn_out", "h", "a", "b")
KEPT_CACHES = ("rope_q", "rope_k", "attention")


def block_forward(w, x, cos, sin, config, tile_size=attention.DEFAULT_TILE_SIZE, recompute=True, kv=None, pool=None):
    """Run one block on x (B, T, C). Return (y, cache) where `cache` (a BlockCache) is what backward needs.

    With recompute=True the cache keeps only what `KEPT_ACTIVATIONS` and `KEPT_CACHES` name.

    Decoding passes kv = (keys, values, start): this layer's cache arrays (B, Hkv, max_len, D) and
    the number of positions already in them. The new rotated keys and values are written at
    start .. start + T - 1 and the queries attend over all start + T positions (inference only).

    pool (an executor), when given, runs attention's head groups and the linears' blocks of rows on
    its threads (the same numbers on any number of threads).
    """
    xp = array_namespace(x)
    seq = x.shape[1]
    ops = {}
    n1, ops["attention_norm"] = rmsnorm.forward(x, w["attention_norm"], config.norm_eps)
    q, ops["wq"] = linear.forward(n1, w["wq"], pool=pool)
    k, ops["wk"] = linear.forward(n1, w["wk"], pool=pool)
    v, ops["wv"] = linear.forward(n1, w["wv"], pool=pool)
    q_rot, ops["rope_q"] = rope.forward(_split_heads(q, config.n_heads), cos, sin)
    k_rot, ops["rope_k"] = rope.forward(_split_heads(k, config.n_kv_heads), cos, sin)
    q_heads, k_heads = _to_attention_layout(q_rot, xp), _to_attention_layout(k_rot, xp)
    v_heads = _to_attention_layout(_split_heads(v, config.n_kv_heads), xp)
    if kv is not None:
        keys, values, start = kv
        keys[:, :, start:start + seq] = k_heads
        values[:, :, start:start + seq] = v_heads
        k_heads, v_heads = keys[:, :, :start + seq], values[:, :, :start + seq]
    attn_out, ops["attention"] = attention.forward(q_heads, k_heads, v_heads, tile_size, pool=pool)
    projected, ops["wo"] = linear.forward(_merge_heads(attn_out), w["wo"], pool=pool)
    h = x + projected
    n2, ops["ffn_norm"] = rmsnorm.forward(h, w["ffn_norm"], config.norm_eps)
    a, ops["w1"] = linear.forward(n2, w["w1"], pool=pool)
    b, ops["w3"] = linear.forward(n2, w["w3"], pool=pool)
    gate, ops["swiglu"] = swiglu.forward(a, b)
    ffn_out, ops["w2"] = linear.forward(gate, w["w2"], pool=pool)
    y = h + ffn_out
    if not recompute:
        return y, BlockCache(ops)
    activations = {"x": x, "attn_out": attn_out, "h": h, "a": a, "b": b}
    return y, BlockCache({name: ops[name] for name in KEPT_CACHES},
                         {name: activations[name] for name in KEPT_ACTIVATIONS})


def _recompute(w, cache, config):
    """The op caches the forward pass dropped, rebuilt from what it kept.

    The same forwards run on the same inputs, so the gradients are bitwise those of a block that
    kept everything. The linears' products are not computed again: their outputs were kept (or
    were only needed to compute what was kept), and their caches need only their inputs.
    """
    kept = cache.activations
    ops = dict(cache.ops)
    n1, ops["attention_norm"] = rmsnorm.forward(kept["x"], w["attention_norm"], config.norm_eps)
    for name in ("wq", "wk", "wv"):
        ops[name] = linear.save_for_backward(n1, w[name])
    ops["wo"] = linear.save_for_backward(_merge_heads(kept["attn_out"]), w["wo"])
    n2, ops["ffn_norm"] = rmsnorm.forward(kept["h"], w["ffn_norm"], config.norm_eps)
    ops["w1"] = linear.save_for_backward(n2, w["w1"])
    ops["w3"] = linear.save_for_backward(n2, w["w3"])
    gate, ops["swiglu"] = swiglu.forward(kept["a"], kept["b"])
    ops["w2"] = linear.save_for_backward(gate, w["w2"])
    return ops


def block_backward(dy, w, cache, config, pool=None):
    """Given dL/dy (B, T, C), return (dx, grads) with grads keyed by short name, like `layer_weights`
    (attention's head groups and the linears' blocks on `pool`'s threads, when given)."""
    xp = array_namespace(dy)
    batch, seq, dim = dy.shape
    ops = cache.ops if cache.activations is None else _recompute(w, cache, config)
    grads = {}

    # forward was: y = h + W2 g, g = silu(a) * b
    dgate, grads["w2"] = linear.backward(dy, ops["w2"], pool=pool)
    da, db = swiglu.backward(dgate, ops["swiglu"])
    # forward was: a = W1 n2, b = W3 n2 (n2 feeds both, so its gradients add)
    dn2, grads["w1"] = linear.backward(da, ops["w1"], pool=pool)
    dn2_from_b, grads["w3"] = linear.backward(db, ops["w3"], pool=pool)
    dn2 += dn2_from_b
    # forward was: n2 = rmsnorm(h); h also reaches y directly through the residual
    dh, grads["ffn_norm"] = rmsnorm.backward(dn2, ops["ffn_norm"])
    dh += dy
    # forward was: h = x + Wo o, o = the attention output (B, H, T, D) with its heads merged
    dattn_flat, grads["wo"] = linear.backward(dh, ops["wo"], pool=pool)
    dattn = _to_attention_layout(_split_heads(dattn_flat, config.n_heads), xp)
    dq_heads, dk_heads, dv_heads = attention.backward(dattn, ops["attention"], pool=pool)
    # forward was: q_heads = rope(q), k_heads = rope(k), in (B, T, H, D) before the layout change
    dq = rope.backward(dq_heads.transpose(0, 2, 1, 3), ops["rope_q"]).reshape(batch, seq, dim)
    dk = rope.backward(dk_heads.transpose(0, 2, 1, 3), ops["rope_k"]).reshape(batch, seq, config.kv_dim)
    dv = dv_heads.transpose(0, 2, 1, 3).reshape(batch, seq, config.kv_dim)
    # forward was: q, k, v = Wq n1, Wk n1, Wv n1
    dn1, grads["wq"] = linear.backward(dq, ops["wq"], pool=pool)
    dn1_from_k, grads["wk"] = linear.backward(dk, ops["wk"], pool=pool)
    dn1_from_v, grads["wv"] = linear.backward(dv, ops["wv"], pool=pool)
    dn1 += dn1_from_k
    dn1 += dn1_from_v
    # forward was: n1 = rmsnorm(x); x also reaches h directly through the residual
    dx, grads["attention_norm"] = rmsnorm.backward(dn1, ops["attention_norm"])
    dx += dh
    return dx, grads


# ---------------------------------------------------------------------------------------------
# The whole model


def _check_tokens(tokens, config):
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > config.max_seq_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {config.max_seq_len}")
    if tokens.size and not bool(((tokens >= 0) & (tokens < config.vocab_size)).all()):
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), the model's vocabulary; "
                         f"got {int(tokens.min())} .. {int(tokens.max())}")


def _on_device(tokens, config, xp, targets=None, ignore_index=-100):
    """tokens (and targets) as `xp` arrays, checked where they are: host arrays on the host, so a
    training step on the GPU does not wait for a check of its batch."""
    tokens = tokens if hasattr(tokens, "ndim") else numpy.asarray(tokens)
    _check_tokens(tokens, config)
    if targets is None:
        return xp.asarray(tokens)
    targets = targets if hasattr(targets, "ndim") else numpy.asarray(targets)
    if targets.shape != tokens.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}")
    if xp is not numpy:  # cross_entropy checks host targets itself; device ones are checked before they move
        cross_entropy.check_targets(targets, config.vocab_size, ignore_index)
    return xp.asarray(tokens), xp.asarray(targets)


@dataclass
class KVCache:
    """Rotated keys and values of every layer for the positions decoded so far (inference only).

    keys[i], values[i]: (B, Hkv, max_len, D), the key/value heads only; `length` positions are filled.
    """

    keys: list
    values: list
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


def init_kv_cache(config: LlamaConfig, batch: int, max_len: int | None = None, dtype="float32", xp=numpy) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` (default max_seq_len) positions."""
    max_len = config.max_seq_len if max_len is None else max_len
    shape = (batch, config.n_kv_heads, max_len, config.head_dim)
    return KVCache([xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)],
                   [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)])


def grow_kv_cache(cache: KVCache, capacity: int) -> None:
    """Give `cache` room for `capacity` positions, keeping the ones it holds (to decode further than planned)."""
    for arrays in (cache.keys, cache.values):
        for layer, old in enumerate(arrays):
            grown = array_namespace(old).zeros(old.shape[:2] + (capacity,) + old.shape[3:], dtype=old.dtype)
            grown[:, :, :cache.length] = old[:, :, :cache.length]
            arrays[layer] = grown


def forward(params, config, tokens, tile_size=attention.DEFAULT_TILE_SIZE, kv_cache: KVCache | None = None,
            only_last: bool = False):
    """tokens (B, T) -> logits (B, T, V), in the parameters' dtype; (B, 1, V) for the last position
    only with `only_last` (the output head, T x C x V, is then computed once, not T times).

    With a KV cache the tokens continue the cached sequence: they sit at positions
    cache.length .. cache.length + T - 1, attend to everything cached before them, and are
    appended to the cache. Decoding one token at a time this way gives the logits of a full
    forward pass over the whole sequence, at O(T) instead of O(T^2) cost per token.
    """
    xp = array_namespace(params[FINAL_NORM])
    tokens = _on_device(tokens, config, xp)
    h = _run_layers(params, config, tokens, tile_size, kv_cache=kv_cache)
    if only_last:
        h = h[:, -1:]
    normed, _ = rmsnorm.forward(h, params[FINAL_NORM], config.norm_eps)
    logits, _ = linear.forward(normed, params[head_name(config)])
    return logits


def _run_layers(params, config, tokens, tile_size, recompute=True, kv_cache=None, on_output=None, pool=None):
    """Embed device tokens (B, T) and run every block over them: the residual stream after the last
    block (B, T, C). The one embed-then-blocks loop of inference, `hidden_states` and training.

    on_output(h, cache), when given, sees each layer's output and cache as it comes: the
    embedding's first, then each block's (training keeps the caches, `hidden_states` the outputs).
    With a KV cache the tokens continue the cached sequence and are appended to it.
    """
    start = kv_cache.length if kv_cache is not None else 0
    if kv_cache is not None and start + tokens.shape[1] > kv_cache.capacity:
        raise ValueError(f"the KV cache holds {kv_cache.capacity} positions; {start} used, "
                         f"{tokens.shape[1]} more asked")
    xp = array_namespace(params[FINAL_NORM])
    cos, sin = rope_tables(config, tokens.shape[1], compute_dtype(xp, params[FINAL_NORM].dtype), xp, start=start)
    h, cache = embedding.forward(tokens, params[TOK_EMBEDDINGS])
    for i in range(config.n_layers):
        if on_output is not None:
            on_output(h, cache)
        kv = (kv_cache.keys[i], kv_cache.values[i], start) if kv_cache is not None else None
        h, cache = block_forward(layer_weights(params, i), h, cos, sin, config, tile_size, recompute=recompute, kv=kv,
                                 pool=pool)
    if on_output is not None:
        on_output(h, cache)
    if kv_cache is not None:
        kv_cache.length = start + tokens.shape[1]
    return h


def hidden_states(params, config, tokens, tile_size=attention.DEFAULT_TILE_SIZE) -> list:
    """The residual stream as transformers' `output_hidden_states` gives it: the embeddings, the
    output of each block but the last, then the last block's output after the final RMSNorm
    (n_layers + 1 arrays of (B, T, C))."""
    xp = array_namespace(params[FINAL_NORM])
    states: list = []
    h = _run_layers(params, config, _on_device(tokens, config, xp), tile_size,
                    on_output=lambda output, cache: states.append(output))
    states[-1], _ = rmsnorm.forward(h, params[FINAL_NORM], config.norm_eps)
    return states


def loss(params, config, tokens, targets, tile_size=attention.DEFAULT_TILE_SIZE, ignore_index=-100):
    """Mean cross-entropy of next-token targets (B, T); a Python float."""
    xp = array_namespace(params[FINAL_NORM])
    tokens, targets = _on_device(tokens, config, xp, targets, ignore_index)
    normed, _ = rmsnorm.forward(_run_layers(params, config, tokens, tile_size), params[FINAL_NORM],
                                config.norm_eps)
    return float(_head_loss(normed, params[head_name(config)], targets, ignore_index))


# The output head and the loss, a chunk of rows at a time. The loss is the model's last op and its
# gradient is 1, so the head's backward can follow its forward at once, chunk by chunk: the
# (B*T, V) logits never exist whole (at V = 32000 and 2048 positions they would be 262 MB, and a
# second buffer as large for exp), and each chunk is still in the cache when its backward reads
# it. The weight's gradient adds the chunks' in order; a batch that fits in one chunk runs
# exactly the unchunked ops.
HEAD_CHUNK_ELEMENTS = 1 << 23


def _head_chunks(n_rows, vocab):
    rows = max(1, HEAD_CHUNK_ELEMENTS // vocab)
    return [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def _head_loss(normed, weight, targets, ignore_index):
    """Mean cross-entropy of output(normed) against targets, without (B*T, V) logits."""
    rows, targets = normed.reshape(-1, normed.shape[-1]), targets.reshape(-1)
    n_counted = cross_entropy.batch_count(targets, ignore_index, normed.dtype)  # every chunk divides by the batch's
    parts = []
    for start, stop in _head_chunks(rows.shape[0], weight.shape[0]):
        logits, _ = linear.forward(rows[start:stop], weight)
        parts.append(cross_entropy.forward(logits, targets[start:stop], ignore_index, n_counted=n_counted)[0])
    return sum(parts[1:], parts[0])


def _head_loss_and_grads(normed, weight, targets, ignore_index, pool=None, n_counted=None, loss_scale=1.0):
    """Return (loss, dnormed, dweight) for loss = cross_entropy(normed W^T, targets), chunk by chunk
    (on `pool`'s threads when given: the chunks' losses and weight gradients are still added in
    chunk order, so the numbers are those of one thread to the bit). The loss divides by
    `n_counted` (`cross_entropy.batch_count` of a larger batch these rows belong to), by default
    by these rows' count. The gradients are those of loss_scale * loss."""
    xp = array_namespace(normed)
    rows, targets = normed.reshape(-1, normed.shape[-1]), targets.reshape(-1)
    if n_counted is None:  # every chunk divides by the batch's
        n_counted = cross_entropy.batch_count(targets, ignore_index, normed.dtype)
    drows = xp.empty(rows.shape, dtype=normed.dtype)

    def chunk(bounds):
        start, stop = bounds
        logits, head_cache = linear.forward(rows[start:stop], weight)
        part, ce_cache = cross_entropy.forward(logits, targets[start:stop], ignore_index, n_counted=n_counted)
        del logits  # the cache keeps exp(z - max) instead, and backward turns that buffer into dlogits
        # forward was: loss = sum over chunks of cross_entropy(logits_c), each divided by the batch's
        # N'; so dloss/dloss_c = 1, and the chunk's rows and the weight get the chunk's gradients
        # (times loss_scale: the gradient of the scaled loss, which mixed precision asks for)
        dlogits = cross_entropy.backward(loss_scale, ce_cache)
        drows[start:stop], dweight_chunk = linear.backward(dlogits, head_cache)
        return part, dweight_chunk

    value, dweight = None, None
    chunks = _head_chunks(rows.shape[0], weight.shape[0])
    for part, dweight_chunk in (pool.map if pool is not None else map)(chunk, chunks):  # in chunk order
        value = part if value is None else value + part
        if dweight is None:  # the chunks' sum in float32 or wider: a float16 head's gradient is rounded after it
            dweight = dweight_chunk.astype(compute_dtype(xp, dweight_chunk.dtype), copy=False)
        else:
            dweight += dweight_chunk
    return value, drows.reshape(normed.shape), dweight


def loss_and_grads(params, config, tokens, targets, recompute=True,
                   tile_size=attention.DEFAULT_TILE_SIZE, ignore_index=-100, on_grad=None, loss_scale=1.0):
    """Return (loss, grads): the mean cross-entropy, a Python float, and its gradient for every
    parameter (see loss_and_grads_on_device)."""
    value, grads = loss_and_grads_on_device(params, config, tokens, targets, recompute, tile_size, ignore_index,
                                            on_grad=on_grad, loss_scale=loss_scale)
    return float(value), grads


def loss_and_grads_on_device(params, config, tokens, targets, recompute=True,
                             tile_size=attention.DEFAULT_TILE_SIZE, ignore_index=-100, on_grad=None, pool=None,
                             n_counted=None, loss_scale=1.0):
    """Return (loss, grads): the mean cross-entropy as a 0-d array where the weights live (reading
    it from a GPU waits for the GPU, so a caller that adds several reads once) and its gradient for
    every parameter.

    The backward pass is written out by hand, block by block, in reverse. `grads` has the same
    names, shapes and dtypes as `params`.

    on_grad(name, grad), when given, is called with each parameter's gradient as soon as backward
    has finished it (the head's first, the embedding's last, a tied head's with it), and `grads`
    keeps what it returns: a caller can send the later layers' gradients to other processes while backward computes the
    earlier ones (npllama.train.distributed.GradientAverage), or copy a gradient into a buffer of its own
    without two copies living at once.

    pool (an executor), when given, runs attention's head groups and the output head's chunks of
    rows on its threads, the chunks' sums in chunk order (the numbers are the same to the bit):
    npllama.parallel's use for a batch of one long sequence.

    n_counted, when given, is what the cross-entropy divides by instead of these rows' count of
    targets: `cross_entropy.batch_count` of a batch these rows are a slice of, so that the
    slices' losses and gradients add up to the batch's (npllama.parallel).

    loss_scale: the gradients are those of loss_scale * loss (the loss returned is not scaled).
    Mixed precision passes float16 weights and a large power of two here, so that small gradients
    stay above float16's smallest numbers (npllama.optim.LossScale).
    """
    xp = array_namespace(params[FINAL_NORM])
    tokens, targets = _on_device(tokens, config, xp, targets, ignore_index)
    caches: list = []  # the embedding's, then each block's
    h = _run_layers(params, config, tokens, tile_size, recompute, on_output=lambda output, cache: caches.append(cache),
                    pool=pool)
    emb_cache, block_caches = caches[0], caches[1:]
    normed, norm_cache = rmsnorm.forward(h, params[FINAL_NORM], config.norm_eps)
    grads: dict = {}

    def finished(name):  # grads[name] is complete: in the parameter's dtype, and handed to on_grad
        grads[name] = grads[name].astype(params[name].dtype, copy=False)
        if on_grad is not None:  # what on_grad returns replaces it, so the two never both live on
            grads[name] = on_grad(name, grads[name])

    value, dnormed, dhead = _head_loss_and_grads(normed, params[head_name(config)], targets, ignore_index, pool,
                                                 n_counted, loss_scale)
    if head_name(config) == OUTPUT_HEAD:
        grads[OUTPUT_HEAD], dhead = dhead, None
        finished(OUTPUT_HEAD)
    dh, grads[FINAL_NORM] = rmsnorm.backward(dnormed, norm_cache)
    finished(FINAL_NORM)
    for i in reversed(range(config.n_layers)):
        dh, layer_grads = block_backward(dh, layer_weights(params, i), block_caches.pop(), config, pool)
        for short in list(layer_grads):
            grads[layer_name(i, short)] = layer_grads.pop(short)
            finished(layer_name(i, short))
    grads[TOK_EMBEDDINGS] = embedding.backward(dh, emb_cache)
    if dhead is not None:  # tied: forward used tok_embeddings twice (lookup and head), so its gradient adds both
        grads[TOK_EMBEDDINGS] = grads[TOK_EMBEDDINGS].astype(dhead.dtype, copy=False)  # float32 for float16 weights
        grads[TOK_EMBEDDINGS] += dhead
    finished(TOK_EMBEDDINGS)
    return value, {name: grads[name] for name in params}


if __name__ == "__main__":  # a library module: the preset table is a command of its own
    from .cli import fail

    raise SystemExit(fail("npllama.model is a library module; the preset table is python -m npllama.presets"))
