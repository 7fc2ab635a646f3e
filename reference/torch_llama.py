"""Llama-1 in PyTorch with autograd: the independent oracle npllama is tested against.

Written from Meta's original `llama/model.py` (github.com/meta-llama/llama), in Meta's conventions,
and deliberately sharing no code or formulation with npllama:

- RoPE multiplies each interleaved pair (x[2i], x[2i+1]), read as the complex number
  x[2i] + i x[2i+1], by e^{i p f_i} with f_i = theta^(-2i/D) (`precompute_freqs_cis`), where
  npllama writes the rotation out with cos and sin.
- Attention materialises the whole (T, T) score matrix: softmax(Q K^T / sqrt(D) + causal mask) V.
- Gradients come from torch.autograd, not from a hand-written backward.

The one departure from Meta's file: where Meta upcasts with `.float()` (RMSNorm statistics,
RoPE, softmax), this upcasts to *at least* float32, so a float64 oracle stays float64 throughout
(Meta's `.float()` would silently round a float64 check to float32). RoPE angles are computed in
float64 for the same reason; in float32 they are rounded once, at the end.

Parameters are a flat dict of torch tensors under Meta's names (`tok_embeddings.weight`,
`layers.{i}.attention.wq.weight`, ..., `norm.weight`, `output.weight`), linear weights [out, in].
`config` needs dim, n_layers, n_heads, norm_eps and rope_theta (npllama's LlamaConfig has them),
and may give rope_scaling (Meta's Llama 3.1 `apply_scaling`), tie_embeddings (the output head is
the embedding matrix; autograd adds the gradients of both uses) and n_kv_heads: grouped-query
attention as in Meta's Llama 2 `model.py`, which repeats each key/value head for the query heads
that share it (`repeat_kv`) before the attention.

Never imported by npllama/: only tests/ use it.
"""

import math

import torch
import torch.nn.functional as F


def _at_least_float32(dtype):
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x, weight, eps):
    """Meta's RMSNorm: x * rsqrt(mean(x^2) + eps) in at least float32, cast back, times the gain."""
    xf = x.to(_at_least_float32(x.dtype))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def apply_scaling(freqs, scaling):
    """RoPE frequency scaling as Meta's Llama 3.1 `apply_scaling` writes it, frequency by frequency
    (llama3), or positions divided by the factor (linear, as transformers' linear rope type)."""
    if scaling.rope_type == "linear":
        return freqs / scaling.factor
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    new_freqs = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scaling.factor)
        else:
            smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
                      / (scaling.high_freq_factor - scaling.low_freq_factor))
            new_freqs.append((1 - smooth) * freq / scaling.factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype)


def precompute_freqs_cis(head_dim, n_positions, theta=10000.0, start=0, scaling=None):
    """e^{i p f_i} for positions p = start .. start + n_positions - 1: complex128 (T, D/2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim))
    if scaling is not None:
        freqs = apply_scaling(freqs, scaling)
    positions = torch.arange(start, start + n_positions, dtype=torch.float64)
    angles = torch.outer(positions, freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x, freqs_cis):
    """Rotate x (B, T, H, D): each pair (x[2i], x[2i+1]) as a complex number times freqs_cis[t, i]."""
    xf = x.to(_at_least_float32(x.dtype))
    x_complex = torch.view_as_complex(xf.reshape(*x.shape[:-1], -1, 2).contiguous())
    rotation = freqs_cis.to(x.device, x_complex.dtype)[None, :, None, :]  # broadcast over batch and heads
    return torch.view_as_real(x_complex * rotation).flatten(3).type_as(x)


def causal_attention(q, k, v):
    """softmax(Q K^T / sqrt(D) + mask) V on (B, H, T, D), with the (T, T) scores materialised."""
    seq, head_dim = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    mask = torch.full((seq, seq), float("-inf"), dtype=scores.dtype, device=scores.device).triu(diagonal=1)
    probs = F.softmax((scores + mask).to(_at_least_float32(q.dtype)), dim=-1).type_as(q)
    return probs @ v


def repeat_kv(x, n_rep):
    """(B, T, Hkv, D) -> (B, T, Hkv * n_rep, D): each key/value head copied for its n_rep query heads."""
    batch, seq, n_kv_heads, head_dim = x.shape
    return x[:, :, :, None, :].expand(batch, seq, n_kv_heads, n_rep, head_dim).reshape(
        batch, seq, n_kv_heads * n_rep, head_dim)


def block(params, prefix, config, x, freqs_cis):
    """One Llama block: pre-norm attention and pre-norm SwiGLU feed-forward, each with a residual."""
    batch, seq, dim = x.shape
    heads, head_dim = config.n_heads, dim // config.n_heads
    kv_heads = getattr(config, "n_kv_heads", None) or heads

    def weight(name):
        return params[prefix + name + ".weight"]

    n1 = rms_norm(x, weight("attention_norm"), config.norm_eps)
    q = F.linear(n1, weight("attention.wq")).view(batch, seq, heads, head_dim)
    k = F.linear(n1, weight("attention.wk")).view(batch, seq, kv_heads, head_dim)
    v = F.linear(n1, weight("attention.wv")).view(batch, seq, kv_heads, head_dim)
    q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
    k, v = repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads)
    attn = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    attn = attn.transpose(1, 2).reshape(batch, seq, dim)
    h = x + F.linear(attn, weight("attention.wo"))

    n2 = rms_norm(h, weight("ffn_norm"), config.norm_eps)
    gated = F.silu(F.linear(n2, weight("feed_forward.w1"))) * F.linear(n2, weight("feed_forward.w3"))
    return h + F.linear(gated, weight("feed_forward.w2"))


def forward(params, config, tokens):
    """tokens (B, T) integers -> logits (B, T, V) for every position (no KV cache)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    h = F.embedding(tokens, params["tok_embeddings.weight"])
    freqs_cis = precompute_freqs_cis(config.dim // config.n_heads, tokens.shape[1], config.rope_theta,
                                     scaling=getattr(config, "rope_scaling", None))
    for i in range(config.n_layers):
        h = block(params, f"layers.{i}.", config, h, freqs_cis)
    head = params["tok_embeddings.weight"] if getattr(config, "tie_embeddings", False) else params["output.weight"]
    return F.linear(rms_norm(h, params["norm.weight"], config.norm_eps), head)


def loss(params, config, tokens, targets, ignore_index=-100):
    """Mean next-token cross-entropy over the targets that are not ignore_index: a 0-d tensor."""
    logits = forward(params, config, tokens)
    targets = torch.as_tensor(targets, dtype=torch.long)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
