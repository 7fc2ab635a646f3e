"""Hypothesis strategies named after what they draw, shared by the test modules."""

import numpy
from hypothesis import strategies as st

from npllama.ops.rope import RopeScaling

seeds = st.integers(min_value=0, max_value=2**32 - 1)
batch_sizes = st.integers(min_value=1, max_value=3)
seq_lens = st.integers(min_value=1, max_value=19)  # includes T = 1 and odd lengths
head_counts = st.integers(min_value=1, max_value=4)
head_dims = st.integers(min_value=1, max_value=32).map(lambda half: 2 * half)  # even, 2 .. 64
model_dims = st.integers(min_value=1, max_value=24)
value_scales = st.sampled_from([0.1, 1.0, 3.0])
# attention's score scale s in softmax(s Q K^T): None is the default 1/sqrt(D); the others are
# what a caller may pass (temperature, another convention), so backward must use the one given
softmax_scales = st.sampled_from([None, 0.05, 0.7, 2.0])


def rng_from(seed):
    return numpy.random.default_rng(seed)


@st.composite
def attention_problems(draw):
    """(batch, heads, seq, head_dim, tile_size): shapes for causal attention."""
    batch, heads, seq, head_dim = draw(batch_sizes), draw(head_counts), draw(seq_lens), draw(head_dims)
    tile_size = draw(st.integers(min_value=1, max_value=seq + 2))
    return batch, heads, seq, head_dim, tile_size


@st.composite
def grouped_attention_problems(draw):
    """(batch, n_kv_heads, group, seq, head_dim, tile_size): grouped-query attention, the
    n_kv_heads * group query heads sharing key/value heads in groups of `group` (>= 2; 1 is
    multi-head attention, which attention_problems draws); n_kv_heads = 1 is multi-query."""
    batch, seq, head_dim = draw(batch_sizes), draw(seq_lens), draw(head_dims)
    n_kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(2, 3))
    tile_size = draw(st.integers(min_value=1, max_value=seq + 2))
    return batch, n_kv_heads, group, seq, head_dim, tile_size


# RMSNorm epsilons: Meta's 1e-6, Hugging Face's 1e-5, and two large enough that a path which
# silently used another epsilon than the config's would change the numbers well beyond rounding
norm_epsilons = st.sampled_from([1e-6, 1e-5, 1e-3, 0.1])


# RoPE scaling: none, linear, and llama3 over an original context of 16 positions, so that with
# theta 100 or 10000 and head dims 2-6 some frequencies are kept, some divided, some blended
rope_scalings = st.sampled_from([
    None, RopeScaling("linear", factor=2.0),
    RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)])


@st.composite
def small_model_configs(draw):
    """A LlamaConfig small enough to difference: 1-2 layers, 1-3 heads of even dim 2-6, sharing one
    key/value head or each with its own, the output head tied to the embedding or not, RoPE scaled
    or not."""
    from npllama.model import LlamaConfig

    n_heads = draw(st.integers(1, 3))
    n_kv_heads = draw(st.sampled_from([1, n_heads]))  # multi-query or multi-head (the same for n_heads 1)
    head_dim = 2 * draw(st.integers(1, 3))
    return LlamaConfig(dim=n_heads * head_dim, n_layers=draw(st.integers(1, 2)), n_heads=n_heads,
                       n_kv_heads=n_kv_heads, tie_embeddings=draw(st.booleans()),
                       rope_scaling=draw(rope_scalings),
                       vocab_size=draw(st.integers(2, 11)), multiple_of=draw(st.sampled_from([1, 4, 8])),
                       max_seq_len=16, rope_theta=draw(st.sampled_from([100.0, 10000.0])),
                       norm_eps=draw(norm_epsilons))
