"""npllama against an independent PyTorch oracle: the same numbers from a different derivation.

The oracle is reference/torch_llama.py (Meta's model.py conventions, complex-number RoPE,
materialised attention) and torch.autograd for every gradient; the op tests use torch's own
functions (scaled_dot_product_attention, F.silu, F.cross_entropy, ...) and torch.optim.AdamW.
Everything runs in float64, so any disagreement beyond rounding is a bug on one side.

Tolerances: float64 rounds at 1.1e-16. Two correct implementations that order their sums
differently disagree by a few hundred ulps after the longest chains here (two blocks, tiled
attention, autograd), i.e. ~1e-13. Each comparison allows 1e-10 relative or tighter unless its
comment says why not: still three orders of magnitude below any real error (a wrong sign, a
missing term, an off-by-one position), which shows up at 1e-3 or more.
Entry-wise, an entry is also accepted within `rtol * scale`, the scale being the largest entry of
the expected array, or of all the gradients of one call where one of them may be exactly zero: a
gradient entry that is a sum of terms cancelling to (nearly) zero carries the absolute rounding
of those terms, which is relative to their scale, not to the tiny result. (One query attending to
one key has dq = 0 exactly; torch returns ~1e-16 there.)
"""

import importlib.util
from pathlib import Path

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import assertions
from npllama import model, optim
from npllama.ops import attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu
from npllama.ops.rope import RopeScaling
from strategies import (
    attention_problems,
    batch_sizes,
    grouped_attention_problems,
    head_counts,
    head_dims,
    model_dims,
    rng_from,
    seeds,
    seq_lens,
    small_model_configs,
    softmax_scales,
)

torch = pytest.importorskip("torch", reason="the oracle tests need PyTorch: pip install '.[test]'")
F = torch.nn.functional

pytestmark = pytest.mark.oracle
# the arrays here are tiny: one thread is faster than several contending for two cores
torch.set_num_threads(1)


def _load_oracle():
    """reference/ is not a package (npllama must never import it): load the file by path."""
    path = Path(__file__).resolve().parents[1] / "reference" / "torch_llama.py"
    spec = importlib.util.spec_from_file_location("torch_llama", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


oracle = _load_oracle()


def as_numpy(array):
    return array.detach().numpy() if isinstance(array, torch.Tensor) else numpy.asarray(array)


def largest(*arrays):
    return max(float(numpy.abs(as_numpy(a)).max(initial=0.0)) for a in arrays)


def assert_close(got, expected, rtol, name="", scale=None):
    """Each entry within rtol of its expected value, or within rtol * scale (default: the
    expected array's largest entry)."""
    expected = as_numpy(expected)
    scale = largest(expected) if scale is None else scale
    assertions.assert_close(as_numpy(got), expected, rtol=rtol, atol=rtol * scale, err_msg=name)


def leaf(array):
    """A float64 torch leaf tensor that autograd will fill .grad for."""
    return torch.tensor(array, dtype=torch.float64, requires_grad=True)


# --- the whole model ----------------------------------------------------------------------------

def random_params(config, seed):
    """float64 parameters far from the 0.02 init, so attention is sharp and every path matters."""
    rng = rng_from(seed)
    params = model.init_params(config, seed=seed, dtype="float64", std=0.5)
    for name in params:
        if name.endswith("norm.weight"):
            params[name] = 1.0 + 0.3 * rng.standard_normal(params[name].shape)
    return params


def random_batch(config, batch, seq, seed, ignored_share=0.0):
    """tokens and targets (B, T); a share of the targets is ignore_index -100, never all of them."""
    rng = rng_from(seed + 1)
    tokens = rng.integers(0, config.vocab_size, (batch, seq))
    targets = rng.integers(0, config.vocab_size, (batch, seq))
    ignored = rng.random((batch, seq)) < ignored_share
    ignored.flat[0] = False  # an all-ignored batch is 0 in npllama and nan in torch, by design
    targets[ignored] = -100
    return tokens, targets


def oracle_loss_and_grads(params, config, tokens, targets):
    torch_params = {name: leaf(p) for name, p in params.items()}
    value = oracle.loss(torch_params, config, torch.from_numpy(tokens), torch.from_numpy(targets))
    value.backward()
    return value.item(), {name: p.grad for name, p in torch_params.items()}


def assert_model_matches_oracle(params, config, tokens, targets, tile_size):
    # forward: two blocks of float64 arithmetic on O(1) activations, ~1e-14 apart
    logits = model.forward(params, config, tokens, tile_size=tile_size)
    expected_logits = oracle.forward({n: torch.from_numpy(p) for n, p in params.items()}, config,
                                     torch.from_numpy(tokens))
    assert_close(logits, expected_logits, rtol=1e-10, name="logits")

    expected_loss, expected_grads = oracle_loss_and_grads(params, config, tokens, targets)
    grad_scale = largest(*expected_grads.values())  # a gradient may be exactly 0 (repeated tokens)
    for recompute in (True, False):
        value, grads = model.loss_and_grads(params, config, tokens, targets, recompute=recompute,
                                            tile_size=tile_size)
        # the loss is one mean of O(1) terms: rounding is ~1e-15 relative
        assertions.assert_close(value, expected_loss, rtol=1e-12)
        assert set(grads) == set(expected_grads)
        for name, grad in grads.items():
            # backward is the longest chain here (every op twice, autograd's order vs the
            # hand-written one); 1e-10 of the gradient's scale is still far below any real error
            assert_close(grad, expected_grads[name], rtol=1e-10, name=f"{name} (recompute={recompute})",
                         scale=grad_scale)


@given(config=small_model_configs(), batch=st.integers(1, 3), seq=st.integers(1, 16), seed=seeds,
       tile_size=st.integers(1, 8), ignored_share=st.sampled_from([0.0, 0.3]))
def test_small_models_give_the_oracles_logits_loss_and_every_gradient(config, batch, seq, seed, tile_size,
                                                                       ignored_share):
    params = random_params(config, seed % 2**16)
    tokens, targets = random_batch(config, batch, seq, seed, ignored_share)
    assert_model_matches_oracle(params, config, tokens, targets, tile_size)


@pytest.mark.parametrize("std, tile_size", [(0.02, attention.DEFAULT_TILE_SIZE), (0.25, 16)],
                         ids=["training-init-one-tile", "sharp-attention-three-tiles"])
def test_nano_preset_gives_the_oracles_logits_loss_and_every_gradient(std, tile_size):
    config = model.PRESETS["nano"]
    params = model.init_params(config, seed=3, dtype="float64", std=std)
    tokens, targets = random_batch(config, 2, 48, seed=3, ignored_share=0.1)
    assert_model_matches_oracle(params, config, tokens, targets, tile_size)


# --- ops against torch's own functions ----------------------------------------------------------

def assert_attention_matches_torch(q, k, v, dout, tile_size, softmax_scale=None, **sdpa_mask):
    """npllama's tiled attention and its backward against torch's sdpa with autograd."""
    out, cache = attention.forward(q, k, v, tile_size, scale=softmax_scale)
    dq, dk, dv = attention.backward(dout, cache)
    tq, tk, tv = leaf(q), leaf(k), leaf(v)
    expected = F.scaled_dot_product_attention(tq, tk, tv, scale=softmax_scale, **sdpa_mask)
    expected.backward(torch.from_numpy(dout))
    # online softmax over tiles vs one softmax: a few ulps per tile, far below 1e-10
    assert_close(out, expected, rtol=1e-10, name="out")
    grad_scale = largest(tq.grad, tk.grad, tv.grad)  # dq is exactly 0 for a lone query-key pair
    for name, got, t in (("dq", dq, tq), ("dk", dk, tk), ("dv", dv, tv)):
        assert_close(got, t.grad, rtol=1e-10, name=name, scale=grad_scale)


@given(problem=attention_problems(), seed=seeds, scale=st.sampled_from([0.1, 1.0, 3.0]), softmax_scale=softmax_scales)
def test_attention_equals_torch_scaled_dot_product_attention_forward_and_backward(problem, seed, scale,
                                                                                 softmax_scale):
    batch, heads, seq, head_dim, tile_size = problem
    rng = rng_from(seed)
    q, k, v = (scale * rng.standard_normal((batch, heads, seq, head_dim)) for _ in range(3))
    dout = rng.standard_normal((batch, heads, seq, head_dim))
    assert_attention_matches_torch(q, k, v, dout, tile_size, softmax_scale, is_causal=True)


@given(seq=st.integers(2, 19), n_cached=st.integers(1, 18), head_dim=head_dims, seed=seeds,
       tile_size=st.integers(1, 8))
def test_attention_with_a_kv_cache_equals_torch_with_a_bottom_right_causal_mask(seq, n_cached, head_dim, seed,
                                                                              tile_size):
    """Tq < Tk: query i sits at position Tk - Tq + i. (torch's is_causal aligns top-left, so the
    mask is spelled out: key j is visible to query i when j <= i + Tk - Tq.)"""
    n_cached = min(n_cached, seq - 1)
    rng = rng_from(seed)
    q = rng.standard_normal((2, 2, seq - n_cached, head_dim))
    k, v = (rng.standard_normal((2, 2, seq, head_dim)) for _ in range(2))
    dout = rng.standard_normal(q.shape)
    visible = torch.ones(seq - n_cached, seq, dtype=torch.bool).tril(diagonal=n_cached)
    assert_attention_matches_torch(q, k, v, dout, tile_size, attn_mask=visible)


@given(problem=grouped_attention_problems(), seed=seeds)
def test_grouped_query_attention_equals_torch_sdpa_with_shared_key_value_heads(problem, seed):
    batch, n_kv_heads, group, seq, head_dim, tile_size = problem
    rng = rng_from(seed)
    q, dout = (rng.standard_normal((batch, n_kv_heads * group, seq, head_dim)) for _ in range(2))
    k, v = (rng.standard_normal((batch, n_kv_heads, seq, head_dim)) for _ in range(2))
    assert_attention_matches_torch(q, k, v, dout, tile_size, is_causal=True, enable_gqa=True)


def test_the_oracles_materialised_attention_equals_torch_sdpa():
    """The oracle is checked too: its own attention agrees with torch's."""
    rng = rng_from(0)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 3, 11, 8))) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(oracle.causal_attention(q, k, v).numpy(), expected, rtol=1e-12)


@given(batch=batch_sizes, seq=seq_lens, dim=model_dims, seed=seeds, scale=st.sampled_from([1e-3, 1.0, 1e3]),
       eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_rmsnorm_equals_metas_rmsnorm_forward_and_backward(batch, seq, dim, seed, scale, eps):
    rng = rng_from(seed)
    x = scale * rng.standard_normal((batch, seq, dim))
    weight = 1.0 + 0.3 * rng.standard_normal(dim)
    dy = rng.standard_normal(x.shape)
    y, cache = rmsnorm.forward(x, weight, eps)
    dx, dweight = rmsnorm.backward(dy, cache)

    tx, tweight = leaf(x), leaf(weight)
    expected = oracle.rms_norm(tx, tweight, eps)
    expected.backward(torch.from_numpy(dy))
    # one mean and one rsqrt per row: ~1e-15 relative; 1e-12 leaves room and nothing else
    assert_close(y, expected, rtol=1e-12, name="y")
    # dx = r (g dy - xhat mean(g dy xhat)) cancels when a row is all along xhat (C = 1: dx is
    # g dy eps / (x^2 + eps)^1.5, ~1e-13 for |x| = 1e3, formed from terms of size r |g dy| ~ 1e-3;
    # both sides then miss the exact value by ~1e-6 relative). The absolute rounding is relative
    # to those terms, so that is the scale the tolerance is taken against.
    term_scale = float(numpy.abs(dy * weight * cache.rstd).max())
    assertions.assert_close(dx, tx.grad.numpy(), rtol=1e-12, atol=1e-12 * term_scale, err_msg="dx")
    assert_close(dweight, tweight.grad, rtol=1e-12, name="dweight")


@given(batch=batch_sizes, seq=seq_lens, heads=head_counts, head_dim=head_dims, start=st.integers(0, 2000),
       theta=st.sampled_from([100.0, 10000.0, 500000.0]), seed=seeds)
def test_rope_equals_metas_complex_multiplication_forward_and_backward(batch, seq, heads, head_dim, start, theta,
                                                                      seed):
    rng = rng_from(seed)
    x = rng.standard_normal((batch, seq, heads, head_dim))
    dy = rng.standard_normal(x.shape)
    cos, sin = rope.frequencies(head_dim, numpy.arange(start, start + seq), theta)
    y, cache = rope.forward(x, cos, sin)
    dx = rope.backward(dy, cache)

    tx = leaf(x)
    expected = oracle.apply_rotary_emb(tx, oracle.precompute_freqs_cis(head_dim, seq, theta, start))
    expected.backward(torch.from_numpy(dy))
    # the frequencies theta^(-2i/D) and 1/theta^(2i/D) may differ by an ulp, which the angle
    # p * f carries as an absolute error of up to ~2000 * 2.2e-16 = 4.4e-13 at the last positions
    assert_close(y, expected, rtol=1e-11, name="y")
    assert_close(dx, tx.grad, rtol=1e-11, name="dx")


LLAMA31 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)


@pytest.mark.parametrize("scaling", [RopeScaling("linear", factor=4.0), LLAMA31,
                                     RopeScaling("llama3", factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
                                                 original_max_position_embeddings=4096)],
                         ids=["linear", "llama-3.1", "llama3-other-factors"])
@pytest.mark.parametrize("head_dim, theta", [(64, 500000.0), (128, 500000.0), (64, 10000.0)])
def test_scaled_rope_frequencies_equal_metas_apply_scaling_and_transformers(scaling, head_dim, theta):
    got = rope.inverse_frequencies(head_dim, theta, scaling, numpy)
    unscaled = torch.from_numpy(rope.inverse_frequencies(head_dim, theta, None, numpy))
    # Meta's loop, frequency by frequency, in float64: the same arithmetic in another order
    assert_close(got, oracle.apply_scaling(unscaled, scaling), rtol=1e-14, name="Meta")
    settings = {"rope_type": scaling.rope_type, "factor": scaling.factor, "rope_theta": theta}
    if scaling.rope_type == "llama3":
        settings.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                        original_max_position_embeddings=scaling.original_max_position_embeddings)
    transformers = pytest.importorskip("transformers", reason="the oracle needs transformers: pip install '.[test]'")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_parameters=settings)
    inv_freq, _ = ROPE_INIT_FUNCTIONS[scaling.rope_type](config, "cpu")
    # transformers computes its frequencies in float32: agreement to float32's precision
    assert_close(got, inv_freq.double(), rtol=2e-7, name="transformers")
    kept, divided = got == unscaled.numpy(), got == unscaled.numpy() / scaling.factor
    assert (kept | divided).any() and (scaling.rope_type == "linear") == divided.all()


@given(batch=batch_sizes, seq=seq_lens, width=model_dims, seed=seeds, scale=st.sampled_from([0.1, 1.0, 3.0, 30.0]))
def test_swiglu_equals_torch_silu_gate_forward_and_backward(batch, seq, width, seed, scale):
    rng = rng_from(seed)
    a, b = (scale * rng.standard_normal((batch, seq, width)) for _ in range(2))
    dy = rng.standard_normal(a.shape)
    y, cache = swiglu.forward(a, b)
    da, db = swiglu.backward(dy, cache)

    ta, tb = leaf(a), leaf(b)
    expected = F.silu(ta) * tb
    expected.backward(torch.from_numpy(dy))
    # elementwise, a handful of operations each: a few ulps
    assert_close(y, expected, rtol=1e-12, name="y")
    assert_close(da, ta.grad, rtol=1e-12, name="da")
    assert_close(db, tb.grad, rtol=1e-12, name="db")


@given(rows=st.integers(1, 24), vocab=st.integers(1, 40), scale=st.sampled_from([0.1, 1.0, 3.0, 30.0]),
       seed=seeds, ignored_share=st.sampled_from([0.0, 0.3, 0.7]))
def test_cross_entropy_equals_torch_cross_entropy_with_ignored_rows(rows, vocab, scale, seed, ignored_share):
    rng = rng_from(seed)
    logits = scale * rng.standard_normal((rows, vocab))
    targets = rng.integers(0, vocab, rows)
    targets[rng.random(rows) < ignored_share] = -100
    targets[0] = rng.integers(0, vocab)  # torch's mean over no rows is nan; npllama's is 0 by design
    dloss = float(rng.standard_normal())
    value, cache = cross_entropy.forward(logits, targets)
    dlogits = cross_entropy.backward(dloss, cache)

    tlogits = leaf(logits)
    expected = F.cross_entropy(tlogits, torch.from_numpy(targets), ignore_index=-100)
    (dloss * expected).backward()
    # a mean of log-sum-exps: ~1e-15 relative. For a confident row torch forms p_y - 1 by
    # cancellation of two terms of size |dloss| / N' (npllama does not: -rest / (1 + rest)), an
    # absolute error of ~1e-16 * |dloss| / N', which can be 1e-9 of a tiny p_y - 1 (checked at 50
    # digits: npllama is the exact side). So entries are judged against the size of those terms.
    assertions.assert_close(float(value), expected.item(), rtol=1e-12, atol=1e-15)
    n_counted = int((targets != -100).sum())
    assert_close(dlogits, tlogits.grad, rtol=1e-12, name="dlogits", scale=abs(dloss) / n_counted)
    assert not dlogits[targets == -100].any()


@given(batch=batch_sizes, seq=seq_lens, vocab=st.integers(1, 5), dim=model_dims, seed=seeds)
def test_embedding_equals_torch_embedding_and_sums_repeated_ids(batch, seq, vocab, dim, seed):
    rng = rng_from(seed)
    ids = rng.integers(0, vocab, (batch, seq))  # a vocabulary of 1-5 ids: repeats are the rule
    weight = rng.standard_normal((vocab, dim))
    dout = rng.standard_normal((batch, seq, dim))
    out, cache = embedding.forward(ids, weight)
    dweight = embedding.backward(dout, cache)

    tweight = leaf(weight)
    expected = F.embedding(torch.from_numpy(ids), tweight)
    expected.backward(torch.from_numpy(dout))
    assertions.assert_same(out, expected.detach().numpy())  # a gather: exact
    # a sum of up to B*T rows in some order: a few ulps of the sum's terms
    assert_close(dweight, tweight.grad, rtol=1e-12, name="dweight")


@given(batch=batch_sizes, seq=seq_lens, n_in=model_dims, n_out=model_dims, seed=seeds)
def test_linear_equals_torch_linear_forward_and_backward(batch, seq, n_in, n_out, seed):
    rng = rng_from(seed)
    x = rng.standard_normal((batch, seq, n_in))
    weight = rng.standard_normal((n_out, n_in))
    dy = rng.standard_normal((batch, seq, n_out))
    y, cache = linear.forward(x, weight)
    dx, dweight = linear.backward(dy, cache)

    tx, tweight = leaf(x), leaf(weight)
    expected = F.linear(tx, tweight)
    expected.backward(torch.from_numpy(dy))
    # dot products of at most 57 terms: a few ulps of their terms
    assert_close(y, expected, rtol=1e-12, name="y")
    assert_close(dx, tx.grad, rtol=1e-12, name="dx")
    assert_close(dweight, tweight.grad, rtol=1e-12, name="dweight")


# --- the optimiser ------------------------------------------------------------------------------

@given(seed=seeds, peak_lr=st.floats(1e-4, 1e-1), weight_decay=st.sampled_from([0.0, 0.1, 0.5]),
       grad_clip=st.sampled_from([None, 0.5, 1.0, 5.0]))
def test_adamw_with_clipping_and_cosine_schedule_equals_torch_adamw(seed, peak_lr, weight_decay, grad_clip):
    """Eight steps through warmup and decay; gradient scales vary so clipping is on in some steps
    and off in others. torch decays only the matrices, as npllama does (norm gains are not)."""
    rng = rng_from(seed)
    params = {"tok_embeddings.weight": rng.standard_normal((5, 4)), "layers.0.attention.wq.weight":
              rng.standard_normal((4, 4)), "layers.0.ffn_norm.weight": 1.0 + 0.3 * rng.standard_normal(4),
              "norm.weight": 1.0 + 0.3 * rng.standard_normal(4)}
    config = optim.AdamWConfig(betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, grad_clip=grad_clip)
    schedule = optim.CosineSchedule(lr=peak_lr, steps=8, warmup=3)
    state = optim.init_state(params)

    tparams = {name: torch.tensor(p, dtype=torch.float64, requires_grad=True) for name, p in params.items()}
    groups = [{"params": [p for p in tparams.values() if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in tparams.values() if p.ndim < 2], "weight_decay": 0.0}]
    torch_optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.95), eps=1e-8)

    for step, grad_scale in enumerate([0.01, 3.0, 0.1, 10.0, 0.02, 1.0, 30.0, 0.05]):
        grads = {name: grad_scale * rng.standard_normal(p.shape) for name, p in params.items()}
        lr = schedule(step)
        stats = optim.step(params, grads, state, lr, config)

        for name, p in tparams.items():
            p.grad = torch.tensor(grads[name])
        if grad_clip:
            total_norm = torch.nn.utils.clip_grad_norm_(list(tparams.values()), max_norm=grad_clip)
            assertions.assert_close(stats["grad_norm"], total_norm.item(), rtol=1e-13)  # one norm, few ulps
        for group in torch_optimizer.param_groups:
            group["lr"] = lr
        torch_optimizer.step()

        # sqrt(v / b2) vs sqrt(v) / sqrt(b2), and m's update order: a few ulps of the step,
        # which is <= lr; accumulated over eight steps it stays below 1e-12 of the parameters
        for name, p in tparams.items():
            assert_close(params[name], p, rtol=1e-12, name=f"{name} after step {step + 1}")
            moments = torch_optimizer.state[p]
            assert_close(state.m[name], moments["exp_avg"], rtol=1e-12, name=f"m {name} after step {step + 1}")
            assert_close(state.v[name], moments["exp_avg_sq"], rtol=1e-12, name=f"v {name} after step {step + 1}")
