"""The assembled model: presets, recompute, causality, dtype, and its error messages."""

import math
from decimal import Decimal

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from assertions import assert_close, assert_differ, assert_same
from npllama import model
from npllama import params as params_table
from npllama.model import LlamaConfig
from strategies import rng_from, seeds, small_model_configs


def random_batch(config, batch, seq, seed):
    rng = rng_from(seed)
    return rng.integers(0, config.vocab_size, (batch, seq)), rng.integers(0, config.vocab_size, (batch, seq))


@pytest.mark.parametrize("name, billions", [("7B", 6.7), ("13B", 13.0), ("33B", 32.5), ("65B", 65.2)])
def test_paper_presets_have_the_papers_parameter_counts(name, billions):
    # the paper rounds to one decimal: 6.7B is 6.65 .. 6.75B, well inside 1%
    assert model.PRESETS[name].n_params() / 1e9 == pytest.approx(billions, rel=0.01)


def test_the_gpu_benchmark_preset_is_gpt2_smalls_size_in_llamas_shape():
    config = model.PRESETS["134M"]
    assert (config.dim, config.n_layers, config.n_heads, config.head_dim, config.ffn_dim) == (768, 12, 12, 64, 2048)
    assert (config.vocab_size, config.max_seq_len, config.n_params()) == (32000, 1024, 134_105_856)


def test_7b_preset_matches_metas_shapes():
    config = model.PRESETS["7B"]
    assert (config.dim, config.n_layers, config.n_heads, config.head_dim, config.ffn_dim) == (4096, 32, 32, 128, 11008)
    assert config.n_params() == 6_738_415_616  # the count Meta's 7B checkpoint holds


def test_ffn_width_follows_metas_rule():
    assert [model.PRESETS[n].ffn_dim for n in ("7B", "13B", "33B", "65B")] == [11008, 13824, 17920, 22016]


def test_an_explicit_hidden_dim_sets_the_ffn_width_and_the_shapes_of_w1_w2_w3():
    config = model.LlamaConfig(dim=8, n_layers=1, n_heads=2, vocab_size=11, multiple_of=4, hidden_dim=13)
    shapes = params_table.parameter_shapes(config)
    assert config.ffn_dim == 13 and model.LlamaConfig(dim=8, n_layers=1, n_heads=2, multiple_of=4).ffn_dim == 24
    assert (shapes["layers.0.feed_forward.w1.weight"], shapes["layers.0.feed_forward.w2.weight"],
            shapes["layers.0.feed_forward.w3.weight"]) == ((13, 8), (8, 13), (13, 8))
    params = model.init_params(config, dtype="float64")
    tokens = numpy.random.default_rng(0).integers(0, 11, (2, 5))
    loss, grads = model.loss_and_grads(params, config, tokens, tokens)
    assert math.isfinite(loss) and all(grads[name].shape == p.shape for name, p in params.items())


def test_a_config_written_without_hidden_dim_is_the_config_of_before_and_one_with_it_round_trips():
    assert "hidden_dim" not in model.PRESETS["7B"].to_dict()  # configs files of default widths are unchanged
    config = model.LlamaConfig(dim=8, n_layers=1, n_heads=2, vocab_size=11, hidden_dim=13)
    assert model.LlamaConfig(**config.to_dict()) == config


@pytest.mark.parametrize("hidden_dim", [0, -3, 2.5, True])
def test_a_hidden_dim_that_is_not_a_positive_integer_is_refused(hidden_dim):
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer"):
        model.LlamaConfig(dim=8, n_layers=1, n_heads=2, hidden_dim=hidden_dim)


def test_parameter_names_and_shapes_are_metas():
    config = model.PRESETS["nano"]
    params = model.init_params(config)
    assert set(params) == set(params_table.parameter_shapes(config))
    assert params["layers.1.feed_forward.w2.weight"].shape == (config.dim, config.ffn_dim)  # [out, in]
    assert params["output.weight"].shape == (config.vocab_size, config.dim)
    assert sum(p.size for p in params.values()) == config.n_params()
    assert all(p.dtype == numpy.float32 for p in params.values())


@pytest.mark.parametrize("kwargs, message", [
    ({"dim": 10, "n_heads": 3}, "not divisible"),
    ({"dim": 6, "n_heads": 2}, "must be even"),
    ({"n_layers": 0}, "positive integer"),
    ({"norm_eps": 0.0}, "must be a positive finite number"),
    ({"rope_theta": True}, "rope_theta must be a positive finite number, got True"),
    ({"rope_theta": "10000"}, "rope_theta must be a positive finite number"),
    ({"norm_eps": float("nan")}, "norm_eps must be a positive finite number"),
])
def test_bad_configs_are_rejected_with_a_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**kwargs)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*nano"):
        model.get_preset("huge")


def test_a_sequence_longer_than_max_seq_len_is_rejected():
    config = model.PRESETS["nano"]
    with pytest.raises(ValueError, match="exceeds max_seq_len 128"):
        model.forward(model.init_params(config), config, numpy.zeros((1, 129), dtype=int))


@pytest.mark.parametrize("bad_id", [-1, 512])
def test_token_ids_outside_the_vocabulary_are_rejected(bad_id):
    config = model.PRESETS["nano"]
    tokens = numpy.array([[1, 2, bad_id]])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        model.forward(model.init_params(config), config, tokens)


@given(config=small_model_configs(), batch=st.integers(1, 3), seq=st.integers(1, 12), seed=seeds,
       tile_size=st.integers(1, 6))
def test_recompute_on_and_off_give_bitwise_identical_gradients(config, batch, seq, seed, tile_size):
    params = model.init_params(config, seed=seed % 1000, dtype="float32")
    tokens, targets = random_batch(config, batch, seq, seed)
    loss_on, grads_on = model.loss_and_grads(params, config, tokens, targets, recompute=True, tile_size=tile_size)
    loss_off, grads_off = model.loss_and_grads(params, config, tokens, targets, recompute=False, tile_size=tile_size)
    assert math.isfinite(loss_on) and loss_on == loss_off
    for name in params:
        assert_same(grads_on[name], grads_off[name], err_msg=name)


@given(config=small_model_configs(), batch=st.integers(1, 3), seq=st.integers(1, 12), seed=seeds,
       rows_per_chunk=st.integers(1, 7), ignored_share=st.sampled_from([0.0, 0.5, 1.0]))
def test_the_head_run_in_chunks_of_rows_gives_the_whole_batchs_loss_and_gradients(
        config, batch, seq, seed, rows_per_chunk, ignored_share):
    params = model.init_params(config, seed=seed % 1000, dtype="float64")
    tokens, targets = random_batch(config, batch, seq, seed)
    targets = numpy.where(rng_from(seed + 1).random(targets.shape) < ignored_share, -100, targets)
    whole = model.loss_and_grads(params, config, tokens, targets)
    whole_loss = model.loss(params, config, tokens, targets)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "HEAD_CHUNK_ELEMENTS", rows_per_chunk * config.vocab_size)
        chunked_loss, chunked_grads = model.loss_and_grads(params, config, tokens, targets)
        chunked_eval_loss = model.loss(params, config, tokens, targets)
    # float64, and the chunks change only the order in which the loss and the output weight's
    # gradient add their terms: a few roundings of 1e-16 each
    assert_close(chunked_loss, whole[0], rtol=1e-12, atol=1e-15)
    assert_close(chunked_eval_loss, whole_loss, rtol=1e-12, atol=1e-15)
    for name in params:
        assert_close(chunked_grads[name], whole[1][name], rtol=1e-10, atol=1e-15, err_msg=name)


def test_recompute_keeps_only_the_expensive_activations():
    config = model.PRESETS["nano"]
    params = model.init_params(config)
    x = rng_from(0).standard_normal((2, 8, config.dim)).astype(numpy.float32)
    cos, sin = model.rope_tables(config, 8, numpy.float32, numpy)
    weights = params_table.layer_weights(params, 0)
    _, kept = model.block_forward(weights, x, cos, sin, config, recompute=True)
    assert set(kept.activations) == {"x", "attn_out", "h", "a", "b"}
    assert set(kept.ops) == {"rope_q", "rope_k", "attention"}
    _, everything = model.block_forward(weights, x, cos, sin, config, recompute=False)
    assert everything.activations is None and set(everything.ops) > set(kept.ops)
    # (B, T, C)-sized arrays kept: x, attn_out, h and attention's q, k, v; (B, T, F): a, b.
    # The recomputed RMSNorms, SwiGLU and the linears' inputs would add three of each more.
    kept_bytes = sum(array.nbytes for array in distinct_arrays(kept))
    activation = x.nbytes
    ffn_activation = activation * config.ffn_dim // config.dim
    lse_bytes = 2 * config.n_heads * 8 * 4
    assert kept_bytes == 6 * activation + 2 * ffn_activation + lse_bytes + cos.nbytes + sin.nbytes


def distinct_arrays(block_cache):
    """Every array a BlockCache holds, each counted once however many caches share it."""
    import dataclasses

    found = {}
    pending = [block_cache]
    while pending:
        item = pending.pop()
        if isinstance(item, numpy.ndarray):
            root = item if item.base is None else item.base
            found[id(root)] = root
        elif dataclasses.is_dataclass(item):
            pending.extend(getattr(item, field.name) for field in dataclasses.fields(item))
        elif isinstance(item, dict):
            pending.extend(item.values())
    return list(found.values())


@given(config=small_model_configs(), seq=st.integers(2, 12), position=st.integers(0, 10), seed=seeds)
def test_model_is_causal(config, seq, position, seed):
    """Changing the tokens after position t changes no logit at or before t."""
    position = min(position, seq - 2)
    params = model.init_params(config, seed=seed % 1000, dtype="float64", std=0.5)
    tokens, _ = random_batch(config, 2, seq, seed)
    changed = tokens.copy()
    changed[:, position + 1:] = (changed[:, position + 1:] + 1) % config.vocab_size
    before = model.forward(params, config, tokens, tile_size=3)
    after = model.forward(params, config, changed, tile_size=3)
    assert_same(after[:, :position + 1], before[:, :position + 1])
    if config.vocab_size > 1:
        assert_differ(after[:, position + 1:], before[:, position + 1:])


def test_initial_loss_is_close_to_log_vocab():
    """Small initial weights give nearly uniform predictions: the loss starts at about ln V."""
    config = model.PRESETS["nano"]
    params = model.init_params(config)
    tokens, targets = random_batch(config, 4, 32, 0)
    assert model.loss(params, config, tokens, targets) == pytest.approx(math.log(config.vocab_size), rel=0.01)


def test_float32_gradients_agree_with_float64():
    """The float32 path computes the same function: gradients agree to float32 precision."""
    config = model.PRESETS["nano"]
    params64 = model.init_params(config, dtype="float64")
    params32 = {name: p.astype(numpy.float32) for name, p in params64.items()}
    tokens, targets = random_batch(config, 2, 16, 1)
    loss64, grads64 = model.loss_and_grads(params64, config, tokens, targets)
    loss32, grads32 = model.loss_and_grads(params32, config, tokens, targets)
    assert_close(loss32, loss64, rtol=1e-5)
    for name in params64:
        assert grads32[name].dtype == numpy.float32
        # norm-wise: float32 rounding (~6e-8) grown by a few hundred operations in sequence
        scale = numpy.abs(grads64[name]).max()
        assert numpy.abs(grads32[name] - grads64[name]).max() <= 1e-4 * scale, name


def test_gradient_descent_on_one_batch_lowers_the_loss():
    config = model.PRESETS["nano"]
    params = model.init_params(config, dtype="float64")
    tokens, targets = random_batch(config, 2, 16, 2)
    loss0, grads = model.loss_and_grads(params, config, tokens, targets)
    stepped = {name: p - 0.5 * grads[name] for name, p in params.items()}
    assert model.loss(stepped, config, tokens, targets) < loss0


def test_preset_table_reports_the_7b_model_as_6_7b_parameters():
    import subprocess
    import sys

    table = subprocess.run([sys.executable, "-m", "npllama.presets"], capture_output=True, text=True, check=True).stdout
    row = next(line for line in table.splitlines() if line.startswith("7B "))
    assert "6.7B (6,738,415,616)" in row


@st.composite
def preset_tables(draw):
    """{name: LlamaConfig} of any sizes, from a few thousand parameters to hundreds of billions."""
    configs = {}
    for name in draw(st.lists(st.text("abcXYZ0123456789", min_size=1, max_size=7), min_size=1, max_size=4,
                              unique=True)):
        n_heads = draw(st.integers(1, 64))
        configs[name] = LlamaConfig(dim=n_heads * 2 * draw(st.integers(1, 128)), n_layers=draw(st.integers(1, 96)),
                                    n_heads=n_heads, vocab_size=draw(st.integers(2, 256_000)),
                                    multiple_of=draw(st.sampled_from([1, 32, 256])))
    return configs


@given(preset_tables())
def test_the_preset_table_has_a_row_per_preset_with_its_shape_and_its_count_exact_and_rounded(configs):
    from npllama.presets import describe_presets

    header, *rows = describe_presets(configs).splitlines()
    assert header.split() == ["preset", "dim", "layers", "heads", "ffn", "vocab", "params"]
    assert len(rows) == len(configs)
    for row, (name, config) in zip(rows, configs.items()):
        cells = row.split()
        count = config.n_params()
        assert cells[:6] == [name, str(config.dim), str(config.n_layers), str(config.n_heads), str(config.ffn_dim),
                             str(config.vocab_size)]
        assert int(cells[7].strip("()").replace(",", "")) == count
        rounded, unit = Decimal(cells[6][:-1]), cells[6][-1]
        # billions with one decimal from 10^9 parameters, millions with two below: within half the last digit
        # (in exact decimals: a count that ends in exactly half a digit may round either way)
        assert unit == ("B" if count >= 10**9 else "M")
        assert abs(rounded * (10**9 if unit == "B" else 10**6) - count) <= (5 * 10**7 if unit == "B" else 5000)


def test_the_preset_command_reads_its_own_arguments_not_the_callers(monkeypatch, capsys):
    from npllama import presets

    monkeypatch.setattr("sys.argv", ["npllama-presets", "--not-an-option"])  # a caller's own command line
    assert presets.main([]) == 0
    assert capsys.readouterr().out.strip() == presets.describe_presets()


@given(config=small_model_configs(), seq=st.integers(2, 14), prompt=st.integers(1, 13), seed=seeds,
       tile_size=st.integers(1, 5))
def test_kv_cache_decoding_gives_the_logits_of_a_full_forward(config, seq, prompt, seed, tile_size):
    """Prompt in one call, then one token per call: every position's logits equal the full pass."""
    prompt = min(prompt, seq - 1)
    params = model.init_params(config, seed=seed % 1000, dtype="float64", std=0.5)
    tokens, _ = random_batch(config, 2, seq, seed)
    full = model.forward(params, config, tokens, tile_size=tile_size)
    cache = model.init_kv_cache(config, batch=2, max_len=seq, dtype="float64")
    pieces = [model.forward(params, config, tokens[:, :prompt], tile_size=tile_size, kv_cache=cache)]
    for t in range(prompt, seq):
        pieces.append(model.forward(params, config, tokens[:, t:t + 1], tile_size=tile_size, kv_cache=cache))
    assert cache.length == seq
    assert cache.keys[0].shape == (2, config.n_kv_heads, seq, config.head_dim)  # key/value heads only
    # the same sums, only split differently across tiles: float64 agrees to ~1e-15 relative
    assert_close(numpy.concatenate(pieces, axis=1), full, rtol=1e-11, atol=1e-12)


@given(config=small_model_configs(), seq=st.integers(1, 9), seed=seeds)
def test_only_last_gives_the_last_positions_logits_with_or_without_a_cache(config, seq, seed):
    params = model.init_params(config, seed=seed % 1000, dtype="float64", std=0.5)
    tokens, _ = random_batch(config, 2, seq, seed)
    full = model.forward(params, config, tokens)
    last = model.forward(params, config, tokens, only_last=True)
    assert last.shape == (2, 1, config.vocab_size)
    assert_close(last, full[:, -1:], rtol=1e-12, atol=1e-13)  # one matrix product fewer rows: same sums
    cache = model.init_kv_cache(config, batch=2, max_len=seq, dtype="float64")
    assert_close(model.forward(params, config, tokens, kv_cache=cache, only_last=True), last, rtol=1e-12, atol=1e-13)
    assert cache.length == seq


def test_kv_cache_overflow_is_refused():
    config = model.PRESETS["nano"]
    cache = model.init_kv_cache(config, batch=1, max_len=4)
    params = model.init_params(config)
    model.forward(params, config, numpy.zeros((1, 3), dtype=int), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 4 positions; 3 used, 2 more"):
        model.forward(params, config, numpy.zeros((1, 2), dtype=int), kv_cache=cache)


@pytest.mark.parametrize("module", ["train", "generate", "audit", "tokenizer", "presets", "eval", "eval.datasets",
                                    "convert"])
def test_every_command_answers_help_with_its_usage(module):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", f"npllama.{module}", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m npllama.{module}"), result.stdout[:200]
