"""Every backward equals finite differences of its forward, over drawn shapes, values and seeds.

Tolerance: `gradcheck.DEFAULT_RTOL` = 1e-6 norm-wise relative error. In float64 the fourth-order
differences themselves are accurate to about 1e-10 relative (the audit shows 1e-13 .. 1e-10),
so 1e-6 leaves four orders of magnitude of margin, while a wrong or missing term in a backward
gives errors of order 1.
"""

import numpy
from hypothesis import given
from hypothesis import strategies as st

from npllama.audit import gradcheck
from npllama.audit import ops as audit
from npllama.ops import attention, cross_entropy, embedding, linear, rmsnorm, rope, swiglu
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
    value_scales,
)


def assert_all_pass(results):
    failures = [r for r in results if not r.passed]
    assert not failures, "\n" + audit.format_table(results)


@given(batch=batch_sizes, seq=seq_lens, vocab=st.integers(1, 9), dim=model_dims, seed=seeds)
def test_embedding_backward_matches_finite_differences(batch, seq, vocab, dim, seed):
    rng = rng_from(seed)
    ids = rng.integers(0, vocab, (batch, seq))  # a small vocab makes repeated ids the norm
    results = gradcheck.check_op("embedding", lambda weight: embedding.forward(ids, weight), embedding.backward,
                                 {"weight": rng.standard_normal((vocab, dim))}, ["weight"], rng)
    assert_all_pass(results)


@given(batch=batch_sizes, seq=seq_lens, n_in=model_dims, n_out=model_dims, scale=value_scales, seed=seeds)
def test_linear_backward_matches_finite_differences(batch, seq, n_in, n_out, scale, seed):
    rng = rng_from(seed)
    inputs = {"x": scale * rng.standard_normal((batch, seq, n_in)), "weight": rng.standard_normal((n_out, n_in))}
    assert_all_pass(gradcheck.check_op("linear", linear.forward, linear.backward, inputs, ["x", "weight"], rng))


@given(batch=batch_sizes, seq=seq_lens, dim=model_dims, scale=value_scales, seed=seeds,
       eps=st.sampled_from([1e-6, 1e-5, 1e-2]))
def test_rmsnorm_backward_matches_finite_differences(batch, seq, dim, scale, seed, eps):
    rng = rng_from(seed)
    inputs = {"x": scale * rng.standard_normal((batch, seq, dim)), "weight": rng.standard_normal(dim)}
    results = gradcheck.check_op("rmsnorm", lambda x, weight: rmsnorm.forward(x, weight, eps), rmsnorm.backward,
                                 inputs, ["x", "weight"], rng)
    assert_all_pass(results)


@given(batch=batch_sizes, seq=seq_lens, heads=head_counts, head_dim=head_dims, start=st.integers(0, 5000),
       theta=st.sampled_from([10.0, 10000.0, 500000.0]), seed=seeds)
def test_rope_backward_matches_finite_differences(batch, seq, heads, head_dim, start, theta, seed):
    rng = rng_from(seed)
    cos, sin = rope.frequencies(head_dim, numpy.arange(start, start + seq), theta)
    results = gradcheck.check_op("rope", lambda x: rope.forward(x, cos, sin), rope.backward,
                                 {"x": rng.standard_normal((batch, seq, heads, head_dim))}, ["x"], rng)
    assert_all_pass(results)


@given(batch=batch_sizes, seq=seq_lens, width=model_dims, scale=value_scales, seed=seeds)
def test_swiglu_backward_matches_finite_differences(batch, seq, width, scale, seed):
    rng = rng_from(seed)
    inputs = {"a": 3 * scale * rng.standard_normal((batch, seq, width)),
              "b": rng.standard_normal((batch, seq, width))}
    assert_all_pass(gradcheck.check_op("swiglu", swiglu.forward, swiglu.backward, inputs, ["a", "b"], rng))


@given(problem=attention_problems(), scale=value_scales, softmax_scale=softmax_scales, seed=seeds)
def test_attention_backward_matches_finite_differences(problem, scale, softmax_scale, seed):
    batch, heads, seq, head_dim, tile_size = problem
    rng = rng_from(seed)
    inputs = {name: scale * rng.standard_normal((batch, heads, seq, head_dim)) for name in ("q", "k", "v")}
    results = gradcheck.check_op("attention",
                                 lambda q, k, v: attention.forward(q, k, v, tile_size, scale=softmax_scale),
                                 attention.backward, inputs, ["q", "k", "v"], rng, max_elements=24)
    assert_all_pass(results)


@given(problem=grouped_attention_problems(), scale=value_scales, seed=seeds)
def test_grouped_query_attention_backward_matches_finite_differences(problem, scale, seed):
    """dK and dV of a key/value head shared by a group of query heads: the sums over the group."""
    batch, n_kv_heads, group, seq, head_dim, tile_size = problem
    rng = rng_from(seed)
    inputs = {"q": scale * rng.standard_normal((batch, n_kv_heads * group, seq, head_dim)),
              "k": scale * rng.standard_normal((batch, n_kv_heads, seq, head_dim)),
              "v": scale * rng.standard_normal((batch, n_kv_heads, seq, head_dim))}
    results = gradcheck.check_op("attention", lambda q, k, v: attention.forward(q, k, v, tile_size),
                                 attention.backward, inputs, ["q", "k", "v"], rng, max_elements=24)
    assert_all_pass(results)


@given(rows=st.integers(1, 12), vocab=st.integers(1, 40), scale=value_scales, seed=seeds,
       ignored_share=st.sampled_from([0.0, 0.3]))
def test_cross_entropy_backward_matches_finite_differences(rows, vocab, scale, seed, ignored_share):
    rng = rng_from(seed)
    targets = rng.integers(0, vocab, rows)
    targets[rng.random(rows) < ignored_share] = -100
    results = gradcheck.check_op("cross_entropy", lambda logits: cross_entropy.forward(logits, targets),
                                 cross_entropy.backward, {"logits": 3 * scale * rng.standard_normal((rows, vocab))},
                                 ["logits"], rng)
    assert_all_pass(results)


@given(config=small_model_configs(), batch=st.integers(1, 2), seq=st.integers(1, 9), seed=seeds,
       recompute=st.booleans())
def test_model_gradients_match_finite_differences(config, batch, seq, seed, recompute):
    assert_all_pass(audit.audit_model(seed, numpy, config=config, batch=batch, seq=seq, recompute=recompute))
